"""Per-item caching through the real `forward-proxy run` and the real model API (MiniLM, digits).

The model API's `GET /stats` counts the rows each model really computed (and the requests that reached
it), so every test checks what went upstream by those counts, and what came back against a direct call
to the same server: vectors to float tolerance, indices, order, usage and shapes exactly.
"""

from __future__ import annotations

import base64
import random
import re
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.model_server import export_digits, start_model_api
from tests.support.processes import ManagedProcess, free_port
from tests.support.proxy import RunningProxy, start_proxy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "all-MiniLM-L6-v2"
DIGITS = "digits"
TOLERANCE = 1e-5
TIMEOUT = 120


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # only the proxies given, never the environment's
    return session


@dataclass
class ModelApi:
    process: ManagedProcess
    url: str

    def computed(self, model: str = MODEL) -> tuple[int, int]:
        """Rows the model has computed and requests that reached it, since the server started."""
        with _session() as session:
            figures = session.get(f"{self.url}/stats", timeout=TIMEOUT).json()["models"][model]
        return int(figures["rows"]), int(figures["requests"])

    def direct(self, path: str, body: Any) -> requests.Response:
        """What the model API answers without the proxy."""
        with _session() as session:
            answer = session.post(f"{self.url}{path}", json=body, timeout=TIMEOUT)
        assert answer.status_code == 200, answer.text
        return answer


class Counted:
    """The rows and requests a model has computed since this was made (`delta()`)."""

    def __init__(self, api: ModelApi, model: str = MODEL) -> None:
        self.api, self.model = api, model
        self.rows, self.requests = api.computed(model)

    def delta(self) -> tuple[int, int]:
        rows, calls = self.api.computed(self.model)
        return rows - self.rows, calls - self.requests


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rows-through-proxy")


@pytest.fixture(scope="module")
def digits(work: Path) -> Path:
    return export_digits(work / "digits-seed0.pt2", seed=0)


@pytest.fixture(scope="module")
def model_api(work: Path, digits: Path) -> Iterator[ModelApi]:
    process, url = start_model_api(
        work, "--device", "cpu", "--model", MODEL, "--model", f"{DIGITS}={digits}", "--accept-token-ids"
    )  # test_token_id_rows sends MiniLM's own ids
    try:
        yield ModelApi(process, url)
    finally:
        process.stop()


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[RunningProxy]:
    with start_proxy(tmp_path) as running:
        yield running


def sentences(topic: str, count: int) -> list[str]:
    """Distinct sentences of varied lengths (so that rows differ in their token counts)."""
    return [
        f"{topic} note {index}: " + "the figures were checked again " * (1 + index % 4)
        for index in range(count)
    ]


def through(
    proxy: RunningProxy, url: str, body: Any, headers: dict[str, str] | None = None
) -> requests.Response:
    with _session() as session:
        return session.post(url, json=body, headers=headers, proxies=proxy.proxies, timeout=TIMEOUT)


def embed(
    proxy: RunningProxy, api: ModelApi, texts: Any, headers: dict[str, str] | None = None, **rest: Any
) -> requests.Response:
    answer = through(proxy, f"{api.url}/v1/embeddings", {"model": MODEL, "input": texts, **rest}, headers)
    assert answer.status_code == 200, answer.text
    return answer


def rows_header(answer: requests.Response) -> tuple[str, str | None]:
    return answer.headers["X-Cache"], answer.headers.get("X-Cache-Rows")


def _vector(item: dict[str, Any]) -> list[float]:
    embedding = item["embedding"]
    if isinstance(embedding, str):
        raw = base64.b64decode(embedding)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return list(embedding)


_NUMBER = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def skeleton(content: bytes) -> bytes:
    """The answer's bytes with every number replaced: equal skeletons are the same JSON text but for the
    numbers' values (checked apart, to tolerance)."""
    return _NUMBER.sub(b"0", content)


