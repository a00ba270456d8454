#!/usr/bin/env bash
# images/xfstests-image.sh - the guest for thinblk-xfstests: Debian's non-cloud kernel (it has
# 9p) and a small initramfs whose /init mounts the host's root read-only over 9p, puts a tmpfs
# overlay on it, mounts the run directory read-write at its host path, bind-mounts the kernel's
# modules at /lib/modules, and switch_roots into the host userland to run the run's script.
#
# Usage: images/xfstests-image.sh [OUTDIR]      (default OUTDIR: <repo>/_build/xfstests-image)
#
# Output (OUTDIR): vmlinuz, initramfs.cpio.gz, kernel-version, modules (path of the unpacked
# modules tree, lib/modules/VERSION, depmod'ed), stamp (inputs hash; an unchanged build is
# skipped). Kernel: the newest linux-image-*-amd64 (non-cloud) apt-cache lists, or
# $THINBLK_XFSTESTS_KERNEL_PKG (e.g. linux-image-6.1.0-56-amd64).
#
# Kernel command line the /init reads: thinblk.rundir=DIR (host path of the run directory,
# 9p tag "rundir"), thinblk.script=PATH (run inside the host root, as PID 1, with bash),
# thinblk.overlay_size=SIZE (tmpfs for the writable layer, default 50%).
# Missing host packages are installed with apt-get.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$script_dir/.." && pwd)
out=${1:-$repo/_build/xfstests-image}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cache=$out/cache
mkdir -p "$cache"
exec 9>"$out/.lock"
flock 9

log() { echo "xfstests-image: $*" >&2; }

