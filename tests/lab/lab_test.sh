#!/bin/bash
# Self-check of the lab (tests/lab/run). Four boots: one long one that checks what a
# VMM test needs inside L1 (devices, kvm_amd with nesting, mounts, the environment, a
# VFIO-bindable NVMe behind the vIOMMU), one for exit-code and output passthrough, one
# for the timeout, one whose kernel panics; plus a QEMU start failure, which needs no boot.
# Prints one line per check and "N passed, N failed"; exits non-zero on any failure.
set -euo pipefail

LAB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$LAB_DIR/../.." && pwd)
RUN="$LAB_DIR/run"

# Seconds since $1 (an $EPOCHREALTIME), as "12.3"; bash arithmetic, no bc needed.
since() {
  local us=$(( ${EPOCHREALTIME//[.,]/} - ${1//[.,]/} ))
  printf '%d.%d' $((us / 1000000)) $((us % 1000000 / 100000))
}

passed=0
failed=0
ok() { echo "lab_test: ok   - $*"; passed=$((passed + 1)); }
bad() { echo "lab_test: FAIL - $*"; failed=$((failed + 1)); }
check() { # description command...
  local what=$1
  shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}

# Under build/, not /tmp: L1 has its own tmpfs on /tmp, but sees the repo read-write.
mkdir -p "$REPO/build"
work=$(mktemp -d "$REPO/build/lab-test.XXXXXX")
marker="$work/written-by-l1"
trap 'rm -rf "$work"' EXIT
export TMPDIR="$work"

"$LAB_DIR/prepare" || { echo "lab_test: FAIL - tests/lab/prepare"; echo "0 passed, 1 failed"; exit 1; }

# --- Boot 1: the environment inside L1. The guest script prints "ok"/"FAIL" lines that
# we count here, so one boot covers many checks.
truncate -s 64M "$work/nvme.img"
cat >"$work/inside.sh" <<'EOF'
#!/bin/bash
# Runs inside L1. Each check prints "ok - ..." or "FAIL - ...".
# Builtins where possible: each exec of a host binary costs ~0.1 s in L1.
t() { local what=$1; shift; if "$@" >/dev/null 2>&1; then echo "ok - $what"; else echo "FAIL - $what"; fi; }
first_line() { local l=""; read -r l <"$1" || true; echo "$l"; }
fstype() { # mount point -> filesystem type, from /proc/self/mounts
  local dev mnt type rest
  while read -r dev mnt type rest; do [ "$mnt" = "$1" ] && found=$type; done </proc/self/mounts
  echo "${found:-none}"; found=""
}
for dev in /dev/kvm /dev/vhost-vsock /dev/vhost-net /dev/net/tun /dev/vfio/vfio; do
  t "$dev is a character device" test -c "$dev"
done
ls -l /dev/kvm /dev/vhost-vsock /dev/vhost-net /dev/net/tun /dev/vfio/vfio
t "kvm_amd is loaded" test -d /sys/module/kvm_amd
nested=$(first_line /sys/module/kvm_amd/parameters/nested)
npt=$(first_line /sys/module/kvm_amd/parameters/npt)
t "kvm_amd has nested support (nested=$nested)" test "$nested" = 1 -o "$nested" = Y
t "kvm_amd uses nested paging (npt=$npt)" test "$npt" = 1 -o "$npt" = Y
flags=$(while read -r k v; do [ "$k" = flags ] && { echo "$v"; break; }; done </proc/cpuinfo)
t "CPU has svm" test "${flags/ svm /}" != "$flags"
for m in vhost_net vhost_vsock tun vfio_pci vfio_iommu_type1 fuse overlay loop bridge veth nvme; do
  t "module $m is loaded" test -d "/sys/module/$m"
done
holder=$(first_line /run/clone-lab/key-holder)
t "the KVM key holder runs (pid $holder, docs/LAB.md)" test -d "/proc/${holder:-none}"
t "modprobe loads a module on demand (dummy)" modprobe dummy
for m in /sys/fs/cgroup:cgroup2 /tmp:tmpfs /var/tmp:tmpfs /run:tmpfs /dev:devtmpfs /dev/pts:devpts \
  /dev/shm:tmpfs /proc:proc /sys:sysfs /:overlay; do
  t "${m%%:*} is ${m#*:}" test "$(fstype "${m%%:*}")" = "${m#*:}"
done
t "lo is up" test "$(( $(first_line /sys/class/net/lo/flags) & 1 ))" = 1
t "runs in the caller's directory ($LAB_TEST_CWD)" test "$PWD" = "$LAB_TEST_CWD"
t "CLONE_ variables pass through" test "${CLONE_LAB_TEST_TOKEN:-}" = passed-through
t "GTEST_ variables pass through" test "${GTEST_COLOR:-}" = no
t "other variables do not" test -z "${LAB_TEST_PRIVATE:-}"
t "HOME is /root" test "$HOME" = /root
t "CLONE_LAB=1 is set" test "${CLONE_LAB:-}" = 1
t "the repo is writable (writes reach the host)" eval 'echo from-l1 >"$LAB_TEST_MARKER"'
t "the root overlay is writable (writes stay in L1)" touch "/etc/lab-test-$LAB_TEST_PID"
t "this host's binaries run (cmake)" cmake --version

# The NVMe from --nvme: its own IOMMU group, and it binds to vfio-pci.
bdf=""
for d in /sys/bus/pci/devices/*; do
  [ "$(first_line "$d/class")" = 0x010802 ] && bdf=${d##*/}
done
t "an NVMe controller is on the PCI bus" test -n "$bdf"
if [ -n "$bdf" ]; then
  group=$(readlink "/sys/bus/pci/devices/$bdf/iommu_group")
  group=${group##*/}
  members=("/sys/kernel/iommu_groups/$group/devices"/*)
  echo "NVMe $bdf is in IOMMU group $group: ${members[*]##*/}"
  t "the NVMe is alone in its IOMMU group" test "${members[*]##*/}" = "$bdf"
  if [ -e "/sys/bus/pci/devices/$bdf/driver" ]; then
    echo "$bdf" >"/sys/bus/pci/devices/$bdf/driver/unbind"
  fi
  echo vfio-pci >"/sys/bus/pci/devices/$bdf/driver_override"
  echo "$bdf" >/sys/bus/pci/drivers/vfio-pci/bind || true
  driver=$(readlink "/sys/bus/pci/devices/$bdf/driver")
  t "the NVMe is bound to vfio-pci" test "${driver##*/}" = vfio-pci
  t "/dev/vfio/$group exists" test -c "/dev/vfio/$group"
fi
EOF
chmod +x "$work/inside.sh"

# Boots 1 and 2 normally take ~10 s. Their L1 has been seen to stall at boot (CI-18: still
# booting after 30 min, the 50-min default limit not reached), or to panic, as in the e2e
# runs (docs/LAB.md). So they get 5 minutes, and a boot that ends as a lab failure (124:
# timed out, 125: L1 died) runs once more in a new L1, and says so.
run_boot() { # NAME: runs the function NAME, sets rc; once more in a new L1 if the lab failed
  local name=$1
  rc=0
  "$name" || rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 125 ]; then
    echo "lab_test: $name: the lab failed (exit $rc); once more in a new L1 (docs/LAB.md):"
    tail -5 "$work/$name.err" | sed 's/^/lab_test:   first try | /'
    rc=0
    "$name" || rc=$?
  fi
}

boot1() {
  (cd "$REPO/tests" &&
    CLONE_LAB_TEST_TOKEN=passed-through GTEST_COLOR=no LAB_TEST_PRIVATE=leaked \
    "$RUN" --timeout 300 --nvme "$work/nvme.img" -- env LAB_TEST_CWD="$REPO/tests" \
      LAB_TEST_MARKER="$marker" LAB_TEST_PID=$$ bash "$work/inside.sh") \
    >"$work/boot1.out" 2>"$work/boot1.err"
}

echo "lab_test: boot 1: environment inside L1 (with --nvme)"
start=$EPOCHREALTIME
run_boot boot1
echo "lab_test: boot 1 took $(since "$start") s"
grep -vE '^(ok|FAIL) - ' "$work/boot1.out" | sed 's/^/lab_test:   | /' || true
check "boot 1 exits 0 (got $rc)" test "$rc" = 0
check "boot 1 wrote nothing to stderr" test ! -s "$work/boot1.err"
[ -s "$work/boot1.err" ] && sed 's/^/lab_test:   stderr | /' "$work/boot1.err"
while IFS= read -r line; do
  case "$line" in
    "ok - "*) ok "L1: ${line#ok - }" ;;
    "FAIL - "*) bad "L1: ${line#FAIL - }" ;;
  esac
