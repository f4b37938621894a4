# Sourced first by every script in scripts/: with -h or --help among the
# script's arguments (before any `--`), prints the script's header comment
# and exits before anything is installed, built or started.
for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) break ;;
  esac
done
