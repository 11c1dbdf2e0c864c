# Sourced by the bench scripts. `bench_part DIR NAME COMMAND...` runs one part of a bench: its figures go to
# DIR/NAME.txt and to the terminal, its log to DIR/NAME.err, whose end (less INFO lines) is shown if it fails,
# and the script stops there.
bench_part() {
  local dir=$1 name=$2
  shift 2
  local started=$SECONDS
  if ! "$@" 2> "$dir/$name.err" | tee "$dir/$name.txt"; then
    echo "$name ($*) failed; the end of its log ($dir/$name.err):" >&2
    grep -v ' INFO ' "$dir/$name.err" | tail -20 >&2
    exit 1
  fi
  echo "($name took $((SECONDS - started)) s)"
}
