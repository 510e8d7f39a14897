#!/usr/bin/env bash
# Prints the path of a Python interpreter of at least the given version (default 3.12), or nothing.
# Usage: scripts/find-python.sh 3.12   |   scripts/find-python.sh 3.11 exact
# Tries plain names on PATH first, then pyenv's installed versions (pyenv shims refuse versions that are
# not selected, so the shims alone are not enough), then the usual system locations.
set -u
want=${1:-3.12}
exact=${2:-}
major=${want%%.*}; minor=${want#*.}
check() {
  "$1" -c "import sys; v=sys.version_info[:2]; sys.exit(0 if (v==($major,$minor) if '$exact' else v>=($major,$minor)) else 1)" \
    >/dev/null 2>&1
}
candidates=()
if [ -n "$exact" ]; then
  candidates+=("python$want")
else
  for m in 12 13 14; do [ "$m" -ge "$minor" ] && candidates+=("python3.$m"); done
fi
for c in "${candidates[@]}"; do
  p=$(command -v "$c" 2>/dev/null) || continue
  if check "$p"; then echo "$p"; exit 0; fi
done
for d in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.* /usr/bin /usr/local/bin; do
  for c in "${candidates[@]}"; do
    p="$d/bin/$c"; [ -x "$p" ] || p="$d/$c"
    if [ -x "$p" ] && check "$p"; then echo "$p"; exit 0; fi
  done
done
if [ -z "$exact" ] && check python3; then command -v python3; exit 0; fi
exit 1
