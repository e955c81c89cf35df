#!/usr/bin/env bash
# Run a command (make test-under-load: the pytest suite) beside a CPU hog, one busy process per core.
#   .ci/with_cpu_hog.sh [--seconds S] [--procs N] -- CMD ARGS...
# The hog starts first and is always stopped afterwards: when CMD ends (pass or fail), after Ctrl-C (SIGINT reaches
# CMD with the rest of the terminal's process group; this shell waits for CMD to end), after SIGTERM/SIGHUP to this
# shell or the death of its parent (forwarded to CMD as SIGTERM, which is waited for) and, should this shell be
# SIGKILLed, by itself (it watches this shell, and exits after --seconds anyway). The exit status is CMD's.
# Call it with exec from make's recipe shell, so that make's SIGTERM reaches this script.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
seconds=1800
procs="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)"
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --procs) procs="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: $0 [--seconds S] [--procs N] -- CMD ARGS..." >&2; exit 2; }
python="${PYTHON:-python3}"

hog=""
cmd=""
stop_hog() {
  if [ -n "$hog" ]; then
    kill -TERM "$hog" 2>/dev/null
    wait "$hog" 2>/dev/null
    hog=""
  fi
}
forward() {  # pass the signal on to CMD; the loop below keeps waiting for it
  [ -n "$cmd" ] && kill -"$1" "$cmd" 2>/dev/null
}
watcher=""
cleanup() {
  [ -n "$watcher" ] && kill "$watcher" 2>/dev/null
  stop_hog
}
trap cleanup EXIT
trap ':' INT  # CMD got it too (same process group): wait for it to finish its own cleanup
trap 'forward TERM' TERM
trap 'forward HUP' HUP

"$python" "$here/cpu_hog.py" --procs "$procs" --seconds "$seconds" --watch $$ &
hog=$!
# CMD in the background (so that a trapped signal interrupts `wait` at once) but with SIGINT restored: a background
# job of a script ignores it otherwise, and Ctrl-C must still reach pytest
(trap - INT QUIT; exec "$@") &
cmd=$!
# should our own parent (make) die without passing a signal on, stop CMD as if we had got SIGTERM
parent=$PPID
( trap - TERM; while kill -0 "$parent" 2>/dev/null; do sleep 1; done; kill -TERM $$ 2>/dev/null ) &
watcher=$!
while kill -0 "$cmd" 2>/dev/null; do
  wait "$cmd"
done
wait "$cmd"  # CMD's status (kept by the shell after the loop reaped it)
status=$?
cleanup
echo "with_cpu_hog: '$*' exited with status $status" >&2
exit "$status"
