"""Real-component test lab: private Postfix, redis-server, dnsmasq and haproxy instances.

Everything in here is plain Python (no pytest import) so it can also be used
from an interactive shell while debugging::

    >>> from tests.lab import PrivatePostfix
    >>> pf = PrivatePostfix()
    >>> pf.start()
    >>> ...
    >>> pf.cleanup()

Design rules shared by all helpers:

* Every instance lives in its own ``tempfile.mkdtemp(prefix="smtpguard-lab-…")``
  directory, listens on 127.0.0.1 only, on its own port, and never talks to
  anything but loopback.
* Each lab directory contains ``owner.pid`` (the pid of the Python process that
  created it).  :func:`reap_stale_labs` removes directories (and stops the
  processes living in them) whose owner has died, e.g. after ``kill -9`` of a
  pytest run.  Directories of live owners (other concurrent test runs) are
  never touched.
* Processes we spawn directly (redis-server, dnsmasq) get ``PR_SET_PDEATHSIG``
  so they die together with the test process.  Postfix daemonises itself, so
  started instances are additionally registered with :mod:`atexit`.
* Waiting is always a bounded polling loop (:func:`wait_until`) on an
  observable condition (port answers, file appears, process gone); there are
  no fixed sleeps.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, TypeVar

if TYPE_CHECKING:  # pragma: no cover - typing only
    import dns.resolver

__all__ = [
    "LAB_PREFIX",
    "DnsBlackhole",
    "DnsServer",
    "HAProxy",
    "LabError",
    "PostfixFactory",
    "PrivatePostfix",
    "RedisSentinel",
    "RedisServer",
    "ci_enabled",
    "free_port",
    "missing_requirements",
    "reap_stale_labs",
    "wait_until",
    "which",
]

LOOPBACK = "127.0.0.1"
LAB_PREFIX = "smtpguard-lab-"
#: Extra directories searched for daemons; /usr/sbin is often not on a normal user's PATH.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")

T = TypeVar("T")


class LabError(RuntimeError):
    """A lab component failed to start/stop; the message carries its log tail."""


# --------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------


def which(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN_DIRS])
    return shutil.which(name, path=path)


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([env.get("PATH", os.defpath), *SBIN_DIRS])
    env.setdefault("LC_ALL", "C")
    return env


def free_port(kind: Literal["tcp", "udp", "both"] = "tcp") -> int:
    """Return a port on 127.0.0.1 that is currently free.

    Works by binding port 0 and reading back the number the kernel chose.  With
    ``kind="both"`` the port is free for TCP *and* UDP at the time of the call
    (needed for DNS servers, which listen on both).  The usual caveat applies:
    the port is released before the caller binds it, so another process could
    grab it in between; with the kernel's ephemeral-port rotation that is rare.
    """
    for _ in range(50):
        first = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
        with socket.socket(socket.AF_INET, first) as s:
            s.bind((LOOPBACK, 0))
            port: int = s.getsockname()[1]
            if kind != "both":
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    raise LabError(f"could not find a free {kind} port on {LOOPBACK}")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.02,
    on_timeout: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns a truthy value; return that value.

    Raises :class:`LabError` after ``timeout`` seconds; the message includes
    ``what`` and, if given, the string returned by ``on_timeout()`` (typically
    a log tail).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            extra = on_timeout() if on_timeout else ""
            raise LabError(f"timed out after {timeout:.1f}s waiting for {what}\n{extra}".rstrip())
        time.sleep(interval)


def tail(text: str, lines: int = 40) -> str:
    """Last ``lines`` lines of ``text`` (for error messages)."""
    return "\n".join(text.splitlines()[-lines:])


def _read_text(path: Path, offset: int = 0) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie.

    In this sandbox PID 1 reaps orphans lazily, so daemonised processes that
    exited can linger as zombies for a while; they hold no sockets or files.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    # state is the field after the parenthesised comm (which may contain spaces)
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def _pids_with_cwd_under(root: Path) -> list[int]:
    """Live processes whose working directory is ``root`` or below it.

    Every Postfix daemon chdir()s into its queue directory, so this finds all
    processes of a private instance, even orphans whose master already died.
    """
    prefix = str(root)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if (cwd == prefix or cwd.startswith(prefix + "/")) and _pid_alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _kill(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


@contextlib.contextmanager
def frozen(proc: subprocess.Popen[bytes] | None) -> Iterator[None]:
    """A server of ours stopped with SIGSTOP for the block: its sockets stay
    bound and the kernel still accepts connections, but nothing is answered."""
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM a child we spawned and wait; SIGKILL after *timeout*."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _tcp_port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    """preexec_fn: ask the kernel to SIGTERM the child when the parent dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 == PR_SET_PDEATHSIG


def _preexec() -> Callable[[], None] | None:
    """PR_SET_PDEATHSIG fires when the *thread* that forked exits, so only use
    it when spawning from the main thread (a server started inside e.g.
    ``asyncio.to_thread`` would otherwise die with that worker thread)."""
    return _set_pdeathsig if threading.current_thread() is threading.main_thread() else None


def _make_lab_dir(kind: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=f"{LAB_PREFIX}{kind}-"))
    (d / "owner.pid").write_text(f"{os.getpid()}\n")
    return d


class _Cleanable(Protocol):
    def cleanup(self) -> None: ...


_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def _register(obj: _Cleanable) -> None:
    with _LIVE_LOCK:
        _LIVE.add(obj)


def _unregister(obj: _Cleanable) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(obj)


