#!/bin/bash
# `make demo`: boots Debian's cloud kernel with Clone's test initramfs, asks the guest for its
# kernel version and CPU count over the serial console, and powers it off.
# Without /dev/kvm it runs itself inside the lab (nested KVM under QEMU TCG, docs/LAB.md).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${CLONE_BUILD_DIR:-build}

if [ ! -e /dev/kvm ]; then
  echo "demo: this host has no /dev/kvm; running the demo inside the lab (nested KVM under TCG)"
  exec tests/lab/run -- "$PWD/scripts/demo.sh"
fi

echo "demo: clone run --kernel $BUILD/guest/vmlinuz --initrd $BUILD/guest/initrd.img --vcpus 2 --mem-mb 1024"
start=$(date +%s%N)
coproc VM { exec "$BUILD/bin/clone" run --kernel "$BUILD/guest/vmlinuz" \
  --initrd "$BUILD/guest/initrd.img" --cmdline "console=ttyS0 panic=-1 quiet" \
  --vcpus 2 --mem-mb 1024 --verbose 2>&1; }
vm_pid=$VM_PID
exec {vm_out}<&"${VM[0]}" {vm_in}>&"${VM[1]}"

# Reads the VM's output until a line contains $1 (gives up after $2 seconds).
wait_for() {
  local line
  while IFS= read -r -t "$2" -u "$vm_out" line; do
    line=${line%$'\r'}
    [[ $line == *"$1"* ]] && { printf '%s\n' "$line"; return 0; }
  done
  echo "demo: timed out waiting for '$1'" >&2
  return 1
}

wait_for CLONE-GUEST-READY 300 >/dev/null
ready=$(date +%s%N)
echo "demo: guest reached userspace in $(( (ready - start) / 1000000 )) ms"
echo 'echo "DEMO kernel=$(uname -r) cpus=$(nproc) mem=$(awk "/MemTotal/ {print \$2}" /proc/meminfo)kB"' >&"$vm_in"
wait_for "DEMO kernel=" 60 | sed 's/^/guest: /'
echo 'poweroff -f' >&"$vm_in"
wait_for "boot timing" 60 | sed 's/^/vmm:   /' || true
wait "$vm_pid" && code=0 || code=$?
echo "demo: clone run exited with $code after the guest powered off"
exit "$code"
