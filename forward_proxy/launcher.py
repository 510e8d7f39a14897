"""`forward-proxy run`: mitmproxy's master in this process, with the mitmproxy addons a forward proxy uses
(`forward_proxy_master`) plus `forward_proxy.addons.addons`, stopped cleanly by SIGINT or SIGTERM.

Every setting is a mitmproxy option (one source of truth, shared with `mitmdump -s forward_proxy/addons.py`).
The first-class flags below are shorthands for the most used options; any option can be set with
`--set NAME=VALUE`, and `forward-proxy run --options` lists them all with their help. To add a flag,
add one `Flag` line to `FLAGS`.

`--workers N` (N > 1) runs N such proxies, one process each, behind the one listening port
(`forward_proxy.workers`); only the first runs the admin listener, which shows the shared counters of all.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from forward_proxy.policy.clients import comma_separated

# The launcher's own defaults where they differ from mitmproxy's: listen on loopback only, and no
# per-flow dump on stdout (the access log addon writes one line per request instead).
LAUNCHER_DEFAULTS: dict[str, Any] = {"listen_host": "127.0.0.1", "listen_port": 8080, "flow_detail": 0}


@dataclass(frozen=True)
class Flag:
    flag: str  # "--listen-port"
    option: str  # the mitmproxy option it sets, "listen_port"
    type: Callable[[str], Any]
    help: str
    metavar: str = "VALUE"


FLAGS: tuple[Flag, ...] = (
    Flag("--listen-host", "listen_host", str, "address to listen on (default 127.0.0.1)", "HOST"),
    Flag("--listen-port", "listen_port", int, "port to listen on (default 8080)", "PORT"),
    Flag(
        "--cache-dir",
        "cache_dir",
        str,
        "cache directory (default $FORWARD_PROXY_CACHE_DIR, else ~/.cache/forward-proxy)",
        "DIR",
    ),
    Flag(
        "--cache-backend",
        "cache_backend",
        str,
        "where the cache lives: empty for the cache directory, or a Redis URL redis://[user:pass@]host:port/db "
        "shared by a fleet of proxies",
        "URL",
    ),
    Flag("--cache-size", "cache_size", str, "size limit of the cache, e.g. 512MiB (default 1GiB)", "SIZE"),
    Flag("--cache-ttl", "cache_ttl", str, "how long entries are served, e.g. 30m (default 1h)", "DURATION"),
    Flag("--access-log", "access_log", str, 'one JSON line per request to FILE, or "-" for stderr', "FILE"),
    Flag("--admin-port", "admin_port", int, "serve the dashboard, /stats and /metrics on this port", "PORT"),
    Flag(
        "--proxyauth", "proxyauth", str, 'require proxy credentials: "user:pass" or "@htpasswd-file"', "SPEC"
    ),
    Flag(
        "--allow-clients",
        "allow_clients",
        comma_separated,
        "client networks that may connect, comma-separated CIDRs (default loopback and private ranges)",
        "CIDRS",
    ),
)


def register(subcommands: Any) -> None:
    parser: argparse.ArgumentParser = subcommands.add_parser(
        "run",
        help="run the caching forward proxy",
        description="Run the caching forward proxy (mitmproxy in this process with the project's addons). "
        "Clients use it with HTTP_PROXY=http://HOST:PORT. Stop it with Ctrl-C or SIGTERM.",
    )
    for flag in FLAGS:
        parser.add_argument(flag.flag, dest=flag.option, type=flag.type, help=flag.help, metavar=flag.metavar)
    parser.add_argument(
        "--set",
        dest="setoptions",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="set any mitmproxy or proxy option (repeatable); see --options for the list",
    )
    parser.add_argument(
        "--options", action="store_true", help="print every option with its default and help, then exit"
    )
    parser.add_argument(
        "--workers",
        type=_worker_count,
        default=1,
        metavar="N",
        help="run N proxy processes behind the one listening port (Linux SO_REUSEPORT), sharing the cache; "
        "default 1",
    )
    parser.set_defaults(handler=run)


MOST_WORKERS = 256


def _worker_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers such as 2") from None
    if not 1 <= count <= MOST_WORKERS:
        raise argparse.ArgumentTypeError(f"give 1 to {MOST_WORKERS} workers, not {count}")
    return count


def run(args: argparse.Namespace) -> int:
    flags = {flag.option: getattr(args, flag.option) for flag in FLAGS}
    flag_values = {k: v for k, v in flags.items() if v is not None}
    if args.workers == 1 or args.options:
        result = asyncio.run(serve(flag_values, args.setoptions, args.options))
        return result if isinstance(result, int) else 0
    return run_workers(args.workers, flag_values, args.setoptions)


def run_workers(count: int, flag_values: dict[str, Any], set_specs: Sequence[str]) -> int:
    """Check the options once here (a mistake stops everything at once, with one message), then supervise
    `count` worker processes on the one port."""
    from forward_proxy import workers

    checked = asyncio.run(serve(flag_values, set_specs, check_only=True))
    if isinstance(checked, int):
        return checked
    host, port = checked
    try:
        workers.check_reuse_port(host, port)
    except OSError as exc:
        print(f"forward-proxy run: {exc}", file=sys.stderr)
        return 2
    return workers.supervise(count, functools.partial(_work, count, flag_values, tuple(set_specs)))


def _work(count: int, flag_values: dict[str, Any], set_specs: tuple[str, ...], index: int) -> int:
    """One worker: a whole proxy; only worker 0 keeps the admin listener (one port cannot serve two)."""
    values = dict(flag_values) if index == 0 else {**flag_values, "admin_port": 0}
    result = asyncio.run(serve(values, set_specs, worker=(index, count)))
    return result if isinstance(result, int) else 0


def forward_proxy_master(opts: Any) -> Any:
    """mitmproxy's master with the mitmproxy addons a forward proxy uses, then the project's own.

    mitmproxy hands every event of every flow to every addon in turn, and at a cache hit's speed that
    dispatch is most of the work: with DumpMaster's full set (playback, export, HAR and flow saving, the
    browser, cookie and auth replay, ...) a hit costs about a third more than with this set. Those tools
    stay available in `mitmdump -s forward_proxy/addons.py`; here their options do not exist.
    """
    from mitmproxy import master
    from mitmproxy.addons import (
        anticomp,
        block,
        core,
        disable_h2c,
        dns_resolver,
        dumper,
        errorcheck,
        modifyheaders,
        next_layer,
        proxyauth,
        proxyserver,
        script,
        strip_dns_https_records,
        tlsconfig,
        update_alt_svc,
        upstream_auth,
    )

    from forward_proxy.mitmseams import use_hook_table

    lean = master.Master(opts, with_termlog=True)
    use_hook_table(lean)  # each event's handlers looked up once, not on every call
    lean.addons.add(
        core.Core(),
        block.Block(),  # block_global / block_private
        strip_dns_https_records.StripDnsHttpsRecords(),
        anticomp.AntiComp(),
        disable_h2c.DisableH2C(),
        proxyauth.ProxyAuth(),  # --proxyauth
        proxyserver.Proxyserver(),
        script.ScriptLoader(),  # --set scripts=... still loads more addons
        dns_resolver.DnsResolver(),
        next_layer.NextLayer(),
        modifyheaders.ModifyHeaders(),
        tlsconfig.TlsConfig(),
        upstream_auth.UpstreamAuth(),
        update_alt_svc.UpdateAltSvc(),
        dumper.Dumper(),  # flow_detail
        errorcheck.ErrorCheck(),  # startup errors end the process with a message
    )
    return lean


async def serve(
    flag_values: dict[str, Any],
    set_specs: Sequence[str],
    list_options: bool = False,
    *,
    check_only: bool = False,
    worker: tuple[int, int] | None = None,
) -> int | tuple[str, int]:
    """Build the master, apply defaults, `--set` options and flags (in that order), run until signalled.

    `check_only`: stop after applying the options and return where the proxy would listen.
    `worker` (index, count): this proxy is one of `--workers`; its start-up line says which."""
    # mitmproxy is imported here so that `forward-proxy stats` and `--help` stay quick.
    from mitmproxy import exceptions, options, optmanager

    from forward_proxy import addons
    from forward_proxy.gctuning import GcTuning
    from forward_proxy.stopping import GracefulStop

    opts = options.Options()
    master = forward_proxy_master(opts)
    stopping = GracefulStop()
    master.addons.add(*addons.addons, Announce(worker), stopping, GcTuning())
    if list_options:
        optmanager.dump_defaults(opts, sys.stdout)
        return 0
    try:
        opts.update(**LAUNCHER_DEFAULTS)
        opts.set(*set_specs)
        opts.update(**flag_values)
    except exceptions.OptionsError as exc:
        print(f"forward-proxy run: {exc}", file=sys.stderr)
        return 2
    if check_only:
        return opts.listen_host, opts.listen_port
    if worker is None and (taken := _port_taken(opts.listen_host, opts.listen_port)):
        print(
            f"forward-proxy run: cannot listen on {opts.listen_host or '0.0.0.0'}:{opts.listen_port} ({taken}); "
            "choose another port with --listen-port, or stop what holds it.",
            file=sys.stderr,
        )
        return 1

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.request_stop, master)  # answers requests in flight first
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    await master.run()
    # Connections still open are cancelled when the loop closes; on Python < 3.12.4 asyncio reports each
    # as an "exception in callback" (CancelledError). That is the normal end of a connection here.
    loop.set_exception_handler(_quiet_cancellations)
    print("forward-proxy stopped", flush=True)
    return 0


def _port_taken(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on (bound as asyncio's servers bind it), None when it can.

    Checked before mitmproxy starts, so the message names the flag that fixes it; mitmproxy would
    refuse it too, without saying how."""
    import socket

    if not port:
        return None
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return None  # mitmproxy reports an unknown host itself
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                return exc.strerror or str(exc)
    return None


