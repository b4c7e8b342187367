"""What each benchmark engine runs with: the YAML base, --set, no KVSHARE_* variables."""

from __future__ import annotations

import argparse

import pytest

from kvshare.bench.engine_config import (
    add_config_arguments,
    base_config,
    connector_config,
    ignored_environment,
)
from kvshare.bench.vllm_runner import vllm_env

STRAY = {"KVSHARE_RHO": "1.0", "KVSHARE_CHECK_LAYERS": "", "KVSHARE_HOME": "/elsewhere",
         "KVSHARE_CONFIG": "/nowhere.yaml", "PATH": "/usr/bin", "HF_HOME": "/hf"}


def test_engines_see_no_kvshare_variable():
    env = vllm_env(STRAY)
    assert not [name for name in env if name.startswith("KVSHARE_")]
    assert env["PATH"] == "/usr/bin" and env["HF_HOME"] == "/hf"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"


def test_config_variables_are_reported_as_ignored_but_locations_are_not():
    assert ignored_environment(STRAY) == ["KVSHARE_CHECK_LAYERS", "KVSHARE_RHO"]


def test_base_config_layers_yaml_then_sets_and_never_the_environment(tmp_path):
    yaml_file = tmp_path / "kvshare.yaml"
    yaml_file.write_text("rho: 0.2\nrecompute_tail_tokens: 32\ncheck_layers: [2]\n")
    environ = {"KVSHARE_RHO": "0.9", "KVSHARE_TOP_K": "3"}
    config = base_config(str(yaml_file), ["recompute_tail_tokens=16"], environ=environ)
    assert config.rho == 0.2 and config.top_k == 8          # no environment layer
    assert config.recompute_tail_tokens == 16 and config.check_layers == [2]
    via_env = base_config(None, environ={"KVSHARE_CONFIG": str(yaml_file)})
    assert via_env.rho == 0.2                               # $KVSHARE_CONFIG locates the YAML
    with pytest.raises(SystemExit, match="unknown kvshare config key 'rhoo'"):
        base_config(None, ["rhoo=1"], environ={})
    with pytest.raises(SystemExit, match="--set expects KEY=VALUE, got 'rho'"):
        base_config(None, ["rho"], environ={})


def test_connector_config_is_complete_and_checked(tmp_path):
    base = base_config(None, ["rho=0.3"], environ={})
    config = connector_config(base, home=str(tmp_path), check_layers=[])
    assert config["rho"] == 0.3 and config["check_layers"] == [] and config["home"] == str(tmp_path)
    assert set(config) == set(base.to_dict())
    with pytest.raises(ValueError, match="rho=2.0 is invalid"):
        connector_config(base, rho=2.0)


def test_set_is_repeatable():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert parser.parse_args(["--set", "rho=0.1", "--set", "top_k=4"]).sets == ["rho=0.1",
                                                                                 "top_k=4"]
    assert parser.parse_args([]).sets == []
