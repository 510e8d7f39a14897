"""What the proxy knows of each service's deployment version, and when to re-check it (pure)."""

from __future__ import annotations

from forward_proxy.cache.versions import Knowledge, VersionBook


def test_version_knowledge_ages_from_fresh_to_due_to_expired() -> None:
    book = VersionBook(interval=10)
    origin = "http://127.0.0.1:8000"
    assert not book.known(origin) and book.state(origin, 0) is Knowledge.EXPIRED
    assert book.learn(origin, "v1", now=100) is True
    assert book.current(origin) == "v1"
    assert [book.state(origin, now).value for now in (100, 104.9, 105, 109.9, 110)] == [
        "fresh",
        "fresh",
        "due",
        "due",
        "expired",
    ]
    assert book.learn(origin, "v1", now=110) is False
    assert book.state(origin, 111) is Knowledge.FRESH
    assert book.learn(origin, "v2", now=112) is True and book.current(origin) == "v2"
    assert book.learn(origin, None, now=113) is True and book.current(origin) is None


def test_an_interval_of_zero_turns_re_checks_off() -> None:
    book = VersionBook(interval=0)
    assert book.state("http://m:1", 0) is Knowledge.FRESH
