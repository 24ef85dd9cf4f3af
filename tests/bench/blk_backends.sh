#!/bin/bash
# Issue 5 benchmark: vhost-user-blk back-ends side by side, clone-block against
# qemu-storage-daemon, on a raw and a qcow2 image, measured by build/bench/clone-blk-bench (a
# front-end and guest driver with no VM, so it runs on the host: vhost-user needs no KVM).
#
#   tests/bench/blk_backends.sh [ROUNDS] [SECONDS]        (defaults 5 and 3)
#   tests/bench/blk_backends.sh --summarize FILE          (the tables again, from a kept results file)
#
# Environment: CLONE_BUILD_DIR (default build), CLONE_BLOCK (default $CLONE_BUILD_DIR/bin/clone-block;
# skipped with a note when missing), BLK_BENCH_DIR (default /dev/shm: a tmpfs, so the back-ends
# serve from memory and the path under test is vhost-user + virtio-blk + the image format, not a
# disk), BLK_BENCH_SIZE (default 1G), BLK_BENCH_WARMUP (default 0.5 s), BLK_BENCH_WORKLOADS
# (default all six below), BLK_BENCH_FORMATS (default "raw qcow2"), BLK_BENCH_BACKENDS (default
# "qsd clone"; "qsd" is qemu-storage-daemon with aio=io_uring, the same kernel interface as
# clone-block's data path, "qsd-threads" is its default aio=threads).
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

summarize() {
# Ratios two ways: of the medians, and the median of the per-round ratios (the two back-ends'
# runs of one round are seconds apart, so a paired ratio cancels most of the load drift).
awk -v workloads="$WORKLOADS" -v formats="$FORMATS" -v backends="$BACKENDS" '
  function median(list,    n, a, i, j, t) {
    n = split(list, a, " ")
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j > 0 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return n ? a[int((n + 1) / 2)] : "-"
  }
  function lo(list,    n, a, i, m) { n = split(list, a, " "); m = a[1]; for (i = 2; i <= n; i++) if (a[i] + 0 < m + 0) m = a[i]; return m }
  function hi(list,    n, a, i, m) { n = split(list, a, " "); m = a[1]; for (i = 2; i <= n; i++) if (a[i] + 0 > m + 0) m = a[i]; return m }
  function ratio(a, b) { return (a == "-" || b == "-" || b + 0 == 0) ? "-" : sprintf("%.2f", a / b) }
  # Median [min-max] of x/y over the rounds that have both.
  function paired(kx, ky,    r, list) {
    list = ""
    for (r = 1; r <= rounds; r++) if ((kx, r) in iops && (ky, r) in iops && iops[ky, r] > 0) list = list " " sprintf("%.3f", iops[kx, r] / iops[ky, r])
    return list == "" ? "-" : sprintf("%.2f [%.2f-%.2f]", median(list), lo(list), hi(list))
  }
  {
    k = $2 SUBSEP $3 SUBSEP $4
    all[k] = all[k] " " $5; p50[k] = p50[k] " " $6; p99[k] = p99[k] " " $7; cpu[k] = cpu[k] " " $8
    iops[k, $1] = $5; if ($1 > rounds) rounds = $1
  }
  END {
    nw = split(workloads, W, " "); nf = split(formats, F, " "); nb = split(backends, B, " ")
    printf "| %-17s | %-6s | %-11s | %9s | %13s | %8s | %8s | %9s |\n", "workload", "format", "backend", "IOPS", "min-max", "p50 us", "p99 us", "CPU us/IO"
    print "|---|---|---|---|---|---|---|---|"
    for (w = 1; w <= nw; w++) { split(W[w], parts, ":"); name[w] = parts[1]
      for (f = 1; f <= nf; f++) for (b = 1; b <= nb; b++) { k = name[w] SUBSEP F[f] SUBSEP B[b]
        if (!(k in all)) continue
        med[k] = median(all[k]); mcpu[k] = median(cpu[k])
        printf "| %-17s | %-6s | %-11s | %9s | %13s | %8s | %8s | %9s |\n", name[w], F[f], B[b], med[k], lo(all[k]) "-" hi(all[k]), median(p50[k]), median(p99[k]), mcpu[k] } }
    print ""
    print "IOPS ratios: of the medians; then the median [min-max] of the per-round ratios. CPU: qsd CPU us/IO over clone CPU us/IO (above 1: clone-block spends less)."
    print ""
    print "| workload | format | clone/qsd | per round | qsd/clone CPU per IO |"
    print "|---|---|---|---|---|"
    for (w = 1; w <= nw; w++) for (f = 1; f <= nf; f++) {
      c = name[w] SUBSEP F[f] SUBSEP "clone"; q = name[w] SUBSEP F[f] SUBSEP "qsd"
      if (!(c in med) || !(q in med)) continue
      printf "| %s | %s | %s | %s | %s |\n", name[w], F[f], ratio(med[c], med[q]), paired(c, q), ratio(mcpu[q], mcpu[c]) }
    print ""
    print "| workload | backend | qcow2/raw | per round |"
    print "|---|---|---|---|"
    for (w = 1; w <= nw; w++) for (b = 1; b <= nb; b++) {
      r = name[w] SUBSEP "raw" SUBSEP B[b]; q = name[w] SUBSEP "qcow2" SUBSEP B[b]
      if (!(r in med) || !(q in med)) continue
      printf "| %s | %s | %s | %s |\n", name[w], B[b], ratio(med[q], med[r]), paired(q, r) }
  }' "$results"
}
if [ "${1:-}" = --summarize ]; then
  results=$2 ROUNDS=$(awk '$1 > n {n = $1} END {print n}' "$2")
  BACKENDS=${BLK_BENCH_BACKENDS:-qsd clone}
  summarize
  exit 0
fi

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
mkdir -p "$BUILD/bench-results"
results=$BUILD/bench-results/blk_backends.$(date +%Y%m%d-%H%M%S).txt  # one line per run, kept

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
        echo "$round $name $format $backend $(awk -v l="$line" 'BEGIN {
          n = split(l, f, " "); for (i = 1; i <= n; i++) { split(f[i], kv, "="); v[kv[1]] = kv[2] }
          print v["iops"], v["lat_p50_us"], v["lat_p99_us"] }') $cpu_us" >>"$results"
      done
    done
  done
done

echo
echo "RESULT medians of $ROUNDS rounds, ${SECONDS_PER_RUN} s each after ${WARMUP} s warm-up, 1 queue; qsd: cache.direct=off, aio=io_uring (qsd-threads: aio=threads); runs in $results"
summarize
