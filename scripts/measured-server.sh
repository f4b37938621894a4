# Sourced by the per-message scripts (syscalls-per-message.sh,
# context-switches-per-message.sh): the server as they measure it, and
# peerbench run at it. Not a script of its own.

# measured_flag FLAG VALUE: takes one of the flags the per-message scripts
# share into its variable (bin, batch, rounds, rate_flag, peerbench, port);
# returns 1 for any other flag.
measured_flag() {
  case "$1" in
    --bin) bin="$2" ;;
    --batch) batch="$2" ;;
    --rounds) rounds="$2" ;;
    --rate) rate_flag=(--rate "$2") ;;
    --peerbench) peerbench="$2" ;;
    --port) port="$2" ;;
    *) return 1 ;;
  esac
}

# measured_server_start BIN PORT DIR: starts BIN with 1 shard, periodic
# durability and its data in DIR (emptied first), listening on
# 127.0.0.1:PORT without a metrics listener; sets `pid` once the port
# accepts (or after 5 s).
measured_server_start() {
  rm -rf "$3"
  "$1" --listen "127.0.0.1:$2" --metrics-listen off --data-dir "$3" \
    --shards 1 --durability periodic --log warn &
  pid=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null && break; sleep 0.05; done
}

# measured_peerbench_start PEERBENCH PORT OUT [peerbench flags]: runs
# peerbench against the server `pid` for 7 s after 1 s of warm-up, in the
# background, its report into OUT; sets `bench`.
measured_peerbench_start() {
  local peerbench="$1" port="$2" out="$3"
  shift 3
  timeout 30 "$peerbench" --target queueber --addr "127.0.0.1:$port" --server-pid "$pid" \
    "$@" --duration 7 --warmup 1 >"$out" 2>/dev/null &
  bench=$!
}