def assert_same_embeddings(proxied: requests.Response, direct: requests.Response) -> None:
    """The same answer as the model's: fields, order, indices and usage exactly, vectors to tolerance."""
    got, want = proxied.json(), direct.json()
    assert {name: value for name, value in got.items() if name != "data"} == {
        name: value for name, value in want.items() if name != "data"
    }
    assert [item["index"] for item in got["data"]] == list(range(len(want["data"])))
    assert [sorted(item) for item in got["data"]] == [sorted(item) for item in want["data"]]
    for mine, theirs in zip(got["data"], want["data"], strict=True):
        assert max(abs(a - b) for a, b in zip(_vector(mine), _vector(theirs), strict=True)) < TOLERANCE
    counts = [int(count) for count in direct.headers["X-Input-Tokens"].split(",")]  # each input's tokens
    assert len(counts) == len(want["data"]) and sum(counts) == want["usage"]["prompt_tokens"]
    assert proxied.headers["X-Input-Tokens"] == direct.headers["X-Input-Tokens"]
    assert proxied.headers["X-Model-Version"] == direct.headers["X-Model-Version"]
    assert skeleton(proxied.content) == skeleton(direct.content)  # written as the model API writes it


def test_new_known_and_mixed_batches_answer_as_the_model_does(
    model_api: ModelApi, proxy: RunningProxy
) -> None:
    texts = sentences("mixed", 12)
    first_eight = texts[:8]

    counted = Counted(model_api)
    new = embed(proxy, model_api, first_eight)
    assert rows_header(new) == ("MISS", "0/8")
    assert counted.delta() == (8, 1)
    assert new.content == model_api.direct("/v1/embeddings", {"model": MODEL, "input": first_eight}).content

    counted = Counted(model_api)
    known = embed(proxy, model_api, first_eight)
    assert rows_header(known) == ("HIT", "8/8")
    assert counted.delta() == (0, 0)
    assert known.content == new.content  # rows put together again give the very bytes

    shuffled = [texts[8], texts[3], texts[9], texts[0], texts[10], texts[7], texts[11], texts[5]]
    counted = Counted(model_api)
    mixed = embed(proxy, model_api, shuffled)
    assert rows_header(mixed) == ("PARTIAL", "4/8")
    assert counted.delta() == (4, 1)  # only the unknown rows, in one request
    assert_same_embeddings(mixed, model_api.direct("/v1/embeddings", {"model": MODEL, "input": shuffled}))

    counted = Counted(model_api)
    again = embed(proxy, model_api, shuffled)
    assert rows_header(again) == ("HIT", "8/8") and counted.delta() == (0, 0)
    assert again.content == mixed.content


def test_token_id_rows(model_api: ModelApi, proxy: RunningProxy) -> None:
    hello, world, both = [101, 7592, 102], [101, 2088, 102], [101, 7592, 2088, 102]
    embed(proxy, model_api, [hello, world])
    counted = Counted(model_api)
    mixed = embed(proxy, model_api, [both, world, hello])
    assert rows_header(mixed) == ("PARTIAL", "2/3")
    assert counted.delta() == (1, 1)
    assert mixed.json()["usage"]["prompt_tokens"] == 10
    assert_same_embeddings(
        mixed, model_api.direct("/v1/embeddings", {"model": MODEL, "input": [both, world, hello]})
    )


def test_a_row_repeated_inside_a_batch_is_computed_once(model_api: ModelApi, proxy: RunningProxy) -> None:
    one, two = sentences("repeated", 2)
    batch = [one, two, one, one]
    counted = Counted(model_api)
    answer = embed(proxy, model_api, batch)
    assert rows_header(answer) == ("MISS", "0/4")
    assert counted.delta() == (2, 1)
    assert_same_embeddings(answer, model_api.direct("/v1/embeddings", {"model": MODEL, "input": batch}))

    counted = Counted(model_api)
    known = embed(proxy, model_api, [two, one, two])
    assert rows_header(known) == ("HIT", "3/3") and counted.delta() == (0, 0)


