"""Screening checks: one module per check, each a small pure unit.

Every check has the same shape: a frozen config dataclass with ``enabled``,
``action`` (``ignore | enforce | drop | tempfail``, see
:func:`smtpguard.verdict.verdict_for`) and, where its pass can be cached in
the allowlist cache, ``ttl``; and a function that takes facts (and, for
network checks, an injected resolver or store) and returns a
:class:`smtpguard.verdict.Result`.  The order in which checks run is written
once, in :mod:`smtpguard.pipeline`.
"""
