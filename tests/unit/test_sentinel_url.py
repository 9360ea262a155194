"""``redis+sentinel://`` state URLs: what [state] url accepts and what the
store makes of it."""

from __future__ import annotations

import pytest

from smtpguard.config import ConfigError, from_dict
from smtpguard.store.redis import parse_sentinel_url


def test_sentinel_urls() -> None:
    url = "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,[2001:db8::3]:26379/mymaster?db=2"
    assert from_dict({"state": {"url": url}}).state.url == url
    assert parse_sentinel_url(url) == ([("10.0.0.1", 26379), ("10.0.0.2", 26379), ("2001:db8::3", 26379)],
                                       "mymaster", 2)
    assert parse_sentinel_url("redis+sentinel://h:1/svc") == ([("h", 1)], "svc", 0)
    for bad in ("redis+sentinel://h/svc", "redis+sentinel://h:1/", "redis+sentinel://h:1/svc?db=x"):
        with pytest.raises(ConfigError, match=r"^state\.url: expected .*redis\+sentinel://HOST:PORT"):
            from_dict({"state": {"url": bad}})
    with pytest.raises(ValueError, match="only \\?db=N"):
        parse_sentinel_url("redis+sentinel://h:1/svc?password=x")
