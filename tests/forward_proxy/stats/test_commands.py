"""`forward-proxy stats` and `forward-proxy cache ...` on a real diskcache directory, run in-process."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from forward_proxy.cli import main
from forward_proxy.stats import commands
from forward_proxy.stats.counters import Counters
from forward_proxy.store.base import Entry
from forward_proxy.store.disk import open_store
from tests.forward_proxy.stats.table import parse_table

ORIGIN = "http://127.0.0.1:8000"
OTHER = "http://127.0.0.1:9000"
LIMIT = 64 * 1024


def _entry(key_id: str, route: str, *, origin: str = ORIGIN, age: float = 5.0) -> Entry:
    method, _, path = route.partition(" ")
    content = json.dumps({"key": key_id}).encode()
    return Entry(200, (("content-type", "application/json"),), content, time.time() - age, 0.5, "v1",
                 origin, route, "mini", method, path, key_id, len(content) + 32)  # fmt: skip


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """Three entries and the counts of 5 requests: 3 hits, 1 miss, 1 bypass."""
    directory = tmp_path / "cache"
    store, counter_store = open_store(directory, LIMIT)
    try:
        store.set("key-1", _entry("e1000001", "POST /v1/embeddings", age=7200), 3600)
        store.set("key-2", _entry("e2000002", "POST /v1/embeddings", origin=OTHER), 3600)
        store.set("key-3", _entry("i3000003", "POST /v2/models/*/infer", age=60), 3600)
        counters = Counters(counter_store)
        for name, amount in (("requests", 5), ("hits", 3), ("misses", 1), ("bypasses", 1), ("stores", 1)):
            counters.count(name, origin=ORIGIN, route="POST /v1/embeddings", model="mini", amount=amount)
        counters.count(
            "upstream_seconds_saved", origin=ORIGIN, route="POST /v1/embeddings", model="mini", amount=1.5
        )
    finally:
        store.close()
        counter_store.close()
    return directory


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _stored_keys(directory: Path) -> set[str]:
    store, counter_store = open_store(directory)
    try:
        return {entry.key_id for _, entry in store.iter_entries()}
    finally:
        store.close()
        counter_store.close()


# ---- stats ------------------------------------------------------------------------------------------


def test_stats_json_reports_the_counts_and_the_volume(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, "stats", "--json", "--cache-dir", str(cache_dir))
    report = json.loads(out)
    assert code == 0
    assert (report["requests"], report["hits"], report["misses"], report["bypasses"]) == (5, 3, 1, 1)
    assert report["hit_ratio"] == 0.6
    assert report["upstream_seconds_saved"] == 1.5
    assert (report["entries"], report["limit_bytes"]) == (3, LIMIT)
    assert report["size_bytes"] > 0
    assert [(r["route"], r["requests"]) for r in report["routes"]] == [("POST /v1/embeddings", 5)]


def test_stats_table(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "stats", "--cache-dir", str(cache_dir))
    summary, routes = parse_table(out)
    assert code == 0
    assert (summary["requests"], summary["hits"], summary["hit ratio"], summary["entries"]) == (
        "5",
        "3",
        "60.0%",
        "3",
    )
    assert [(r["ROUTE"], r["REQUESTS"], r["HITS"], r["SAVED"]) for r in routes] == [
        ("POST /v1/embeddings", "5", "3", "1.500 s")
    ]


def test_stats_shows_the_completion_tokens_saved_per_model(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, counter_store = open_store(cache_dir)
    chat = {"origin": ORIGIN, "route": "POST /v1/chat/completions", "model": "smol"}
    try:
        counters = Counters(counter_store)
        for name, amount in (("requests", 2), ("misses", 1), ("hits", 1), ("upstream_seconds_saved", 2.25)):
            counters.count(name, **chat, amount=amount)
        counters.count("completion_tokens_saved", **chat, amount=40)
    finally:
        store.close()
        counter_store.close()
    _, out, _ = _run(capsys, "stats", "--json", "--cache-dir", str(cache_dir))
    report = json.loads(out)
    routes = {r["route"]: r for r in report["routes"]}
    assert report["completion_tokens_saved"] == 40
    assert (
        routes[chat["route"]]["completion_tokens_saved"],
        routes[chat["route"]]["upstream_seconds_saved"],
    ) == (
        40,
        2.25,
    )
    _, out, _ = _run(capsys, "stats", "--cache-dir", str(cache_dir))
    summary, rows = parse_table(out)
    assert summary["tokens saved"] == "40"
    assert [(r["ROUTE"], r["SAVED"], r["TOKENS SAVED"]) for r in rows] == [
        ("POST /v1/embeddings", "1.500 s", "-"),
        (chat["route"], "2.250 s", "40"),
    ]


def test_stats_never_changes_the_size_limit(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run(capsys, "stats", "--cache-dir", str(cache_dir))
    _run(capsys, "cache", "ls", "--cache-dir", str(cache_dir))
    store, counter_store = open_store(cache_dir)
    try:
        assert store.volume().limit_bytes == LIMIT
    finally:
        store.close()
        counter_store.close()


def test_stats_watch_prints_again_until_interrupted(
    cache_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(commands.time, "sleep", sleep)
    code, out, _ = _run(capsys, "stats", "--json", "--watch", "1.5", "--cache-dir", str(cache_dir))
    assert code == 0 and naps == [1.5, 1.5]
    assert [json.loads(line)["requests"] for line in out.splitlines()] == [5, 5]


def test_stats_reset_starts_counting_again(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = json.loads(_run(capsys, "stats", "--json", "--cache-dir", str(cache_dir))[1])
    code, out, _ = _run(capsys, "stats", "--reset", "--cache-dir", str(cache_dir))
    after = json.loads(_run(capsys, "stats", "--json", "--cache-dir", str(cache_dir))[1])
    assert code == 0 and "reset" in out
    assert (after["requests"], after["hits"], after["routes"]) == (0, 0, [])
    assert after["started_at"] >= before["started_at"]
    assert after["entries"] == 3  # the entries stay


def test_a_missing_cache_directory_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "stats", "--cache-dir", str(tmp_path / "nowhere"))
    assert code == 1 and out == ""
    assert err.strip() == (
        f"forward-proxy stats: there is no cache at {tmp_path / 'nowhere'} yet (the proxy creates it on its "
        "first run); give the proxy's --cache-dir."
    )
    assert not (tmp_path / "nowhere").exists()


def test_the_cache_dir_defaults_to_the_environment(
    cache_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORWARD_PROXY_CACHE_DIR", str(cache_dir))
    assert json.loads(_run(capsys, "stats", "--json")[1])["requests"] == 5


def test_watch_needs_a_positive_interval(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["stats", "--watch", "0", "--cache-dir", str(cache_dir)])
    assert exit_info.value.code == 2
    assert "must be more than 0 seconds" in capsys.readouterr().err


# ---- cache ls / show ---------------------------------------------------------------------------------


def test_cache_ls_lists_every_entry_newest_first(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "cache", "ls", "--cache-dir", str(cache_dir))
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split()[:3] == ["KEY", "AGE", "SIZE"]
    assert [line.split()[0] for line in lines[1:-1]] == ["e2000002", "i3000003", "e1000001"]
    assert lines[-1].startswith("3 entries, ")


def test_cache_ls_json_with_a_filter(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys, "cache", "ls", "--json", "--route", "POST /v1/*", "--cache-dir", str(cache_dir)
    )
    listed = json.loads(out)
    assert code == 0
    assert [(e["key"], e["origin"]) for e in listed] == [("e2000002", OTHER), ("e1000001", ORIGIN)]
    assert listed[1]["age_seconds"] >= 7200


def test_cache_show_by_key_prefix(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "cache", "show", "i3", "--cache-dir", str(cache_dir))
    assert code == 0
    assert "key            i3000003" in out
    assert "route          POST /v2/models/*/infer" in out
    assert '"key": "i3000003"' in out


def test_cache_show_json_and_body(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shown = json.loads(_run(capsys, "cache", "show", "e1000001", "--json", "--cache-dir", str(cache_dir))[1])
    assert (shown["key"], shown["status"], shown["body"]) == ("e1000001", 200, '{"key": "e1000001"}')
    code, body, _ = _run(capsys, "cache", "show", "e1000001", "--body", "--cache-dir", str(cache_dir))
    assert (code, body) == (0, '{"key": "e1000001"}')


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("zz", "no entry has the key id 'zz'"),
        ("e", "key id 'e' is the start of 2 entries: e1000001, e2000002"),
    ],
)
def test_cache_show_explains_a_missing_or_ambiguous_key(
    cache_dir: Path, capsys: pytest.CaptureFixture[str], key: str, message: str
) -> None:
    code, out, err = _run(capsys, "cache", "show", key, "--cache-dir", str(cache_dir))
    assert (code, out) == (1, "")
    assert err.startswith("forward-proxy cache show: " + message)


# ---- cache purge ---------------------------------------------------------------------------------------


def test_purge_refuses_to_empty_the_cache_without_all(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, "cache", "purge", "--cache-dir", str(cache_dir))
    assert code == 2 and "refusing to remove every entry" in err
    code, _, err = _run(capsys, "cache", "purge", "--all", "--origin", ORIGIN, "--cache-dir", str(cache_dir))
    assert code == 2 and "--all removes every entry" in err
    assert _stored_keys(cache_dir) == {"e1000001", "e2000002", "i3000003"}


def test_purge_removes_exactly_what_it_names(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys, "cache", "purge", "--route", "/v1/*", "--origin", ORIGIN, "--cache-dir", str(cache_dir)
    )
    assert code == 0
    assert out.splitlines() == [
        f"removed e1000001  {ORIGIN}  POST /v1/embeddings  /v1/embeddings",
        f"removed 1 entry (51 B) matching origin {ORIGIN} and route /v1/*",
    ]
    assert _stored_keys(cache_dir) == {"e2000002", "i3000003"}


def test_purge_by_key_and_by_age(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run(capsys, "cache", "purge", "i3000003", "--cache-dir", str(cache_dir))
    assert _stored_keys(cache_dir) == {"e1000001", "e2000002"}
    code, out, _ = _run(capsys, "cache", "purge", "--older-than", "1h", "--cache-dir", str(cache_dir))
    assert code == 0 and out.splitlines()[0].startswith("removed e1000001 ")
    assert _stored_keys(cache_dir) == {"e2000002"}


def test_purge_dry_run_removes_nothing(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "cache", "purge", "--all", "--dry-run", "--cache-dir", str(cache_dir))
    assert code == 0 and out.splitlines()[-1].startswith("would remove 3 entries ")
    assert len(_stored_keys(cache_dir)) == 3


def test_purge_all_empties_the_cache_and_keeps_the_counters(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, "cache", "purge", "--all", "--cache-dir", str(cache_dir))
    assert code == 0 and out.splitlines()[-1].startswith("removed 3 entries ")
    assert _stored_keys(cache_dir) == set()
    report = json.loads(_run(capsys, "stats", "--json", "--cache-dir", str(cache_dir))[1])
    assert (report["entries"], report["requests"]) == (0, 5)


def test_purge_rejects_a_bad_age(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["cache", "purge", "--older-than", "soon", "--cache-dir", str(cache_dir)])
    assert "'soon' is not a duration" in capsys.readouterr().err
