#!/usr/bin/env bash
# Runs the whole test suite: unit, property, integration and doc tests.
# --help prints this and starts nothing.
source "$(dirname "$0")/help.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo test --release --all-features "$@"
