#!/usr/bin/env bash
# images/build.sh - build the guest kernel + initramfs used by guesttests and `make demo`.
#
# Usage: images/build.sh [OUTDIR]        (default OUTDIR: <repo>/_build/images)
#
# Output (OUTDIR):
#   vmlinuz            Debian cloud kernel (the one linux-image-cloud-amd64 depends on, else the
#                      newest linux-image-*-cloud-amd64 apt-cache lists; or $THINBLK_KERNEL_PKG,
#                      e.g. linux-image-6.12.117+deb12-cloud-amd64)
#   initramfs.cpio.gz  busybox userland, virtio/vsock/xfs modules, mkfs.xfs, xfs_repair,
#                      mkfs.ext4, e2fsck, fio, blkdiscard, fstrim, sfdisk, sha256sum with their
#                      libraries, and the static guest agent (cmd/thinblk-agent) started by /init
#   kernel-version     the kernel release inside
#   stamp              hash of the inputs; the build is skipped when it still matches
#
# Inputs hashed: this script, the agent's Go sources (cmd/thinblk-agent, guesttests/agentproto),
# go.mod/go.sum, the kernel package name and the host tools' paths+sizes. Missing host packages
# are installed with apt-get (root required for that step only).
# The guest /init loads modules, mounts proc/sys/dev, then runs the agent; the agent reaches the
# host over vsock when there is a virtio-vsock device, otherwise over the virtio-serial port
# named "org.thinblk.agent".
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$script_dir/.." && pwd)
out=${1:-$repo/_build/images}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cache=$out/cache
mkdir -p "$cache"
# One build at a time per output directory (parallel test processes may all ask for images).
exec 9>"$out/.lock"
flock 9

log() { echo "images: $*" >&2; }

# Modules the guest needs, in load order; their depends= are resolved and loaded first.
# Names missing from the package are taken as built in (checked against modules.builtin).
want_modules=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
	virtio_blk virtio_console vsock vmw_vsock_virtio_transport_common
	vmw_vsock_virtio_transport libcrc32c crc32c-intel xfs)

# Host programs copied into the guest with their libraries: "path package".
host_tools=(
	"/usr/sbin/mkfs.xfs xfsprogs" "/usr/sbin/xfs_repair xfsprogs" "/usr/sbin/xfs_db xfsprogs"
	"/usr/sbin/mkfs.ext4 e2fsprogs" "/usr/sbin/e2fsck e2fsprogs" "/usr/bin/fio fio"
	"/usr/sbin/blkdiscard util-linux" "/usr/sbin/fstrim util-linux" "/usr/sbin/sfdisk fdisk"
	"/usr/bin/fallocate util-linux" "/usr/bin/sha256sum coreutils" "/sbin/blockdev util-linux"
	"/bin/dd coreutils"
)

apt_updated=
apt_install() {
	log "installing $*"
	if [ -z "$apt_updated" ]; then
		apt-get install -y --no-install-recommends "$@" >&2 && return 0
		apt-get update >&2
		apt_updated=1
	fi
	apt-get install -y --no-install-recommends "$@" >&2
}

need_pkgs=()
# The guest needs the static busybox (ldd fails on a static binary).
if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then
	need_pkgs+=(busybox-static)
fi
command -v cpio >/dev/null || need_pkgs+=(cpio)
command -v strings >/dev/null || need_pkgs+=(binutils)
command -v xz >/dev/null || need_pkgs+=(xz-utils)
command -v zstd >/dev/null || need_pkgs+=(zstd)
for t in "${host_tools[@]}"; do
	set -- $t
	[ -x "$1" ] || need_pkgs+=("$2")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
	apt_install $(printf '%s\n' "${need_pkgs[@]}" | sort -u)
fi

go=$(command -v go || echo /usr/local/go/bin/go)

# Kernel: the distribution's current cloud kernel (what its linux-image-cloud-amd64 metapackage
# depends on) unless pinned. Not the highest version apt lists: Debian 12 also carries a 6.12 LTS
# kernel beside its own 6.1, and that one oopsed once under TCG in CI (a NULL elevator in the
# block layer during fstrim, the back-end answering every request) where 6.1, the kernel
# PLATFORM.md verified, runs the same tests clean. Without the metapackage: the newest listed.
kpkg=${THINBLK_KERNEL_PKG:-}
if [ -z "$kpkg" ]; then
	distro_kernel() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'; }
	list_kernels() { apt-cache search --names-only '^linux-image-[0-9].*-cloud-amd64$' | awk '{print $1}'; }
	kpkg=$(distro_kernel)
	kl=$(list_kernels)
	if [ -z "$kpkg" ] && [ -z "$kl" ]; then
		apt-get update >&2
		kpkg=$(distro_kernel)
		kl=$(list_kernels)
	fi
	[ -n "$kpkg" ] || kpkg=$(echo "$kl" | sort -V | tail -1)
	[ -n "$kpkg" ] || { log "no linux-image-*-cloud-amd64 package found by apt-cache"; exit 1; }
fi

# Input hash: everything that changes the image.
hash_inputs() {
	{
		cat "${BASH_SOURCE[0]}"
		echo "$kpkg"
		(cd "$repo" && find cmd/thinblk-agent guesttests/agentproto -name '*.go' ! -name '*_test.go' -type f 2>/dev/null | sort | xargs cat)
		cat "$repo/go.mod" "$repo/go.sum"
		for t in "${host_tools[@]}"; do
			set -- $t
			stat -Lc '%n %s %Y' "$1"
		done
		stat -Lc '%n %s %Y' /bin/busybox
	} | sha256sum | awk '{print $1}'
}
stamp=$(hash_inputs)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio.gz" ]; then
	log "up to date ($kpkg) in $out"
	exit 0
