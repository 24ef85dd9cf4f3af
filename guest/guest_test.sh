#!/bin/bash
# Boots the guest images under QEMU TCG (no KVM needed) and checks, by driving
# the serial console, that they do what docs/GUEST.md promises.
#   guest/guest_test.sh [OUTDIR]     (default build/guest; built if missing)
# Prints one line per check and exits non-zero on the first failure. Every
# wait has a timeout, and the QEMU processes it starts are always killed.
set -euo pipefail
export LC_ALL=C

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
out="${1:-$repo/build/guest}"
boot_timeout="${GUEST_TEST_BOOT_TIMEOUT:-180}"   # TCG on a loaded 2-core host
cmd_timeout="${GUEST_TEST_CMD_TIMEOUT:-60}"

if [ ! -f "$out/vmlinuz" ] || [ ! -f "$out/initrd.img" ]; then
  "$here/build.sh" "$out"
fi
command -v qemu-system-x86_64 >/dev/null || { echo "FAIL: qemu-system-x86_64 missing (scripts/install-deps.sh lab)"; exit 1; }

work="$(mktemp -d /tmp/clone-guest-test.XXXXXX)"
qemu_pid=""
cleanup() {
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
    kill "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
  fi
  exec 3>&- 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

checks=0
pass() { checks=$((checks + 1)); echo "ok   $*"; }
fail() {
  echo "FAIL $*"
  if [ -f "$work/console.log" ]; then
    echo "---- last console lines ($work/console.log) ----"
    tail -n 40 "$work/console.log" | tr -d '\r'
  fi
  exit 1
}
now() { date +%s.%N; }

# boot NAME APPEND [extra qemu args...]: starts QEMU with the serial console
# on a fifo (our fd 3) and a log file; returns once it is running.
boot() {
  local name="$1" append="$2"; shift 2
  rm -f "$work/in" "$work/console.log"
  mkfifo "$work/in"
  exec 3<>"$work/in"   # read-write: opening never blocks, QEMU never sees EOF
  qemu-system-x86_64 -M q35 -cpu max -m 512 -smp 2 \
    -display none -monitor none -serial stdio -no-reboot \
    -kernel "$out/vmlinuz" -initrd "$out/initrd.img" \
    -append "console=ttyS0 panic=-1 $append" "$@" \
    <"$work/in" >"$work/console.log" 2>"$work/qemu.err" &
  qemu_pid=$!
  boot_start="$(now)"
  echo "--   boot $name: qemu pid $qemu_pid"
}

# wait_for REGEX TIMEOUT: polls the console log; fails if QEMU dies first.
wait_for() {
  local re="$1" timeout="$2" deadline
  deadline=$(( $(date +%s) + timeout ))
  while ! tr -d '\r' <"$work/console.log" | grep -Eq -- "$re"; do
    kill -0 "$qemu_pid" 2>/dev/null ||
      fail "QEMU exited before '$re' appeared ($(cat "$work/qemu.err"))"
    [ "$(date +%s)" -lt "$deadline" ] || fail "timeout (${timeout}s) waiting for '$re'"
    sleep 0.1
  done
}

# run DESC CMD: runs CMD in the guest shell; sets $output (CMD's console
# output) and $rc. Markers are expanded by the guest shell, so an echoed
# command line can never be mistaken for its result.
seq_no=0
run() {
  local desc="$1" cmd="$2"
  seq_no=$((seq_no + 1))
  printf '%s\n' "echo @@$seq_no-begin@@; $cmd; echo \"@@$seq_no-rc=\$?@@\"" >&3
  wait_for "@@$seq_no-rc=[0-9]+@@" "$cmd_timeout"
  output="$(tr -d '\r' <"$work/console.log" |
            sed -n "/^.*@@$seq_no-begin@@\$/,/@@$seq_no-rc=/p" | sed '1d;$d')"
  rc="$(tr -d '\r' <"$work/console.log" | sed -n "s/.*@@$seq_no-rc=\([0-9]*\)@@.*/\1/p" | tail -n1)"
  [ "$rc" = 0 ] || fail "$desc: '$cmd' exited $rc; output: $output"
}
# expect DESC CMD REGEX: run, then the output must match REGEX (grep -E).
expect() {
  run "$1" "$2"
  grep -Eq -- "$3" <<<"$output" || fail "$1: '$2' output does not match /$3/: $output"
  pass "$1"
}

