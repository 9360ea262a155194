"""Command line: ``smtpguard serve|policy|check-config|greylist|cache -c FILE``, ``smtpguard report LOG...``.

``serve`` runs the front end until SIGTERM/SIGINT (graceful shutdown, see
:class:`smtpguard.listener.Server`), and the Postfix policy service too when
``[policy] listen`` is set; ``policy`` runs the policy service alone (no
SMTP listener, see :mod:`smtpguard.policy`); SIGHUP reloads the configuration file,
its tables and the TLS certificate (:mod:`smtpguard.reload`).  ``check-config``
validates a file and prints every error and warning, each with its line and
key, then a one-line summary; exit status 1 on errors only.  ``greylist`` and ``cache`` are the operator commands on
the state store (:mod:`smtpguard.admin`); ``show-config [-n]`` prints the
effective configuration (:mod:`smtpguard.showconfig`, ``postconf [-n]``).

Every command that reads the configuration reads ``-c FILE``, else
``$SMTPGUARD_CONFIG``, else ``/etc/smtpguard/smtpguard.toml`` (and says
which when it was not given with ``-c``); ``-c /dev/null`` runs on the
embedded defaults.  Output to a pipe closed early (``| head``) ends quietly.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable
from importlib import metadata
from typing import Any

from . import admin, eventloop, logs, report, showconfig
from . import config as config_mod
from .config import Config, ConfigError, HostPort
from .dns import DnsResolver, Resolver
from .dnsscreen import wants_resolver
from .handoff import handoff_allowed
from .health import OpsServer, Readiness
from .listener import Server
from .pipeline import Pipeline
from .policy import engine as policy_engine
from .policy.server import PolicyServer
from .policy.settings import Endpoint
from .reload import Reloader
from .store import Store, StoreError, open_store, sweep_forever

log = logging.getLogger("smtpguard")

#: The configuration file when neither -c nor $SMTPGUARD_CONFIG names one.
DEFAULT_CONFIG = "/etc/smtpguard/smtpguard.toml"
CONFIG_HELP = f"TOML configuration file (default: $SMTPGUARD_CONFIG, else {DEFAULT_CONFIG})"

#: postgrey's port, where ``smtpguard policy`` listens unless [policy] listen says
DEFAULT_POLICY_LISTEN = Endpoint(inet=HostPort("127.0.0.1", 10023))


def config_path(given: str | None) -> tuple[str, str]:
    """The configuration file to read and where its name came from
    (``""`` for -c, else why it was chosen)."""
    if given:
        return given, ""
    env = os.environ.get("SMTPGUARD_CONFIG")
    if env:
        return env, "from $SMTPGUARD_CONFIG"
    return DEFAULT_CONFIG, "the default; -c FILE or $SMTPGUARD_CONFIG names another"


def _missing_database(url: str, must_exist: bool) -> str:
    """Why an operator command must not open the SQLite database of *url*
    (it would create an empty one and report on it), or ``""``."""
    if not (must_exist and url.startswith("sqlite:///")):
        return ""
    path = url.removeprefix("sqlite:///")
    if os.path.exists(path):
        return ""
    relative = "" if os.path.isabs(path) else " (a relative path: from the current directory)"
    return f"no database at {os.path.abspath(path)}{relative}; smtpguard serve creates it"


def version() -> str:
    try:
        return metadata.version("smtpguard")
    except metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def _load(path: str) -> tuple[Config | None, list[config_mod.Problem]]:
    """The configuration (None, after printing the errors) and its warnings."""
    cfg, problems = config_mod.check(path)
    if cfg is None:
        for problem in problems:
            if not problem.warning:
                print(f"smtpguard: error: {problem.format(path)}", file=sys.stderr)
    return cfg, [p for p in problems if p.warning]


def summary(cfg: Config) -> str:
    listen = ", ".join(str(hp) for hp in cfg.server.listen)
    metrics_at = str(cfg.metrics.listen) if cfg.metrics.listen else "off"
    starttls = f"STARTTLS {cfg.tls.security_level}" if cfg.tls.enabled else "STARTTLS off"
    proxy = "; PROXY protocol" if cfg.server.proxy_protocol else ""
    handoff = f" (handoff {cfg.handoff.socket})" if cfg.handoff.socket else ""
    policy = f"; policy {', '.join(str(ep) for ep in cfg.policy.listen)} ({policy_checks(cfg)})" \
        if cfg.policy.listen else ""
    return (f"listen {listen}; upstream {cfg.upstream.address}{handoff}; state {cfg.state.url}; "
            f"metrics {metrics_at}; hostname {cfg.server.hostname}; {starttls}{proxy}{policy}")


def policy_checks(cfg: Config) -> str:
    return ", ".join(str(c) for c in cfg.policy.checks) or "no checks"


def policy_summary(cfg: Config) -> str:
    metrics_at = str(cfg.metrics.listen) if cfg.metrics.listen else "off"
    listen = ", ".join(str(ep) for ep in cfg.policy.listen)
    return f"policy {listen}; checks {policy_checks(cfg)}; state {cfg.state.url}; metrics {metrics_at}"


def _resolver(cfg: Config, previous: Pipeline | None = None) -> Resolver | None:
    """One resolver (so one DNS cache) for the process; a reload keeps it
    unless the ``[dns]`` section changed."""
    if not (wants_resolver(cfg) or policy_engine.wants_dns(cfg)):
        return None
    if previous is not None and previous.dns.resolver is not None and previous.cfg.dns == cfg.dns:
        return previous.dns.resolver
    return DnsResolver(cfg.dns)


async def _new_pipeline(cfg: Config, previous: Pipeline) -> Pipeline:
    """The pipeline for a reloaded configuration (re-reads its tables, asks
    Postfix again whether clients may be handed off), on *previous*'s state
    store (``state.url`` changes need a restart).  The policy service builds
    its engine from it: its settings are checked here, so that a bad
    ``[policy]`` refuses the reload."""
    policy_engine.validate(cfg)
    allowed = await asyncio.to_thread(handoff_allowed, cfg.handoff)
    previous.store.failfast.configure(cfg.state.limits())
    return Pipeline(cfg, previous.store, resolver=_resolver(cfg, previous), handoff_allowed=allowed)


def _first_pipeline(cfg: Config, store: Store) -> Pipeline:
    policy_engine.validate(cfg)
    return Pipeline(cfg, store, resolver=_resolver(cfg), handoff_allowed=handoff_allowed(cfg.handoff))


async def serve(cfg: Config, path: str | None = None) -> None:
    store = await open_store(cfg.state.url, limits=cfg.state.limits())
    sweeper = asyncio.create_task(sweep_forever(store, cfg.state.cleanup_interval))
    server = Server(cfg, _first_pipeline(cfg, store))
    policy = PolicyServer(lambda: server.pipeline) if cfg.policy.listen else None
    try:
        await server.start()
    except BaseException:
        sweeper.cancel()
        await store.close()
        raise
    if policy is not None:
        try:
            await policy.start(cfg.policy.listen)
        except BaseException:
            await server.shutdown()
            sweeper.cancel()
            await store.close()
            raise
    ops, stop = await _operate(cfg, path, server, lambda: not server.closing)
    log.info("daemon started -- %s; event loop %s", summary(cfg), eventloop.describe(asyncio.get_running_loop()))
    await stop.wait()
    log.info("shutting down: no new connections, %d session(s) to finish", len(server.sessions))
    if policy is not None:
        await policy.close()
    await server.shutdown()
    await _finish(ops, sweeper, store)


async def _operate(cfg: Config, path: str | None, target: Any, accepting: Callable[[], bool],
                   upstream: bool = True) -> tuple[OpsServer | None, asyncio.Event]:
    """The ops endpoint and the signals (TERM/INT: the event; HUP: reload
    *target*, which has ``cfg`` and ``pipeline``).  Without *upstream* (the
    policy service alone) readiness does not probe the upstream Postfix."""
    ops = None
    if cfg.metrics.listen is not None:
        readiness = Readiness(lambda: target.cfg, lambda: target.pipeline.store, accepting=accepting)
        if not upstream:
            del readiness.probes["upstream"]
        ops = OpsServer(cfg.metrics.listen, readiness)
        await ops.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, Reloader(path, target, _new_pipeline).signal)
    return ops, stop


async def _finish(ops: OpsServer | None, sweeper: asyncio.Task[None], store: Store) -> None:
    if ops is not None:
        await ops.close()
    sweeper.cancel()
    await store.close()
    log.info("daemon stopped")


class PolicyOnly:
    """What the reloader switches when only the policy service runs."""

    def __init__(self, cfg: Config, pipeline: Pipeline) -> None:
        self.cfg, self.pipeline = cfg, pipeline
        self.tls_context: Any = None


async def serve_policy(cfg: Config, path: str | None = None) -> None:
    """``smtpguard policy``: the policy service alone, on ``[policy] listen``
    (``127.0.0.1:10023``, postgrey's port, when it is not set)."""
    if not cfg.policy.listen:
        cfg = dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, listen=(DEFAULT_POLICY_LISTEN,)))
    store = await open_store(cfg.state.url, limits=cfg.state.limits())
    sweeper = asyncio.create_task(sweep_forever(store, cfg.state.cleanup_interval))
    holder = PolicyOnly(cfg, _first_pipeline(cfg, store))
    policy = PolicyServer(lambda: holder.pipeline)
    try:
        await policy.start(cfg.policy.listen)
    except BaseException:
        sweeper.cancel()
        await store.close()
        raise
    ops, stop = await _operate(cfg, path, holder, lambda: bool(policy.servers), upstream=False)
    log.info("daemon started -- %s; event loop %s", policy_summary(cfg),
             eventloop.describe(asyncio.get_running_loop()))
    await stop.wait()
    log.info("shutting down: closing %d policy connection(s)", len(policy.connections))
    await policy.close()
    await _finish(ops, sweeper, store)


