"""Command line: ``smtpguard serve|check-config -c FILE``.

``serve`` runs the front end until SIGTERM/SIGINT (graceful shutdown, see
:class:`smtpguard.listener.Server`); SIGHUP reloads the access tables.  ``check-config`` validates a file and
prints a one-line summary, or the error naming the key, with exit status 1.
Without ``-c`` the embedded defaults are used.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from . import config as config_mod
from . import logs, metrics
from .config import Config, ConfigError
from .dns import DnsResolver
from .dnsscreen import wants_resolver
from .listener import Server
from .pipeline import Pipeline

log = logging.getLogger("smtpguard")


def _load(path: str | None) -> Config:
    return config_mod.load(path) if path else Config()


def summary(cfg: Config) -> str:
    listen = ", ".join(str(hp) for hp in cfg.server.listen)
    metrics_at = str(cfg.metrics.listen) if cfg.metrics.listen else "off"
    return (f"listen {listen}; upstream {cfg.upstream.address}; state {cfg.state.url}; "
            f"metrics {metrics_at}; hostname {cfg.server.hostname}")


async def serve(cfg: Config) -> None:
    # One resolver (and so one DNS cache) for the whole process.
    resolver = DnsResolver(cfg.dns) if wants_resolver(cfg) else None
    pipeline = Pipeline(cfg, resolver=resolver)
    server = Server(cfg, pipeline)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP: re-read the access tables; a table with an error keeps its
    # previous contents and the error (file, line) is logged.
    loop.add_signal_handler(signal.SIGHUP, pipeline.reload_tables)
    log.info("daemon started -- %s", summary(cfg))
    await stop.wait()
    log.info("shutting down: no new connections, %d session(s) to finish", len(server.sessions))
    await server.shutdown()
    log.info("daemon stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smtpguard", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "run the SMTP front end"), ("check-config", "validate a configuration file")):
        p = sub.add_parser(name, help=text)
        p.add_argument("-c", "--config", help="TOML configuration file (default: embedded defaults)")
    args = parser.parse_args(argv)
    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        print(f"smtpguard: error: {exc}", file=sys.stderr)
        return 1
    if args.command == "check-config":
        print(f"smtpguard: configuration OK: {summary(cfg)}")
        return 0
    logs.setup(cfg.log)
    try:
        if cfg.metrics.listen is not None:
            metrics.serve(cfg.metrics.listen)
        asyncio.run(serve(cfg))
    except ConfigError as exc:  # e.g. no [dns] nameservers and no usable /etc/resolv.conf
        log.critical("cannot start: %s", exc)
        return 1
    except OSError as exc:
        log.critical("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
