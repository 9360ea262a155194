"""The policy delegation protocol, sans-IO: requests as Postfix writes them,
bad input of every kind, and a fuzzer that feeds arbitrary bytes in
arbitrary pieces (every request that ends gets exactly one answer; the
parser never raises and never holds more than its limits)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpguard.policy.protocol import Limits, PolicyParser, answer

# What Postfix 3.7's smtpd sends at RCPT (SMTPD_POLICY_README).
POSTFIX_REQUEST = (
    b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
    b"client_address=192.0.2.7\nclient_name=mx.example.org\nreverse_client_name=mx.example.org\n"
    b"client_port=40123\nhelo_name=mx.example.org\nsender=alice@example.org\nrecipient=bob@example.test\n"
    b"recipient_count=0\nqueue_id=\ninstance=1f2e.656f4a1b.8a2c1.0\nsize=0\netrn_domain=\nstress=\n"
    b"sasl_method=\nsasl_username=\nsasl_sender=\nccert_subject=\nccert_issuer=\nccert_fingerprint=\n"
    b"ccert_pubkey_fingerprint=\nencryption_protocol=\nencryption_cipher=\nencryption_keysize=0\n"
    b"policy_context=\nserver_address=127.0.0.1\nserver_port=25\ncompatibility_level=3.6\nmail_version=3.7.11\n\n"
)


def test_a_postfix_request() -> None:
    p = PolicyParser()
    [req] = p.feed(POSTFIX_REQUEST)
    assert req.ok and not req.unknown
    assert req.state == "RCPT"
    assert req.get("sender") == "alice@example.org" and req.get("queue_id") == ""
    assert req.size == len(POSTFIX_REQUEST)
    assert not p.pending


def test_byte_by_byte_and_pipelined() -> None:
    p = PolicyParser()
    out = []
    for b in POSTFIX_REQUEST * 3:
        out += p.feed(bytes([b]))
    assert len(out) == 3 and all(r.ok for r in out)
    assert [r.get("recipient") for r in out] == ["bob@example.test"] * 3


def test_crlf_lines_and_value_with_equals() -> None:
    [req] = PolicyParser().feed(b"request=smtpd_access_policy\r\nsender=a=b@x.test\r\n\r\n")
    assert req.ok and req.get("sender") == "a=b@x.test"


def test_unknown_attribute_is_noted_not_fatal() -> None:
    [req] = PolicyParser().feed(b"request=smtpd_access_policy\nfuture_thing=1\n\n")
    assert req.ok and req.unknown == ["future_thing"]


def test_line_without_equals() -> None:
    [req] = PolicyParser().feed(b"request=smtpd_access_policy\nGARBAGE\n\n")
    assert not req.ok and "line without '='" in req.problems[0]


def test_bad_attribute_name() -> None:
    [req] = PolicyParser().feed(b"request=smtpd_access_policy\nSender=x\n\n")
    assert not req.ok and "bad attribute name" in req.problems[0]


def test_missing_and_wrong_request() -> None:
    p = PolicyParser()
    [a, b] = p.feed(b"sender=x@y\n\nrequest=junk\n\n")
    assert a.problems == ["no request= attribute"]
    assert b.problems == ['unknown request type "junk"']


def test_oversized_attribute_in_one_piece_and_in_many() -> None:
    limits = Limits(max_line=100, max_request=1000)
    data = b"request=smtpd_access_policy\nsender=" + b"a" * 500 + b"\nrecipient=b@x\n\n"
    [req] = PolicyParser(limits).feed(data)
    assert not req.ok and "longer than 100 bytes" in req.problems[0]
    p = PolicyParser(limits)
    out = []
    for i in range(0, len(data), 7):
        out += p.feed(data[i:i + 7])
        assert len(p._buf) <= limits.max_line + 8  # never buffered beyond a line
    [req] = out
    assert not req.ok and req.get("recipient") == "b@x"
    # The next request on the connection is fine again.
    assert p.feed(b"request=smtpd_access_policy\n\n")[0].ok


def test_oversized_request() -> None:
    limits = Limits(max_line=100, max_request=1000)
    data = b"request=smtpd_access_policy\n" + b"".join(b"a%d=%s\n" % (i, b"x" * 50) for i in range(100)) + b"\n"
    p = PolicyParser(limits)
    [req] = p.feed(data)
    assert not req.ok and req.problems == ["request larger than 1000 bytes"]
    assert len(req.attrs) < 25


def test_pending_partial_request() -> None:
    p = PolicyParser()
    assert not p.pending
    assert p.feed(b"request=smtpd_access_policy\nsend") == []
    assert p.pending


def test_answer_is_one_line() -> None:
    assert answer("DUNNO") == b"action=DUNNO\n\n"
    assert answer("REJECT a\nb\x00é") == b"action=REJECT a?b???\n\n"


# ------------------------------------------------------------------ fuzzing

ATTR_NAMES = st.sampled_from(["request", "sender", "recipient", "client_address", "protocol_state", "x", "Bad",
                              "instance", ""])
VALUES = st.one_of(st.binary(max_size=300), st.just(b"smtpd_access_policy"), st.text(max_size=50).map(str.encode))
LINES = st.one_of(
    st.builds(lambda n, v: n.encode() + b"=" + v.replace(b"\n", b""), ATTR_NAMES, VALUES),
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")),
    st.just(b""),
)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(LINES, max_size=40), cuts=st.lists(st.integers(min_value=1, max_value=64), max_size=30),
       tail=st.binary(max_size=100).map(lambda b: b.replace(b"\n", b"")))
def test_fuzz_every_ended_request_gets_one_result(lines: list[bytes], cuts: list[int], tail: bytes) -> None:
    data = b"".join(line + b"\n" for line in lines) + tail
    limits = Limits(max_line=128, max_request=1024)
    p = PolicyParser(limits)
    out = []
    pos = 0
    for cut in cuts:
        out += p.feed(data[pos:pos + cut])
        pos += cut
        assert len(p._buf) <= limits.max_line + 1
    out += p.feed(data[pos:])
    # One result per empty line (a lone CR counts as one: CRLF line endings).
    assert len(out) == sum(1 for line in lines if line in (b"", b"\r"))
    for req in out:
        assert req.size <= len(data) + 1
        assert all(len(v.encode("utf-8", "surrogateescape")) <= limits.max_line for v in req.attrs.values())
        assert req.ok == (not req.problems)
        answer(req.get("sender"))  # any value can go into an answer


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4000))
def test_fuzz_binary(data: bytes) -> None:
    p = PolicyParser(Limits(max_line=512, max_request=2048))
    out = p.feed(data) + p.feed(b"\n\n")
    assert len(out) >= 1  # the two newlines end whatever was open


def _parsed(p: PolicyParser, chunks: list[bytes]) -> list[tuple[dict[str, str], list[str], list[str], int]]:
    return [(r.attrs, r.problems, r.unknown, r.size) for chunk in chunks for r in p.feed(chunk)]


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(LINES, max_size=40))
def test_fuzz_whole_requests_parse_as_line_by_line(lines: list[bytes]) -> None:
    """The fast path (whole requests in one read) gives what the
    line-by-line path gives (one byte per read never takes the fast path)."""
    data = b"".join(line + b"\n" for line in lines)
    limits = Limits(max_line=128, max_request=1024)
    whole = _parsed(PolicyParser(limits), [data])
    assert whole == _parsed(PolicyParser(limits), [data[i:i + 1] for i in range(len(data))])


def test_an_oversized_line_reads_the_same_whatever_the_reads() -> None:
    """Found by the fuzz test above: the problem text gave the bytes seen so
    far, which depend on how the input was split into reads."""
    data = b"request=0000000" + "\U00010000".encode() * 30 + b"\n\n"
    limits = Limits(max_line=128, max_request=1024)
    whole = _parsed(PolicyParser(limits), [data])
    assert whole == _parsed(PolicyParser(limits), [data[i:i + 1] for i in range(len(data))])
    assert whole[0][1] == ["attribute line longer than 128 bytes"]


def test_fast_path_postfix_requests_pipelined() -> None:
    one = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nsender=a=b@x.example\nrecipient=c@d.example\n"
           b"newer_attribute=1\nclient_address=192.0.2.7\n\n")
    reqs = PolicyParser().feed(one * 3 + b"request=smtpd_access_policy\nsend")
    assert len(reqs) == 3 and all(r.ok and r.size == len(one) for r in reqs)
    assert reqs[0].get("sender") == "a=b@x.example" and reqs[0].unknown == ["newer_attribute"]