@atexit.register
def _cleanup_all() -> None:
    """Safety net: clean up every instance still alive at interpreter exit."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for obj in live:
        with contextlib.suppress(Exception):
            obj.cleanup()


def reap_stale_labs(tmpdir: str | None = None) -> list[Path]:
    """Stop processes of, and delete, lab directories whose owner process is dead.

    Only directories created by this module (``LAB_PREFIX``) that contain an
    ``owner.pid`` naming a dead pid are touched, so concurrent test runs are
    safe.  Returns the removed directories.
    """
    removed = []
    for d in Path(tmpdir or tempfile.gettempdir()).glob(f"{LAB_PREFIX}*"):
        try:
            owner = int((d / "owner.pid").read_text().strip())
        except (OSError, ValueError):
            continue
        if _pid_alive(owner):
            continue
        # Every lab process runs with its cwd inside its lab dir (Postfix
        # daemons chdir to the queue dir; redis/dnsmasq are spawned there), so
        # this finds them without trusting possibly recycled pids in pid files.
        _kill(_pids_with_cwd_under(d), signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


# --------------------------------------------------------------------------
# requirement checks (used by conftest's skip / fail logic)
# --------------------------------------------------------------------------

#: marker name -> binaries it needs
REQUIRED_BINARIES: dict[str, tuple[str, ...]] = {
    "postfix": ("postfix", "postconf", "postsuper"),
    "redis": ("redis-server",),
    "dns": ("dnsmasq",),
    "prometheus": ("prometheus", "promtool"),
    "pflogsumm": ("pflogsumm",),
    "fail2ban": ("fail2ban-regex",),
    "haproxy": ("haproxy",),
}


def missing_requirements(kind: str) -> str | None:
    """Why the lab component ``kind`` ("postfix", "redis", "dns", "haproxy") cannot run here.

    Returns ``None`` if everything is available, else a human-readable reason.
    A private Postfix additionally needs root (it chowns directories and its
    master runs as root) and the ``postfix`` user.
    """
    missing = [b for b in REQUIRED_BINARIES[kind] if which(b) is None]
    if missing:
        return f"{kind} lab: binary not found: {', '.join(missing)} (searched PATH and {':'.join(SBIN_DIRS)})"
    if kind == "postfix":
        if os.geteuid() != 0:
            return "postfix lab: a private Postfix instance must be started as root"
        import pwd

        try:
            pwd.getpwnam("postfix")
        except KeyError:
            return "postfix lab: system user 'postfix' does not exist"
        if _master_cf_template() is None:
            return "postfix lab: no master.cf template found"
    return None


def ci_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """True when running in CI: ``CI`` is set to anything except "", 0, false, no."""
    value = (os.environ if environ is None else environ).get("CI", "")
    return value.strip().lower() not in ("", "0", "false", "no", "off")


# --------------------------------------------------------------------------
# Postfix
# --------------------------------------------------------------------------

_MASTER_CF_CANDIDATES = (
    "/usr/share/postfix/master.cf.dist",  # Debian/Ubuntu
    "/etc/postfix/master.cf.proto",  # upstream layout
    "/etc/postfix/master.cf",
)


def _master_cf_template() -> Path | None:
    for c in _MASTER_CF_CANDIDATES:
        if Path(c).is_file():
            return Path(c)
    return None


_ERROR_TRANSPORT = "error:5.7.1 smtpguard lab Postfix does not deliver off-box"


class _Instance:
    """What every lab server shares: a directory, a ``stop()``, and a
    ``cleanup()`` (stop, delete the directory, forget it) that is safe to
    call twice; usable as a context manager (start on enter)."""

    dir: Path
    _cleaned = False

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        if self._cleaned:
            return
        try:
            with contextlib.suppress(FileNotFoundError):  # already partly gone
                self.stop()
        finally:
            self._cleaned = True
            shutil.rmtree(self.dir, ignore_errors=True)
            _unregister(self)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:  # a failed start leaves nothing behind either
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class PrivatePostfix(_Instance):
    """A throw-away Postfix instance under its own directory and SMTP port.

    How it works
    ------------
    ``__init__`` builds a complete, independent configuration in ``self.dir``::

        dir/conf/main.cf      generated with ``postconf -c dir/conf -e``
        dir/conf/master.cf    copy of the distribution master.cf: the port-25
                              ``smtp inet`` service is commented out, one
                              ``127.0.0.1:<port> inet … smtpd`` service added,
                              chroot switched off for every service
        dir/queue/            queue_directory (master.pid lives in queue/pid/)
        dir/data/             data_directory (master.lock), owned by postfix
        dir/mail/inbox/new/   Maildir for every recipient in ``domain``
                              (virtual(8) delivery, uid/gid 5000)
        dir/postfix.log       maillog_file written by postlogd(8)

    ``start()`` runs ``postfix -c dir/conf start`` and then polls the SMTP port
    until it answers ``220``.  Nothing is shared with the system Postfix (no
    /etc/postfix/main.cf is needed), so any number of instances can run side by
    side as long as each has its own ``name`` (→ ``syslog_name`` and
    ``myhostname``) and port.

    Use distinct ``name``s for instances that talk to each other: the Postfix
    SMTP client refuses to deliver to a server that greets it with its own
    ``myhostname`` ("mail for … loops back to myself").

    Mail for ``domain`` is delivered to ``maildir`` (``…/mail/inbox/new``).
    Without a ``relayhost`` the default transport is ``error:…``, so smtpd
    rejects any other recipient at RCPT time (550 5.7.1); with a relayhost
    (see :meth:`sender`) it is relayed there with ``smtp``.  The instance
    therefore never sends mail off-box by itself.

    Logging: each instance logs only to its own ``postfix.log`` under
    ``syslog_name = postfix-<name>`` (e.g. ``postfix-backend/smtpd[123]: …``),
    so log regexes must not hard-code ``postfix/``.

    Settings that make the queue manager fast in tests (see
    :attr:`FAST_SETTINGS`) are applied by default; ``extra`` overrides any of
    them.  All methods must run as root.
    """

    host = LOOPBACK

    #: Settings that speed up tests; applied before ``extra``.
    FAST_SETTINGS: dict[str, str] = {
        "in_flow_delay": "0",  # never throttle smtpd -> cleanup
        "smtpd_error_sleep_time": "0",  # no 1s pause after a rejected command
        "smtpd_soft_error_limit": "100",  # no growing per-error delay (hard limit stays 20)
        "queue_run_delay": "1s",  # deferred queue scanned every second
        # Not 1s: a message deferred with a 1s backoff gets mtime = now+1,
        # which the next deferred-queue scan (also every 1s) already accepts;
        # if the delivery agent still holds the queue-file lock at that moment
        # qmgr logs "skipped, still being delivered" and parks the message
        # for a hard-coded 60s.  With 2s the scan skips it until it cools down.
        "minimal_backoff_time": "2s",
        "maximal_backoff_time": "4s",
        "transport_retry_time": "1s",  # a hiccuping delivery agent is retried after 1s, not 60s
        # A daemon that exits abnormally before finishing its first job (a
        # virtual(8) killed or fatal mid-delivery, e.g. around a reload or a
        # stop) makes master log "bad command startup -- throttling" and take
        # no connections for that service for service_throttle_time (60s):
        # qmgr logs "queue active" for the next tests' mail, then nothing until
        # the minute is over -- longer than wait_for_messages waits, and
        # `postqueue -f` cannot help.  Tests provoke such exits on purpose.
        "service_throttle_time": "1s",
        "smtp_connect_timeout": "5s",
        "delay_warning_time": "0",
        "biff": "no",  # no comsat
    }

    def __init__(
        self,
        port: int | None = None,
        extra: Mapping[str, str] | None = None,
        domain: str = "example.test",
        *,
        name: str = "backend",
        myhostname: str | None = None,
        pass_service: bool = False,
        postscreen: bool = False,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", name):
            raise ValueError(f"name must be a simple label, got {name!r}")
        self.name = name
        self.domain = domain
        self.port = port if port is not None else free_port()
        self.myhostname = myhostname or f"{name}.test"
        self.syslog_name = f"postfix-{name}"
        self.dir: Path = _make_lab_dir(f"postfix-{name}")
        self.conf_dir = self.dir / "conf"
        self.queue_dir = self.dir / "queue"
        self.data_dir = self.dir / "data"
        self.mail_dir = self.dir / "mail"
        self.log_path: Path = self.dir / "postfix.log"
        self.maildir: Path = self.mail_dir / "inbox" / "new"
        # With pass_service: an smtpd "pass" service (postscreen's kind) that
        # takes client connections handed over by smtpguard ([handoff] socket).
        self.pass_socket: Path | None = self.queue_dir / "public" / "smtpguard" if pass_service else None
        # With postscreen: postscreen itself on a port of its own, handing the
        # clients it lets through to the usual "smtpd pass" service (a
        # reference for the hand-off's cost in bench/relay.py).
        self.postscreen_port: int | None = free_port() if postscreen else None
        self._log_offset = 0
        _register(self)
        try:
            self._configure(dict(extra or {}))
        except BaseException:
            self.cleanup()
            raise
        self._baseline = {f: (self.conf_dir / f).read_text() for f in ("main.cf", "master.cf")}

    # -- construction helpers -------------------------------------------

    @classmethod
    def sender(
        cls,
        relay_port: int,
        relay_host: str = LOOPBACK,
        *,
        name: str = "sender",
        domain: str = "sender.test",
        extra: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> PrivatePostfix:
        """An instance in the "sending MTA" role: everything not for ``domain``
        goes to ``[relay_host]:relay_port`` with fast retries.

        Submit mail with :meth:`submit` (or smtplib on ``.port``); it is relayed
        asynchronously by the queue manager.
        """
        settings = {"relayhost": f"[{relay_host}]:{relay_port}"}
        settings.update(extra or {})
        return cls(port=port, extra=settings, domain=domain, name=name)

    def _postconf_cmd(self, *args: str) -> list[str]:
        return ["postconf", "-c", str(self.conf_dir), *args]

    def _run(self, cmd: Sequence[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            list(cmd),
            capture_output=True,
            text=True,
            env=_subprocess_env(),
            timeout=timeout,
            cwd=self.dir,
        )
        if check and proc.returncode != 0:
            raise LabError(
                f"[{self.name}] command failed ({proc.returncode}): {' '.join(cmd)}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}\n--- postfix.log tail ---\n{self.log_tail()}"
            )
        return proc

    def _postconf_set(self, settings: Mapping[str, str]) -> None:
        """``postconf -e`` the settings, then backdate the config files.

        Postfix refuses to trust a main.cf modified within the last second
        (it might still be being written) and re-reads it in a 300 ms loop
        until it is old enough, so *every* postconf/postfix command right
        after an edit would stall ~1.5 s.  Setting the mtime into the past
        avoids that stall; daemons only re-read main.cf on reload anyway.
        """
        self._run(self._postconf_cmd("-e", *(f"{k} = {v}" for k, v in settings.items())))
        self._backdate_config()

    def _backdate_config(self) -> None:
        past = time.time() - 10
        for f in ("main.cf", "master.cf"):
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.conf_dir / f, (past, past))

    def _configure(self, extra: dict[str, str]) -> None:
        for d in (self.conf_dir, self.queue_dir, self.data_dir, self.mail_dir):
            d.mkdir(parents=True, exist_ok=True)
        # An empty main.cf: starting from main.cf.dist fails (it points at
        # /etc paths and has settings that don't validate for a private dir).
        (self.conf_dir / "main.cf").write_text("")
        template = _master_cf_template()
        if template is None:
            raise LabError("no master.cf template found in " + ", ".join(_MASTER_CF_CANDIDATES))
        shutil.copyfile(template, self.conf_dir / "master.cf")
        self._backdate_config()

        # master.cf: disable port 25, add our listener, no chroot anywhere
        # (a chroot would need copies of /etc files inside the queue dir).
        services = self._run(self._postconf_cmd("-M")).stdout
        if re.search(r"^smtp\s+inet\s", services, re.M):
            self._run(self._postconf_cmd("-M#", "smtp/inet"))
        for svc in ("submission/inet", "smtps/inet", "submissions/inet"):
            if re.search(rf"^{svc.split('/')[0]}\s+inet\s", services, re.M):
                self._run(self._postconf_cmd("-M#", svc))
        if not re.search(r"^postlog\s+unix-dgram\s", services, re.M):
            raise LabError(f"{template} has no 'postlog unix-dgram postlogd' service; maillog_file needs it")
        listener = f"{self.host}:{self.port}"
        self._run(self._postconf_cmd("-M", f"{listener}/inet={listener} inet n - n - - smtpd"))
        if self.pass_socket is not None:  # private=n: the socket is public/smtpguard
            self._run(self._postconf_cmd("-M", "smtpguard/pass=smtpguard pass n - n - - smtpd"))
        if self.postscreen_port is not None:  # postscreen's own master.cf lines
            screen = f"{self.host}:{self.postscreen_port}"
            self._run(self._postconf_cmd("-M", f"{screen}/inet={screen} inet n - n - 1 postscreen"))
            self._run(self._postconf_cmd("-M", "smtpd/pass=smtpd pass - - n - - smtpd"))
            self._run(self._postconf_cmd("-M", "dnsblog/unix=dnsblog unix - - n - 0 dnsblog"))
        self._run(self._postconf_cmd("-F", "*/*/chroot=n"))
        self._backdate_config()

        settings: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            # maillog_file must be under maillog_file_prefixes, otherwise
            # `postfix check`/`start` fails *without printing anything*.
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.dir),
            "syslog_name": self.syslog_name,
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "myhostname": self.myhostname,
            "mydestination": "",
            "mynetworks": "127.0.0.1/32",
            "alias_maps": "",
            "alias_database": "",
            "virtual_mailbox_domains": self.domain,
            "virtual_mailbox_base": str(self.mail_dir),
            "virtual_mailbox_maps": "static:inbox/",
            "virtual_uid_maps": "static:5000",
            "virtual_gid_maps": "static:5000",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "smtpd_authorized_xforward_hosts": "127.0.0.0/8",
            "smtpd_forbid_bare_newline": "reject",
            "smtpd_forbid_bare_newline_exclusions": "",
            # nothing leaves the box unless a relayhost is configured
            "default_transport": _ERROR_TRANSPORT,
            "relay_transport": _ERROR_TRANSPORT,
        }
        settings.update(self.FAST_SETTINGS)
        settings.update(self._transport_for(extra))
        settings.update({k: str(v) for k, v in extra.items()})
        self._postconf_set(settings)

        os.chown(self.mail_dir, 5000, 5000)
        shutil.chown(self.data_dir, user="postfix")
        os.chmod(self.dir, 0o755)  # postfix (data dir) and uid 5000 (maildir) must traverse

    @staticmethod
    def _transport_for(settings: Mapping[str, str]) -> dict[str, str]:
        """When a relayhost is set, switch the default transport back to smtp."""
        if "relayhost" not in settings:
            return {}
        if str(settings["relayhost"]).strip():
            out = {"default_transport": "smtp", "relay_transport": "relay"}
        else:
            out = {"default_transport": _ERROR_TRANSPORT, "relay_transport": _ERROR_TRANSPORT}
        return {k: v for k, v in out.items() if k not in settings}

    # -- process control --------------------------------------------------

    @property
    def master_pid(self) -> int | None:
        """PID of the running master daemon, or None."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _pid_alive(pid) else None

    def is_running(self) -> bool:
        return self.master_pid is not None

    def pids(self, command: str) -> list[int]:
        """The live processes of this instance named *command* (``smtpd``, ``postscreen``, ``cleanup``, ``qmgr``)."""
        return [p for p in _pids_with_cwd_under(self.queue_dir) if _comm(p) == command]

    def start(self, timeout: float = 30.0) -> None:
        """Start the instance (no-op if already running) and wait for a 220 greeting.

        ``postfix start`` runs the integrity checks and ``master -w``, which
        returns once the master has bound its listeners; we then additionally
        poll the SMTP port (bounded by ``timeout``) until smtpd answers 220.
        """
        if self._cleaned:
            raise LabError(f"[{self.name}] instance was cleaned up")
        if not self.is_running():
            self._reap_children(timeout=5.0)  # leftovers of a crashed master
            if self.log_path.exists():
                # With no postlogd running, postsuper (run by `postfix start`, as mail_owner)
                # writes its warnings -- "bogus file name", the partial queue file of an smtpd
                # killed in mid-message -- to maillog_file itself: "fatal: open logfile".
                shutil.chown(self.log_path, user="postfix")
            proc = self._run(["postfix", "-c", str(self.conf_dir), "start"], check=False, timeout=timeout)
            if proc.returncode != 0:
                raise LabError(
                    f"[{self.name}] `postfix start` failed ({proc.returncode})\n"
                    f"stdout: {proc.stdout}\nstderr: {proc.stderr}\n--- postfix.log tail ---\n{self.log_tail()}"
                )
        wait_until(
            self._greets,
            timeout,
            f"Postfix '{self.name}' to answer 220 on {self.host}:{self.port}",
            interval=0.05,
            on_timeout=lambda: "--- postfix.log tail ---\n" + self.log_tail(),
        )

    def _greets(self) -> bool:
        """Connect, expect a 220 line, say QUIT."""
        try:
            with socket.create_connection((self.host, self.port), timeout=2.0) as s:
                f = s.makefile("rb")
                line = f.readline()
                if not line.startswith(b"220"):
                    return False
                with contextlib.suppress(OSError):
                    s.sendall(b"QUIT\r\n")
                    f.readline()
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 15.0) -> None:
        """Stop like ``postfix stop`` and wait until the port is closed and every
        process of this instance has exited (SIGKILL after ``timeout``).

        ``postfix stop`` is just ``kill -TERM <master.pid>`` followed by a
        poll loop that sleeps in whole seconds, which often costs a full
        second; we send the same SIGTERM ourselves and poll every 20 ms.
        """
        pid = self.master_pid
        if pid is not None:
            _kill([pid], signal.SIGTERM)
        with contextlib.suppress(LabError):
            wait_until(lambda: not self.is_running(), timeout, f"Postfix '{self.name}' master to exit")
        self._reap_children(timeout=timeout)
        wait_until(
            lambda: not _tcp_port_open(self.host, self.port),
            timeout,
            f"port {self.port} of Postfix '{self.name}' to close",
        )

    def _reap_children(self, timeout: float) -> None:
        """Wait for all processes running in our queue dir to exit; SIGKILL stragglers."""
        if not self.queue_dir.exists():
            return
        try:
            wait_until(lambda: not _pids_with_cwd_under(self.queue_dir), timeout, "postfix children to exit")
        except LabError:
            _kill(_pids_with_cwd_under(self.queue_dir), signal.SIGKILL)
            wait_until(lambda: not _pids_with_cwd_under(self.queue_dir), 5.0, "killed postfix children to exit")

    def reload(self, timeout: float = 10.0) -> None:
        """``postfix reload`` and wait until the master logged the reload and
        the SMTP port greets again."""
        if not self.is_running():
            return
        before = self.log_path.stat().st_size if self.log_path.exists() else 0
        master = self.master_pid
        old_smtpd = {p for p in _pids_with_cwd_under(self.queue_dir) if p != master and _comm(p) == "smtpd"}
        self._run(["postfix", "-c", str(self.conf_dir), "reload"])
        wait_until(
            lambda: re.search(r"master\[\d+\]: reload ", _read_text(self.log_path, before)),
            timeout,
            f"Postfix '{self.name}' to log its reload",
            on_timeout=self.log_tail,
        )
        # Idle smtpd processes from before the reload keep accept()ing on the
        # shared listen socket until they notice the reload, so a connection
        # made right now could still see the old config.  Wait for them to go
        # (ones busy with a client session may legitimately stay; bounded).
        with contextlib.suppress(LabError):
            wait_until(lambda: not any(_pid_alive(p) for p in old_smtpd), 5.0, "pre-reload smtpd to exit")
        self.start(timeout=timeout)


    def postconf(self, **settings: Any) -> None:
        """``postconf -e name=value …`` then ``postfix reload`` (if running).

        Setting ``relayhost`` also switches ``default_transport`` between
        ``smtp`` and the off-box-refusing ``error`` transport unless given.
        """
        if not settings:
            return
        values = {k: str(v) for k, v in settings.items()}
        values = {**self._transport_for(values), **values}
        self._postconf_set(values)
        self.reload()

    def postconf_get(self, name: str) -> str:
        """Current value of a main.cf parameter (``postconf -h``)."""
        return self._run(self._postconf_cmd("-h", name)).stdout.rstrip("\n")

    def reset_config(self) -> bool:
        """Restore main.cf and master.cf as they were after construction;
        reload if anything changed.  Returns True if something was restored."""
        changed = False
        for name, text in self._baseline.items():
            path = self.conf_dir / name
            if path.read_text() != text:
                path.write_text(text)
                changed = True
        if changed:
            self._backdate_config()
            self.reload()
        return changed

    def __repr__(self) -> str:
        return f"<PrivatePostfix {self.name} {self.host}:{self.port} dir={self.dir}>"

    # -- mail ----------------------------------------------------------------

    def _mail_files(self) -> list[Path]:
        files: list[Path] = []
        for sub in ("new", "cur"):
            d = self.maildir.parent / sub
            if d.is_dir():
                files.extend(p for p in d.iterdir() if p.is_file())
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def messages(self) -> list[bytes]:
        """Raw bytes of every delivered message (Maildir ``new/`` and ``cur/``),
        oldest first.

        Note: virtual(8) stores messages with LF line endings and prepends
        ``Return-Path:``, ``Delivered-To:`` and Postfix's ``Received:`` header.
        """
        out = []
        for p in self._mail_files():
            with contextlib.suppress(FileNotFoundError):
                out.append(p.read_bytes())
        return out

    def wait_for_messages(self, n: int, timeout: float = 20.0) -> list[bytes]:
        """Poll until at least ``n`` messages were delivered; return all of them.

        Delivery is asynchronous (smtpd → cleanup → qmgr → virtual), so a 250
        reply to DATA does not mean the file exists yet.  Raises
        AssertionError with the log tail on timeout.
        """
        start = time.monotonic()
        flushed = False

        def delivered() -> bool:
            nonlocal flushed
            if len(self._mail_files()) >= n:
                return True
            if not flushed and time.monotonic() - start > 5:
                # A message queued while a `postfix reload` (reset_config)
                # restarted qmgr can wait for the next queue run: ask for it.
                flushed = True
                self._run(["postqueue", "-c", str(self.conf_dir), "-f"], check=False)
            return False

        try:
            wait_until(delivered, timeout, f"{n} message(s)", interval=0.05)
        except LabError:
            raise AssertionError(
                f"[{self.name}] expected {n} delivered message(s) within {timeout}s, "
                f"got {len(self._mail_files())}\n--- log since mark ---\n{tail(self.log())}"
                f"\n--- queue ---\n{self._run(['postqueue', '-c', str(self.conf_dir), '-p'], check=False).stdout}"
                f"--- processes ---\n{[(p, _comm(p)) for p in _pids_with_cwd_under(self.queue_dir)]}"
                f"\n--- trouble anywhere in the log (also before the mark) ---\n{self.trouble()}"
            ) from None
        return self.messages()

    def trouble(self, lines: int = 20) -> str:
        """The last warning/fatal/panic lines of the whole log, e.g. master's
        "bad command startup -- throttling" from an earlier test: a throttled
        service takes no connections for service_throttle_time, and nothing
        after the mark says why delivery stalls."""
        found = [line for line in self.full_log().splitlines() if re.search(r": (warning|fatal|panic): ", line)]
        return "\n".join(found[-lines:]) or "(none)"

    def flush_maildir(self) -> None:
        """Delete every delivered message (``new/``, ``cur/`` and ``tmp/``)."""
        for sub in ("new", "cur", "tmp"):
            d = self.maildir.parent / sub
            if d.is_dir():
                for p in d.iterdir():
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()

    def flush_queue(self) -> None:
        """Delete all queued mail (``postsuper -d ALL``), e.g. leftovers of a
        previous test that are still being retried."""
        self._run(["postsuper", "-c", str(self.conf_dir), "-d", "ALL"], check=False)

    def queue_ids(self) -> list[str]:
        """IDs of messages currently in the queue (all queues)."""
        ids: list[str] = []
        for sub in ("incoming", "active", "deferred", "hold", "maildrop"):
            d = self.queue_dir / sub
            if d.is_dir():
                ids.extend(p.name for p in d.rglob("*") if p.is_file())
        return ids

    def submit(
        self,
        message: bytes | str,
        mail_from: str = "sender@sender.test",
        rcpt_to: str | Sequence[str] = "rcpt@example.test",
        *,
        helo: str = "client.test",
        timeout: float = 10.0,
    ) -> dict[str, tuple[int, bytes]]:
        """Send ``message`` to this instance's SMTP port with smtplib.

        Returns smtplib's refused-recipients dict (empty on full success).
        """
        import smtplib

        with smtplib.SMTP(self.host, self.port, local_hostname=helo, timeout=timeout) as smtp:
            return smtp.sendmail(mail_from, rcpt_to, message)

    # -- logs -----------------------------------------------------------------

    def mark(self) -> int:
        """Remember the current end of the log; :meth:`log` and
        :meth:`wait_for_log` only look at lines written after it."""
        try:
            self._log_offset = self.log_path.stat().st_size
        except FileNotFoundError:
            self._log_offset = 0
        return self._log_offset

    def log(self) -> str:
        """postfix.log content since the last :meth:`mark` (whole log if never marked)."""
        return _read_text(self.log_path, self._log_offset)

    log_since_start = log

    def full_log(self) -> str:
        return _read_text(self.log_path)

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.full_log(), lines)

    def wait_for_log(self, regex: str, timeout: float = 10.0) -> re.Match[str]:
        """Poll the log (since :meth:`mark`) until ``regex`` matches (MULTILINE).

        Postfix logs through postlogd asynchronously, so a line may show up a
        few milliseconds after the SMTP reply.  Raises AssertionError with the
        log since mark on timeout.
        """
        pattern = re.compile(regex, re.M)
        try:
            return wait_until(lambda: pattern.search(self.log()), timeout, f"log line /{regex}/", interval=0.05)
        except LabError:
            raise AssertionError(
                f"[{self.name}] /{regex}/ not found in postfix.log within {timeout}s\n"
                f"--- log since mark ---\n{tail(self.log(), 60)}"
            ) from None


