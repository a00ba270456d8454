#!/usr/bin/env bash
# Installs the host packages thinblk's build, tests, demo and benchmark use,
# only those that are missing, so that `make test` and `make demo` work on a
# brand-new Debian 12 machine. Needs root (or sudo) for apt-get.
set -euo pipefail

# command -> Debian package that provides it
declare -A need=(
	[qemu-system-x86_64]=qemu-system-x86
	[qemu-storage-daemon]=qemu-system-x86
	[qemu-img]=qemu-utils
	[cpio]=cpio
	[fio]=fio
	[mkfs.xfs]=xfsprogs
	[xfs_repair]=xfsprogs
	[mkfs.ext4]=e2fsprogs
	[e2fsck]=e2fsprogs
	[blkdiscard]=util-linux
	[fstrim]=util-linux
	[sfdisk]=fdisk
	[qemu-ga]=qemu-guest-agent # the guest agent for vm-snapshot --freeze tests (copied into the initramfs)
	[libvirtd]=libvirt-daemon-system # TestGuestLibvirt runs a private libvirtd (about 17 s to install)
	[virsh]=libvirt-clients
	[systemd-analyze]=systemd # the service unit's check (systemd-analyze verify, security)
	[systemd-nspawn]=systemd-container # boots systemd as a container's PID 1 to run the unit
)
missing=()
for cmd in "${!need[@]}"; do
	command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/sbin:/usr/sbin" command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
# busybox-static ships a file, not a distinct command name.
[ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' || missing+=(busybox-static)
[ -x /bin/busybox ] || missing+=(busybox-static)

if [ ${#missing[@]} -eq 0 ]; then
	exit 0
fi
mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "install-deps: installing ${pkgs[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}" file >/dev/null
