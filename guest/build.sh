#!/bin/bash
# Builds the guest images Clone boots: guest/build.sh OUTDIR
#   OUTDIR/vmlinuz         Debian's cloud kernel (bzImage)
#   OUTDIR/initrd.img      busybox test initramfs with the virtio modules
#   OUTDIR/kernel-version  kernel release (uname -r in the guest)
#   OUTDIR/kernel-config   that kernel's .config, for reference
#   OUTDIR/initrd.files    listing of the initramfs
# Idempotent: the kernel package is downloaded once per version into
# ${CLONE_CACHE:-<repo>/build/cache}, and the initramfs is rebuilt only when
# a fingerprint of all its inputs changes.
#
# Environment:
#   CLONE_CACHE              download cache (default <repo>/build/cache)
#   CLONE_GUEST_KERNEL_PKG   kernel package to use (default: what
#                            linux-image-cloud-amd64 depends on)
#   CLONE_GUEST_EXTRA        colon-separated files copied to /usr/bin
#                            (shared libraries of dynamic ones come along)
#   CLONE_GUEST_OVERLAY      colon-separated directories copied over /
#   CLONE_GUEST_COMPRESS     zstd (default) | gzip | none
# docs/GUEST.md describes the image and the /init contract.
set -euo pipefail
export LC_ALL=C

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
[ $# -eq 1 ] || { echo "usage: guest/build.sh OUTDIR" >&2; exit 2; }
mkdir -p "$1"
out="$(cd "$1" && pwd)"
cache="${CLONE_CACHE:-$repo/build/cache}"
compress="${CLONE_GUEST_COMPRESS:-zstd}"
meta_pkg=linux-image-cloud-amd64

step="start"
die() { echo "guest/build.sh: $step: $*" >&2; exit 1; }
# shellcheck disable=SC2154 # rc is assigned inside the trap
trap 'rc=$?; [ $rc -eq 0 ] || echo "guest/build.sh: failed in step \"$step\" (exit $rc)" >&2' EXIT
log() { echo "guest: $*"; }

case "$compress" in
  zstd) command -v zstd >/dev/null || die "zstd not installed (scripts/install-deps.sh lab)" ;;
  gzip|none) ;;
  *) die "CLONE_GUEST_COMPRESS=$compress: want zstd, gzip or none" ;;
esac
for tool in dpkg-deb depmod cpio ldd busybox flock perl cc; do
  command -v "$tool" >/dev/null || die "missing host tool '$tool' (scripts/install-deps.sh lab)"
done

mkdir -p "$cache/kernel" || die "cannot create cache $cache/kernel"
# One build at a time per cache and per OUTDIR (make -j, parallel test runs).
exec 9>"$cache/kernel/.lock"
flock 9
exec 8>"$out/.lock"
flock 8
# Leftovers of interrupted runs (we hold both locks, so nobody uses them).
rm -rf "$cache"/kernel/.dl.* "$out"/.stage.*

