"""Client-side TLS (STARTTLS): the ``[tls]`` section and the server's SSLContext.

How it works: :func:`build_context` reads ``cert_file``/``key_file`` (and
``chain_file`` when set) into a server-side :class:`ssl.SSLContext` with
TLS 1.2 as the lowest protocol and the Python/OpenSSL default cipher policy.
Every problem raises :class:`~smtpguard.options.ConfigError` naming the key
(``tls.cert_file: ...``), so ``smtpguard check-config`` reports it; the
section's ``validate`` builds the context once for that reason.  The
listener (:class:`smtpguard.listener.Server`) holds the live context and
rebuilds it with :func:`build_context` on SIGHUP (renewed certificates);
a context that fails to build keeps the previous one.

``security_level`` is Postfix's ``smtpd_tls_security_level``: ``none``
(no STARTTLS), ``may`` (offered after EHLO; needs a certificate, without
one STARTTLS is simply not offered) and ``encrypt`` (MAIL before STARTTLS
gets ``530 5.7.0 Must issue a STARTTLS command first``).

Postfix's XCLIENT cannot carry TLS state (3.7 to 3.12: ``PROTO`` is ``SMTP``
or ``ESMTP``, ``PROTO=ESMTPS`` is answered ``501 5.5.4 Bad PROTO syntax``, and
no attribute is about TLS), so the relay says ``PROTO=ESMTP``, Postfix's
``Received:`` says ``with ESMTP`` and the TLS facts live in our log --
and, with ``received_header = true``, in a ``Received:`` line of ours the
session machine puts right under Postfix's:
:func:`describe` gives smtpd's wording for the ``Anonymous TLS connection
established from ...`` line (docs/transport.md, "What the Received: header
shows after STARTTLS").
"""

from __future__ import annotations

import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .options import ConfigError, one_of, opt, parse_bool, parse_str
from .verdict import Reply

_PROTOCOLS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}

#: Replies of the STARTTLS command and of the ``encrypt`` level (Postfix's wording).
READY = Reply(220, "2.0.0", "Ready to start TLS")
STARTTLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
STARTTLS_SYNTAX = Reply(501, "5.5.4", "Syntax: STARTTLS")
ALREADY_ACTIVE = Reply(554, "5.5.1", "Error: TLS already active")
IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
NOT_AVAILABLE = Reply(502, "5.5.1", "Error: command not implemented")


@dataclass(frozen=True)
class TlsConfig:
    """``[tls]``: STARTTLS towards clients (smtpd_tls_*)."""

    security_level: str = field(
        default="may", metadata=opt(one_of("none", "may", "encrypt"), "smtpd_tls_security_level")
    )
    cert_file: str = field(default="", metadata=opt(parse_str, "smtpd_tls_cert_file"))
    key_file: str = field(default="", metadata=opt(parse_str, "smtpd_tls_key_file (empty: the cert_file)"))
    chain_file: str = field(
        default="", metadata=opt(parse_str, "smtpd_tls_chain_files (intermediate certificates)")
    )
    min_protocol: str = field(
        default="TLSv1.2",
        metadata=opt(one_of(*_PROTOCOLS), "smtpd_tls_mandatory_protocols / smtpd_tls_protocols (>=TLSv1.2)"),
    )
    received_header: bool = field(default=False, metadata=opt(
        parse_bool, "smtpd_tls_received_header",
        "Prepend a `Received:` trace header of smtpguard's to a message whose client used TLS, with the "
        "protocol and cipher (`(using TLSv1.3 with cipher ...)`, `with ESMTPS`), because Postfix's own "
        "Received: cannot show TLS through XCLIENT. Never added for a plaintext session."))

    @property
    def enabled(self) -> bool:
        """STARTTLS is offered: a level other than none and a certificate."""
        return self.security_level != "none" and bool(self.cert_file)

    def validate(self) -> None:
        if self.security_level == "encrypt" and not self.cert_file:
            raise ConfigError("cert_file", "security_level = encrypt needs a certificate")
        build_context(self)  # names the key of a missing, unreadable or mismatched file


def build_context(cfg: TlsConfig) -> ssl.SSLContext | None:
    """The server-side SSLContext for *cfg* (None when STARTTLS is off).
    Reads the files now: call it again to pick up renewed certificates."""
    if cfg.security_level == "none":
        return None
    if not cfg.cert_file:
        if cfg.key_file or cfg.chain_file:
            raise ConfigError("cert_file", "key_file/chain_file given without cert_file")
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _PROTOCOLS[cfg.min_protocol]
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    cert = _pem(cfg.cert_file, "cert_file")
    if b"CERTIFICATE-----" not in cert:
        raise ConfigError("cert_file", f"{cfg.cert_file}: no certificate found")
    key = _pem(cfg.key_file or cfg.cert_file, "key_file" if cfg.key_file else "cert_file")
    chain = _pem(cfg.chain_file, "chain_file") if cfg.chain_file else b""
    with tempfile.TemporaryDirectory(prefix="smtpguard-tls-") as tmp:
        # load_cert_chain wants the certificate and its chain in one file.
        # Only public data goes there; the key is read from key_file itself.
        certs = Path(tmp) / "certs.pem"
        certs.write_bytes(cert.rstrip(b"\n") + b"\n" + chain)
        try:
            ctx.load_cert_chain(certs, cfg.key_file or cfg.cert_file)
        except ssl.SSLError as exc:
            raise ConfigError(*_blame(cfg, exc, key)) from None
    return ctx


def _pem(path: str, key: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"{path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(key, f"{path}: not a PEM file")
    return data


def _blame(cfg: TlsConfig, exc: ssl.SSLError, key: bytes) -> tuple[str, str]:
    """Which key a load_cert_chain failure is about, and why."""
    reason = exc.reason or str(exc)
    key_name, key_path = ("key_file", cfg.key_file) if cfg.key_file else ("cert_file", cfg.cert_file)
    if reason == "KEY_VALUES_MISMATCH":
        return key_name, f"{key_path}: the private key does not match the certificate in {cfg.cert_file}"
    if b"PRIVATE KEY-----" not in key:
        return key_name, f"{key_path}: no private key found"
    return "cert_file", f"{cfg.cert_file}: bad certificate or chain ({reason})"


def describe(sslobj: ssl.SSLObject | ssl.SSLSocket) -> str:
    """``TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)`` as
    smtpd logs an established TLS connection."""
    cipher = sslobj.cipher()
    if cipher is None:
        return f"{sslobj.version()}"
    name, _, bits = cipher
    return f"{sslobj.version()} with cipher {name} ({bits}/{bits} bits)"

