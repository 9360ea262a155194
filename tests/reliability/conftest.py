"""The fault suite (issue 16): real Postfix, Redis and smtpguard under faults.

Sizes: the reduced run is part of ``make test``; ``make soak`` sets
``SMTPGUARD_SOAK=1`` for the full sizes and prints the table of figures
(:mod:`tests.reliability.figures`); docs/operations.md, "The fault suite", has the last full run."""

from __future__ import annotations

from tests.integration.conftest import guard, make_guard  # noqa: F401  (fixtures shared with the e2e tests)