done <"$work/boot1.out"
check "at least 30 checks ran in L1" test "$(grep -cE '^(ok|FAIL) - ' "$work/boot1.out")" -ge 30
check "the host sees the file L1 wrote in the repo" grep -qsx from-l1 "$marker"
check "L1's write to /etc did not reach the host" test ! -e "/etc/lab-test-$$"

# --- Boot 2: exit code and output passthrough; nothing but CMD's output on stdout.
echo "lab_test: boot 2: exit code 7 and output"
start=$EPOCHREALTIME
boot2() {
  "$RUN" --timeout 300 -- sh -c 'echo to-stdout; echo to-stderr >&2; exit 7' \
    >"$work/boot2.out" 2>"$work/boot2.err"
}
run_boot boot2
echo "lab_test: boot 2 took $(since "$start") s"
check "sh -c 'exit 7' exits 7 (got $rc)" test "$rc" = 7
check "stdout is exactly CMD's stdout+stderr" test "$(cat "$work/boot2.out")" = $'to-stdout\nto-stderr'
check "nothing else on stderr" test ! -s "$work/boot2.err"

# --- Boot 3: the timeout.
echo "lab_test: boot 3: --timeout 3 -- sleep 1000"
start=$EPOCHREALTIME
rc=0
"$RUN" --timeout 3 -- sleep 1000 >"$work/boot3.out" 2>"$work/boot3.err" || rc=$?
elapsed=$(since "$start")
echo "lab_test: boot 3 took $elapsed s"
check "a timeout exits 124 (got $rc)" test "$rc" = 124
check "a timeout says so" grep -qx 'lab: timed out after 3 s running: sleep 1000' "$work/boot3.err"
check "a timeout comes soon after its limit ($elapsed s)" test "${elapsed%.*}" -lt 15

