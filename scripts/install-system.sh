#!/usr/bin/env bash
# Installs the Debian packages the test suite starts for real: redis-server and chromium.
# Does nothing when they are already there. Needs root (or sudo) and Debian's package registry.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "error: installing ${need[*]} needs root or sudo" >&2; exit 1; }
  sudo="sudo"
fi
echo ">> installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The Debian package starts a system-wide redis on 6379; the tests start their own, so stop that one.
if [[ " ${need[*]} " == *" redis-server "* ]]; then
  $sudo systemctl disable --now redis-server >/dev/null 2>&1 || $sudo service redis-server stop >/dev/null 2>&1 || true
fi
