"""``kvshare daemon``: the shared cache of one host, for every vLLM instance on it.

Runs :class:`kvshare.remote.server.Daemon` in the foreground until SIGTERM or SIGINT,
then flushes the index and closes the tiers and exits 0. Connectors reach it with
``mode: remote`` and the same ``daemon_address`` (and, over TCP, ``daemon_secret``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from kvshare.config import ConfigError, KVShareConfig

logger = logging.getLogger(__name__)

EXAMPLES = """\
examples:
  kvshare daemon --config configs/daemon.yaml
      serve the config's home on ipc://<home>/daemon.sock (the default address)
  kvshare daemon --home /srv/kvshare --address tcp://10.0.0.5:7400
      over TCP; daemon_secret must be set (config file or KVSHARE_DAEMON_SECRET)

  then start vLLM with the connector in remote mode, e.g.
  kvshare serve smollm2-135m-instruct --kvshare-set mode=remote
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    # Also accepted after the subcommand (`kvshare daemon --config X`); SUPPRESS keeps the
    # top-level `kvshare --config X daemon` from being overwritten with None.
    parser.add_argument("--config", metavar="YAML", default=argparse.SUPPRESS,
                        help="kvshare config file (default: $KVSHARE_CONFIG, then built-in "
                        "defaults)")
    parser.add_argument("--home", metavar="DIR",
                        help="kvshare home (index, chunks, socket); overrides the config")
    parser.add_argument("--address", metavar="ADDR",
                        help="ipc://PATH or tcp://HOST:PORT; overrides daemon_address")


def run(args: argparse.Namespace) -> int:
    from kvshare.remote.server import Daemon, DaemonStartError

    overrides = {key: value for key, value in (("home", args.home),
                                               ("daemon_address", args.address)) if value}
    try:
        config = KVShareConfig.load(args.config, overrides)
    except ConfigError as exc:  # the message names the key; a traceback would bury it
        raise SystemExit(f"kvshare daemon: {exc}") from None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        daemon = Daemon(config)
        daemon.start()
    except DaemonStartError as exc:
        raise SystemExit(f"kvshare daemon: {exc}") from None
    try:
        stop.wait()
        logger.info("kvshare daemon: stopping (signal received)")
    finally:
        daemon.close()
    return 0