need=()
if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then need+=(busybox-static); fi
command -v cpio >/dev/null || need+=(cpio)
command -v depmod >/dev/null || need+=(kmod)
command -v strings >/dev/null || need+=(binutils)
if [ ${#need[@]} -gt 0 ]; then
	log "installing ${need[*]}"
	apt-get install -y --no-install-recommends "${need[@]}" >&2 || { apt-get update >&2 && apt-get install -y --no-install-recommends "${need[@]}" >&2; }
fi

kpkg=${THINBLK_XFSTESTS_KERNEL_PKG:-}
if [ -z "$kpkg" ]; then
	list() { apt-cache search --names-only '^linux-image-[0-9][0-9.]*-[0-9]+-amd64$' | awk '{print $1}'; }
	kl=$(list)
	[ -n "$kl" ] || { apt-get update >&2; kl=$(list); }
	kpkg=$(echo "$kl" | sort -V | tail -1)
	[ -n "$kpkg" ] || { log "no linux-image-*-amd64 package found by apt-cache"; exit 1; }
fi

# Modules the initramfs loads to reach the host root; everything else is loaded later with
# modprobe from the full modules tree.
want_modules=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
	netfs fscache 9pnet 9pnet_virtio 9p overlay)

stamp=$( { cat "${BASH_SOURCE[0]}"; echo "$kpkg"; stat -Lc '%n %s %Y' /bin/busybox; } | sha256sum | awk '{print $1}')
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/initramfs.cpio.gz" ]; then
	log "up to date ($kpkg) in $out"
	exit 0
fi
log "building ($kpkg) into $out"

kdir=$cache/$kpkg
if [ ! -d "$kdir/boot" ]; then
	rm -rf "$kdir" "$kdir.tmp" "$cache/dl"
	mkdir -p "$cache/dl"
	(cd "$cache/dl" && apt-get download "$kpkg" >&2) || { apt-get update >&2; (cd "$cache/dl" && apt-get download "$kpkg" >&2); }
	dpkg -x "$cache"/dl/*.deb "$kdir.tmp"
	mv "$kdir.tmp" "$kdir"
	rm -rf "$cache/dl"
fi
kver=$(ls "$kdir/lib/modules" | head -1)
moddir=$kdir/lib/modules/$kver
depmod -b "$kdir" "$kver"

work=$(mktemp -d "$out/root.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,lower,upper,newroot,lib/modules}

declare -A mod_done=()
load_order=()
find_module() {
	local alt=${1//_/-} alt2=${1//-/_}
	find "$moddir/kernel" \( -name "$1.ko*" -o -name "$alt.ko*" -o -name "$alt2.ko*" \) -print -quit
}
module_text() {
	case "$1" in
	*.xz) xz -dc "$1" ;;
	*.zst) zstd -qdc "$1" ;;
	*) cat "$1" ;;
	esac
}
add_module() {
	local name=$1 f d
	[ -n "${mod_done[$name]:-}" ] && return 0
	mod_done[$name]=1
	f=$(find_module "$name")
	if [ -z "$f" ]; then
		grep -qE "/(${name}|${name//-/_}|${name//_/-})\.ko$" "$moddir/modules.builtin" && return 0
		# Since 6.4 fscache is part of netfs (THINBLK_XFSTESTS_KERNEL_PKG may pick such a kernel).
		[ "$name" = fscache ] && return 0
		log "module $name: neither a module nor built in ($kver)"
		exit 1
	fi
	module_text "$f" >"$work/m.ko"
	for d in $(strings "$work/m.ko" | sed -n 's/^depends=//p' | head -1 | tr , ' '); do
		add_module "$d"
	done
	module_text "$f" >"$root/lib/modules/$name.ko"
	load_order+=("$name")
}
for m in "${want_modules[@]}"; do add_module "$m"; done
printf '%s\n' "${load_order[@]}" >"$root/etc/modules.order"

cp /bin/busybox "$root/bin/busybox"
for a in sh mount mkdir insmod cat switch_root echo sleep poweroff; do ln -s busybox "$root/bin/$a"; done

cat >"$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "thinblk-xfstests-init: $*"; echo o >/proc/sysrq-trigger; sleep 30; }
for m in $(cat /etc/modules.order); do insmod /lib/modules/$m.ko || echo "thinblk-xfstests-init: insmod $m failed"; done
rundir= script= osize=50% modules=
for a in $(cat /proc/cmdline); do
	case $a in
	thinblk.rundir=*) rundir=${a#*=} ;;
	thinblk.script=*) script=${a#*=} ;;
	thinblk.overlay_size=*) osize=${a#*=} ;;
	thinblk.modules=*) modules=${a#*=} ;;
	esac
done
# cache=mmap: executables and libraries are mapped from the page cache; without it every
# exec reads its binary over 9p again (xfstests runs thousands of short processes). Not
# cache=loose: its dentry caching hides what is mounted on the overlay (/proc, /sys).
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=mmap hostroot /lower || fail "mount host root"
mount -t tmpfs -o size=$osize tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot || fail "overlay"
mkdir -p /newroot$rundir /newroot/lib/modules
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 rundir /newroot$rundir || fail "mount run dir"
[ -n "$modules" ] && { mount -o bind /lower$modules /newroot/lib/modules || fail "bind modules"; }
# Fresh mounts (not --move): the new root's /proc must be this kernel's, never the host's
# /proc seen through 9p.
mount -t proc proc /newroot/proc || fail "mount /proc"
mount -t sysfs sysfs /newroot/sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /newroot/dev || fail "mount /dev"
[ -e /newroot/proc/self/fd ] || fail "/proc in the new root is not procfs"
echo "thinblk-xfstests-init: switching to the host root, running $script"
exec switch_root /newroot /bin/bash "$script"
INIT
chmod +x "$root/init"

(cd "$root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -1 >"$work/initramfs.cpio.gz")
cp "$kdir/boot/vmlinuz-$kver" "$out/vmlinuz"
mv "$work/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
echo "$kver" >"$out/kernel-version"
echo "$kdir/lib/modules" >"$out/modules"
echo "$stamp" >"$out/stamp"
log "done: kernel $kver, initramfs modules: ${load_order[*]}"
