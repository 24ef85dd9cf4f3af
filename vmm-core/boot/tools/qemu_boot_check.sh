#!/bin/bash
# Boots a real Linux kernel through Clone's boot path under QEMU TCG, no /dev/kvm needed:
# our ACPI tables, e820, zero page, command line, initrd placement, GDT, page tables and the
# register values from cpu_setup (loaded by a tiny entry stub). The guest's /init reports what
# it saw and powers off through our \_S5. Checks the serial log.
#
#   qemu_boot_check.sh BOOT_CHECK_IMAGE [KERNEL]
# KERNEL falls back to $CLONE_BOOT_CHECK_KERNEL when missing. Exits 77 (skipped) when the kernel or a host
# tool (qemu-system-x86_64, as, ld, cc with static libc, cpio) is missing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
image_tool="${1:?usage: qemu_boot_check.sh BOOT_CHECK_IMAGE [KERNEL]}"
kernel="${2:-}"
if [ ! -f "$kernel" ] && [ -n "${CLONE_BOOT_CHECK_KERNEL:-}" ]; then
  kernel="$CLONE_BOOT_CHECK_KERNEL"
fi
vcpus=2
memory_mib=512
cmdline="console=ttyS0 panic=-1 clone.check=1"

skip() { echo "SKIPPED: $*"; exit 77; }
fail() { echo "FAILED: $*" >&2; exit 1; }

[ -n "$kernel" ] && [ -f "$kernel" ] ||
  skip "no kernel (pass one or set CLONE_BOOT_CHECK_KERNEL; make guest builds build/guest/vmlinuz)"
for tool in qemu-system-x86_64 as ld cc cpio; do
  command -v "$tool" >/dev/null || skip "$tool not installed"
done

work="$(mktemp -d "${TMPDIR:-/tmp}/clone-boot-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT

as --64 "$here/boot_check_stub.S" -o "$work/stub.o"
ld -e _start -Ttext=0xFFFF0000 --oformat=binary -o "$work/stub.bin" "$work/stub.o"
cc -static -O2 -o "$work/init" "$here/boot_check_init.c" 2>"$work/cc.log" ||
  skip "cannot link a static /init: $(tail -n 2 "$work/cc.log")"
mkdir -p "$work/rootfs/proc" "$work/rootfs/sys" "$work/rootfs/dev"
cp "$work/init" "$work/rootfs/init"
(cd "$work/rootfs" && find . | cpio --quiet -o -H newc) > "$work/initrd.cpio"

"$image_tool" "$work" "$work/stub.bin" "$kernel" "$work/initrd.cpio" "$memory_mib" "$vcpus" \
  "$cmdline"

# s4_val=5: make QEMU's PIIX4 treat our SLP_TYP (layout::kS5SleepType) as power-off.
# shellcheck disable=SC2046
timeout 240 qemu-system-x86_64 -M pc -m "$memory_mib" -smp "$vcpus" -nodefaults -display none \
  -no-reboot -global PIIX4_PM.s4_val=5 -serial "file:$work/serial.log" \
  $(cat "$work/loader-args") || fail "qemu exited with $?"
log="$work/serial.log"

expect() { grep -qF -- "$1" "$log" || { tail -n 40 "$log" >&2; fail "serial log lacks: $1"; }; }
refuse() { ! grep -F -- "$1" "$log" >&2 || fail "serial log has: $1"; }

expect "Command line: $cmdline"
expect "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"
expect "BIOS-e820: [mem 0x00000000e0000000-0x00000000efffffff] reserved"
expect "ACPI: RSDP 0x00000000000E0000 000024 (v02 CLONE )"
expect "ACPI: FACP 0x"
expect "ACPI: PM-Timer IO Port: 0x608"
expect "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)"
expect "ACPI: INT_SRC_OVR (bus 0 bus_irq 9 global_irq 9 high level)"
expect "ACPI: LAPIC_NMI (acpi_id[0xff] dfl dfl lint[0x1])"
expect "smpboot: Allowing $vcpus CPUs"
expect "PCI: MMCONFIG at [mem 0xe0000000-0xefffffff] reserved"
expect "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00-ff])"
expect "root bus resource [io  0x0000-0x0cf7 window]"
expect "root bus resource [mem 0xc0000000-0xdfffffff window]"
expect "root bus resource [mem 0x1000000000-0x1fffffffff window]"
expect "[mem 0xe0000000-0xefffffff] has been reserved"
expect "ttyS0 at I/O 0x3f8 (irq = 4"
expect "INIT cmdline: $cmdline"
expect "INIT acpi tables: "
expect "INIT cpus: $vcpus"
expect "CLONE-BOOT-OK"
expect "reboot: Power down"
for bad in "ACPI Error" "ACPI BIOS Error" "ACPI Warning" "Firmware Bug" "FW BUG" \
           "Kernel panic"; do
  refuse "$bad"
done
echo "PASSED: $(grep -F "Linux version" "$log" | sed 's/^\[[^]]*\] //' | cut -c1-60)... booted"
