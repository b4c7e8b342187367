"""LocalCatalog: commits, drops, quotas and tenancy wired together, on a real LanceDB index."""

from __future__ import annotations

import pytest

from kvshare.catalog import LocalCatalog
from kvshare.config import KVShareConfig
from kvshare.storage.index import IndexEntry, new_entry_id

MODEL = "smollm2-test"
KV_BYTES_PER_TOKEN = 100
REPORT = (
    "Quarterly report for Northwind Traders. Revenue grew 12% to $4.1M while costs fell "
    "3%. The board approved the new warehouse in Lyon and asked the CFO to present the "
    "hiring plan for the logistics team at the next meeting. Summarise the key risks."
)


def config_for(tmp_path, **values) -> KVShareConfig:
    return KVShareConfig(home=str(tmp_path), **values)


def entry(catalog, tokenizer, text: str, tenant: str) -> IndexEntry:
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return IndexEntry(entry_id=new_entry_id(), model_id=MODEL, scope=tenant,
                      embedding=catalog.embedder.embed([text])[0], token_ids=token_ids,
                      text_preview=text[:40], chunk_keys=[])


def reused(catalog, tokenizer, text: str, tenant: str) -> int:
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return catalog.lookup(MODEL, text, token_ids, tenant).plan.reused_tokens


@pytest.fixture
def open_catalog(tmp_path, wordllama):
    opened = []

    def open_(**values) -> LocalCatalog:
        catalog = LocalCatalog(config_for(tmp_path, **values), embedder=wordllama)
        opened.append(catalog)
        return catalog

    yield open_
    for catalog in opened:
        catalog._writes.shutdown(wait=True)


def test_a_commit_over_quota_drops_the_tenants_oldest_entries_only(open_catalog, tokenizer):
    tokens = len(tokenizer(REPORT + " 0", add_special_tokens=False)["input_ids"])
    catalog = open_catalog(tenant_quota_bytes=2 * tokens * KV_BYTES_PER_TOKEN + 10)
    neighbour = entry(catalog, tokenizer, REPORT + " 9", "globex")
    catalog.commit([neighbour], KV_BYTES_PER_TOKEN)
    first, second, third = (entry(catalog, tokenizer, f"{REPORT} {i}", "acme")
                            for i in range(3))
    catalog.commit([first], KV_BYTES_PER_TOKEN)
    catalog.commit([second], KV_BYTES_PER_TOKEN)
    catalog.commit([third], KV_BYTES_PER_TOKEN)
    held = {e.entry_id for e in catalog.index.entries()}
    assert first.entry_id not in held
    assert {second.entry_id, third.entry_id, neighbour.entry_id} <= held
    assert catalog.quotas.usage()["acme"] <= catalog.config.tenant_quota_bytes


def test_quotas_and_groups_hold_after_a_restart(open_catalog, tokenizer):
    groups = {"partners": ["acme", "initech"]}
    catalog = open_catalog(tenancy="groups", tenant_groups=groups)
    catalog.commit([entry(catalog, tokenizer, REPORT, "acme")], KV_BYTES_PER_TOKEN)
    catalog.close()
    reopened = open_catalog(tenancy="groups", tenant_groups=groups, tenant_quota_bytes=1)
    # The lowered quota drops the entry at open: nothing is left to reuse, for anybody.
    assert len(reopened.index) == 0 and reopened.quotas.usage().get("acme", 0) == 0
    reopened.commit([entry(reopened, tokenizer, REPORT, "acme")], KV_BYTES_PER_TOKEN)
    assert len(reopened.index) == 0  # one entry alone over the quota is refused


def test_groups_share_and_isolation_holds_for_others(open_catalog, tokenizer):
    catalog = open_catalog(tenancy="groups", tenant_groups={"partners": ["acme", "initech"]},
                           share_public_scope=False)
    catalog.commit([entry(catalog, tokenizer, REPORT, "acme")], KV_BYTES_PER_TOKEN)
    similar = REPORT.replace("Northwind Traders", "Contoso Ltd")
    assert reused(catalog, tokenizer, similar, "initech") > 0
    assert reused(catalog, tokenizer, similar, "globex") == 0


def test_dropped_entries_leave_quota_usage(open_catalog, tokenizer):
    catalog = open_catalog()
    kept, gone = (entry(catalog, tokenizer, f"{REPORT} {i}", "acme") for i in range(2))
    catalog.commit([kept, gone], KV_BYTES_PER_TOKEN)
    before = catalog.quotas.usage()["acme"]
    catalog.drop([gone.entry_id])
    assert catalog.quotas.usage()["acme"] == before - gone.num_tokens * KV_BYTES_PER_TOKEN
    assert [e.entry_id for e in catalog.index.entries()] == [kept.entry_id]
