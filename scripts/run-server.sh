#!/usr/bin/env bash
# Builds queueberd and runs it on its defaults (127.0.0.1:7420, data under
# ~/.local/share/queueber, fsync durability). Extra arguments go to queueberd;
# its flags: ~/.cache/queueber/target/release/queueberd --help (once built).
# --help prints this and starts nothing.
source "$(dirname "$0")/help.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
# The stripped copy (see scripts/dist.sh): small enough to copy to a host.
dist=$(bash scripts/dist.sh)
exec "$dist/queueberd" "$@"
