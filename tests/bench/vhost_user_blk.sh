#!/bin/bash
# Issue 4 benchmark: 4K random-read IOPS of a vhost-user-blk disk served by
# qemu-storage-daemon, through Clone's core and through QEMU (KVM, vhost-user-blk-pci), side by
# side in one run, with the same kernel, benchmark initramfs, image, vCPUs, memory and queues.
#
#   tests/bench/vhost_user_blk.sh [ROUNDS] [SECONDS] [THREADS]      (CLONE_BUILD_DIR, default build)
#
# On a host without /dev/kvm it builds the benchmark initramfs here, then runs itself in the lab
# (tests/lab/run). The guest runs clone-randread (tests/bench/randread.c) as its autorun job:
# THREADS threads of O_DIRECT 4 KiB preads at random offsets for SECONDS. Each round runs
# Clone and QEMU back to back (who goes first alternates); each run gets a fresh
# qemu-storage-daemon. Logs every run (IOPS, the guest's negotiated features and interrupts,
# KVM exits per read, per-thread CPU) and prints a RESULT line with the medians, their ratio
# clone/qemu and the median of the per-round ratios (>= 1.0: our frontend is not the
# bottleneck).
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${CLONE_BUILD_DIR:-build}
ROUNDS=${1:-3}
SECONDS_PER_RUN=${2:-10}
THREADS=${3:-16}
GUEST=$BUILD/guest-bench
MEM=512
VCPUS=${CLONE_BENCH_VCPUS:-2}
CMDLINE="console=ttyS0 panic=-1 quiet"

if [ ! -e /dev/kvm ] && [ "${CLONE_LAB:-}" != 1 ]; then
  # Host side: the image needs apt and dpkg tools, which the lab does not run.
  [ -x "$BUILD/bench/clone-randread" ] || { echo "vhost_user_blk.sh: build $BUILD first" >&2; exit 2; }
  overlay=$BUILD/bench/randread-overlay
  mkdir -p "$overlay/etc"
  # The job also reports what the guest negotiated and how many request-queue interrupts
  # the run took ("bench:" lines), so the two VMMs can be checked for like-with-like.
  cat >"$overlay/etc/clone-autorun" <<EOF
#!/bin/sh
irqs() { awk '/virtio[0-9]+-req/ { for (i = 2; i <= NF && \$i ~ /^[0-9]+\$/; i++) n += \$i } END { print n + 0 }' /proc/interrupts; }
before=\$(irqs)
clone-randread /dev/vda $SECONDS_PER_RUN $THREADS 4096 || exit \$?
after=\$(irqs)
sleep 2  # the host samples KVM's counters for this VM before it goes away
echo "bench: features \$(cat /sys/block/vda/device/features) hw-queues \$(ls /sys/block/vda/mq | wc -l) nr_requests \$(cat /sys/block/vda/queue/nr_requests) request-irqs \$((after - before)) clocksource \$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
EOF
  CLONE_GUEST_EXTRA="$PWD/$BUILD/bench/clone-randread" CLONE_GUEST_OVERLAY="$PWD/$overlay" \
    guest/build.sh "$GUEST" >/dev/null
  export CLONE_BUILD_DIR="$BUILD"
  # Budget: ~4 min per pair of runs under load, plus the lab's boot. L1 itself once stopped
  # mid-run (no output, its own watchdog silent); the lab's timeout ends that.
  exec tests/lab/run --timeout $((300 + ROUNDS * 2 * (120 + SECONDS_PER_RUN))) -- \
    "$0" "$ROUNDS" "$SECONDS_PER_RUN" "$THREADS"
fi
[ -e /dev/kvm ] || { echo "vhost_user_blk.sh: no /dev/kvm" >&2; exit 2; }
[ -f "$GUEST/initrd.img" ] || { echo "vhost_user_blk.sh: no $GUEST (run it on the host)" >&2; exit 2; }

