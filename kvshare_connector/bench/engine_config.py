"""The kvshare config of every connector engine a benchmark starts, built explicitly.

Layers, lowest first: the config's defaults < the YAML file (``--config``, else
``$KVSHARE_CONFIG``) < ``--set key=value`` options < the system's own overrides (naive's
``check_layers=[]``, the benchmark's fresh ``home``...). ``KVSHARE_<KEY>`` environment
variables are *not* a layer here: the engines' environment drops them (see
:func:`kvshare.bench.vllm_runner.vllm_env`), so what a benchmark reports as a system's
config, which it records in full in its JSON, is what that system ran with.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any

from kvshare.config import CONFIG_ENV, ENV_PREFIX, KVShareConfig

NOT_CONFIG_KEYS = (CONFIG_ENV, "KVSHARE_HOME")
"""Variables that locate files, not config keys: the benchmark process still honours them."""


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--set key=value`` (repeatable), on top of the YAML for every connector system."""
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="kvshare config override for every connector engine, on top of "
                             "--config (repeatable; e.g. --set check_layers=2 --set "
                             "recompute_tail_tokens=32); KVSHARE_<KEY> environment "
                             "variables are ignored by the benchmarks")


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    """``["rho=0.3", "check_layers=1,2"]`` -> ``{"rho": "0.3", "check_layers": "1,2"}``."""
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        values[key.strip()] = value.strip()
    return values


def base_config(path: str | os.PathLike[str] | None, sets: Sequence[str] = (),
                environ: Mapping[str, str] | None = None) -> KVShareConfig:
    """Defaults < YAML (``path``, else ``$KVSHARE_CONFIG``) < ``--set`` items; no
    ``KVSHARE_<KEY>`` variable. Exits naming the bad key or value."""
    environ = os.environ if environ is None else environ
    locating = {name: environ[name] for name in (CONFIG_ENV,) if name in environ}
    try:
        return KVShareConfig.load(path, overrides=parse_sets(sets), environ=locating)
    except ValueError as exc:  # ConfigError: names the key
        raise SystemExit(str(exc)) from None


def ignored_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """Names of the ``KVSHARE_<KEY>`` variables a benchmark leaves out of every engine."""
    environ = os.environ if environ is None else environ
    return sorted(name for name in environ
                  if name.startswith(ENV_PREFIX) and name not in NOT_CONFIG_KEYS)


def connector_config(base: KVShareConfig, **overrides: Any) -> dict[str, Any]:
    """The complete ``kv_connector_extra_config`` of one connector system: every key of
    ``base`` with ``overrides`` on top, checked (an unknown key or bad value raises
    :class:`kvshare.config.ConfigError` naming it)."""
    return KVShareConfig.from_dict({**base.to_dict(), **overrides}).to_dict()
