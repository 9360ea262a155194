"""``smtpguard.8``, the manual page, generated from the command line parser.

    python -m smtpguard.manpage > docs/smtpguard.8

``make docs`` regenerates it and ``tests/unit/test_docgen.py`` fails while
the committed file is stale; the wheel and ``make install`` carry it.
"""

from __future__ import annotations

import argparse
import sys

from .cli import DEFAULT_CONFIG, parser


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def _subcommands(p: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    out = []
    for action in p._actions:  # argparse offers no public walk of its sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                out.append((name, helps.get(name, ""), sub))
    return out


def manpage() -> str:
    top = parser()
    lines = [
        '.TH SMTPGUARD 8 "" "smtpguard" "System Manager\'s Manual"',
        ".SH NAME",
        "smtpguard \\- postscreen\\-like SMTP front end for Postfix",
        ".SH SYNOPSIS",
        ".B smtpguard",
        "[\\fB\\-\\-version\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
        _roff("smtpguard stands on port 25 in front of a real Postfix, screens every client as postscreen "
              "and smtpd restrictions do (pregreet, pipelining, DNSBL, HELO and address checks, access "
              "tables, greylisting with postgrey's semantics) and relays the sessions it accepts to Postfix "
              "on a loopback port, announcing the real client with XCLIENT."),
        ".SH COMMANDS",
    ]
    for name, text, sub in _subcommands(top):
        nested = _subcommands(sub)
        for full, sub_text, p in ([(f"{name} {n}", t, s) for n, t, s in nested] if nested else [(name, text, sub)]):
            lines += [".TP", f".B {_roff(full)}", _roff(sub_text or text)]
            opts = [a for a in p._actions if a.option_strings and a.dest != "help"]
            pos = [a for a in p._actions if not a.option_strings and a.help]
            for a in pos + opts:
                flag = ", ".join(a.option_strings) or (a.metavar if isinstance(a.metavar, str) else a.dest)
                lines += [".RS", ".TP", f"\\fB{_roff(flag)}\\fR", _roff(str(a.help or "")), ".RE"]
    lines += [
        ".SH FILES",
        ".TP",
        f".I {DEFAULT_CONFIG}",
        _roff("The configuration, read when neither -c nor $SMTPGUARD_CONFIG names another file; every key is "
              "described in configuration.md of the documentation (installed in /usr/share/doc/smtpguard/docs)."),
        ".SH ENVIRONMENT",
        ".TP",
        ".B SMTPGUARD_CONFIG",
        _roff("The configuration file when -c is not given."),
        ".TP",
        ".B JOURNAL_STREAM",
        _roff('Set by systemd; with [log] output = "auto", log lines go to the journal.'),
        ".SH SIGNALS",
        _roff("SIGHUP re-reads the configuration and its tables (a bad file is refused and the running one "
              "stays); SIGTERM stops accepting and lets transactions finish."),
        ".SH EXIT STATUS",
        _roff("0 on success; 1 on a configuration error or a failure; 141 when the output pipe was closed."),
        ".SH SEE ALSO",
        "\\fBpostscreen\\fR(8), \\fBsmtpd\\fR(8), \\fBpostconf\\fR(5), \\fBaccess\\fR(5), \\fBpostgrey\\fR(8)",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    sys.stdout.write(manpage())
    return 0


if __name__ == "__main__":
    sys.exit(main())
