#!/bin/bash
# Boots a guest with the in-process virtio-rng (clone-virtio-rng-boot) under real KVM and
# checks from inside it that Linux's virtio_pci driver works over our transport: MSI-X
# interrupts through irqfds, doorbells through ioeventfds, entropy through the ring.
#
#   vmm-core/virtio/test_devices/rng_boot_check.sh BUILD_DIR
#
# Needs /dev/kvm: run it inside the lab, e.g.
#   tests/lab/run -- vmm-core/virtio/test_devices/rng_boot_check.sh build-virtio
# BUILD_DIR must hold bin/clone-virtio-rng-boot; the guest kernel and a base initramfs
# come from build/guest (make guest); the initramfs with the check is built beside them
# in BUILD_DIR/rng-guest (before entering the lab, since the lab's / is read-only).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
build=$(cd "${1:?usage: rng_boot_check.sh BUILD_DIR}" && pwd)
tool=$build/bin/clone-virtio-rng-boot
guest=$build/rng-guest
[ -x "$tool" ] || { echo "rng-boot: no $tool (build target clone-virtio-rng-boot)" >&2; exit 2; }

if [ ! -e /dev/kvm ]; then
  echo "rng-boot: no /dev/kvm here; building the guest, then running in the lab" >&2
  CLONE_GUEST_OVERLAY="$here/rng_boot_overlay" "$repo/guest/build.sh" "$guest" >&2
  exec "$repo/tests/lab/run" -- "$0" "$build"
fi
[ -r "$guest/initrd.img" ] || { echo "rng-boot: no $guest/initrd.img; run this outside the lab first" >&2; exit 2; }

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
timeout 300 "$tool" "$guest/vmlinuz" "$guest/initrd.img" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
grep -q '^RNG-CHECK-OK' <(tr -d '\r' <"$log") || { echo "rng-boot: FAILED (vmm exit $status)"; exit 1; }
grep -q 'CLONE-AUTORUN-EXIT 0' <(tr -d '\r' <"$log") || { echo "rng-boot: FAILED: autorun status"; exit 1; }
[ "$status" = 0 ] || { echo "rng-boot: FAILED: vmm exit $status"; exit 1; }
echo "rng-boot: PASSED"