fi
log "building ($kpkg) into $out"

# Fetch and unpack the kernel package (kept in the cache across builds).
kdir=$cache/$kpkg
if [ ! -d "$kdir/boot" ]; then
	rm -rf "$kdir" "$kdir.tmp" "$cache/dl"
	mkdir -p "$cache/dl"
	(cd "$cache/dl" && apt-get download "$kpkg" >&2 2>"$cache/dl/log") || {
		apt-get update >&2
		(cd "$cache/dl" && apt-get download "$kpkg" >&2)
	}
	dpkg -x "$cache"/dl/*.deb "$kdir.tmp"
	mv "$kdir.tmp" "$kdir"
	rm -rf "$cache/dl"
fi
kver=$(ls "$kdir/lib/modules" | head -1)
moddir=$kdir/lib/modules/$kver

work=$(mktemp -d "$out/root.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,mnt,root,run,lib/modules,usr/bin,usr/sbin}

# Modules: decompress on the host (no modprobe there), order deps first.
declare -A mod_done=()
load_order=()
find_module() {
	local n=$1 alt=${1//_/-} alt2=${1//-/_}
	find "$moddir/kernel" \( -name "$n.ko*" -o -name "$alt.ko*" -o -name "$alt2.ko*" \) -print -quit
}
module_text() {
	case "$1" in
	*.xz) xz -dc "$1" ;;
	*.zst) zstd -qdc "$1" ;;
	*.gz) gzip -dc "$1" ;;
	*) cat "$1" ;;
	esac
}
add_module() {
	local name=$1 f deps d
	[ -n "${mod_done[$name]:-}" ] && return 0
	mod_done[$name]=1
	f=$(find_module "$name")
	if [ -z "$f" ]; then
		if grep -qE "/(${name}|${name//-/_}|${name//_/-})\.ko$" "$moddir/modules.builtin"; then
			return 0
		fi
		log "module $name: neither a module nor built in ($kver)"
		exit 1
	fi
	module_text "$f" >"$work/m.ko"
	deps=$(strings "$work/m.ko" | sed -n 's/^depends=//p' | head -1)
	for d in ${deps//,/ }; do
		add_module "$d"
	done
	module_text "$f" >"$root/lib/modules/$name.ko"
	load_order+=("$name")
}
for m in "${want_modules[@]}"; do
	add_module "$m"
done
printf '%s\n' "${load_order[@]}" >"$root/etc/modules.order"

# Busybox userland.
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
	[ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

# Host tools and their libraries, at the paths ldd reports.
copy_with_libs() {
	local bin=$1 dest=$2 lib
	mkdir -p "$root$(dirname "$dest")"
	cp -L "$bin" "$root$dest"
	for lib in $(ldd "$bin" 2>/dev/null | grep -oE '/[^ ]+\.so[^ ]*'); do
		if [ ! -e "$root$lib" ]; then
			mkdir -p "$root$(dirname "$lib")"
			cp -L "$lib" "$root$lib"
		fi
	done
}
for t in "${host_tools[@]}"; do
	set -- $t
	# Tools take precedence over busybox applets of the same name.
	rm -f "$root/bin/$(basename "$1")"
	copy_with_libs "$1" "/usr/sbin/$(basename "$1")"
done
# /bin/sh is the host's dash, not busybox ash: ash runs its own applets before PATH, so a
# script's blkdiscard or fstrim would be busybox's reduced one instead of util-linux's.
rm -f "$root/bin/sh"
copy_with_libs /bin/dash /bin/sh
[ -e "$root/lib64/ld-linux-x86-64.so.2" ] || copy_with_libs /lib64/ld-linux-x86-64.so.2 /lib64/ld-linux-x86-64.so.2
# mke2fs reads its defaults from here; without it ext4 gets odd defaults.
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"

# The agent, static.
(cd "$repo" && CGO_ENABLED=0 GOFLAGS=-trimpath "$go" build -ldflags='-s -w' -o "$root/sbin/thinblk-agent" ./cmd/thinblk-agent)

echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"
touch "$root/etc/mtab"

cat >"$root/init" <<'EOF'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ln -sf /proc/mounts /etc/mtab
for m in $(cat /etc/modules.order); do
	insmod /lib/modules/$m.ko || echo "thinblk-init: insmod $m failed"
done
# virtio-serial ports get /dev/virtio-ports/NAME links from udev elsewhere; make them here.
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
	[ -e "$p/name" ] && ln -sf "/dev/${p##*/}" "/dev/virtio-ports/$(cat "$p/name")"
done
echo "thinblk-init: modules loaded, starting agent"
/sbin/thinblk-agent
echo "thinblk-init: agent exited ($?), powering off"
sync
poweroff -f
EOF
chmod +x "$root/init"

(cd "$root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -1 >"$work/initramfs.cpio.gz")
cp "$kdir/boot/vmlinuz-$kver" "$work/vmlinuz"
mv "$work/vmlinuz" "$out/vmlinuz"
mv "$work/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
echo "$kver" >"$out/kernel-version"
echo "$stamp" >"$out/stamp"
log "done: $out/vmlinuz $out/initramfs.cpio.gz ($(du -h "$out/initramfs.cpio.gz" | cut -f1), kernel $kver, modules: ${load_order[*]})"