# --- Boot 4: L1 dies before CMD runs (no init: the kernel panics); never exit 0.
echo "lab_test: boot 4: L1 kernel panics before CMD runs"
start=$EPOCHREALTIME
rc=0
CLONE_LAB_APPEND=rdinit=/nonexistent "$RUN" -- true >"$work/boot4.out" 2>"$work/boot4.err" || rc=$?
echo "lab_test: boot 4 took $(since "$start") s"
check "a dead L1 gives exit 125 (got $rc)" test "$rc" = 125
check "a dead L1 is reported, with its console" \
  grep -q "^lab: error: L1 stopped without reporting CMD's exit status" "$work/boot4.err"
check "the report shows the panic" grep -q 'Kernel panic' "$work/boot4.err"

# --- No boot: QEMU refuses to start; the lab must fail loudly, never exit 0.
rc=0
"$RUN" --cpus 100000 -- true >"$work/qemu.out" 2>"$work/qemu.err" || rc=$?
check "QEMU failing to start gives a non-zero exit (got $rc)" test "$rc" != 0 -a "$rc" != 124
check "QEMU failing to start is reported" grep -q '^lab: error:' "$work/qemu.err"

# Our runs keep their run dirs (and so QEMU's FIFO paths) under $work.
check "no QEMU of ours is left running" test -z "$(pgrep -f -- "$work/" || true)"

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
