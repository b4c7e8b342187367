"""``kvshare inspect plan`` claims what the connector claims, on a real engine.

The strict engine has vLLM's prefix caching off, so vLLM's own hit is always 0, which is
what ``inspect plan`` assumes. The inspect side reads the engine's index from LanceDB
through the command line, with a config naming the engine's home and model.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from kvshare.cli import main
from kvshare.model_assets import SMOLLM2_ALIAS, resolve_model_dir

pytestmark = pytest.mark.engine

DURABLE_WITHIN_S = 60.0
"""How long an entry may take to reach LanceDB after its request finished (the connector
commits it once the worker confirms the chunks, then flushes in the background)."""


@pytest.fixture
def inspect_config(strict_engine, tmp_path) -> str:
    """A kvshare config for ``kvshare inspect`` describing the strict engine's connector."""
    path = tmp_path / "kvshare.yaml"
    path.write_text(yaml.safe_dump({
        "home": str(strict_engine.home), "model": str(resolve_model_dir(SMOLLM2_ALIAS)),
        "cpu_bytes": 0, "disk_dir": str(strict_engine.chunk_dir),
        "share_public_scope": False, "strict_prefix_cache": True,
    }))
    return str(path)


def inspect(capsys, config: str, *argv: str):
    assert main(["--config", config, "inspect", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def wait_until_durable(capsys, config: str, tenant: str, num_tokens: int) -> dict:
    """The tenant's entry of ``num_tokens`` tokens, once LanceDB holds it."""
    deadline = time.monotonic() + DURABLE_WITHIN_S
    while True:
        rows = inspect(capsys, config, "list", "--scope", tenant)
        found = [row for row in rows if row["num_tokens"] == num_tokens]
        if found:
            return found[0]
        assert time.monotonic() < deadline, (
            f"no {num_tokens}-token entry of tenant {tenant!r} in LanceDB after "
            f"{DURABLE_WITHIN_S:.0f} s; entries seen: {rows}")
        time.sleep(0.2)  # poll interval, not synchronisation: the loop checks the state


def plan_for(capsys, config: str, token_ids: list[int], tenant: str, tmp_path) -> dict:
    ids_file = tmp_path / f"ids-{tenant}.json"
    ids_file.write_text(json.dumps(token_ids))
    return inspect(capsys, config, "plan", "--token-ids", str(ids_file), "--tenant", tenant)


def test_inspect_plan_claims_what_the_connector_claims(strict_engine, report_tokens,
                                                       inspect_config, capsys, tmp_path):
    tenant = "inspect-agrees"
    base = report_tokens[60:60 + 400]
    strict_engine.run(base, tenant)
    entry = wait_until_durable(capsys, inspect_config, tenant, len(base))
    assert entry["model_id"] == strict_engine.model_id
    assert entry["depth"] == 0 and entry["exact_tokens"] == len(base)

    edited = base[:150] + report_tokens[600:604] + base[154:]
    plan = plan_for(capsys, inspect_config, edited, tenant, tmp_path)
    assert plan["model_id"] == strict_engine.model_id
    assert plan["claim_tokens"] > 0 and plan["claim_planned_reuse"] > 0

    report = strict_engine.run(edited, tenant).kv_transfer_params["kvshare"]
    assert report["claimed"] == plan["claim_tokens"]
    assert not report["fallback"] and report["loaded"] >= plan["claim_planned_reuse"]
    assert report["reused"] == plan["claim_expected_reused"]


def test_inspect_plan_claims_nothing_where_the_connector_claims_nothing(
        strict_engine, report_tokens, inspect_config, capsys, tmp_path):
    prompt = report_tokens[60:60 + 400]  # stored by others, never in this tenant
    plan = plan_for(capsys, inspect_config, prompt, "inspect-agrees-empty", tmp_path)
    assert plan["claim_tokens"] == plan["claim_expected_reused"] == 0
    out = strict_engine.run(prompt, "inspect-agrees-empty")
    assert (out.kv_transfer_params or {}).get("kvshare") is None