def test_the_rest_of_the_body_belongs_to_each_row(model_api: ModelApi, proxy: RunningProxy) -> None:
    texts = sentences("format", 3)
    embed(proxy, model_api, texts[:2])
    for rest in ({"encoding_format": "base64"}, {"dimensions": 64}):
        counted = Counted(model_api)
        other = embed(proxy, model_api, texts[:2], **rest)
        assert rows_header(other) == ("MISS", "0/2") and counted.delta() == (2, 1)
        counted = Counted(model_api)
        mixed = embed(proxy, model_api, [texts[2], texts[1]], **rest)
        assert rows_header(mixed) == ("PARTIAL", "1/2") and counted.delta() == (1, 1)
        direct = model_api.direct("/v1/embeddings", {"model": MODEL, "input": [texts[2], texts[1]], **rest})
        assert_same_embeddings(mixed, direct)


def send_together(proxy: RunningProxy, api: ModelApi, batches: list[list[str]]) -> list[requests.Response]:
    """Each batch from a thread of its own, all released at the same moment."""
    start = threading.Barrier(len(batches))

    def send(batch: list[str]) -> requests.Response:
        start.wait(TIMEOUT)
        return embed(proxy, api, batch)

    with ThreadPoolExecutor(len(batches)) as pool:
        return list(pool.map(send, batches))


def test_concurrent_batches_compute_shared_rows_once(model_api: ModelApi, proxy: RunningProxy) -> None:
    """Two batches sent at once that share half their rows: the shared rows are computed once.

    When the second batch arrives only after the first was answered, its shared rows come from the store
    (PARTIAL); the attempt still checks "once" but is repeated (up to three times) until the two were in
    flight together, which shows that rows in flight are shared too.
    """
    overlapped = False
    for attempt in range(3):
        texts = sentences(f"concurrent {attempt}", 36)
        batches = [texts[:24], texts[12:]]
        counted = Counted(model_api)
        answers = send_together(proxy, model_api, batches)
        rows, _ = counted.delta()
        assert rows == 36  # the 12 shared rows once
        for answer, batch in zip(answers, batches, strict=True):
            assert_same_embeddings(
                answer, model_api.direct("/v1/embeddings", {"model": MODEL, "input": batch})
            )
        if all(rows_header(answer)[1] == "0/24" for answer in answers):
            overlapped = True
            break
    assert overlapped, "the two batches were never in flight together"


def test_cache_control_applies_to_every_row(model_api: ModelApi, proxy: RunningProxy) -> None:
    texts = sentences("directives", 5)
    embed(proxy, model_api, texts[:2])

    counted = Counted(model_api)
    refreshed = embed(proxy, model_api, texts[:3], {"Cache-Control": "no-cache"})
    assert rows_header(refreshed) == ("REFRESH", "0/3") and counted.delta() == (3, 1)

    counted = Counted(model_api)
    cached = embed(proxy, model_api, texts[:3], {"Cache-Control": "only-if-cached"})
    assert rows_header(cached) == ("HIT", "3/3")
    refused = through(
        proxy,
        f"{model_api.url}/v1/embeddings",
        {"model": MODEL, "input": texts[2:4]},
        {"Cache-Control": "only-if-cached"},
    )
    assert refused.status_code == 504 and refused.json()["error"]["code"] == "not_cached"
    assert counted.delta() == (0, 0)

    counted = Counted(model_api)
    bypassed = embed(proxy, model_api, texts[3:5], {"Cache-Control": "no-store"})
    assert rows_header(bypassed) == ("BYPASS", None) and counted.delta() == (2, 1)
    counted = Counted(model_api)
    assert rows_header(embed(proxy, model_api, texts[3:4])) == ("MISS", "0/1")  # nothing was stored
    assert counted.delta() == (1, 1)

    time.sleep(1.2)  # texts[:4] are now over a second old
    embed(proxy, model_api, texts[4:5])
    counted = Counted(model_api)
    young = embed(proxy, model_api, [texts[0], texts[4]], {"Cache-Control": "max-age=1"})
    assert rows_header(young) == ("PARTIAL", "1/2") and counted.delta() == (1, 1)
    direct = model_api.direct("/v1/embeddings", {"model": MODEL, "input": [texts[0], texts[4]]})
    assert_same_embeddings(young, direct)


