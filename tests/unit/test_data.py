"""The DATA scanner: end-of-data only at CRLF.CRLF, smuggling variants refused."""

import pytest

from smtpguard.data import DataScanner

SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\n", b"\r\n\x00.\r\n", b"\r\n.\r\r\n"]


def scan(chunks: list[bytes], **kw: object) -> tuple[bytes, bytes, DataScanner]:
    s = DataScanner(size_limit=kw.get("size", 10_000_000), line_limit=kw.get("line", 2048),  # type: ignore[arg-type]
                    bare_newline=kw.get("mode", "reject"))  # type: ignore[arg-type]
    out, left = b"", b""
    for c in chunks:
        o, left = s.feed(c)
        out += o
        if s.done:
            break
    return out, left, s


def test_simple_message_and_leftover() -> None:
    out, left, s = scan([b"Subject: x\r\n\r\nbody\r\n..stuffed\r\n.\r\nQUIT\r\n"])
    assert s.done and s.error is None
    assert out == b"Subject: x\r\n\r\nbody\r\n..stuffed\r\n"  # still stuffed: Postfix unstuffs
    assert left == b"QUIT\r\n"


def test_empty_message() -> None:
    out, left, s = scan([b".\r\n"])
    assert s.done and out == b"" and left == b""


@pytest.mark.parametrize("split", range(1, 12))
def test_end_marker_split_across_chunks(split: int) -> None:
    data = b"line one\r\nline\r\n.\r\n"
    out, left, s = scan([data[:split], data[split:]])
    assert s.done and out == b"line one\r\nline\r\n" and left == b""


def test_byte_by_byte() -> None:
    data = b"a\r\nb\r\n..c\r\n.\r\nNOOP\r\n"
    out, left, s = scan([bytes([b]) for b in data])
    assert s.done and out == b"a\r\nb\r\n..c\r\n"


@pytest.mark.parametrize("seq", SMUGGLING)
def test_smuggling_sequences_rejected(seq: bytes) -> None:
    data = b"Subject: a\r\n\r\nfirst" + seq + b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@example.test>\r\nDATA\r\nevil\r\n.\r\n"
    out, left, s = scan([data])
    assert s.done
    assert s.error is not None and s.error.code == 550
    assert b"evil@x" not in out
    # The message ends at the first real CRLF.CRLF, never earlier.
    assert left == b""


@pytest.mark.parametrize("seq", SMUGGLING)
def test_smuggling_sequences_normalized(seq: bytes) -> None:
    data = b"Subject: a\r\n\r\nfirst" + seq + b"second\r\n.\r\n"
    out, left, s = scan([data], mode="normalize")
    assert s.done and s.error is None
    # Nothing in what is forwarded can end the message for Postfix.
    assert b"\r\n.\r\n" not in b"\r\n" + out
    assert out.count(b"\r") == out.count(b"\r\n") == out.count(b"\n")
    assert b"\x00" not in out


def test_size_limit() -> None:
    out, left, s = scan([b"x" * 100 + b"\r\n"] * 20 + [b".\r\n"], size=1000)
    assert s.done and s.error is not None and str(s.error).startswith("552 5.3.4")
    assert len(out) <= 1000


def test_line_limit_in_partial_line() -> None:
    out, left, s = scan([b"x" * 3000, b"y" * 3000, b"\r\n.\r\n"], line=2048)
    assert s.done and s.error is not None and "line too long" in s.error.text


def test_line_limit_in_complete_lines() -> None:
    out, left, s = scan([b"ok\r\n" + b"x" * 2100 + b"\r\n.\r\n"], line=2048)
    assert s.done and s.error is not None


def test_dot_after_long_line_is_not_an_end() -> None:
    # A "." right after the cut of an over-long line is mid-line, not a line start.
    out, left, s = scan([b"x" * 5000, b".\r\nstill data\r\n.\r\n"], line=2048)
    assert s.done and left == b""
