#!/bin/bash
# Issue 6 benchmark: what the jail adds to the start of one process, side by side in one run.
#   probe: jail-probe from exec to "ready" (seccomp installed), jailed vs direct. No KVM needed.
#   vmm:   clone-vmm from exec to "API listening" (KVM VM, memory, kernel loaded, socket bound),
#          through clone-jailer vs direct. Needs /dev/kvm: tests/lab/run -- tests/bench/jail_start.sh
# Usage: tests/bench/jail_start.sh [RUNS] [probe|vmm|both]. Prints per-kind medians and ratios.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=$PWD/${CLONE_BUILD_DIR:-build}
RUNS=${1:-20}
WHAT=${2:-both}
GUEST=${CLONE_GUEST_DIR:-$BUILD/guest}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"; rmdir /sys/fs/cgroup/clone-bench/* 2>/dev/null || true' EXIT
CGROUP_PARENT=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)/clone-bench
jail=("$BUILD/bin/clone-jailer" --uid 0 --gid 0 --cgroup-parent "$CGROUP_PARENT")

median() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f", m/1e3}'; }

# Starts "$@" with fifos for stdin and stdout+stderr; prints us from spawn until a line
# starting with $MARK, then sends $STOP (a line on stdin, or a command) and waits.
time_until_line() {
  rm -f "$TMP/in" "$TMP/out"; mkfifo "$TMP/in" "$TMP/out"
  local start; start=${EPOCHREALTIME/./}
  "$@" <"$TMP/in" >"$TMP/out" 2>&1 &
  local pid=$!
  exec 7>"$TMP/in" 8<"$TMP/out"
  local line found=0
  while IFS= read -r -u 8 line; do
    if [[ $line == *"$MARK"* ]]; then found=1; break; fi
  done
  local end=${EPOCHREALTIME/./}
  if [ "$STOP" = shutdown ]; then "$BUILD/bin/clone" shutdown --vm "$TMP/api.sock" >/dev/null 2>&1 || true
  else echo "$STOP" >&7; fi
  cat <&8 >/dev/null || true
  exec 7>&- 8<&-
  wait $pid || true
  [ $found = 1 ] || { echo "no '$MARK' from $*" >&2; return 1; }
  echo $((end - start))
}

report() {  # name, direct file, jailed file
  local d j; d=$(median <"$2"); j=$(median <"$3")
  echo "RESULT $1: direct median ${d} ms, jailed median ${j} ms, added $(awk "BEGIN {printf \"%.2f\", $j-$d}") ms, ratio $(awk "BEGIN {printf \"%.2f\", $j/$d}") (N=$RUNS)"
}

if [ "$WHAT" != vmm ]; then
  for i in $(seq 1 "$RUNS"); do
    MARK=ready STOP=exit time_until_line "$BUILD/tests/jail-probe" block kill >>"$TMP/probe.direct"
    MARK=ready STOP=exit time_until_line "${jail[@]}" --id bench-probe --exec-file "$BUILD/tests/jail-probe" -- block kill >>"$TMP/probe.jailed"
  done
  report "jail-probe exec to ready" "$TMP/probe.direct" "$TMP/probe.jailed"
fi
if [ "$WHAT" != probe ]; then
  [ -e /dev/kvm ] || { echo "jail_start.sh: no /dev/kvm for the vmm case (run it through tests/lab/run)" >&2; exit 2; }
  vmm=("$BUILD/bin/clone-vmm" --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initrd.img" --mem-mb 256
    --api-socket "$TMP/api.sock")
  for i in $(seq 1 "$RUNS"); do
    MARK="API listening" STOP=shutdown time_until_line "${vmm[@]}" >>"$TMP/vmm.direct"
    MARK="API listening" STOP=shutdown time_until_line "${jail[@]}" --id bench-vmm --exec-file "${vmm[0]}" --ro "$GUEST" --rw "$TMP" --dev /dev/kvm -- "${vmm[@]:1}" >>"$TMP/vmm.jailed"
  done
  report "clone-vmm exec to API socket" "$TMP/vmm.direct" "$TMP/vmm.jailed"
fi