def check_config(path: str) -> int:
    """``check-config``: every error and warning, each with its line and key
    (``smtpguard.toml:14: greylist.delay: ...``) on stderr; exit 1 on errors only."""
    cfg, problems = config_mod.check(path)
    if cfg is not None:
        try:
            policy_engine.validate(cfg)
            eventloop.loop_factory(cfg.server.event_loop)
        except ConfigError as exc:
            problems.append(config_mod.Problem(exc.key, exc.problem))
            cfg = None
    if cfg is not None and cfg.log.output == "syslog" and (no_syslog := logs.syslog_problem()) is not None:
        problems.append(config_mod.Problem("", f"{no_syslog}; smtpguard serve would log to stderr instead",
                                           warning=True))
    for problem in problems:
        print(problem.format(path), file=sys.stderr)
    errors = sum(not p.warning for p in problems)
    warnings = len(problems) - errors
    counted = f"{_plural(errors, 'error')}, {_plural(warnings, 'warning')}"
    if cfg is None:
        print(f"smtpguard: {path}: {counted}", file=sys.stderr)
        return 1
    print(f"smtpguard: {path}: configuration OK: {summary(cfg)}"
          + (f" ({_plural(warnings, 'warning')})" if warnings else ""))
    return 0


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def main(argv: list[str] | None = None) -> int:
    try:
        status = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:  # `smtpguard cache list | head`: the reader has gone, as for any Unix tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141  # 128 + SIGPIPE, what the shell reports for a tool killed by it
    return status


