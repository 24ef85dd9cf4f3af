# Sourced by the lab's fork tools (fork-owned-pages, fork-jit-probe), from the repo's top.
# boot_lab_template SCRATCH: boots the test guest unjailed (API socket SCRATCH/template.sock)
# and returns once its userspace is up. snapshot_lab_template SCRATCH DIR: snapshots it into
# DIR and destroys it.
boot_lab_template() {
  local scratch=$1
  modprobe vhost_vsock 2>/dev/null || true
  build/bin/clone run --no-jail --kernel build/guest/vmlinuz --initrd build/guest/initrd.img --mem-mb 256 \
    --cmdline "console=ttyS0 panic=-1 quiet" --api-socket "$scratch/template.sock" \
    </dev/null >"$scratch/template.log" 2>&1 &
  for _ in $(seq 300); do
    sleep 1
    grep -q CLONE-GUEST-READY "$scratch/template.log" && return 0
  done
  echo "the lab template did not reach userspace; its console:" >&2
  tail -20 "$scratch/template.log" >&2
  return 1
}

snapshot_lab_template() {
  build/bin/clone snapshot --vm "$1/template.sock" --output "$2"
  build/bin/clone destroy --vm "$1/template.sock"
}
