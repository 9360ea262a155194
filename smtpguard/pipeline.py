"""Where the checks run, and in which order: written once, here.

The listener asks :meth:`Pipeline.on_connect` before the banner; the
conversation asks :meth:`on_helo`, :meth:`on_mail` and :meth:`on_rcpt` as
the commands arrive.  Each returns one :class:`~smtpguard.verdict.Verdict`.

Connect-time precedence follows postscreen's ``psc_endpt_lookup_done``:
global connection cap, then per-client concurrency, connection rate,
permanent access list, temporary allowlist cache, pregreet (with DNS
lookups running during the wait), and then the SMTP-phase checks.  Checks
are added to this module as they land; with none configured every phase
continues.
"""

from __future__ import annotations

from .config import Config
from .session import Session
from .verdict import CONTINUE, REPLIES, Action, Verdict


class Pipeline:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    async def on_connect(self, session: Session, active: int) -> Verdict:
        """Before the banner; *active* counts sessions including this one."""
        if active > self.cfg.server.max_connections:
            return Verdict(Action.DROP, REPLIES["busy"])
        return CONTINUE

    async def on_helo(self, session: Session) -> Verdict:
        return CONTINUE

    async def on_mail(self, session: Session) -> Verdict:
        return CONTINUE

    async def on_rcpt(self, session: Session, rcpt: str) -> Verdict:
        return CONTINUE