class PostfixFactory:
    """Creates extra :class:`PrivatePostfix` instances and cleans them all up."""

    def __init__(self) -> None:
        self.instances: list[PrivatePostfix] = []

    def __call__(self, *args: Any, **kwargs: Any) -> PrivatePostfix:
        """``PrivatePostfix(*args, **kwargs)``, remembered for cleanup (not started)."""
        pf = PrivatePostfix(*args, **kwargs)
        self.instances.append(pf)
        return pf

    def sender(self, relay_port: int, **kwargs: Any) -> PrivatePostfix:
        """``PrivatePostfix.sender(relay_port, **kwargs)``, remembered for cleanup."""
        pf = PrivatePostfix.sender(relay_port, **kwargs)
        self.instances.append(pf)
        return pf

    def cleanup(self) -> None:
        for pf in reversed(self.instances):
            with contextlib.suppress(Exception):
                pf.cleanup()


# --------------------------------------------------------------------------
# redis
# --------------------------------------------------------------------------


class RedisServer(_Instance):
    """A private ``redis-server`` on a loopback TCP port and a unix socket.

    Runs in the foreground as our child (``--daemonize no``) with persistence
    off (``--save "" --appendonly no``), working dir/logfile in ``self.dir``.
    (``--port 0`` would disable TCP altogether, so a free port is used instead.)

    ``url`` is ``redis://127.0.0.1:PORT/0``; ``socket`` the unix socket path;
    ``unix_url`` ``unix://…?db=0``.  :meth:`command` speaks minimal RESP so the
    lab needs no redis client library.
    """

    host = LOOPBACK

    def __init__(self, port: int | None = None, extra: Sequence[str] = ()) -> None:
        self.port = port if port is not None else free_port()
        self.extra = list(extra)  # more redis-server options, e.g. ["--replicaof", "127.0.0.1", "6379"]
        self.dir = _make_lab_dir("redis")
        self.socket: Path = self.dir / "redis.sock"
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        _register(self)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket}?db=0"

    def start(self, timeout: float = 15.0) -> None:
        """Spawn redis-server and poll PING on the unix socket until +PONG."""
        if self.proc is not None and self.proc.poll() is None:
            return
        binary = which("redis-server")
        if binary is None:
            raise LabError("redis-server not found")
        cmd = [
            binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.log_path),
            "--pidfile", "",
            *self.extra,
        ]  # fmt: skip
        with open(self.dir / "redis.stdout", "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.dir,  # lets reap_stale_labs() find it
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_preexec(),
            )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"redis-server exited with {self.proc.returncode}\n{self._log_tail()}")
            try:
                return self.command("PING") == b"PONG"
            except OSError:
                return False

        wait_until(ready, timeout, f"redis-server on {self.socket}", on_timeout=self._log_tail)

    def _log_tail(self) -> str:
        return tail(_read_text(self.log_path) + _read_text(self.dir / "redis.stdout"))

    def command(self, *args: str | bytes, timeout: float = 5.0) -> bytes | int | None:
        """Send one command over the unix socket; returns the decoded simple
        reply (status/bulk string as bytes, integer as int, nil as None).
        Raises LabError on an error reply."""
        parts = [a.encode() if isinstance(a, str) else a for a in args]
        payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.socket))
            s.sendall(payload)
            f = s.makefile("rb")
            line = f.readline()
            if not line:
                raise ConnectionError("redis closed the connection")
            kind, body = line[:1], line[1:].rstrip(b"\r\n")
            if kind == b"+":
                return body
            if kind == b"-":
                raise LabError(f"redis error: {body.decode()}")
            if kind == b":":
                return int(body)
            if kind == b"$":
                n = int(body)
                return None if n < 0 else f.read(n + 2)[:n]
            raise LabError(f"unsupported redis reply {line!r}")

    def ping(self) -> bool:
        return self.command("PING") == b"PONG"

    def flushall(self) -> None:
        self.command("FLUSHALL")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait; SIGKILL after ``timeout``."""
        _terminate(self.proc, timeout)
        self.proc = None



class RedisSentinel(_Instance):
    """A ``redis-server --sentinel`` on a loopback port monitoring the
    primary ``127.0.0.1:primary_port`` as *service* (quorum 2, a primary
    is down after ``down_after_ms``)."""

    host = LOOPBACK

    def __init__(self, primary_port: int, service: str = "smtpguard", down_after_ms: int = 1000) -> None:
        self.port = free_port()
        self.service = service
        self.dir = _make_lab_dir("sentinel")
        self.conf = self.dir / "sentinel.conf"
        self.conf.write_text(
            f"port {self.port}\nbind {self.host}\ndir {self.dir}\nlogfile {self.dir / 'sentinel.log'}\n"
            f"sentinel monitor {service} {self.host} {primary_port} 2\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} 10000\n"
            f"sentinel parallel-syncs {service} 1\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        _register(self)

    def start(self, timeout: float = 15.0) -> None:
        binary = which("redis-server")
        if binary is None:
            raise LabError("redis-server not found")
        self.proc = subprocess.Popen([binary, str(self.conf), "--sentinel"], cwd=self.dir, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=_preexec())
        wait_until(lambda: _tcp_port_open(self.host, self.port), timeout, f"sentinel on port {self.port}",
                   on_timeout=lambda: tail(_read_text(self.dir / "sentinel.log")))

    def primary(self) -> int | None:
        """The port of the primary this sentinel names now."""
        with socket.create_connection((self.host, self.port), timeout=5) as s:
            s.sendall(f"SENTINEL get-master-addr-by-name {self.service}\r\n".encode())
            reply = s.recv(4096).decode()
        parts = reply.split("\r\n")
        return int(parts[4]) if len(parts) > 4 and parts[4].isdigit() else None

    def stop(self, timeout: float = 10.0) -> None:
        _terminate(self.proc, timeout)
        self.proc = None


# --------------------------------------------------------------------------
# DNS
# --------------------------------------------------------------------------


class DnsBlackhole:
    """A DNS "server" that accepts queries and never answers.

    One UDP socket and one listening TCP socket on the same loopback port.
    Nobody ever reads from them: UDP datagrams are queued (then dropped) by
    the kernel, TCP connections complete in the listen backlog and hang.
    Because the port *is* bound, the kernel sends no ICMP port-unreachable /
    RST, so clients see a genuine timeout.  No thread, nothing to stop except
    closing the sockets.
    """

    address = LOOPBACK

    def __init__(self) -> None:
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.address, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind((self.address, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(64)
            self.udp, self.tcp, self.port = udp, tcp, port
            _register(self)
            return
        raise LabError("could not bind a black-hole DNS port")

    def server_arg(self, zone: str) -> str:
        """dnsmasq option forwarding ``zone`` here (i.e. making it time out)."""
        return f"--server=/{zone}/{self.address}#{self.port}"

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()
        _unregister(self)

    cleanup = close

    def __enter__(self) -> DnsBlackhole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DnsServer(_Instance):
    """A private dnsmasq answering fixture records on 127.0.0.1:``port`` (UDP+TCP).

    Command line (no config file, nothing under /etc or /run is read or
    written)::

        dnsmasq --no-daemon --conf-file=/dev/null --port=P
                --listen-address=127.0.0.1 --bind-interfaces
                --no-resolv --no-hosts --cache-size=0 --log-facility=-
                [--log-queries=extra] [--local=/#/] <args>

    * ``--no-daemon`` (``-d``, debug mode): stays in the foreground as our
      child, writes no pid file and does *not* switch to the ``dnsmasq`` user,
      so running as root needs no ``--user``/``--pid-file`` options.
    * ``--conf-file=/dev/null`` keeps /etc/dnsmasq.conf (and its conf-dir) out.
    * ``--log-facility=-`` logs to stderr only (captured in ``dnsmasq.log``)
      instead of also trying syslog.
    * ``--no-resolv`` + no ``--server`` means there is no upstream: names that
      are neither records nor in a ``--local`` zone get **REFUSED**.  Therefore
      ``nxdomain_by_default=True`` adds ``--local=/#/`` which turns every
      unknown name into **NXDOMAIN** (what DNSBL / rDNS tests expect); more
      specific ``--server=/zone/…`` options still win.

    Record syntax reminders (dnsmasq 2.90)::

        --host-record=mx.example.test,192.0.2.10      A (+ automatic PTR)
        --address=/2.0.0.127.zen.test/127.0.0.2       A for name and subdomains
        --txt-record=example.test,v=spf1 -all          (no quotes in an argv
                                                       list: there is no shell to
                                                       strip them; a comma starts
                                                       a second string)
        --ptr-record=5.113.0.203.in-addr.arpa,mail.example.org
        --mx-host=example.test,mx.example.test,10

    Zones that must *time out* (no answer at all): pass ``timeout_zones``; they
    are forwarded to an internal :class:`DnsBlackhole`.  Checked on dnsmasq
    2.90: forwarding to an unbound port also just times out (the ICMP
    port-unreachable is ignored and no SERVFAIL is sent), but a bound
    black-hole port can't be taken over by somebody else, so it is used.
    """

    address = LOOPBACK

    def __init__(
        self,
        args: Sequence[str] = (),
        port: int | None = None,
        *,
        timeout_zones: Sequence[str] = (),
        nxdomain_by_default: bool = True,
        log_queries: bool = True,
    ) -> None:
        self.args = list(args)
        self.port = port if port is not None else free_port("both")
        self.dir = _make_lab_dir("dnsmasq")
        self.log_path = self.dir / "dnsmasq.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.blackhole: DnsBlackhole | None = DnsBlackhole() if timeout_zones else None
        self.timeout_zones = list(timeout_zones)
        self.nxdomain_by_default = nxdomain_by_default
        self.log_queries = log_queries
        _register(self)

    def command(self) -> list[str]:
        binary = which("dnsmasq") or "dnsmasq"
        cmd = [
            binary,
            "--no-daemon",
            "--conf-file=/dev/null",
            f"--port={self.port}",
            f"--listen-address={self.address}",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--cache-size=0",
            "--log-facility=-",
        ]
        if self.log_queries:
            cmd.append("--log-queries=extra")
        if self.blackhole is not None:
            cmd.extend(self.blackhole.server_arg(z) for z in self.timeout_zones)
        if self.nxdomain_by_default:
            cmd.append("--local=/#/")
        return cmd + self.args

    def start(self, timeout: float = 10.0) -> None:
        """Spawn dnsmasq and poll with a UDP probe query until it answers."""
        if self.proc is not None and self.proc.poll() is None:
            return
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.dir,  # lets reap_stale_labs() find it
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_preexec(),
            )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"dnsmasq exited with {self.proc.returncode}:\n{self.log()}")
            return _dns_probe(self.address, self.port)

        wait_until(ready, timeout, f"dnsmasq on {self.address}:{self.port}", on_timeout=lambda: tail(self.log()))

    def log(self) -> str:
        """dnsmasq's output (startup messages, and each query with --log-queries)."""
        return _read_text(self.log_path)

    def resolver(self, timeout: float = 2.0, lifetime: float | None = None) -> dns.resolver.Resolver:
        """A dnspython Resolver that only talks to this server."""
        import dns.resolver

        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [self.address]
        r.port = self.port
        r.timeout = timeout
        r.lifetime = lifetime if lifetime is not None else timeout
        r.cache = None
        return r

    def stop(self, timeout: float = 10.0) -> None:
        _terminate(self.proc, timeout)
        self.proc = None

    def cleanup(self) -> None:
        if self.blackhole is not None:
            self.blackhole.close()
            self.blackhole = None
        super().cleanup()


def _dns_probe(host: str, port: int, timeout: float = 0.2) -> bool:
    """Send a minimal A query for ``lab-probe.invalid`` and report whether any
    DNS response (whatever its rcode) came back.  Stdlib only."""
    qid = os.getpid() & 0xFFFF
    header = qid.to_bytes(2, "big") + b"\x01\x00" + b"\x00\x01" + b"\x00\x00" * 3
    qname = b"".join(bytes([len(label)]) + label for label in (b"lab-probe", b"invalid")) + b"\x00"
    query = header + qname + b"\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))  # connected: port-unreachable -> instant ECONNREFUSED
            s.send(query)
            data = s.recv(512)
        except OSError:  # timeout, or not bound yet
            return False
    return data[:2] == query[:2]


# --------------------------------------------------------------------------
# HAProxy
# --------------------------------------------------------------------------


class HAProxy(_Instance):
    """A private ``haproxy`` (TCP mode, foreground) on 127.0.0.1 in front of
    ``backend_port``, sending a PROXY header of version ``proxy`` (1 or 2;
    0: none, a plain TCP proxy)."""

    host = LOOPBACK

    def __init__(self, backend_port: int, proxy: int = 2, port: int | None = None) -> None:
        self.port = port if port is not None else free_port()
        self.dir = _make_lab_dir("haproxy")
        self.config = self.dir / "haproxy.cfg"
        send = {0: "", 1: " send-proxy", 2: " send-proxy-v2"}[proxy]
        self.config.write_text(
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
            f"frontend smtp\n  bind {self.host}:{self.port}\n  default_backend guard\n"
            f"backend guard\n  server guard {self.host}:{backend_port}{send}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        _register(self)

    def start(self, timeout: float = 15.0) -> HAProxy:
        binary = which("haproxy")
        if binary is None:
            raise LabError("haproxy not found")
        with open(self.dir / "haproxy.out", "wb") as out:
            self.proc = subprocess.Popen(
                [binary, "-db", "-f", str(self.config)], cwd=self.dir, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=_preexec(),
            )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"haproxy exited with {self.proc.returncode}\n{_read_text(self.dir / 'haproxy.out')}")
            return _tcp_port_open(self.host, self.port)

        wait_until(up, timeout, f"haproxy on {self.host}:{self.port}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        _terminate(self.proc, timeout)
        self.proc = None
