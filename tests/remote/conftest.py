"""A real daemon (real LanceDB index, real tiers) in a thread of the test process; clients
talk to it over its real socket. Subprocess daemons: ``remote_helpers.DaemonProcess``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from remote_helpers import daemon_config

from kvshare.config import KVShareConfig
from kvshare.remote.client import DaemonClient
from kvshare.remote.server import Daemon


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[tuple[str, list[int]]]:
    """Real ShareGPT first turns of 40..400 tokens."""
    from kvshare.data.sharegpt import first_user_turns

    picked = []
    for text in dict.fromkeys(first_user_turns()):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if 40 <= len(ids) <= 400:
            picked.append((text, ids))
            if len(picked) == 12:
                return picked
    raise AssertionError("ShareGPT has fewer than 12 prompts of 40..400 tokens")


@pytest.fixture
def config(tmp_path) -> KVShareConfig:
    return daemon_config(tmp_path / "home")


@pytest.fixture
def daemon(config) -> Iterator[Daemon]:
    served = Daemon(config)
    served.start()
    yield served
    served.close()


@pytest.fixture
def client(config) -> Iterator[DaemonClient]:
    c = DaemonClient.from_config(config)
    yield c
    c.close()