work=$(mktemp -d /tmp/clone-vhost-bench.XXXXXX)
qsd_pid=""
cleanup() {
  [ -n "$qsd_pid" ] && kill "$qsd_pid" 2>/dev/null && wait "$qsd_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
image=$work/disk.raw
sock=$work/blk.sock
# 256 MiB, allocated (tmpfs in the lab: the back-end reads from memory, so the path under test
# is virtio + vhost-user + the two VMMs, not a disk).
dd if=/dev/zero of="$image" bs=1M count=256 status=none

start_qsd() {
  rm -f "$sock"
  qemu-storage-daemon \
    --blockdev "driver=file,node-name=f,filename=$image,cache.direct=off" \
    --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$sock,writable=on" \
    >"$work/qsd.log" 2>&1 &
  qsd_pid=$!
  for _ in $(seq 200); do [ -S "$sock" ] && return 0; sleep 0.05; done
  echo "vhost_user_blk.sh: qemu-storage-daemon did not start:" >&2; cat "$work/qsd.log" >&2; exit 1
}
stop_qsd() { kill "$qsd_pid" 2>/dev/null; wait "$qsd_pid" 2>/dev/null || true; qsd_pid=""; }

clone_cmd=("$BUILD/bin/clone-vmm" --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initrd.img"
  --cmdline "$CMDLINE" --mem-mb $MEM --vcpus $VCPUS --vhost-user-blk "$sock")
qemu_cmd=(qemu-system-x86_64 -accel kvm -M q35 -cpu host -smp $VCPUS -m $MEM
  -object "memory-backend-memfd,id=mem,size=${MEM}M,share=on" -numa node,memdev=mem
  -chardev "socket,id=c,path=$sock" -device vhost-user-blk-pci,chardev=c,num-queues=1,queue-size=128
  -nodefaults -display none -no-reboot -serial stdio
  -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initrd.img" -append "$CMDLINE")

# Seconds a run may take (boot, warm-up, SECONDS, power-off) before it counts as wedged.
RUN_LIMIT=$((120 + SECONDS_PER_RUN))
log() { echo "[$(printf '%(%H:%M:%S)T' -1)] $*" >&2; }

# One run: prints the IOPS, or fails with the console output.
run_one() {
  local who=$1 out=$work/$1.out
  local -n cmd="${who}_cmd"
  start_qsd
  local started=$EPOCHREALTIME
  "${cmd[@]}" </dev/null >"$out" 2>&1 &
  local pid=$!
  # A timer process and `wait -n`: a polling loop of `sleep 0.1` would fork a host binary
  # over 9p per step, which costs more than the step under TCG.
  sleep "$RUN_LIMIT" &
  local timer=$! finished="" status=0
  # KVM's counters for this VM (debugfs, while the VM lives), sampled when the guest is up
  # and when the load ends: exits per operation is where a VMM's costs show.
  (
    snap() {
      until grep -q "$1" "$out" 2>/dev/null; do sleep 0.2; kill -0 "$pid" 2>/dev/null || return 1; done
      grep -H . /sys/kernel/debug/kvm/"$pid"-*/{exits,io_exits,mmio_exits,halt_exits,irq_exits,irq_injections,halt_wakeup,insn_emulation,hypercalls,signal_exits,irq_window_exits,request_irq_exits} 2>/dev/null |
        sed 's,.*/,,' >"$2"
    }
    snap CLONE-GUEST-READY "$work/$who.kvm0" && snap '^randread:' "$work/$who.kvm1" &&
      # CPU time (user+system ticks) of every VMM and back-end thread so far: vCPU threads
      # carry the guest's time, the others are what each VMM and qemu-storage-daemon cost.
      for p in "$pid" "$qsd_pid"; do
        cat /proc/"$p"/task/*/stat 2>/dev/null | awk -v who="$p" '{ open_at = index($0, "("); close_at = match($0, /\) [A-Z] /)
          comm = substr($0, open_at + 1, close_at - open_at - 1); gsub(/ /, "_", comm)
          split(substr($0, close_at + 2), f, " "); printf "%s:%s=%d ", who, comm, f[12] + f[13] }'
      done >"$work/$who.cpu"
  ) &
  local sampler=$!
  wait -n -p finished "$pid" "$timer" || status=$?
  if [ "$finished" != "$pid" ]; then
    # Stuck: show where every thread of the VMM and the back-end waits, then give up.
    echo "vhost_user_blk.sh: $who did not finish in $RUN_LIMIT s; thread states (name state wchan):" >&2
    for p in "$pid" "$qsd_pid"; do
      for t in /proc/"$p"/task/*; do
        echo "  $p/$(basename "$t") $(cat "$t/comm") $(awk '{print $3}' "$t/stat") $(cat "$t/wchan")" >&2
      done
    done
    kill -9 "$pid"; wait "$pid" 2>/dev/null
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
    tail -30 "$out" >&2; stop_qsd; return 1
  fi
  kill "$timer" 2>/dev/null; wait "$timer" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  if [ "$status" != 0 ]; then
    echo "vhost_user_blk.sh: $who run failed (exit $status):" >&2; tail -30 "$out" >&2; stop_qsd; return 1
  fi
  stop_qsd
  local iops
  iops=$(awk '/^randread:/ {print $7}' "$out" | tr -d '\r')
  if [ -z "$iops" ] || ! grep -q 'CLONE-AUTORUN-EXIT 0' "$out"; then
    echo "vhost_user_blk.sh: $who: no result:" >&2; tail -30 "$out" >&2; return 1
  fi
  local wall=$(( (${EPOCHREALTIME/./} - ${started/./}) / 1000 ))
  log "$who: $(grep -h '^randread:' "$out" | tr -d '\r') (VM wall time ${wall} ms)"
  # What the guest negotiated and how many request-queue interrupts it took: the two VMMs
  # must match on the first, and the second is a frontend cost.
  log "$who: $(grep -h '^bench:' "$out" | tr -d '\r')"
  if [ -s "$work/$who.kvm1" ]; then
    local all
    all=$(awk '/^randread:/ {print $(NF-3)}' "$out")
    log "$who: CPU ticks per thread: $(cat "$work/$who.cpu" 2>/dev/null)"
    log "$who: KVM per op from guest ready to load end: $(awk -F: -v ops="$all" '
      NR == FNR { a[$1] = $2; next } { printf "%s %.2f ", $1, ($2 - a[$1]) / ops }' "$work/$who.kvm0" "$work/$who.kvm1")"
  fi
  echo "$iops"
}

# Nested KVM under TCG (the lab) sometimes wedges an L2 guest under this load, with either VMM
# (docs/BENCHMARKS.md); such a run is retried, up to 3 attempts, and counted.
declare -A failures=([clone]=0 [qemu]=0)
run_retrying() {
  local who=$1 attempt iops
  for attempt in 1 2 3; do
    if iops=$(run_one "$who"); then echo "$iops"; return 0; fi
    echo "vhost_user_blk.sh: $who attempt $attempt failed" >&2
    echo "$who" >>"$work/failures"
  done
  return 1
}
declare -a clone_iops qemu_iops
log "$ROUNDS rounds of $SECONDS_PER_RUN s, $THREADS threads, $VCPUS vCPUs, $MEM MiB; $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
for ((i = 0; i < ROUNDS; i++)); do
  # Who goes first alternates, so a cost of following the other VM (freeing its memory,
  # a warmer or colder L1) does not always land on the same side.
  if ((i % 2 == 0)); then
    clone_iops+=("$(run_retrying clone)")
    qemu_iops+=("$(run_retrying qemu)")
  else
    qemu_iops+=("$(run_retrying qemu)")
    clone_iops+=("$(run_retrying clone)")
  fi
  log "after round $((i + 1)): clone ${clone_iops[*]} qemu ${qemu_iops[*]}"
done
failures[clone]=$(grep -c '^clone$' "$work/failures" 2>/dev/null || true)
failures[qemu]=$(grep -c '^qemu$' "$work/failures" 2>/dev/null || true)
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2 ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2)}'; }
c=$(median "${clone_iops[@]}")
q=$(median "${qemu_iops[@]}")
echo "clone runs (iops): ${clone_iops[*]}"
echo "qemu runs (iops): ${qemu_iops[*]}"
# Each round's ratio (its two runs were next to each other in time, so they saw similar
# load from the rest of the machine) and their median.
ratios=()
for ((i = 0; i < ROUNDS; i++)); do
  ratios+=("$(awk -v a="${clone_iops[i]}" -v b="${qemu_iops[i]}" 'BEGIN {printf "%.2f", a/b}')")
done
echo "per-round ratios clone/qemu: ${ratios[*]} (median $(median "${ratios[@]}"))"
echo "failed attempts (retried): clone ${failures[clone]:-0} qemu ${failures[qemu]:-0}"
echo "RESULT randread_4k_iops threads $THREADS vcpus $VCPUS clone $c qemu $q ratio_clone_over_qemu $(awk -v a="$c" -v b="$q" 'BEGIN {printf "%.2f", a/b}') median_round_ratio $(median "${ratios[@]}")"
