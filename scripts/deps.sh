#!/usr/bin/env bash
# Installs what building queueber needs on Debian/Ubuntu, only when missing:
# the Cap'n Proto compiler (build.rs) and clang/libclang (RocksDB bindings).
# Idempotent; sourced by the other scripts.
# --help (when run, not sourced) prints this and installs nothing.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  source "$(dirname "${BASH_SOURCE[0]}")/help.sh"
fi
set -euo pipefail

missing=()
command -v capnp >/dev/null 2>&1 || missing+=(capnproto)
command -v clang >/dev/null 2>&1 || missing+=(clang)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 || missing+=(libclang-dev)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
# objcopy: scripts/dist.sh splits the debug info off the binaries.
command -v objcopy >/dev/null 2>&1 || missing+=(binutils)
# Installs the named Debian packages with apt (through sudo unless root).
apt_install() {
  echo "installing: $*" >&2
  local sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "$@" >/dev/null
}
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust (https://rustup.rs) first" >&2
  exit 1
fi

# RocksDB's C++ takes ~18 minutes to build per profile: keep one build cache
# outside the source tree, and use only the release profile everywhere.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/queueber/target}"
