#!/bin/bash
# `make demo`: Clone's main job, end to end.
#   1. boots a template VM (Debian's cloud kernel, Clone's initramfs with the guest agent) with
#      `clone run` and asks it for its kernel, CPUs and memory;
#   2. snapshots it (`clone snapshot`, the vsock device and the guest agent included) and forks
#      10 copies (`clone fork --count 10`), which gives each fork its own vsock CID and applies
#      its identity in the guest through the agent: hostname = fork id, fresh RNG seed, clock;
#   3. runs `clone exec` in every fork: its hostname and 8 bytes of /dev/urandom, to show that
#      every fork is its own machine, and its vsock CID from its own API socket;
#   4. prints the fork latency (spawn until the guest agent answered and the identity was
#      applied) and the private memory (PSS of all the fork's processes) per fork;
#   5. forks 10 more copy-on-write copies through the template's fork server (`clone fork
#      --fork-server`, one command each, as a user would ask for them one by one), runs the same
#      `clone exec` in each, and prints their latency and memory (the server's and its spare's
#      PSS shared out over them).
# Without /dev/kvm it runs itself inside the lab (nested KVM under QEMU TCG, docs/LAB.md).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${CLONE_BUILD_DIR:-build}
FORKS=${CLONE_DEMO_FORKS:-10}
# memfd (each fork's own memfd, filled lazily) or cow (forks share the template's pages).
FORK_MEMORY=${CLONE_DEMO_FORK_MEMORY:-memfd}

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

echo "demo: clone run --kernel $BUILD/guest/vmlinuz --initrd $BUILD/guest/initrd.img --vcpus 2 --mem-mb 512 --api-socket $template_sock"
start=$(now_ms)
coproc VM { exec "$clone" run --kernel "$BUILD/guest/vmlinuz" \
  --initrd "$BUILD/guest/initrd.img" --cmdline "console=ttyS0 panic=-1 quiet" \
  --vcpus 2 --mem-mb 512 --api-socket "$template_sock" 2>&1; }
vm_pid=$VM_PID
exec {vm_out}<&"${VM[0]}" {vm_in}>&"${VM[1]}"

# Reads the template's console until a line contains $1 (gives up after $2 seconds); keeps
# what it read in $work/console.log and shows its end on a timeout.
wait_for() {
  local line
  while IFS= read -r -t "$2" -u "$vm_out" line; do
    line=${line%$'\r'}
    printf '%s\n' "$line" >>"$work/console.log"
    [[ $line == *"$1"* ]] && { printf '%s\n' "$line"; return 0; }
  done
  echo "demo: timed out waiting for '$1'; the template's console and log ended with:" >&2
  tail -n 30 "$work/console.log" >&2 || true
  return 1
}

wait_for CLONE-GUEST-READY 300 >/dev/null
echo "demo: the template reached userspace in $(( $(now_ms) - start )) ms"
echo 'echo "DEMO kernel=$(uname -r) cpus=$(nproc) mem=$(awk "/MemTotal/ {print \$2}" /proc/meminfo)kB"' >&"$vm_in"
wait_for "DEMO kernel=" 60 | sed 's/^/template: /'
# One line: the guest's hostname and 8 bytes of its /dev/urandom.
guest_info() {
  "$clone" exec --vm "$1" --timeout 30 -- sh -c 'hostname; head -c8 /dev/urandom | od -An -x' |
    tr -s ' \n' ' '
}
cid_of() { "$clone" status --vm "$1" --json | sed -n 's/.*"vsock_cid":\([0-9]*\).*/\1/p'; }
echo "demo: template: cid $(cid_of "$template_sock"), hostname and urandom: $(guest_info "$template_sock")"

echo "demo: clone snapshot --vm $template_sock --output $work/template"
"$clone" snapshot --vm "$template_sock" --output "$work/template" | sed 's/^/demo: /'

echo "demo: clone fork --template $work/template --count $FORKS --fork-memory $FORK_MEMORY"
fork_start=$(now_ms)
if ! "$clone" fork --template "$work/template" --count "$FORKS" --fork-memory "$FORK_MEMORY" \
    >"$work/forks" 2>"$work/fork-latency"; then
  cat "$work/fork-latency" >&2
  exit 1
