#!/usr/bin/env bash
# Runs the whole test suite: unit, property, integration and doc tests.
# --help prints the comment above and starts nothing.
for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) break ;;
  esac
done
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo test --release --all-features "$@"