def test_rows_are_not_shared_across_credentials(model_api: ModelApi, proxy: RunningProxy) -> None:
    texts = sentences("tenants", 3)
    team_a, team_b = {"Authorization": "Bearer team-a"}, {"Authorization": "Bearer team-b"}
    embed(proxy, model_api, texts[:2], team_a)

    counted = Counted(model_api)
    other = embed(proxy, model_api, texts, team_b)
    assert rows_header(other) == ("MISS", "0/3") and counted.delta() == (3, 1)
    counted = Counted(model_api)
    anonymous = embed(proxy, model_api, texts[:2])
    assert rows_header(anonymous) == ("MISS", "0/2") and counted.delta() == (2, 1)
    counted = Counted(model_api)
    own = embed(proxy, model_api, [texts[2], texts[0], texts[1]], team_a)
    assert rows_header(own) == ("PARTIAL", "2/3") and counted.delta() == (1, 1)


def test_per_item_cache_off_caches_batches_whole(model_api: ModelApi, tmp_path: Path) -> None:
    texts = sentences("whole", 3)
    with start_proxy(tmp_path / "off", "--set", "per_item_cache=false") as proxy:
        embed(proxy, model_api, texts[:2])
        counted = Counted(model_api)
        bigger = embed(proxy, model_api, texts)
        assert rows_header(bigger) == ("MISS", None) and counted.delta() == (3, 1)
        assert rows_header(embed(proxy, model_api, texts)) == ("HIT", None)


# Open Inference Protocol (KServe v2): the digits classifier batches along its first dimension -----------


def pixels(seed: int) -> list[float]:
    generator = random.Random(seed)
    return [round(generator.random(), 4) for _ in range(64)]


def infer_body(rows: list[list[float]], **rest: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [len(rows), 64], "data": rows}],
        **rest,
    }


def meet(proxy: RunningProxy, url: str) -> None:
    """A first exchange of the proxy with the model API: before it, the proxy has no address to ask a
    KServe model's metadata at, and handles its batches whole."""
    with proxy.session() as session:
        assert session.get(f"{url}/v2/health/ready", timeout=30).status_code == 200


def infer(proxy: RunningProxy, url: str, rows: list[list[float]], **rest: Any) -> requests.Response:
    answer = through(proxy, f"{url}/v2/models/{DIGITS}/infer", infer_body(rows, **rest))
    assert answer.status_code == 200, answer.text
    return answer


def assert_same_inference(proxied: requests.Response, direct: requests.Response) -> None:
    got, want = proxied.json(), direct.json()
    assert {name: value for name, value in got.items() if name != "outputs"} == {
        name: value for name, value in want.items() if name != "outputs"
    }
    for mine, theirs in zip(got["outputs"], want["outputs"], strict=True):
        assert {name: value for name, value in mine.items() if name != "data"} == {
            name: value for name, value in theirs.items() if name != "data"
        }
        assert max(abs(a - b) for a, b in zip(mine["data"], theirs["data"], strict=True)) < TOLERANCE
    assert skeleton(proxied.content) == skeleton(direct.content)