fi
forked=$(now_ms)
echo "demo: clone exec --vm SOCKET -- sh -c 'hostname; head -c8 /dev/urandom | od -An -x' in every fork:"
while read -r id sock; do
  printf '%s: cid %s, hostname and urandom: %s\n' "$id" "$(cid_of "$sock")" "$(guest_info "$sock" </dev/null)"
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
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# "fork ID: ready (agent answered, identity applied) 812.4 ms after spawn; API answered after 401.2 ms"
mapfile -t latencies < <(sed -n 's/.*: ready (agent answered, identity applied) \([0-9.]*\) ms after spawn.*/\1/p' "$work/fork-latency")
mapfile -t api_latencies < <(sed -n 's/.*; API answered after \([0-9.]*\) ms$/\1/p' "$work/fork-latency")
if [ "${#latencies[@]}" -ne "$FORKS" ]; then
  echo "demo: expected $FORKS forks with their identity applied, clone fork said:" >&2
  cat "$work/fork-latency" >&2
  exit 1
fi
echo "demo: $FORKS forks started in $((forked - fork_start)) ms (clone fork until every fork's agent applied its identity)"
slowest() { printf '%s\n' "$@" | sort -g | tail -1; }
echo "demo: fork latency, spawn to identity applied (agent answered): median $(median "${latencies[@]}") ms, slowest $(slowest "${latencies[@]}") ms"
echo "demo:   of which spawn to API answer (restored, vCPUs running): median $(median "${api_latencies[@]}") ms, slowest $(slowest "${api_latencies[@]}") ms"
echo "demo: private memory per fork (PSS of its processes): median $(( $(median "${pss[@]}") / 1024 )) MiB"

# 5. The fast path: one `clone fork --fork-server` command per fork. The first starts the
# template's fork server (jailed, copy-on-write memory), which keeps a spare fork restored and
# running ahead of the next request; the pause between commands lets the next spare get ready.
echo "demo: $FORKS more forks through the template's fork server, one command each:"
echo "demo:   clone fork --template $work/template --fork-server --fork-memory cow"
: >"$work/server-forks"
: >"$work/server-latency"
declare -a command_ms
for _ in $(seq "$FORKS"); do
  started=$(now_ms)
  if ! "$clone" fork --template "$work/template" --fork-server --fork-memory cow \
      >>"$work/server-forks" 2>>"$work/server-latency"; then
    cat "$work/server-latency" >&2
    exit 1
  fi
  command_ms+=($(( $(now_ms) - started )))
  sleep 1
done
while read -r id sock; do
  printf '%s: cid %s, hostname and urandom: %s\n' "$id" "$(cid_of "$sock")" "$(guest_info "$sock" </dev/null)"
done <"$work/server-forks"
mapfile -t server_latencies < <(sed -n 's/.*: ready (agent answered, identity applied) \([0-9.]*\) ms after spawn.*/\1/p' "$work/server-latency")
if [ "${#server_latencies[@]}" -ne "$FORKS" ]; then
  echo "demo: expected $FORKS fork-server forks with their identity applied, clone fork said:" >&2
  cat "$work/server-latency" >&2
  exit 1
fi
# Every process of the server's family (server, spare, forks: all share its command line).
family_kb=0
for pid in $(pgrep -f -- "--fork-server-fd" || true); do
  kb=$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)
  family_kb=$((family_kb + kb))
done
echo "demo: fork-server fork latency, request to identity applied (agent answered): median $(median "${server_latencies[@]}") ms, slowest $(slowest "${server_latencies[@]}") ms"
echo "demo:   the whole clone fork command (its own process start included): median $(median "${command_ms[@]}") ms, slowest $(slowest "${command_ms[@]}") ms"
echo "demo: memory per fork-server fork (PSS of the server, its spare and its forks, over $FORKS forks): $(( family_kb / FORKS / 1024 )).$(( family_kb * 10 / FORKS / 1024 % 10 )) MiB"