def parser() -> argparse.ArgumentParser:
    """The command line (also read by the man page generator, :mod:`smtpguard.manpage`)."""
    top = argparse.ArgumentParser(prog="smtpguard", description=__doc__.splitlines()[0])
    top.add_argument("--version", action="version", version=f"smtpguard {version()}")
    sub = top.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "run the SMTP front end (and [policy] listen, when set)"),
                       ("policy", "run the Postfix policy service alone (check_policy_service)"),
                       ("check-config", "report every error and warning of the configuration file"),
                       ("show-config", "print the effective configuration as TOML (postconf)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("-c", "--config", help=CONFIG_HELP)
        if name == "show-config":
            p.add_argument("-n", dest="changed", action="store_true",
                           help="only what differs from the defaults (postconf -n)")
    admin.add_parsers(sub)
    rp = sub.add_parser("report", help="summarise smtpguard's log (pflogsumm-like)")
    rp.add_argument("logs", nargs="*", metavar="LOG", help="log files (.gz too); default or '-': stdin")
    rp.add_argument("-n", "--top", type=int, default=10, help="lines in each top list (default 10)")
    rp.add_argument("--json", action="store_true", help="machine-readable output")
    rp.add_argument("--syslog-name", help="read only lines of this program (e.g. postfix-smtpguard)")
    return top


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    if args.command == "report":
        return report.main(args.logs, args.top, args.json, args.syslog_name)
    path, why = config_path(args.config)
    if why and args.command not in ("serve", "policy"):  # those say it in their start-up line
        print(f"smtpguard: configuration {path} ({why})", file=sys.stderr)
    if args.command == "check-config":
        return check_config(path)
    cfg, warnings = _load(path)
    if cfg is None:
        return 1
    if args.command == "show-config":
        sys.stdout.write(showconfig.render(cfg, args.changed, path))
        return 0
    if args.command in ("greylist", "cache"):
        missing = _missing_database(cfg.state.url, args.action != "import-postgrey")
        if missing:
            print(f"smtpguard: error: state store {cfg.state.url}: {missing}", file=sys.stderr)
            return 1
        try:
            return asyncio.run(admin.run(cfg, args))
        except StoreError as exc:
            print(f"smtpguard: error: state store {cfg.state.url}: {exc}", file=sys.stderr)
            return 1
    logs.setup(cfg.log)
    log.info("configuration %s%s", path, f" ({why})" if why else "")
    for warning in warnings:
        log.warning("%s", warning.format(path))
    try:
        command = serve_policy if args.command == "policy" else serve
        eventloop.run(lambda: command(cfg, path), cfg.server.event_loop)
    except ConfigError as exc:  # e.g. no [dns] nameservers and no usable /etc/resolv.conf
        log.critical("cannot start: %s", exc)
        return 1
    except (OSError, StoreError) as exc:
        log.critical("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
