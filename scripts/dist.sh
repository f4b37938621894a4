#!/usr/bin/env bash
# Builds the release binaries and writes shippable copies to
# $CARGO_TARGET_DIR/dist: queueberd, queueber and loadgen without their debug
# sections (about 16 MB instead of about 450 MB: almost all of it is the line
# tables of the statically linked RocksDB C++), each with a .debug file
# beside it that gdb and perf find through the binary's debuglink. Function
# symbols stay in the binary, so perf shows names even without the .debug.
#
#   scripts/dist.sh            # prints the dist directory
# --help prints this and starts nothing.
source "$(dirname "$0")/help.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
# Built the way scripts/test.sh builds them (the test graph, where
# dev-dependencies unify some dependencies' features): a plain `cargo build`
# would compile those crates and queueber a second time, so the README's two
# commands would rebuild between them. This builds the test targets too.
cargo test --release --all-features --no-run >&2
release="$CARGO_TARGET_DIR/release"
dist="$CARGO_TARGET_DIR/dist"
mkdir -p "$dist"
for bin in queueberd queueber loadgen; do
  # Only when the build changed it: the copy is what a running server uses.
  if [ ! -e "$dist/$bin" ] || [ "$release/$bin" -nt "$dist/$bin" ]; then
    objcopy --only-keep-debug "$release/$bin" "$dist/$bin.debug.tmp"
    objcopy --strip-debug --add-gnu-debuglink="$dist/$bin.debug.tmp" "$release/$bin" "$dist/$bin.tmp"
    mv "$dist/$bin.debug.tmp" "$dist/$bin.debug"
    mv "$dist/$bin.tmp" "$dist/$bin"
  fi
done
echo "$dist"
