#!/usr/bin/env bash
# Runs the Python client's tests (clients/python/tests) against a real
# queueberd: creates a venv at ${QUEUEBER_VENV:-~/.cache/queueber/venv} when
# missing (installing python3-venv with apt if needed), installs
# ./clients/python and the pinned test tools (pytest, pytest-timeout, and the reference Prometheus parsers for the metrics test) into it, then runs pytest with
# a per-test and an overall timeout. Extra arguments go to pytest.
#
# The server binary is $QUEUEBERD, else
# ${CARGO_TARGET_DIR:-~/.cache/queueber/target}/release/queueberd (built with
# cargo only when it is missing). Every server the tests start listens on
# 127.0.0.1 and is stopped by PID.
# --help prints this and starts nothing.
source "$(dirname "$0")/help.sh"
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${QUEUEBER_VENV:-$HOME/.cache/queueber/venv}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  echo "installing: python3-venv" >&2
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq python3-venv >/dev/null
fi
# A venv whose interpreter is gone (the system Python was replaced) is made anew.
if [ -d "$venv" ] && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi

"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  pytest==8.4.2 pytest-timeout==2.4.0 prometheus-client==0.26.0
# Not editable: the tests run against the package as pip installs it (with
# the schema it ships). pip reinstalls a local directory every time.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check ./clients/python

if [ -z "${QUEUEBERD:-}" ]; then
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/queueber/target}"
  if [ ! -x "$CARGO_TARGET_DIR/release/queueberd" ]; then
    source scripts/deps.sh
    cargo build --release --bin queueberd >&2
  fi
fi

# Bounded as a whole, so a hang fails the run instead of running out a CI clock.
timeout 900 "$venv/bin/python" -m pytest -p no:cacheprovider --timeout 120 \
  clients/python/tests "$@"
