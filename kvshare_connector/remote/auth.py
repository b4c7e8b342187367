"""CURVE keys of a TCP daemon, derived from the shared ``daemon_secret``.

Daemon and connectors hold the same secret, so both derive the same two key pairs
without any key files to distribute: the server pair (the daemon's identity, which
clients pin) and the client pair (the only key the daemon's ZAP handler admits). A peer
without the secret cannot derive the client secret key, so its CURVE handshake is
refused and it never gets to send a call; traffic of admitted clients is encrypted.

Secret keys are ``sha256(label + secret)`` (32 bytes, the size of a Curve25519 secret
key), z85-encoded as ZeroMQ wants them; public keys follow from them.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import zmq
from zmq.utils import z85

SERVER_LABEL = b"kvshare-server"
CLIENT_LABEL = b"kvshare-client"


@dataclass(frozen=True)
class CurveKeys:
    """Both key pairs of one secret, z85-encoded (40 bytes each)."""

    server_secret: bytes
    server_public: bytes
    client_secret: bytes
    client_public: bytes

    def callback(self, domain: str, client_key: bytes) -> bool:
        """ZAP check (``configure_curve_callback``): admit only this secret's client key."""
        return hmac.compare_digest(client_key, self.client_public)


def curve_keys(secret: str) -> CurveKeys:
    """The key pairs ``secret`` derives (deterministic: same secret, same keys)."""
    if not secret:
        raise ValueError("daemon_secret is empty; a tcp:// daemon needs a shared secret "
                         "(at least 16 characters) in daemon and connector configs")
    server_secret = _secret_key(SERVER_LABEL, secret)
    client_secret = _secret_key(CLIENT_LABEL, secret)
    return CurveKeys(server_secret, zmq.curve_public(server_secret),
                     client_secret, zmq.curve_public(client_secret))


def _secret_key(label: bytes, secret: str) -> bytes:
    return z85.encode(hashlib.sha256(label + secret.encode()).digest())