# wait_exit DESC TIMEOUT: QEMU must exit 0 within TIMEOUT seconds.
wait_exit() {
  local desc="$1" timeout="$2" deadline qrc
  deadline=$(( $(date +%s) + timeout ))
  while kill -0 "$qemu_pid" 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "$desc: QEMU still running after ${timeout}s"
    sleep 0.1
  done
  qrc=0; wait "$qemu_pid" || qrc=$?
  qemu_pid=""
  exec 3>&-
  [ "$qrc" = 0 ] || fail "$desc: QEMU exited $qrc ($(cat "$work/qemu.err"))"
  pass "$desc"
}

echo "guest_test: $out ($(cat "$out/kernel-version"), initrd $(stat -c %s "$out/initrd.img") bytes)"

# ---- boot 1: devices, tools, poweroff -f ----------------------------------
truncate -s 64M "$work/disk.raw"
boot main "clone.hostname=clone-test clone.net=dhcp" \
  -drive "file=$work/disk.raw,if=none,id=d0,format=raw" -device virtio-blk-pci,drive=d0 \
  -netdev user,id=n0,restrict=on -device virtio-net-pci,netdev=n0
wait_for '^CLONE-GUEST-READY$' "$boot_timeout"
marker_wall="$(awk -v a="$(now)" -v b="$boot_start" 'BEGIN { printf "%.2f", a - b }')"
guest_up="$(tr -d '\r' <"$work/console.log" | sed -n 's/^clone-init: up \([0-9.]*\)s.*/\1/p')"
pass "marker CLONE-GUEST-READY after ${marker_wall}s wall, ${guest_up}s guest uptime"

expect "nproc is 2" 'nproc' '^2$'
expect "meminfo: ~512 MiB" 'grep MemTotal /proc/meminfo' '^MemTotal: +(4[0-9]{5}|5[01][0-9]{4}) kB$'
expect "hostname from clone.hostname" 'hostname' '^clone-test$'
expect "mounts: proc sysfs devtmpfs devpts tmpfs(/tmp,/run)" \
  'n=0; for m in /proc /sys /dev /dev/pts /tmp /run; do grep -q " $m " /proc/mounts || { echo "missing $m"; n=1; }; done; [ $n = 0 ] && echo mounts-ok' \
  '^mounts-ok$'
expect "virtio drivers registered" 'ls /sys/bus/virtio/drivers' 'virtio_blk'
expect "virtio_blk bound to the disk" 'ls /sys/bus/virtio/drivers/virtio_blk; readlink /sys/block/vda/device/driver' 'virtio_blk$'
expect "virtio_net bound to eth0" 'ls /sys/bus/virtio/drivers/virtio_net; readlink /sys/class/net/eth0/device/driver' 'virtio_net$'
expect "modules loaded (vsock, virtiofs, console, balloon, rng)" \
  'for m in virtio_pci virtio_blk virtio_net virtio_console vsock vmw_vsock_virtio_transport virtiofs fuse virtio_balloon virtio_rng; do grep -q "^$m " /proc/modules && echo "have $m"; done | wc -l' \
  '^10$'
expect "every module of clone-load.list (with dependencies) is loaded" \
  'n=0; while read -r m; do b=${m##*/}; b=${b%.ko}; b=$(echo "$b" | tr - _); grep -q "^$b " /proc/modules || { echo "missing $b"; n=1; }; done < /lib/modules/$(uname -r)/clone-load.list; [ $n = 0 ] && echo all-loaded' \
  '^all-loaded$'