def _quiet_cancellations(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    if not isinstance(context.get("exception"), asyncio.CancelledError):
        loop.default_exception_handler(context)


class Announce:
    """Prints where the proxy listens and where its cache lives, once the servers are up."""

    def __init__(self, worker: tuple[int, int] | None = None) -> None:
        self.worker = worker

    def running(self) -> None:
        from mitmproxy import ctx

        admin: Any = ctx.master.addons.get("adminlistener")
        if admin is not None and ctx.options.admin_port and admin.server is None:
            return  # its error names the port; mitmproxy's error check then ends the process (exit 1)
        addresses = []
        proxyserver: Any = ctx.master.addons.get("proxyserver")
        if proxyserver is not None and hasattr(proxyserver, "listen_addrs"):
            addresses = [f"http://{_host(addr[0])}:{addr[1]}" for addr in proxyserver.listen_addrs()]
        if not addresses:
            addresses = [f"http://{ctx.options.listen_host or '0.0.0.0'}:{ctx.options.listen_port or 8080}"]
        cache: Any = ctx.master.addons.get("cache")
        where = f"cache: {cache.config.describe()}" if cache is not None and cache.config else "cache: off"
        which = f" [worker {self.worker[0] + 1} of {self.worker[1]}]" if self.worker is not None else ""
        print(f"forward-proxy listening on {', '.join(addresses)} ({where}){which}", flush=True)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
