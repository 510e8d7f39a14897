#!/usr/bin/env bash
# `make demo`: the user's loop in one command.
#
# Starts the model API (all-MiniLM-L6-v2, an exported digits classifier and the chat model
# SmolLM2-135M-Instruct) and the forward proxy on loopback, exports HTTP_PROXY, runs the client scripts
# cold and then warm, asks the chat model the same question twice (computed, then replayed from the
# cache), prints the cache statistics, and stops everything it started (by PID), also on Ctrl-C.
#
# Environment: DEMO_DIR (default .demo), DEMO_API_PORT / DEMO_PROXY_PORT / DEMO_ADMIN_PORT (defaults
# 8000 / 8080 / 8081, or free ports when those are taken), DEMO_HOLD=1 keeps both servers running after
# the demo until Ctrl-C, so the dashboard can be opened.
set -euo pipefail
cd "$(dirname "$0")/.."

PROXY_BIN=.venv/bin
MODEL_BIN=.venv-model/bin
DEMO_DIR=${DEMO_DIR:-.demo}
CACHE_DIR="$DEMO_DIR/cache"

bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say() { printf '$ %s\n' "$*"; }

pick_port() { # a preferred port when it is free, else any free loopback port
  "$PROXY_BIN/python" - "$1" <<'PY'
import socket, sys
preferred = int(sys.argv[1])
for port in (preferred, 0):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(s.getsockname()[1])
        break
PY
}

wait_http() { # URL TIMEOUT PID: wait until URL answers 2xx, without any proxy
  "$PROXY_BIN/python" - "$@" <<'PY'
import os, sys, time, urllib.request
url, timeout, pid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"the process {pid} exited before {url} answered")
    try:
        with opener.open(url, timeout=2) as r:
            if r.status < 300:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit(f"{url} did not answer within {timeout:.0f}s")
PY
}

pids=()
cleanup() {
  trap - EXIT INT TERM
  if [ ${#pids[@]} -gt 0 ]; then
    bold "stopping what the demo started (PIDs ${pids[*]})"
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  fi
}
trap cleanup EXIT
trap 'echo; echo "interrupted"; exit 130' INT TERM

API_PORT=${DEMO_API_PORT:-$(pick_port 8000)}
PROXY_PORT=${DEMO_PROXY_PORT:-$(pick_port 8080)}
ADMIN_PORT=${DEMO_ADMIN_PORT:-$(pick_port 8081)}
API_URL="http://127.0.0.1:$API_PORT"
PROXY_URL="http://127.0.0.1:$PROXY_PORT"
ADMIN_URL="http://127.0.0.1:$ADMIN_PORT"

mkdir -p "$DEMO_DIR"
rm -rf "$CACHE_DIR" # every demo starts cold

if [ ! -f "$DEMO_DIR/digits.pt2" ]; then
  bold "exporting the example tensor model (a digits classifier, trained in seconds)"
  "$MODEL_BIN/model-api" export-example "$DEMO_DIR/digits.pt2"
fi

bold "starting the model API on $API_URL with the chat model (loading takes a while; logs: $DEMO_DIR/model-api.log)"
"$MODEL_BIN/model-api" serve --host 127.0.0.1 --port "$API_PORT" \
  --model all-MiniLM-L6-v2 --model "digits=$DEMO_DIR/digits.pt2" >"$DEMO_DIR/model-api.log" 2>&1 &
pids+=($!)
api_pid=$!
echo "model API PID $api_pid"

bold "starting the forward proxy on $PROXY_URL, admin on $ADMIN_URL (logs: $DEMO_DIR/proxy.log)"
"$PROXY_BIN/forward-proxy" run --listen-host 127.0.0.1 --listen-port "$PROXY_PORT" \
  --admin-port "$ADMIN_PORT" --cache-dir "$CACHE_DIR" --access-log "$DEMO_DIR/access.log" \
  >"$DEMO_DIR/proxy.log" 2>&1 &
pids+=($!)
proxy_pid=$!
echo "forward proxy PID $proxy_pid"

wait_http "$ADMIN_URL/stats" 60 "$proxy_pid"
wait_http "$API_URL/v2/health/ready" 420 "$api_pid" # it answers once every model, the chat model too, is loaded
echo "both are up"

export HTTP_PROXY="$PROXY_URL" http_proxy="$PROXY_URL" MODEL_API_URL="$API_URL"
unset NO_PROXY no_proxy
client="$PROXY_BIN/client-app"

run_clients() {
  say client-app embed "The proxy caches identical inference requests."
  "$client" embed "The proxy caches identical inference requests."
  say client-app search "how do I reset my password?"
  "$client" search --top 3 "how do I reset my password?"
  say client-app predict --sample 5
  "$client" predict --sample 5
}

bold "export HTTP_PROXY=$PROXY_URL   # every client call below goes through the proxy"
bold "cold: the first run computes everything in the model"
run_clients
bold "warm: the same scripts again, answered from the cache"
run_clients

ask_chat() {
  say client-app chat --max-tokens 32 "What does a forward proxy do?"
  "$client" chat --max-tokens 32 "What does a forward proxy do?"
}
bold "chat, cold: a greedy question (temperature 0), its answer generated token by token by the chat model"
ask_chat
bold "chat, warm: the same question, its answer replayed by the proxy as the same stream of events"
ask_chat

bold "an ordinary request passes through the proxy untouched by the cache"
say client-app fetch "$API_URL/v1/models"
"$client" fetch "$API_URL/v1/models"

bold "a bounded load: 300 requests, 8 at a time, 70% repeats"
say client-app load --requests 300 --concurrency 8 --repeat-ratio 0.7 --seed demo
"$client" load --requests 300 --concurrency 8 --repeat-ratio 0.7 --seed demo

# At 8 at a time on a small machine a hit mostly waits its turn (8 in flight at ~600 hits/s is ~13 ms
# each); 2 at a time, the time it waits is what a warm answer costs.
bold "the same requests again, warm, 2 at a time: every one was answered before, so every one is a hit"
say client-app load --requests 300 --concurrency 2 --repeat-ratio 0.7 --seed demo
"$client" load --requests 300 --concurrency 2 --repeat-ratio 0.7 --seed demo

bold "cache statistics (forward-proxy stats --cache-dir $CACHE_DIR)"
"$PROXY_BIN/forward-proxy" stats --cache-dir "$CACHE_DIR"

bold "the dashboard: $ADMIN_URL/   (Prometheus: $ADMIN_URL/metrics, JSON: $ADMIN_URL/stats)"
if [ "${DEMO_HOLD:-0}" = "1" ]; then
  echo "DEMO_HOLD=1: both servers keep running; press Ctrl-C to stop them."
  wait "$proxy_pid"
else
  echo "(run 'DEMO_HOLD=1 make demo' to keep the servers up and open the dashboard)"
fi
