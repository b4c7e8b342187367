"""The Redis tier's URL forms, parsed without importing redis (the config checks them).

* ``redis://[[user]:password@]host[:port][/db]`` and ``unix://path``: one server
  (redis-py's own URL forms);
* ``redis+cluster://[[user]:password@]host:port[,host:port...]``: a Redis Cluster. The
  nodes listed are only where the client starts: it asks them for the slot map and
  then talks to every master. Listing more than one lets the tier start while one of
  them is down. Cluster mode has a single database, so no ``/db`` part.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

CLUSTER_SCHEME = "redis+cluster://"
SERVER_SCHEMES = ("redis://", "unix://")
URL_FORMS = ("empty, redis://HOST:PORT/DB, unix://PATH or "
             "redis+cluster://HOST:PORT[,HOST:PORT...]")
"""What a valid ``redis_url`` looks like, for error messages."""


@dataclass(frozen=True)
class ClusterURL:
    """A parsed ``redis+cluster://`` URL."""

    nodes: tuple[tuple[str, int], ...]
    """Startup nodes ``(host, port)``, in the order given."""
    username: str | None = None
    password: str | None = None


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEME)


def parse_cluster_url(url: str) -> ClusterURL:
    """Split ``redis+cluster://[[user]:password@]host:port[,host:port...]``.

    Raises:
        ValueError: naming the part that is wrong and the expected form.
    """
    if not is_cluster_url(url):
        raise ValueError(f"{url!r} does not start with {CLUSTER_SCHEME!r}")
    rest = url[len(CLUSTER_SCHEME):].removesuffix("/")
    username = password = None
    if "@" in rest:
        credentials, rest = rest.rsplit("@", 1)
        user, _, secret = credentials.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    if "/" in rest or "?" in rest:
        raise ValueError(f"{_hide(url)!r}: a Redis Cluster has one database; expected "
                         f"{CLUSTER_SCHEME}HOST:PORT[,HOST:PORT...] without a /db or options")
    nodes = []
    for item in rest.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{_hide(url)!r}: node {item!r} is not HOST:PORT; expected "
                             f"{CLUSTER_SCHEME}HOST:PORT[,HOST:PORT...]")
        nodes.append((host.strip("[]"), int(port)))
    return ClusterURL(tuple(nodes), username, password)


def _hide(url: str) -> str:
    """``url`` with its credentials masked (error messages end up in logs)."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}<hidden>@{rest.rsplit('@', 1)[1]}" if "@" in rest else url
