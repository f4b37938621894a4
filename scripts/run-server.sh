#!/usr/bin/env bash
# Builds queueberd and runs it on its defaults (127.0.0.1:7420, data under
# ~/.local/share/queueber, fsync durability). Extra arguments go to queueberd.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo build --release --bin queueberd --bin queueber
exec "$CARGO_TARGET_DIR/release/queueberd" "$@"
