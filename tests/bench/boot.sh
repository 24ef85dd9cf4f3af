#!/bin/bash
# Issue 3 benchmark: Clone vs QEMU (KVM, -kernel) with the same kernel, initrd and cmdline,
# side by side in one run. Needs /dev/kvm: run it through the lab on hosts without KVM:
#   tests/lab/run -- tests/bench/boot.sh [RUNS]
# Prints per-run numbers and RESULT lines with medians and the ratios.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${CLONE_BUILD_DIR:-build}
RUNS=${1:-5}
KERNEL=$BUILD/guest/vmlinuz
INITRD=$BUILD/guest/initrd.img
CMDLINE="console=ttyS0 panic=-1 quiet"
MEM=512
[ -e /dev/kvm ] || { echo "boot.sh: no /dev/kvm (run it through tests/lab/run)" >&2; exit 2; }

clone_cmd=("$PWD/$BUILD/bin/clone-vmm" --kernel "$KERNEL" --initrd "$INITRD" --cmdline "$CMDLINE"
  --mem-mb $MEM --vcpus 1)
qemu_cmd=(/usr/bin/qemu-system-x86_64 -accel kvm -M q35 -cpu host -m $MEM -smp 1 -nodefaults
  -nographic -no-reboot -serial stdio -kernel "$KERNEL" -initrd "$INITRD" -append "$CMDLINE")

# Setup time: from execve to the first KVM_RUN, read from strace timestamps (only execve and
# ioctl are traced, with seccomp-bpf, so other syscalls run at full speed for both).
first_entry_ms() {
  local log
  log=$(mktemp)
  strace -f -ttt --seccomp-bpf -e trace=execve,ioctl -o "$log" "$@" </dev/null >/dev/null 2>&1 &
  local pid=$! waited=0
  # Only the timestamps matter: stop the VM once it has entered the guest.
  until grep -q KVM_RUN "$log" 2>/dev/null || [ $waited -ge 300 ]; do
    sleep 0.1; waited=$((waited + 1))
  done
  kill -9 $pid 2>/dev/null; pkill -9 -P $pid 2>/dev/null; wait $pid 2>/dev/null || true
  awk '/execve\(/ && !s {s=$2} /KVM_RUN/ && !r {r=$2} END {if (s && r) printf "%.2f\n", (r-s)*1000; else print "nan"}' "$log"
  rm -f "$log"
}

declare -a clone_setup qemu_setup
for ((i = 0; i < RUNS; i++)); do
  clone_setup+=("$(first_entry_ms "${clone_cmd[@]}")")
  qemu_setup+=("$(first_entry_ms "${qemu_cmd[@]}")")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
cs=$(median "${clone_setup[@]}")
qs=$(median "${qemu_setup[@]}")
echo "clone setup runs (ms): ${clone_setup[*]}"
echo "qemu setup runs (ms): ${qemu_setup[*]}"
echo "RESULT setup_to_first_kvm_run_ms clone $cs qemu $qs ratio_qemu_over_clone $(awk -v a="$qs" -v b="$cs" 'BEGIN {printf "%.1f", a/b}')"

bench=$BUILD/bench/clone-boot-bench
out=$(mktemp)
"$bench" --runs "$RUNS" --label clone -- "${clone_cmd[@]}" >"$out"
"$bench" --runs "$RUNS" --label qemu -- "${qemu_cmd[@]}" >>"$out"
cat "$out"
clone_boot=$(awk '/^RESULT clone/ {print $5}' "$out")
qemu_boot=$(awk '/^RESULT qemu/ {print $5}' "$out")
rm -f "$out"
echo "RESULT boot_to_userspace_ms clone $clone_boot qemu $qemu_boot ratio_qemu_over_clone $(awk -v a="$qemu_boot" -v b="$clone_boot" 'BEGIN {printf "%.2f", a/b}')"
