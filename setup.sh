#!/usr/bin/env bash
# Installs everything chunksync needs on Debian bookworm (system tools + a virtualenv in .venv).
#   ./setup.sh            install only (idempotent, fast when already done)
#   ./setup.sh demo       install, then run `chunksync demo`
#   ./setup.sh test       install, then run the whole test suite
set -euo pipefail
cd "$(dirname "$0")"

# Tools the tests, the demo and the bench drive for real.
debs=(docker-registry skopeo umoci zstd bsdiff xdelta3 casync rsync debootstrap apache2-utils openssl time python3-venv)
missing=()
for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# Reinstall only when the project description changed since the last install.
stamp=.venv/.chunksync-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing Python packages into .venv"
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e '.[test,bench]'
    touch "$stamp"
fi

case "${1:-}" in
    demo) exec .venv/bin/chunksync demo ;;
    test) shift; exec .venv/bin/python -m pytest "$@" ;;
    "") echo "setup: done. Try: .venv/bin/chunksync demo" ;;
    *) echo "usage: ./setup.sh [demo|test [pytest args]]" >&2; exit 2 ;;
esac
