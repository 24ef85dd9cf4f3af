#!/bin/bash
# Issue 5 benchmark: vhost-user-blk back-ends side by side, clone-block against
# qemu-storage-daemon, on a raw and a qcow2 image, measured by build/bench/clone-blk-bench (a
# front-end and guest driver with no VM, so it runs on the host: vhost-user needs no KVM).
#
#   tests/bench/blk_backends.sh [ROUNDS] [SECONDS]        (defaults 5 and 3)
#
# Environment: CLONE_BUILD_DIR (default build), CLONE_BLOCK (default $CLONE_BUILD_DIR/bin/clone-block;
# skipped with a note when missing), BLK_BENCH_DIR (default /dev/shm: a tmpfs, so the back-ends
# serve from memory and the path under test is vhost-user + virtio-blk + the image format, not a
# disk), BLK_BENCH_SIZE (default 1G), BLK_BENCH_WARMUP (default 0.5 s), BLK_BENCH_WORKLOADS
# (default all six below), BLK_BENCH_FORMATS (default "raw qcow2"), BLK_BENCH_BACKENDS (default
# "qsd clone"; "qsd" is qemu-storage-daemon with aio=io_uring, the same kernel interface as
# clone-block's data path and the cheaper of its two choices with the page cache, "qsd-threads"
# is its default aio=threads).
#
# Images: a raw file (truncate) and a qcow2 (qemu-img create -f qcow2 -o
# preallocation=off,cluster_size=64k), both of SIZE, both then written completely through
# qemu-storage-daemon by the driver (--fill-only, 1 MiB writes), so every qcow2 cluster is
# allocated and both hold the same data, which the driver checks on every read.
#
# Each run starts a fresh back-end (one queue), runs the driver for WARMUP + SECONDS, and stops
# it; the back-end's CPU time during the run is read from /proc. Rounds alternate which back-end
# goes first. Prints every run, then per workload the median IOPS, min-max spread, median p50/p99
# latency and CPU per request, and the ratios clone/qsd and qcow2/raw.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${CLONE_BUILD_DIR:-build}
ROUNDS=${1:-5}
SECONDS_PER_RUN=${2:-3}
WARMUP=${BLK_BENCH_WARMUP:-0.5}
SIZE=${BLK_BENCH_SIZE:-1G}
BASE=${BLK_BENCH_DIR:-/dev/shm}
FORMATS=${BLK_BENCH_FORMATS:-raw qcow2}
DRIVER=$BUILD/bench/clone-blk-bench
CLONE_BLOCK=${CLONE_BLOCK:-$BUILD/bin/clone-block}
# name rw bs iodepth
WORKLOADS=${BLK_BENCH_WORKLOADS:-"randread-4k-qd1:randread:4096:1 randread-4k-qd32:randread:4096:32 randwrite-4k-qd1:randwrite:4096:1 randwrite-4k-qd32:randwrite:4096:32 read-1m-qd4:read:1M:4 write-1m-qd4:write:1M:4"}

[ -x "$DRIVER" ] || { echo "blk_backends.sh: build $DRIVER first (ninja -C $BUILD clone-blk-bench)" >&2; exit 2; }
command -v qemu-storage-daemon >/dev/null || { echo "blk_backends.sh: no qemu-storage-daemon" >&2; exit 2; }
BACKENDS=${BLK_BENCH_BACKENDS:-qsd clone}
if [[ " $BACKENDS " == *" clone "* ]] && [ ! -x "$CLONE_BLOCK" ]; then
  echo "blk_backends.sh: no $CLONE_BLOCK, measuring qemu-storage-daemon only" >&2
  BACKENDS=$(echo "$BACKENDS" | sed 's/\bclone\b//')
fi

work=$(mktemp -d "$BASE/clone-blk-bench.XXXXXX")
backend_pid=""
cleanup() {
  if [ -n "$backend_pid" ]; then kill "$backend_pid" 2>/dev/null || true; wait "$backend_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
sock=$work/blk.sock
results=$work/results

# start_backend BACKEND FORMAT: starts it on the image of FORMAT, waits for its socket.
start_backend() {
  local backend=$1 format=$2 image=$work/disk.$2
  rm -f "$sock"
  case $backend in
    qsd | qsd-threads)
      local aio=io_uring
      [ "$backend" = qsd-threads ] && aio=threads
      local node="driver=file,node-name=f,filename=$image,cache.direct=off,aio=$aio"
      local args=(--blockdev "$node")
      if [ "$format" = qcow2 ]; then
        args=(--blockdev "${node/node-name=f/node-name=file}" --blockdev "driver=qcow2,node-name=f,file=file")
      fi
      qemu-storage-daemon "${args[@]}" \
        --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$sock,writable=on,num-queues=1" \
        >"$work/backend.log" 2>&1 &
      ;;
    clone)
      "$CLONE_BLOCK" --socket-path "$sock" --image "$image" --format "$format" --queues 1 \
        >"$work/backend.log" 2>&1 &
      ;;
  esac
  backend_pid=$!
  for _ in $(seq 400); do [ -S "$sock" ] && return 0; sleep 0.025; done
  echo "blk_backends.sh: $backend did not start on $format:" >&2; cat "$work/backend.log" >&2; exit 1
}
stop_backend() {
  kill "$backend_pid" 2>/dev/null || true
  wait "$backend_pid" 2>/dev/null || true
  backend_pid=""
}
# CPU time (user + system, clock ticks) of the back-end so far, all threads.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$backend_pid/stat"; }

