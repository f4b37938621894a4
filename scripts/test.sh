#!/usr/bin/env bash
# Runs the whole test suite: unit, property, integration and doc tests, then
# the Python client's tests against the server just built.
# --help prints this and starts nothing.
source "$(dirname "$0")/help.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
# promtool, from Debian's prometheus package: tests/metrics.rs checks
# /metrics with Prometheus's own parser. The package is unpacked into the
# cache, not installed, so no Prometheus service is set up or started.
promtool_dir="$HOME/.cache/queueber/promtool"
if ! command -v promtool >/dev/null 2>&1 && [ ! -x "$promtool_dir/usr/bin/promtool" ]; then
  echo "fetching promtool (Debian package prometheus, unpacked only)" >&2
  rm -rf "$promtool_dir" && mkdir -p "$promtool_dir"
  (cd "$promtool_dir" && apt-get download prometheus >/dev/null && dpkg-deb -x prometheus_*.deb . && rm -f prometheus_*.deb)
fi
export PATH="$PATH:$promtool_dir/usr/bin"
# tmux: tests/top.rs drives `queueber top` in a real terminal.
command -v tmux >/dev/null 2>&1 || apt_install tmux
cargo test --release --all-features "$@"
# The Python client against the queueberd just built (its own venv).
bash scripts/test-python.sh
