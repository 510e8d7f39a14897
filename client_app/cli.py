"""The `client-app` command: embed, search, predict, fetch and load against the model API.

Every request goes through `requests`, so `HTTP_PROXY` / `HTTPS_PROXY` / `NO_PROXY` decide whether it
passes through the forward proxy. Failures print one line to stderr (`client-app: ...`) and exit non-zero:
1 when the network, the proxy or the model API failed, 2 when the command line or an input file is wrong.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import secrets
import sys
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import requests

from client_app import load as load_module
from client_app.chat import DEFAULT_CHAT_MODEL, chat
from client_app.client import (
    API_URL_ENV,
    DEFAULT_EMBEDDING_MODEL,
    DEFAULT_TIMEOUT,
    ClientError,
    InputError,
    ModelApiClient,
    Reply,
    api_url_from_env,
    error_message,
    status_line,
)
from client_app.predict import builtin_samples, infer_inputs, parse_rows, predict
from client_app.search import DEFAULT_BATCH_SIZE, load_documents, search

PROG = "client-app"
DEFAULT_TENSOR_MODEL = "digits"
SAMPLE_DOCS = "client_app/data/docs.txt (shipped with the package)"


# -- output helpers -----------------------------------------------------------------------------------


def _via(proxy: str | None) -> str:
    return f"via proxy {proxy}" if proxy else "direct (no proxy for this URL)"


def _reply_line(reply: Reply) -> str:
    return (
        f"{reply.method} {reply.url} → {reply.status} in {reply.seconds * 1000:.1f} ms, {_via(reply.proxy)}"
    )


def _cache_line(reply: Reply) -> str:
    found = reply.cache_headers()
    if "X-Cache" not in found:
        found = {"X-Cache": "(none: the answer did not pass a caching proxy)", **found}
    return "   ".join(f"{name}: {value}" for name, value in found.items())


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _mix(values: Sequence[str | None]) -> str:
    counts = Counter(value or load_module.NO_HEADER for value in values)
    return ", ".join(f"{name} {count}" for name, count in counts.most_common())


# -- commands -----------------------------------------------------------------------------------------


def cmd_embed(args: argparse.Namespace, client: ModelApiClient) -> int:
    result = client.embed(args.texts, model=args.model)
    if args.json:
        _print_json(result.reply.body)
        return 0
    body = result.reply.body
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    dims = sorted({len(vector) for vector in result.vectors})
    print(_reply_line(result.reply))
    print(_cache_line(result.reply))
    usage_text = " ".join(f"{key}={value}" for key, value in usage.items()) or "-"
    dims_text = ", ".join(map(str, dims))
    print(
        f"model: {body.get('model', args.model)}   embeddings: {len(result.vectors)}   dims: {dims_text}   usage: {usage_text}"
    )
    for index, (text, vector) in enumerate(zip(args.texts, result.vectors, strict=True)):
        norm = math.sqrt(sum(v * v for v in vector))
        first = ", ".join(f"{v:+.4f}" for v in vector[: args.values])
        more = ", …" if len(vector) > args.values else ""
        shown = text if len(text) <= 60 else text[:57] + "..."
        print(f"[{index}] norm={norm:.4f} first=[{first}{more}] {json.dumps(shown, ensure_ascii=False)}")
    return 0


def cmd_search(args: argparse.Namespace, client: ModelApiClient) -> int:
    if args.docs is None:
        with resources.as_file(resources.files("client_app").joinpath("data", "docs.txt")) as path:
            documents = load_documents(path)
        source = SAMPLE_DOCS
    else:
        documents = load_documents(Path(args.docs))
        source = args.docs
    result = search(client, documents, args.query, top=args.top, batch_size=args.batch_size, model=args.model)
    document_cache = [reply.x_cache for reply in result.document_replies]
    if args.json:
        _print_json(
            {
                "query": result.query,
                "documents": source,
                "document_count": len(documents),
                "matches": [
                    {"rank": m.rank, "index": m.index, "score": round(m.score, 6), "document": m.document}
                    for m in result.matches
                ],
                "x_cache": {"documents": document_cache, "query": result.query_reply.x_cache},
                "requests": len(result.replies),
            }
        )
        return 0
    seconds = sum(reply.seconds for reply in result.replies)
    print(f"query: {json.dumps(result.query, ensure_ascii=False)}")
    print(
        f"documents: {len(documents)} from {source}, embedded in {len(result.document_replies)} "
        f"batch(es) of up to {args.batch_size} + 1 query request in {seconds * 1000:.1f} ms, "
        f"{_via(result.query_reply.proxy)}"
    )
    print(f"{'rank':>4}  {'score':>6}  document")
    for match in result.matches:
        print(f"{match.rank:>4}  {match.score:>6.3f}  {match.document}")
    print(f"X-Cache: documents [{_mix(document_cache)}]   query [{_mix([result.query_reply.x_cache])}]")
    return 0


def cmd_predict(args: argparse.Namespace, client: ModelApiClient) -> int:
    samples = parse_rows(args.input) if args.input is not None else builtin_samples(args.sample)
    result = predict(client, args.model, samples)
    if args.json:
        _print_json(result.reply.body)
        return 0
    spec = result.input
    print(
        f"model: {result.model}   input: {spec.name} {spec.datatype} {spec.shape}   output: {result.output.name}"
    )
    print(_reply_line(result.reply))
    print(_cache_line(result.reply))
    print(f"{'row':>3}  {'label':>5}  {'predicted':>9}  {'confidence':>10}")
    for p in result.predictions:
        label = "-" if p.label is None else str(p.label)
        confidence = "-" if p.confidence is None else f"{p.confidence:.3f}"
        print(f"{p.row:>3}  {label:>5}  {p.predicted:>9}  {confidence:>10}")
    labelled = [p for p in result.predictions if p.label is not None]
    if labelled:
        right = sum(p.label == p.predicted for p in labelled)
        print(f"correct: {right} of {len(labelled)} built-in samples")
    return 0


def cmd_chat(args: argparse.Namespace, client: ModelApiClient) -> int:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": " ".join(args.question)})
    stream = args.stream and not args.json

    def show(text: str) -> None:
        print(text, end="", flush=True)

    answer = chat(
        client,
        messages,
        model=args.model,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        stream=stream,
        on_text=None if args.json else show,
    )
    if args.json:
        _print_json(answer.reply.body)
        return 0
    print()
    reply = answer.reply
    first = (
        f"first token in {answer.first_token_seconds * 1000:.1f} ms, " if answer.first_token_seconds else ""
    )
    kind = f"streamed in {answer.chunks} chunks" if stream else "not streamed"
    print(
        f"{reply.method} {reply.url} → {reply.status}, {first}{reply.seconds * 1000:.1f} ms in all ({kind}), "
        f"{_via(reply.proxy)}"
    )
    print(_cache_line(reply))
    usage_text = " ".join(f"{key}={value}" for key, value in answer.usage.items()) or "-"
    print(
        f"model: {answer.model or args.model}   finish_reason: {answer.finish_reason}   usage: {usage_text}"
    )
    return 0


def cmd_fetch(args: argparse.Namespace, client: ModelApiClient) -> int:
    response, seconds = client.fetch(args.url, method=args.method)
    proxy = client.proxy_for(args.url)
    print(f"{args.method} {args.url} → {status_line(response)} in {seconds * 1000:.1f} ms, {_via(proxy)}")
    for name, value in response.headers.items():
        print(f"{name}: {value}")
    if args.body and response.content:
        print()
        sys.stdout.write(response.text if response.text.endswith("\n") else response.text + "\n")
    if response.status_code >= 400:
        via = f" (through the proxy at {proxy})" if proxy else ""
        raise ClientError(f"{args.url} answered {response.status_code}{via}: {error_message(response)}")
    return 0


def cmd_load(args: argparse.Namespace, client: ModelApiClient) -> int:
    seed = args.seed if args.seed is not None else secrets.token_hex(4)
    plan = load_module.plan_requests(args.requests, args.repeat_ratio, random.Random(seed))
    model = args.model or (DEFAULT_EMBEDDING_MODEL if args.route == "embeddings" else DEFAULT_TENSOR_MODEL)
    local = threading.local()
    clients: list[ModelApiClient] = []
    clients_lock = threading.Lock()

    def thread_client() -> ModelApiClient:
        if not hasattr(local, "client"):
            local.client = _make_client(args)
            with clients_lock:
                clients.append(local.client)
        return local.client  # type: ignore[no-any-return]

    send: Callable[[int], Reply]
    if args.route == "embeddings":

        def send(payload: int) -> Reply:
            texts = load_module.embedding_texts(seed, payload, args.batch)
            return thread_client().embed(texts, model=model).reply

        path = "/v1/embeddings"
    else:
        spec = client.model_metadata(model).inputs[0]
        row_shape = spec.shape[1:]
        if not row_shape or any(d < 0 for d in row_shape):
            raise ClientError(
                f"input {spec.name!r} of model {model!r} has shape {spec.shape}; cannot tell its row size"
            )
        row_size = math.prod(row_shape)

        def send(payload: int) -> Reply:
            rows = load_module.tensor_rows(seed, payload, args.batch, row_size)
            return thread_client().infer(model, infer_inputs(spec, rows))

        path = f"/v2/models/{model}/infer"

    if not args.json:
        cap = f", at most {args.duration:g} s" if args.duration is not None else ""
        print(
            f"load: {len(plan)} requests ({len(plan) - len(set(plan))} repeats) to POST {client.api_url}{path}, "
            f"batch {args.batch}, concurrency {args.concurrency}{cap}, seed {seed}, "
            f"{_via(client.proxy_for(client.api_url + path))}"
        )
    from tqdm import tqdm  # only the load command draws a progress bar

    with tqdm(
        total=len(plan),
        unit="req",
        file=sys.stderr,
        disable=None if args.progress is None else not args.progress,
    ) as bar:
        outcomes, elapsed = load_module.run(
            send,
            plan,
            concurrency=args.concurrency,
            duration=args.duration,
            on_done=lambda _outcome: bar.update(1),
        )
    for each in clients:
        each.close()
    settings = {
        "route": args.route,
        "url": client.api_url + path,
        "model": model,
        "batch": args.batch,
        "concurrency": args.concurrency,
        "repeat_ratio": args.repeat_ratio,
        "duration_cap_s": args.duration,
        "seed": seed,
    }
    report = load_module.summarise(outcomes, elapsed, planned=plan, batch=args.batch, settings=settings)
    if args.json:
        _print_json(report)
    else:
        _print_load_report(report, args)
    if report["failed"]:
        first = report["errors"][0]["message"]
        raise ClientError(f"{report['failed']} of {report['sent']} requests failed; the first error: {first}")
    return 0


def _print_load_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    if report["stopped_early"]:
        print(
            f"stopped by --duration {args.duration:g} s after {report['sent']} of {report['planned']} requests"
        )
    print(
        f"done: {report['ok']} ok, {report['failed']} failed in {report['elapsed_s']:.2f} s → "
        f"{report['throughput_rps']:.1f} req/s ({report['rows_per_s']:.1f} rows/s)"
    )
    latency = report["latency_ms"]
    if latency["p50"] is not None:
        print(
            "latency ms: "
            + "  ".join(f"{name} {latency[name]:.1f}" for name in ("p50", "p90", "p99", "mean", "max"))
        )
    mix = report["x_cache"]
    print("X-Cache: " + ("  ".join(f"{name} {count}" for name, count in mix.items()) or "-"))
    by_cache = report["latency_ms_by_cache"]
    if by_cache:
        print(
            "latency ms by X-Cache: "
            + "  ".join(f"{name} p50 {q['p50']:.1f} p90 {q['p90']:.1f}" for name, q in by_cache.items())
        )


# -- argument parsing ---------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', not {text!r}")
    return name.strip(), value.strip()


# Options every command takes, before or after the command name; SUPPRESS keeps a value given before
# the command from being overwritten by the subcommand's default, and GLOBAL_DEFAULTS fills what is missing.
GLOBAL_DEFAULTS: dict[str, Any] = {
    "api_url": None,
    "timeout": DEFAULT_TIMEOUT,
    "headers": [],
    "ca_bundle": None,
}


def _global_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--api-url",
        default=argparse.SUPPRESS,
        help=f"base URL of the model API (default: ${API_URL_ENV} or http://127.0.0.1:8000)",
    )
    common.add_argument(
        "--timeout",
        type=_positive_float,
        default=argparse.SUPPRESS,
        help=f"seconds to wait for a connection and for an answer (default: {DEFAULT_TIMEOUT:g})",
    )
    common.add_argument(
        "-H",
        "--header",
        dest="headers",
        type=_header,
        action="append",
        default=argparse.SUPPRESS,
        metavar="'NAME: VALUE'",
        help="extra request header, repeatable (for example 'Cache-Control: no-cache')",
    )
    common.add_argument(
        "--ca-bundle",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="CA certificates to verify HTTPS with, e.g. the proxy's ~/.mitmproxy/mitmproxy-ca-cert.pem "
        "(default: requests' bundle, or $REQUESTS_CA_BUNDLE)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _global_options()
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[common],
        description="Call the model API (OpenAI embeddings, KServe v2) through HTTP_PROXY as requests does.",
        epilog="Requests go through $HTTP_PROXY / $HTTPS_PROXY unless $NO_PROXY names the host. See docs/client.md.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser(
        "embed", parents=[common], help="print embeddings of texts (POST /v1/embeddings)"
    )
    embed.add_argument("texts", nargs="+", metavar="TEXT", help="texts to embed, all in one request")
    embed.add_argument(
        "--model", default=DEFAULT_EMBEDDING_MODEL, help="embedding model (default: %(default)s)"
    )
    embed.add_argument(
        "--values", type=int, default=5, metavar="K", help="values of each vector shown (default: 5)"
    )
    embed.add_argument(
        "--json", action="store_true", help="print the full response JSON instead of a summary"
    )
    embed.set_defaults(handler=cmd_embed)

    search_cmd = commands.add_parser(
        "search", parents=[common], help="rank the documents of a file by similarity to a query"
    )
    search_cmd.add_argument("query", metavar="QUERY")
    search_cmd.add_argument(
        "--docs",
        metavar="FILE",
        help="documents, one per line or a JSON list of strings (default: the shipped sample of 30 sentences)",
    )
    search_cmd.add_argument(
        "--top", type=_positive_int, default=5, metavar="K", help="matches shown (default: 5)"
    )
    search_cmd.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        metavar="B",
        help="documents per embeddings request (default: %(default)s)",
    )
    search_cmd.add_argument(
        "--model", default=DEFAULT_EMBEDDING_MODEL, help="embedding model (default: %(default)s)"
    )
    search_cmd.add_argument("--json", action="store_true", help="print the matches as JSON")
    search_cmd.set_defaults(handler=cmd_search)

    predict_cmd = commands.add_parser(
        "predict", parents=[common], help="classify rows with a tensor model (POST /v2/models/NAME/infer)"
    )
    predict_cmd.add_argument(
        "--model", default=DEFAULT_TENSOR_MODEL, help="tensor model name (default: %(default)s)"
    )
    source = predict_cmd.add_mutually_exclusive_group()
    source.add_argument(
        "--sample",
        type=_positive_int,
        default=5,
        metavar="N",
        help="send the first N of the 20 built-in 8x8 digits (default: 5)",
    )
    source.add_argument(
        "--input",
        metavar="JSON",
        help="rows to send instead: a JSON list of numbers, a list of rows, or @FILE",
    )
    predict_cmd.add_argument("--json", action="store_true", help="print the full response JSON")
    predict_cmd.set_defaults(handler=cmd_predict)

    chat_cmd = commands.add_parser(
        "chat", parents=[common], help="ask the chat model; the answer streams in (POST /v1/chat/completions)"
    )
    chat_cmd.add_argument("question", nargs="+", metavar="QUESTION", help="the question (words are joined)")
    chat_cmd.add_argument("--model", default=DEFAULT_CHAT_MODEL, help="chat model (default: %(default)s)")
    chat_cmd.add_argument("--system", metavar="TEXT", help="a system message before the question")
    chat_cmd.add_argument(
        "--max-tokens",
        type=_positive_int,
        metavar="N",
        help="most tokens to generate (default: the server's)",
    )
    chat_cmd.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="0 (the default) answers the same every time, so a caching proxy can serve it again; higher samples",
    )
    chat_cmd.add_argument("--seed", type=int, help="makes a sampled answer (temperature > 0) repeatable")
    chat_cmd.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print the answer as it is generated (default); --no-stream waits for the whole answer",
    )
    chat_cmd.add_argument("--json", action="store_true", help="print the full response JSON (not streamed)")
    chat_cmd.set_defaults(handler=cmd_chat)

    fetch = commands.add_parser(
        "fetch", parents=[common], help="request any URL (through the proxy) and show status and headers"
    )
    fetch.add_argument("url", metavar="URL")
    fetch.add_argument("--method", default="GET", type=str.upper, help="HTTP method (default: GET)")
    fetch.add_argument("--body", action="store_true", help="print the response body too")
    fetch.set_defaults(handler=cmd_fetch)

    load = commands.add_parser(
        "load", parents=[common], help="a bounded load test reporting throughput, latency and X-Cache mix"
    )
    load.add_argument(
        "--requests", type=_positive_int, default=100, metavar="N", help="requests to send (default: 100)"
    )
    load.add_argument(
        "--concurrency", type=_positive_int, default=4, metavar="C", help="worker threads (default: 4)"
    )
    load.add_argument(
        "--repeat-ratio",
        type=_ratio,
        default=0.5,
        metavar="R",
        help="share of requests that repeat an earlier request's payload, 0 to 1 (default: 0.5)",
    )
    load.add_argument(
        "--batch", type=_positive_int, default=1, metavar="B", help="texts or rows per request (default: 1)"
    )
    load.add_argument(
        "--route",
        choices=("embeddings", "infer"),
        default="embeddings",
        help="POST /v1/embeddings or POST /v2/models/MODEL/infer (default: embeddings)",
    )
    load.add_argument(
        "--model",
        help=f"model to call (default: {DEFAULT_EMBEDDING_MODEL} for embeddings, {DEFAULT_TENSOR_MODEL} for infer)",
    )
    load.add_argument(
        "--duration",
        type=_positive_float,
        metavar="SECONDS",
        help="stop starting requests after this many seconds, even if fewer than N were sent",
    )
    load.add_argument(
        "--seed",
        help="makes the payloads repeatable: a second run with the same seed sends the same requests "
        "(default: a new random seed per run)",
    )
    load.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar on stderr (default: only when stderr is a terminal)",
    )
    load.add_argument("--json", action="store_true", help="print the report as JSON")
    load.set_defaults(handler=cmd_load)
    return parser


def _make_client(args: argparse.Namespace) -> ModelApiClient:
    return ModelApiClient(
        args.api_url or api_url_from_env(),
        timeout=args.timeout,
        headers=dict(args.headers),
        verify=args.ca_bundle or True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, default in GLOBAL_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    handler: Callable[[argparse.Namespace, ModelApiClient], int] = args.handler
    try:
        with _make_client(args) as client:
            return handler(args, client)
    except InputError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except requests.RequestException as exc:  # a path that escaped ModelApiClient's translation
        print(f"{PROG}: request failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `client-app ... | head`: the reader left, nothing more to say
        sys.stderr.close()
        return 1
