#!/usr/bin/env bash
# Runs the whole test suite: unit, property, integration and doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo test --release --all-features "$@"
