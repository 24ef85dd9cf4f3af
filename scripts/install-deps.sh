#!/bin/bash
# Installs the Debian 12 packages Clone needs to build, test and run its lab.
# Idempotent: only missing packages are installed, and `apt-get update` runs once.
set -euo pipefail

BUILD_PKGS=(
  build-essential cmake ninja-build pkg-config git
  capnproto libcapnp-dev
  libseccomp-dev libcap-dev
  libspdlog-dev libfmt-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  liburing-dev libcli11-dev nlohmann-json3-dev libssl-dev libmd-dev
  zlib1g-dev libzstd-dev
  acpica-tools
)
# qemu-system-x86 brings qemu-system-common, which holds qemu-storage-daemon and
# /usr/lib/qemu/virtiofsd: the third-party vhost-user back-ends of the e2e tests and benchmarks.
# The benchmark's guest load generator (tests/bench/randread.c) is static: libc6-dev's libc.a.
LAB_PKGS=(
  qemu-system-x86 qemu-utils
  busybox-static cpio kmod xz-utils zstd
  e2fsprogs
)

want=("${BUILD_PKGS[@]}")
case "${1:-all}" in
  build) ;;
  all|lab) want+=("${LAB_PKGS[@]}") ;;
  *) echo "install-deps: unknown set '$1' (build|lab|all)" >&2; exit 2 ;;
esac

missing=()
for pkg in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "install-deps: installing ${missing[*]}"
stamp=/var/lib/apt/periodic/clone-apt-updated
if [ ! -e "$stamp" ] || [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
  $SUDO apt-get update -qq
  $SUDO mkdir -p "$(dirname "$stamp")" && $SUDO touch "$stamp"
fi
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
