#!/bin/bash
# Runs every suite and ends with one line: "N passed, N failed".
#   1. unit and integration tests (ctest, labels unit/integration) on this host;
#   2. e2e tests (ctest label e2e) on /dev/kvm: directly when this host has it, else in the lab,
#      all in one lab boot;
#   3. script suites (lab self-test, guest image test), each counted as one test.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${1:-build}"
REPO="$(pwd)"
passed=0
failed=0
failures=()

# Adds a ctest run's counts from its log ("NN% tests passed, F tests failed out of T").
count_ctest() {
  local name="$1" log="$2" rc="$3"
  local line total bad
  line=$(grep -E "tests passed, [0-9]+ tests? failed out of [0-9]+" "$log" | tail -1)
  if [ -z "$line" ]; then
    echo "run-all: $name: no ctest summary (exit $rc); counting as one failure" >&2
    failed=$((failed + 1)); failures+=("$name")
    return
  fi
  total=$(sed -E 's/.*out of ([0-9]+).*/\1/' <<<"$line")
  bad=$(sed -E 's/.*, ([0-9]+) tests? failed.*/\1/' <<<"$line")
  passed=$((passed + total - bad))
  failed=$((failed + bad))
  [ "$bad" -ne 0 ] && failures+=("$name: $bad ctest failures")
  if [ "$rc" -ne 0 ] && [ "$bad" -eq 0 ]; then
    failed=$((failed + 1)); failures+=("$name: ctest exited $rc")
  fi
}

run_script_suite() {
  local name="$1"; shift
  echo "=== $name: $*"
  if "$@"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1)); failures+=("$name")
  fi
}

logdir="$BUILD_DIR/test-logs"
mkdir -p "$logdir"

echo "=== unit and integration tests (host)"
ctest --test-dir "$BUILD_DIR" -LE e2e --output-on-failure -j "$(nproc)" 2>&1 | tee "$logdir/host.log"
count_ctest host "$logdir/host.log" "${PIPESTATUS[0]}"

echo "=== e2e tests (real KVM)"
if [ -e /dev/kvm ]; then
  ctest --test-dir "$BUILD_DIR" -L e2e --output-on-failure 2>&1 | tee "$logdir/e2e.log"
  rc=${PIPESTATUS[0]}
else
  echo "no /dev/kvm on this host: running the e2e suite inside the lab (nested KVM under TCG)"
  tests/lab/run -- ctest --test-dir "$REPO/$BUILD_DIR" -L e2e --timeout 900 --output-on-failure 2>&1 | tee "$logdir/e2e.log"
  rc=${PIPESTATUS[0]}
  # 125: the lab itself failed, not a test. Its L1 kernel (nested SVM under TCG) has been seen to
  # overflow a kernel stack in a vCPU thread's page fault and panic minutes later (docs/LAB.md).
  # Such a run says nothing about Clone, so the suite runs once more, and says so.
  if [ "$rc" -eq 125 ]; then
    echo "run-all: the lab failed (exit 125, see above); running the e2e suite once more"
    lab_retries=1
    tests/lab/run -- ctest --test-dir "$REPO/$BUILD_DIR" -L e2e --timeout 900 --output-on-failure 2>&1 | tee "$logdir/e2e.log"
    rc=${PIPESTATUS[0]}
  fi
fi
count_ctest e2e "$logdir/e2e.log" "$rc"

run_script_suite "lab self-test" tests/lab/lab_test.sh
run_script_suite "guest image under QEMU TCG" guest/guest_test.sh "$BUILD_DIR/guest"

echo
if [ ${#failures[@]} -ne 0 ]; then
  echo "failures:"
  printf '  %s\n' "${failures[@]}"
fi
[ -n "${lab_retries:-}" ] && echo "note: the e2e suite was rerun after a lab failure (exit 125)"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