# ---------------------------------------------------------------- kernel ---
step="choose kernel package"
kpkg="${CLONE_GUEST_KERNEL_PKG:-}"
kdebver=""
# apt-cache takes ~1 s here (no pkgcache.bin), so remember its answer until
# the apt lists or apt's configuration change.
apt_sig="$( { echo "${kpkg:-$meta_pkg}"
              stat -c '%n %Y %s' /var/lib/apt/lists/*Packages* /etc/apt /etc/apt/* 2>/dev/null || true
            } | sha256sum | cut -d' ' -f1)"
if [ -f "$cache/kernel/.resolved" ] && [ "$(head -n1 "$cache/kernel/.resolved")" = "$apt_sig" ]; then
  { read -r _; read -r kpkg kdebver; } <"$cache/kernel/.resolved"
else
  if [ -z "$kpkg" ]; then
    kpkg="$(apt-cache depends "$meta_pkg" 2>/dev/null |
            awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')" || true
  fi
  [ -n "$kpkg" ] && kdebver="$(apt-cache policy "$kpkg" 2>/dev/null |
                               awk '$1 == "Candidate:" { print $2; exit }')" || true
  [ "$kdebver" = "(none)" ] && kdebver=""
  [ -n "$kpkg" ] && [ -n "$kdebver" ] && printf '%s\n%s %s\n' "$apt_sig" "$kpkg" "$kdebver" >"$cache/kernel/.resolved"
fi

cached_kernel() {  # newest complete cached kernel (of CLONE_GUEST_KERNEL_PKG if set)
  local d
  for d in $(ls -d "$cache/kernel/${CLONE_GUEST_KERNEL_PKG:-linux-image-*}"_*/ 2>/dev/null | sort -rV); do
    [ -e "$d/.ok" ] && { echo "${d%/}"; return 0; }
  done
  return 0
}
if [ -z "$kpkg" ] || [ -z "$kdebver" ]; then
  # apt lists missing or stale: an already cached kernel still lets us build.
  kdir="$(cached_kernel)"
  [ -n "$kdir" ] ||
    die "apt-cache cannot resolve $meta_pkg${kpkg:+ -> $kpkg} and nothing is cached; run apt-get update"
  log "apt-cache cannot resolve the kernel; using cached $(basename "$kdir")" >&2
else
  kdir="$cache/kernel/${kpkg}_${kdebver//:/%3a}"
fi

if [ ! -e "$kdir/.ok" ]; then
  step="download $kpkg $kdebver"
  log "downloading $kpkg $kdebver into $cache/kernel"
  dl="$(mktemp -d "$cache/kernel/.dl.XXXXXX")"
  # As root apt drops to _apt, which cannot write our cache: stay root.
  sandbox=()
  [ "$(id -u)" -eq 0 ] && sandbox=(-o APT::Sandbox::User=root)
  if ! (cd "$dl" && apt-get "${sandbox[@]}" -q download "$kpkg=$kdebver" >/dev/null); then
    rm -rf "$dl"
    old="$(cached_kernel)"
    [ -n "$old" ] ||
      die "apt-get download $kpkg=$kdebver failed (apt-get update? network to the Debian mirror?)"
    # Offline with an older kernel cached: build with it rather than fail.
    echo "guest/build.sh: warning: download of $kpkg=$kdebver failed; using cached $(basename "$old")" >&2
    kdir="$old"
  fi
fi
if [ ! -e "$kdir/.ok" ]; then
  deb="$(ls "$dl"/*.deb)" || die "no .deb in $dl after download"
  step="extract $deb"
  dpkg-deb -x "$deb" "$dl/tree" || die "dpkg-deb -x $deb failed"
  mv "$deb" "$dl/tree.deb"
  step="depmod for $kpkg"
  krel="$(ls "$dl/tree/lib/modules")"
  [ "$(echo "$krel" | wc -l)" -eq 1 ] || die "expected one release in $dl/tree/lib/modules, got: $krel"
  depmod -b "$dl/tree" "$krel" || die "depmod -b $dl/tree $krel failed"
  echo "$krel" >"$dl/release"
  chmod 0755 "$dl"
  touch "$dl/.ok"
  rm -rf "$kdir"
  mv "$dl" "$kdir"
  # Keep only the wanted kernel; each extracted tree is ~100 MB.
  for old in "$cache"/kernel/linux-image-*; do
    [ "$old" = "$kdir" ] || rm -rf "$old"
  done
fi
krel="$(cat "$kdir/release")"
ktree="$kdir/tree"
kmoddir="$ktree/lib/modules/$krel"

step="install kernel"
[ -f "$ktree/boot/vmlinuz-$krel" ] || die "no bzImage at $ktree/boot/vmlinuz-$krel"
install_if_changed() {  # src dst: copy only on change so mtimes stay stable
  cmp -s "$1" "$2" 2>/dev/null && return 0
  cp "$1" "$2.tmp" && mv "$2.tmp" "$2" || die "cannot write $2"
}
install_if_changed "$ktree/boot/vmlinuz-$krel" "$out/vmlinuz"
install_if_changed "$ktree/boot/config-$krel" "$out/kernel-config"
echo "$krel" >"$out/.kernel-version.new"
install_if_changed "$out/.kernel-version.new" "$out/kernel-version"
rm -f "$out/.kernel-version.new"