truncate -s "$SIZE" "$work/disk.raw"
qemu-img create -q -f qcow2 -o preallocation=off,cluster_size=64k "$work/disk.qcow2" "$SIZE"
for format in $FORMATS; do
  start_backend qsd "$format"
  "$DRIVER" --socket "$sock" --fill-only --bs 1M --iodepth 8 --label "fill-$format"
  stop_backend
done
if [[ " $FORMATS " == *" qcow2 "* ]]; then
  qemu-img check -q "$work/disk.qcow2"
  echo "qcow2 after the fill: $(qemu-img map --output=json "$work/disk.qcow2" | grep -c '"data": true') data extent(s), $(du -h "$work/disk.qcow2" | cut -f1) on disk"
fi

tick=$(getconf CLK_TCK)
echo "host: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at the start; images in $(df --output=fstype "$work" | tail -1) $work, $SIZE each"
: >"$results"
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then order=$BACKENDS; else order=$(echo "$BACKENDS" | awk '{for (i = NF; i > 0; i--) printf "%s ", $i}'); fi
  for workload in $WORKLOADS; do
    IFS=: read -r name rw bs depth <<<"$workload"
    for format in $FORMATS; do
      for backend in $order; do
        start_backend "$backend" "$format"
        before=$(cpu_ticks)
        line=$("$DRIVER" --socket "$sock" --rw "$rw" --bs "$bs" --iodepth "$depth" \
                 --seconds "$SECONDS_PER_RUN" --warmup "$WARMUP" --label "$backend-$format-$name") || {
          echo "blk_backends.sh: the driver failed against $backend $format $name:" >&2
          cat "$work/backend.log" >&2; exit 1; }
        after=$(cpu_ticks)
        stop_backend
        # CPU microseconds the back-end spent per request (warm-up included in both terms).
        cpu_us=$(awk -v l="$line" -v t="$((after - before))" -v hz="$tick" -v s="$SECONDS_PER_RUN" -v w="$WARMUP" '
          BEGIN { match(l, /ios=[0-9]+/); ios = substr(l, RSTART + 4, RLENGTH - 4);
                  printf "%.1f", t / hz * 1e6 / (ios * (s + w) / s) }')
        echo "round $round $line backend_cpu_us_per_io=$cpu_us"
        echo "$name $format $backend $(awk -v l="$line" 'BEGIN {
          n = split(l, f, " "); for (i = 1; i <= n; i++) { split(f[i], kv, "="); v[kv[1]] = kv[2] }
          print v["iops"], v["lat_p50_us"], v["lat_p99_us"] }') $cpu_us" >>"$results"
      done
    done
  done
done

# Medians per (workload, format, backend): iops min max p50 p99 cpu.
median() { sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
col() { awk -v n="$1" -v f="$2" -v b="$3" -v c="$4" '$1 == n && $2 == f && $3 == b {print $c}' "$results"; }
stat_of() {  # name format backend -> "median min max p50 p99 cpu"
  local iops
  iops=$(col "$1" "$2" "$3" 4)
  [ -n "$iops" ] || { echo "- - - - - -"; return; }
  echo "$(median <<<"$iops") $(sort -g <<<"$iops" | head -1) $(sort -g <<<"$iops" | tail -1)" \
       "$(col "$1" "$2" "$3" 5 | median) $(col "$1" "$2" "$3" 6 | median) $(col "$1" "$2" "$3" 7 | median)"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'; }

echo
echo "RESULT medians of $ROUNDS rounds, ${SECONDS_PER_RUN} s each after ${WARMUP} s warm-up, 1 queue; qsd: cache.direct=off, aio=io_uring (qsd-threads: aio=threads)"
printf '| %-17s | %-6s | %-11s | %9s | %17s | %8s | %8s | %10s |\n' workload format backend IOPS "min-max" "p50 us" "p99 us" "CPU us/IO"
echo "|---|---|---|---|---|---|---|---|"
for workload in $WORKLOADS; do
  name=${workload%%:*}
  for format in $FORMATS; do
    for backend in $BACKENDS; do
      read -r med lo hi p50 p99 cpu <<<"$(stat_of "$name" "$format" "$backend")"
      printf '| %-17s | %-6s | %-11s | %9s | %17s | %8s | %8s | %10s |\n' "$name" "$format" "$backend" "$med" "$lo-$hi" "$p50" "$p99" "$cpu"
    done
  done
done
echo
echo "| workload | clone/qsd raw | clone/qsd qcow2 | qcow2/raw qsd | qcow2/raw clone |"
echo "|---|---|---|---|---|"
for workload in $WORKLOADS; do
  name=${workload%%:*}
  m() { stat_of "$name" "$1" "$2" | cut -d' ' -f1; }
  echo "| $name | $(ratio "$(m raw clone)" "$(m raw qsd)") | $(ratio "$(m qcow2 clone)" "$(m qcow2 qsd)") | $(ratio "$(m qcow2 qsd)" "$(m raw qsd)") | $(ratio "$(m qcow2 clone)" "$(m raw clone)") |"
done