def test_kserve_rows_of_a_batching_model(model_api: ModelApi, proxy: RunningProxy) -> None:
    rows = [pixels(seed) for seed in range(6)]
    meet(proxy, model_api.url)
    counted = Counted(model_api, DIGITS)
    new = infer(proxy, model_api.url, rows[:4], id="first")
    assert rows_header(new) == ("MISS", "0/4") and counted.delta() == (4, 1)
    assert (
        new.content
        == model_api.direct(f"/v2/models/{DIGITS}/infer", infer_body(rows[:4], id="first")).content
    )

    counted = Counted(model_api, DIGITS)
    known = infer(proxy, model_api.url, [rows[3], rows[1]], id="second")
    assert rows_header(known) == ("HIT", "2/2") and counted.delta() == (0, 0)
    direct = model_api.direct(f"/v2/models/{DIGITS}/infer", infer_body([rows[3], rows[1]], id="second"))
    assert_same_inference(known, direct)

    batch = [rows[4], rows[1], rows[5], rows[4], rows[0]]
    counted = Counted(model_api, DIGITS)
    mixed = infer(proxy, model_api.url, batch)
    assert rows_header(mixed) == ("PARTIAL", "2/5") and counted.delta() == (2, 1)  # rows 4 and 5, once
    assert [output["shape"] for output in mixed.json()["outputs"]] == [[5, 10], [5]]
    assert_same_inference(mixed, model_api.direct(f"/v2/models/{DIGITS}/infer", infer_body(batch)))


def test_rows_of_another_model_version_are_never_served_or_mixed(
    work: Path, digits: Path, tmp_path: Path
) -> None:
    """The digits model restarted with other weights on the same port: a new X-Model-Version."""
    other_weights = export_digits(work / "digits-seed1.pt2", seed=1)
    port = free_port()
    rows = [pixels(100 + seed) for seed in range(4)]
    first, url = start_model_api(tmp_path, "--device", "cpu", "--model", f"{DIGITS}={digits}", port=port)
    try:
        # A long interval: after the restart the proxy still believes the old version for a while.
        with start_proxy(tmp_path / "proxy", "--set", "version_check_interval=1h") as proxy:
            meet(proxy, url)
            old = infer(proxy, url, rows[:2])
            old_version = old.headers["X-Model-Version"]
            first.stop()
            second, _ = start_model_api(
                tmp_path, "--device", "cpu", "--model", f"{DIGITS}={other_weights}", port=port
            )
            api = ModelApi(second, url)
            try:
                counted = Counted(api, DIGITS)
                refused = through(proxy, f"{url}/v2/models/{DIGITS}/infer", infer_body([rows[2], rows[0]]))
                assert counted.delta() == (1, 1)  # the missing row only
                # The missing row came back from the new version: rather than put an old row beside a
                # new one, the proxy says so (retry at once), and the retry is computed whole.
                assert refused.status_code == 503 and refused.headers["Retry-After"] == "0"
                assert refused.json()["error"]["code"] == "upstream_version_changed"
                counted = Counted(api, DIGITS)
                mixed = infer(proxy, url, [rows[2], rows[0]])
                assert counted.delta() == (2, 1)
                direct = api.direct(f"/v2/models/{DIGITS}/infer", infer_body([rows[2], rows[0]]))
                assert direct.headers["X-Model-Version"] != old_version
                assert mixed.headers["X-Model-Version"] == direct.headers["X-Model-Version"]
                assert rows_header(mixed) == ("MISS", "0/2")
                assert_same_inference(mixed, direct)
                old_row = old.json()["outputs"][0]["data"][:10]
                assert mixed.json()["outputs"][0]["data"][10:] != old_row  # the weights really differ

                counted = Counted(api, DIGITS)
                again = infer(proxy, url, rows[:2])  # the proxy knows the new version now
                # rows[0] of the new version is stored (from the retry), rows[1] only of the old one
                assert rows_header(again) == ("PARTIAL", "1/2") and counted.delta() == (1, 1)
                assert_same_inference(again, api.direct(f"/v2/models/{DIGITS}/infer", infer_body(rows[:2])))
            finally:
                second.stop()
    finally:
        first.stop()
