#!/bin/bash
# `make demo`: Clone's main job, end to end.
#   1. boots a template VM (Debian's cloud kernel, Clone's initramfs with the guest agent) with
#      `clone run` and asks it for its kernel, CPUs and memory;
#   2. snapshots it (`clone snapshot`) and forks 10 copies (`clone fork --count 10`);
#   3. asks every fork for its status over its own API socket (running, its own uptime);
#   4. prints the fork latency (spawn to API answer) and the private memory (PSS) per fork.
# Not yet: `clone exec` into forks. Templates cannot hold the vsock device yet (docs/FORK.md), so
# the template runs with --no-vsock and the forks have no guest agent.
# Without /dev/kvm it runs itself inside the lab (nested KVM under QEMU TCG, docs/LAB.md).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${CLONE_BUILD_DIR:-build}
FORKS=${CLONE_DEMO_FORKS:-10}

if [ ! -e /dev/kvm ]; then
  echo "demo: this host has no /dev/kvm; running the demo inside the lab (nested KVM under TCG)"
  exec tests/lab/run --mem 6G --timeout 1500 -- "$PWD/scripts/demo.sh"
fi

clone=$PWD/$BUILD/bin/clone
# Unix sockets cannot live on the lab's 9p tree: keep the VM's files on a local filesystem.
work=$(mktemp -d /tmp/clone-demo.XXXXXX)
export CLONE_RUNTIME_DIR=$work/run
template_sock=$work/template.sock
vm_pid=""
cleanup() {
  for sock in "$work"/run/*.sock; do
    [ -S "$sock" ] && "$clone" destroy --vm "$sock" >/dev/null 2>&1 || true
  done
  if [ -n "$vm_pid" ] && kill -0 "$vm_pid" 2>/dev/null; then
    "$clone" shutdown --vm "$template_sock" >/dev/null 2>&1 || kill "$vm_pid" 2>/dev/null || true
    wait "$vm_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

echo "demo: clone run --kernel $BUILD/guest/vmlinuz --initrd $BUILD/guest/initrd.img --vcpus 2 --mem-mb 512 --no-vsock --api-socket $template_sock"
start=$(now_ms)
coproc VM { exec "$clone" run --kernel "$BUILD/guest/vmlinuz" \
  --initrd "$BUILD/guest/initrd.img" --cmdline "console=ttyS0 panic=-1 quiet" \
  --vcpus 2 --mem-mb 512 --no-vsock --api-socket "$template_sock" 2>&1; }
vm_pid=$VM_PID
exec {vm_out}<&"${VM[0]}" {vm_in}>&"${VM[1]}"

# Reads the template's console until a line contains $1 (gives up after $2 seconds).
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
echo "demo: the template reached userspace in $(( $(now_ms) - start )) ms"
echo 'echo "DEMO kernel=$(uname -r) cpus=$(nproc) mem=$(awk "/MemTotal/ {print \$2}" /proc/meminfo)kB"' >&"$vm_in"
wait_for "DEMO kernel=" 60 | sed 's/^/template: /'

echo "demo: clone snapshot --vm $template_sock --output $work/template"
"$clone" snapshot --vm "$template_sock" --output "$work/template" | sed 's/^/demo: /'

echo "demo: clone fork --template $work/template --count $FORKS"
fork_start=$(now_ms)
"$clone" fork --template "$work/template" --count "$FORKS" >"$work/forks" 2>"$work/fork-latency"
forked=$(now_ms)
while read -r id sock; do
  printf 'fork %s: %s\n' "$id" "$("$clone" status --vm "$sock" --json)"
done <"$work/forks"

# Private memory per fork: PSS of every process of the fork (its clone-vmm).
declare -a pss
while read -r id sock; do
  total=0
  for pid in $(pgrep -f -- "--api-socket $sock( |$)" || true); do
    kb=$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)
    total=$((total + kb))
  done
  pss+=("$total")
done <"$work/forks"
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mapfile -t latencies < <(awk '/answering on its API socket/ {print $(NF-3)}' "$work/fork-latency")
echo "demo: $FORKS forks started in $((forked - fork_start)) ms (clone fork until every fork's API answered)"
echo "demo: fork latency, spawn to API answer: median $(median "${latencies[@]}") ms, slowest $(printf '%s\n' "${latencies[@]}" | sort -g | tail -1) ms"
echo "demo: private memory per fork (PSS of its processes): median $(( $(median "${pss[@]}") / 1024 )) MiB"
