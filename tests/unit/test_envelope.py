"""MAIL/RCPT argument parsing, ESMTP parameters and xtext."""

import pytest

from smtpguard.envelope import EnvelopeError, parse_mail, parse_rcpt, xtext


@pytest.mark.parametrize(
    ("arg", "address", "params"),
    [
        ("FROM:<a@b.example>", "a@b.example", ()),
        ("from: <a@b.example>", "a@b.example", ()),
        ("FROM:<>", "", ()),
        ("FROM:a@b.example", "a@b.example", ()),
        ("FROM:<a@b.example> SIZE=1000 BODY=8BITMIME", "a@b.example", ("SIZE=1000", "BODY=8BITMIME")),
        ("FROM:<a@b.example> RET=HDRS ENVID=abc+2Bdef SMTPUTF8", "a@b.example", ("RET=HDRS", "ENVID=abc+2Bdef",
                                                                               "SMTPUTF8")),
        ("FROM:<@relay.example:a@b.example>", "a@b.example", ()),
    ],
)
def test_mail_ok(arg: str, address: str, params: tuple[str, ...]) -> None:
    path = parse_mail(arg, 10_000_000, smtputf8=True)
    assert (path.address, path.params) == (address, params)


@pytest.mark.parametrize(
    ("arg", "reply"),
    [
        (None, "501 5.5.4 Syntax: MAIL FROM:<address>"),
        ("TO:<a@b>", "501 5.5.4 Syntax: MAIL FROM:<address>"),
        ("FROM:<a@b", "501 5.1.7 Bad sender address syntax"),
        ("FROM:<a b@c>", "501 5.1.7 Bad sender address syntax"),
        ("FROM:<a@b>x", "501 5.1.7 Bad sender address syntax"),
        ("FROM:<a@b> FOO=1", "555 5.5.4 Unsupported option: FOO=1"),
        ("FROM:<a@b> SIZE=x", "501 5.5.4 Bad message size syntax"),
        ("FROM:<a@b> SIZE=20000000", "552 5.3.4 Message size exceeds fixed limit"),
        ("FROM:<a@b> BODY=BINARYMIME", "501 5.5.4 Unsupported BODY parameter value"),
        ("FROM:<a@b> RET=ALL", "501 5.5.4 Bad RET parameter syntax"),
        # ASCII-only rules: str.isdigit() and str.upper() accept what SMTP does not.
        ("FROM:<a@b> SIZE=\u00b2", "501 5.5.4 Bad message size syntax"),
        ("FROM:<a@b> SIZE=\u0663", "501 5.5.4 Bad message size syntax"),
        ("FROM:<a@b> BODY=8bitm\u0131me", "501 5.5.4 Unsupported BODY parameter value"),
        ("FROM:<a@b> \u017fIZE=100", "555 5.5.4 Unsupported option: \u017fIZE=100"),
        # A parameter that takes a value is only known with its "=" (smtpd: strncasecmp "SIZE=").
        ("FROM:<a@b> SIZE", "555 5.5.4 Unsupported option: SIZE"),
        ("FROM:<a@b> BODY", "555 5.5.4 Unsupported option: BODY"),
    ],
)
def test_mail_errors(arg: str | None, reply: str) -> None:
    with pytest.raises(EnvelopeError) as err:
        parse_mail(arg, 10_000_000, smtputf8=True)
    assert str(err.value.reply) == reply


def test_rcpt_dsn_params_pass_through() -> None:
    path = parse_rcpt("TO:<bob@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+2Bx@example.test")
    assert path.address == "bob@example.test"
    assert path.params == ("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob+2Bx@example.test")


@pytest.mark.parametrize(
    ("arg", "reply"),
    [
        ("TO:<>", "501 5.1.3 Bad recipient address syntax"),
        ("FROM:<a@b>", "501 5.5.4 Syntax: RCPT TO:<address>"),
        ("TO:<a@b> NOTIFY=NEVER,SUCCESS", "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
        ("TO:<a@b> ORCPT=rfc822", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
        ("TO:<a@b> SIZE=1", "555 5.5.4 Unsupported option: SIZE=1"),
    ],
)
def test_rcpt_errors(arg: str, reply: str) -> None:
    with pytest.raises(EnvelopeError) as err:
        parse_rcpt(arg)
    assert str(err.value.reply) == reply


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("mail.example.com", "mail.example.com"),
        ("a+b=c", "a+2Bb+3Dc"),
        ("two words", "two+20words"),
        ("ünï", "+C3+BCn+C3+AF"),
        ("tab\there", "tab+09here"),
        ("", ""),
    ],
)
def test_xtext(value: str, encoded: str) -> None:
    assert xtext(value) == encoded