expect "virtiofs and fuse filesystems registered" 'grep -cE "[[:space:]](virtiofs|fuse)$" /proc/filesystems' '^2$'
expect "modprobe knows the modules.dep" 'modprobe -D virtiofs' 'fuse'
expect "DHCP (clone.net=dhcp) configured eth0" 'ip -4 addr show eth0' 'inet 10\.0\.2\.15/24'
expect "mkfs.ext4 on /dev/vda" 'mkfs.ext4 -q -F /dev/vda && echo mkfs-ok' '^mkfs-ok$'
expect "mount, write, umount" 'mount -t ext4 /dev/vda /mnt && echo hi > /mnt/f && cat /mnt/f && umount /mnt' '^hi$'
expect "fsck.ext4 -fn is clean" 'fsck.ext4 -fn /dev/vda' 'clean|[0-9]+/[0-9]+ files'
expect "poweroff/reboot are available" 'which poweroff reboot halt | wc -l' '^3$'
printf 'poweroff -f\n' >&3
wait_exit "poweroff -f ends QEMU with exit 0" 60
# The write reached the virtio-blk disk: check it from the host.
if command -v debugfs >/dev/null; then
  [ "$(debugfs -R 'cat /f' "$work/disk.raw" 2>/dev/null)" = hi ] ||
    fail "host: /f on the disk image does not read 'hi'"
  e2fsck -fn "$work/disk.raw" >/dev/null 2>&1 || fail "host: e2fsck of the disk image failed"
  pass "host sees /f = hi on a clean ext4 image"
fi

# ---- boot 2: plain `reboot` (signals /init) and echo-free prompt ----------
boot signals ""
wait_for '^CLONE-GUEST-READY$' "$boot_timeout"
pass "second boot reached the marker"
printf 'echo "prompt-check"\n' >&3
wait_for '^# prompt-check$' "$cmd_timeout"
grep -q 'echo "prompt-check"' <(tr -d '\r' <"$work/console.log") &&
  fail "the console echoed the command line (expected stty -echo)"
pass "prompt is '# ' and input is not echoed"
expect "default hostname" 'hostname' '^clone-guest$'
expect "the shell's controlling tty is the serial port" 'ls -l /proc/$$/fd/0; awk "{print \$7}" /proc/$$/stat' '^[1-9][0-9]*$'
printf 'sleep 100\n' >&3
sleep 1
printf '\003' >&3
expect "^C interrupts the foreground job (job control works)" 'echo after-interrupt' '^after-interrupt$'
printf 'reboot\n' >&3
wait_exit "plain reboot (busybox init shutdown) ends QEMU (-no-reboot) with exit 0" 60

# ---- boot 3: CLONE_GUEST_EXTRA / CLONE_GUEST_OVERLAY and autorun ---------
# A variant image (uncompressed, so it builds fast) carrying a dynamic host
# binary with its libraries, and an autorun job that ends the VM.
mkdir -p "$work/overlay/etc"
cat >"$work/overlay/etc/clone-autorun" <<'JOB'
echo "autorun: $(zstd --version)"
exit 3
JOB
CLONE_CACHE="${CLONE_CACHE:-$repo/build/cache}" CLONE_GUEST_COMPRESS=none \
  CLONE_GUEST_EXTRA="$(command -v zstd)" CLONE_GUEST_OVERLAY="$work/overlay" \
  "$here/build.sh" "$work/variant" >"$work/variant.log" 2>&1 ||
  fail "build.sh with CLONE_GUEST_EXTRA/OVERLAY: $(tail -n 5 "$work/variant.log")"
grep -q ' usr/bin/zstd$' "$work/variant/initrd.files" &&
  grep -q 'liblzma.so' "$work/variant/initrd.files" ||
  fail "variant image lacks /usr/bin/zstd or its liblzma"
pass "CLONE_GUEST_EXTRA copies a dynamic binary and its libraries"
out_main="$out"; out="$work/variant"
boot autorun ""
out="$out_main"
wait_for '^CLONE-AUTORUN-EXIT [0-9]+$' "$boot_timeout"
tr -d '\r' <"$work/console.log" | grep -Eq '^autorun: \*\*\* Zstandard CLI' ||
  fail "autorun: zstd did not run in the guest"
tr -d '\r' <"$work/console.log" | grep -q '^CLONE-AUTORUN-EXIT 3$' || fail "autorun: exit status not reported as 3"
pass "/etc/clone-autorun runs after the marker and its status is reported"
wait_exit "autorun mode powers off when the job ends" 60

echo "guest_test: all $checks checks passed (boot-to-marker ${marker_wall}s wall under TCG)"