# --------------------------------------------------------------- modules ---
step="resolve modules"
# name -> path relative to $kmoddir; '-' and '_' are the same in module names.
declare -A modpath=() moddeps=() builtin=()
while IFS= read -r line; do
  path="${line%%:*}"
  name="${path##*/}"; name="${name%%.ko*}"; name="${name//-/_}"
  modpath[$name]="$path"
  moddeps[$name]="${line#*:}"
done <"$kmoddir/modules.dep"
while IFS= read -r path; do
  name="${path##*/}"; name="${name%%.ko*}"
  builtin[${name//-/_}]=1
done <"$kmoddir/modules.builtin"

load_order=()   # paths, dependencies first
declare -A seen=()
visit() {
  local name="$1" dep dname
  [ -n "${seen[$name]:-}" ] && return 0
  seen[$name]=1
  for dep in ${moddeps[$name]}; do
    dname="${dep##*/}"; dname="${dname%%.ko*}"
    visit "${dname//-/_}"
  done
  load_order+=("${modpath[$name]}")
}
wanted=()
while read -r name _; do
  name="${name%%#*}"
  [ -n "$name" ] || continue
  name="${name//-/_}"
  if [ -n "${modpath[$name]:-}" ]; then
    wanted+=("$name")
    visit "$name"
  elif [ -n "${builtin[$name]:-}" ]; then
    log "module $name is built into $krel; skipped"
  else
    die "module '$name' (guest/modules.txt) is neither a module nor built into $krel"
  fi
done <"$here/modules.txt"

# -------------------------------------------------------- host binaries ---
step="resolve host binaries"
# Files copied from the host: "source<TAB>destination in the initramfs".
plan=()
add_file() { plan+=("$1"$'\t'"$2"); }
# A dynamic executable's libraries go to the same paths in the initramfs
# (the image is merged-/usr like Debian 12: /lib -> usr/lib).
add_libs() {
  local bin="$1" lib deps
  deps="$(ldd "$bin" 2>/dev/null)" || return 0   # static or not ELF: nothing to add
  ! grep -q 'not found' <<<"$deps" || die "ldd $bin: $(grep 'not found' <<<"$deps" | tr -s '\t\n' '  ')"
  while read -r lib; do
    add_file "$lib" "$(canon "$lib")"
  done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$deps")
}
canon() {  # host path -> path inside the merged-/usr initramfs
  case "$1" in
    /usr/*) echo "${1#/}" ;;
    /bin/*|/sbin/*|/lib/*|/lib64/*) echo "usr/${1#/}" ;;
    *) echo "${1#/}" ;;
  esac
}
busybox_bin="$(command -v busybox)"
# /init runs before any library path exists: busybox must be static.
if ldd "$busybox_bin" >/dev/null 2>&1; then die "$busybox_bin is dynamic; install busybox-static"; fi
add_file "$busybox_bin" usr/bin/busybox
# e2fsprogs is dynamic in Debian: mkfs.ext4/fsck.ext4 need their libraries.
for tool in mke2fs e2fsck; do
  src="/sbin/$tool"
  [ -x "$src" ] || die "$src missing (install e2fsprogs)"
  add_file "$src" "usr/sbin/$tool"
  add_libs "$src"
done
[ -f /etc/mke2fs.conf ] && add_file /etc/mke2fs.conf etc/mke2fs.conf
extras=()
if [ -n "${CLONE_GUEST_EXTRA:-}" ]; then
  IFS=: read -r -a extras <<<"$CLONE_GUEST_EXTRA"
fi
for f in "${extras[@]}"; do
  [ -n "$f" ] || continue
  step="resolve CLONE_GUEST_EXTRA file $f"
  [ -f "$f" ] || die "not a file"
  add_file "$(realpath "$f")" "usr/bin/$(basename "$f")"
  add_libs "$f"
done
overlays=()
if [ -n "${CLONE_GUEST_OVERLAY:-}" ]; then
  IFS=: read -r -a overlays <<<"$CLONE_GUEST_OVERLAY"
fi
for d in "${overlays[@]}"; do
  [ -n "$d" ] || continue
  [ -d "$d" ] || { step="CLONE_GUEST_OVERLAY"; die "$d is not a directory"; }
done

# ----------------------------------------------------------- fingerprint ---
step="fingerprint inputs"
# Everything that can change the initramfs: our sources, the kernel, the
# host files we copy (by content), overlays, the compressor.
fingerprint="$(
  {
    echo "kernel $krel $(basename "$kdir") compress $compress"
    (cd "$here" && find build.sh init modules.txt rootfs agent -printf '%p %m %l\n' | sort &&
     find build.sh init modules.txt rootfs agent -type f -print0 | sort -z | xargs -0 sha256sum)
    echo "cc $(cc --version | head -n1)"
    printf '%s\n' "${load_order[@]}"
    for p in "${plan[@]}"; do echo "$p $(sha256sum <"${p%%$'\t'*}")"; done
    for d in "${overlays[@]}"; do
      [ -n "$d" ] || continue
      echo "overlay $d"
      (cd "$d" && find . -printf '%p %m %l\n' | sort && find . -type f -print0 | sort -z | xargs -0 -r sha256sum)
    done
  } | sha256sum | cut -d' ' -f1
)"
if [ -f "$out/initrd.img" ] && [ "$(cat "$out/.initrd.fingerprint" 2>/dev/null)" = "$fingerprint" ]; then
  log "up to date: $out/vmlinuz ($krel), $out/initrd.img ($(stat -c %s "$out/initrd.img") bytes)"
  exit 0
fi

# --------------------------------------------------------------- staging ---
step="stage initramfs tree"
stage="$(mktemp -d "$out/.stage.XXXXXX")"
trap 'rc=$?; rm -rf "$stage"; [ $rc -eq 0 ] || echo "guest/build.sh: failed in step \"$step\" (exit $rc)" >&2' EXIT
r="$stage/root"
mkdir -p "$r"/{usr/bin,usr/sbin,usr/lib,usr/lib64,etc,proc,sys,dev,tmp,run,mnt,root,var}
# merged /usr, as on Debian 12, so host library paths work unchanged
ln -s usr/bin "$r/bin"; ln -s usr/sbin "$r/sbin"
ln -s usr/lib "$r/lib"; ln -s usr/lib64 "$r/lib64"
ln -s ../run "$r/var/run"; mkdir -p "$r/var/tmp"
chmod 1777 "$r/tmp" "$r/var/tmp"; chmod 0700 "$r/root"

for p in "${plan[@]}"; do
  src="${p%%$'\t'*}"; dst="$r/${p#*$'\t'}"
  mkdir -p "$(dirname "$dst")"
  rm -f "$dst"
  cp -L "$src" "$dst" || die "cannot copy $src to $dst"
done

step="busybox applet links"
# Absolute-path links to the one binary; the real e2fsprogs tools win.
links=()
while read -r applet; do
  case "$applet" in
    linuxrc|*/busybox|*/linuxrc|*/init) continue ;;  # our /init is PID 1
    usr/*) dst="$r/$applet" ;;
    *) dst="$r/usr/$applet" ;;
  esac
  [ -e "$dst" ] || [ -L "$dst" ] || links+=("$dst")
done < <("$busybox_bin" --list-full)
# One process for ~270 links (a fork per `ln` costs seconds on a busy host).
perl -e 'for (@ARGV) { symlink("/usr/bin/busybox", $_) or die "symlink $_: $!\n" }' "${links[@]}" ||
  die "cannot create busybox applet links in $r"
for t in ext2 ext3 ext4; do
  ln -sf mke2fs "$r/usr/sbin/mkfs.$t"
  ln -sf e2fsck "$r/usr/sbin/fsck.$t"
done

step="copy modules"
mdst="$r/usr/lib/modules/$krel"
mkdir -p "$mdst"
: >"$mdst/clone-load.list"
for path in "${load_order[@]}"; do
  rel="${path%.xz}"; rel="${rel%.zst}"; rel="${rel%.gz}"
  mkdir -p "$mdst/$(dirname "$rel")"
  case "$path" in   # insmod wants plain .ko
    *.ko.xz) xz -dc "$kmoddir/$path" >"$mdst/$rel" ;;
    *.ko.zst) zstd -qdc "$kmoddir/$path" >"$mdst/$rel" ;;
    *.ko.gz) gzip -dc "$kmoddir/$path" >"$mdst/$rel" ;;
    *) cp "$kmoddir/$path" "$mdst/$rel" ;;
  esac || die "cannot copy module $kmoddir/$path"
  echo "$rel" >>"$mdst/clone-load.list"
done
# Names /init loads with one `modprobe -a`; clone-load.list is the resolved
# load order, for reference.
printf '%s\n' "${wanted[@]}" >"$mdst/clone-modules"
cp "$kmoddir/modules.builtin" "$kmoddir/modules.builtin.modinfo" "$kmoddir/modules.order" "$mdst/"
step="depmod for the initramfs"
# A modules.dep of our own so `modprobe` also works in the guest.
depmod -b "$r" "$krel" || die "depmod -b $r $krel failed"

step="build the guest agent"
# clone-agent (docs/AGENT.md): static, since the initramfs has no C library.
cc -static -Os -s -Wall -o "$r/usr/bin/clone-agent" "$here/agent/agent.c" "$here/agent/agent_protocol.c" ||
  die "cc -static of guest/agent failed (glibc static libraries: libc6-dev)"

step="copy guest/rootfs and /init"
cp -a "$here/rootfs/." "$r/"
cp "$here/init" "$r/init"
chmod 0755 "$r/init"
for d in "${overlays[@]}"; do
  [ -n "$d" ] || continue
  step="copy overlay $d"
  cp -a "$d/." "$r/" || die "cannot copy overlay $d"
done

# --------------------------------------------------------------- archive ---
step="write initramfs"
# newc header for an entry cpio cannot take from the tree without root:
# /dev/console must exist before /init runs, or the kernel gives it no stdio.
newc() {  # name mode(octal) rdevmajor rdevminor
  local name="$1" namesize=$((${#1} + 1)) pad
  printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
    0 "$((8#$2))" 0 0 1 0 0 0 0 "$3" "$4" "$namesize" 0
  printf '%s\0' "$name"
  pad=$(( (4 - (110 + namesize) % 4) % 4 ))
  head -c "$pad" /dev/zero
}
# Reproducible archive: fixed mtimes, owner root, sorted names.
find "$r" -exec touch -h -d @0 {} +
(
  newc dev 040755 0 0
  newc dev/console 020600 5 1
  cd "$r" && find . -mindepth 1 ! -path ./dev -printf '%P\n' | sort |
    cpio -o -H newc -R 0:0 --reproducible --quiet
) >"$stage/initrd.cpio" || die "cpio failed"
case "$compress" in
  zstd) zstd -q -19 -T0 -c "$stage/initrd.cpio" >"$stage/initrd.img" ;;
  gzip) gzip -9 -n -c "$stage/initrd.cpio" >"$stage/initrd.img" ;;
  none) cp "$stage/initrd.cpio" "$stage/initrd.img" ;;
esac || die "$compress of $stage/initrd.cpio failed"
(cd "$r" && find . -mindepth 1 \( -type l -printf '%M %10s %P -> %l\n' \) -o -printf '%M %10s %P\n' |
  sort -k3; echo "crw------- 5,1 dev/console") | sort -k3 >"$out/initrd.files"
mv "$stage/initrd.img" "$out/initrd.img"
echo "$fingerprint" >"$out/.initrd.fingerprint"
log "built $out/initrd.img: $(stat -c %s "$out/initrd.img") bytes ($compress), $(stat -c %s "$stage/initrd.cpio") uncompressed"
log "kernel $krel: $out/vmlinuz ($(stat -c %s "$out/vmlinuz") bytes); modules: ${wanted[*]}"
