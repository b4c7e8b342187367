"""Config layering and errors: every bad key or value is named in the message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kvshare.config import ConfigError, KVShareConfig

REPO = Path(__file__).resolve().parents[1]


def test_defaults_match_the_shipped_default_yaml():
    shipped = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    assert KVShareConfig.from_dict(shipped) == KVShareConfig()


def test_layering_file_then_overrides_then_environment(tmp_path):
    path = tmp_path / "kvshare.yaml"
    path.write_text("top_k: 3\nrho: 0.3\nmin_run_tokens: 4\n")
    config = KVShareConfig.load(
        environ={"KVSHARE_CONFIG": str(path), "KVSHARE_RHO": "0.5", "KVSHARE_CHECK_LAYERS": "1,2"},
        overrides={"top_k": 5, "rho": 0.4},
    )
    assert config.min_run_tokens == 4  # from the file
    assert config.top_k == 5  # override beats file
    assert config.rho == 0.5  # environment beats everything
    assert config.check_layers == [1, 2]


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "kvshare.yaml"
    path.write_text("top_kk: 3\n")
    with pytest.raises(ConfigError, match="'top_kk'"):
        KVShareConfig.load(path, environ={})


def test_unknown_environment_key_is_named():
    with pytest.raises(ConfigError, match="'chunk_size'"):
        KVShareConfig.load(environ={"KVSHARE_CHUNK_SIZE": "256"})


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("top_k", "many", "top_k='many'"),
        ("top_k", 0, "top_k=0"),
        ("rho", 1.5, "rho=1.5"),
        ("rho_mass", -0.1, "rho_mass=-0.1"),
        ("rho_max", 0.01, "rho_max=0.01"),  # below rho_min
        ("share_public_scope", "maybe", "share_public_scope='maybe'"),
        ("compression", "lz4", "compression='lz4'"),
        ("redis_url", "localhost:6379", "redis_url='localhost:6379'"),
        ("check_layers", [-1], "check_layers=[-1]"),
        ("min_reuse_fraction", True, "min_reuse_fraction=True"),
        ("recompute_tail_tokens", -1, "recompute_tail_tokens=-1"),
        ("tenancy", "shared", "tenancy='shared'"),
        ("popular_min_tenants", 1, "popular_min_tenants=1"),
        ("tenant_groups", {"g": 5}, "tenant_groups"),
        ("mode", "cluster", "mode='cluster'"),
        ("daemon_address", "localhost:7400", "daemon_address='localhost:7400'"),
        ("disk_compression", "lz4", "disk_compression='lz4'"),
    ],
)
def test_bad_values_are_named(key, value, fragment):
    with pytest.raises(ConfigError) as excinfo:
        KVShareConfig.from_dict({key: value})
    assert fragment in str(excinfo.value)


def test_missing_or_malformed_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        KVShareConfig.load(tmp_path / "nope.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        KVShareConfig.load(bad, environ={})


def test_environment_strings_are_coerced():
    config = KVShareConfig.load(environ={
        "KVSHARE_TOP_K": "12", "KVSHARE_SHARE_PUBLIC_SCOPE": "false", "KVSHARE_CPU_BYTES": "1_000",
    })
    assert (config.top_k, config.share_public_scope, config.cpu_bytes) == (12, False, 1000)


def test_tcp_needs_a_secret_and_never_prints_it():
    with pytest.raises(ConfigError, match="daemon_secret") as excinfo:
        KVShareConfig(daemon_address="tcp://10.0.0.5:7400")
    assert "at least 16 characters" in str(excinfo.value)
    with pytest.raises(ConfigError) as excinfo:
        KVShareConfig(daemon_address="tcp://10.0.0.5:7400", daemon_secret="short-secret")
    assert "short-secret" not in str(excinfo.value)
    assert KVShareConfig(daemon_address="tcp://10.0.0.5:7400",
                         daemon_secret="a" * 16).daemon_endpoint == "tcp://10.0.0.5:7400"


def test_tenant_groups_come_from_yaml_and_environment(tmp_path):
    path = tmp_path / "groups.yaml"
    path.write_text("tenancy: groups\ntenant_groups:\n  partners: [acme, initech]\n")
    assert KVShareConfig.load(path, environ={}).tenant_groups == {
        "partners": ["acme", "initech"]}
    config = KVShareConfig.load(environ={"KVSHARE_TENANT_GROUPS": '{"g": ["a", "b"]}'})
    assert config.tenant_groups == {"g": ["a", "b"]}
