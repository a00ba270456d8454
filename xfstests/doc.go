// Package xfstests runs xfstests (fstests) in QEMU guests whose TEST and SCRATCH disks are
// thinblk volumes, and the same tests on qemu-storage-daemon for comparison. The command is
// cmd/thinblk-xfstests; this package is its logic, tested without xfstests against the fake
// check in testdata/fakexfstests.
//
// The pieces:
//
//   - Parser reads check's output as it streams (partial lines too: the running test is
//     known before its line ends) and yields a Result per test: pass with check's seconds,
//     notrun with xfstests' reason, fail with the first failure line and the diff excerpt.
//   - Config renders the local.config passed to check as HOST_OPTIONS (the user's tree is not
//     modified); RESULT_BASE points into the run directory.
//   - Run drives a Launcher session by session: a test that runs past the time limit gets its
//     session killed (for a guest: QEMU), is reported failed, and the rest goes on in a new
//     session (or the run stops, StopOnHang). Failures' .out.bad, .full and .dmesg are copied
//     to OUTDIR/failures.
//   - LocalLauncher runs check as a host process (the runner's own tests); VMLauncher boots
//     the guest built by images/xfstests-image.sh: Debian's non-cloud kernel, the host root
//     over 9p read-only under a tmpfs overlay, the run directory over 9p read-write at its
//     host path, the kernel's modules bind-mounted at /lib/modules. Its generated script
//     (PID 1) mounts what xfstests needs (devpts, tmpfs /tmp and /run, debugfs, /dev/fd),
//     adds the fsgqa users, starts udev (dm tests need /dev/mapper nodes), finds the disks by
//     PCI slot (0x10 TEST, 0x11 SCRATCH; on thinblk the serial must be the volume name),
//     makes the TEST filesystem, runs check and powers off.
//   - StartDisks makes the storage: a thin pool whose real size is below the two volumes'
//     virtual sizes, served by `thinblk serve` with 2 queues, or two sparse raw files of the
//     same virtual size behind qemu-storage-daemon, or (kind "file") the same files served by
//     QEMU's own virtio-blk-pci, with no vhost-user back-end at all. After the thinblk run, CheckPool runs
//     `thinblk check` and checks the accounting of `thinblk status --json`.
//   - Report holds every back-end's run and the tests whose outcomes differ; it writes JSON,
//     JUnit XML (expected failures as skipped) and the terminal table. OK is false on any
//     failure not in the expected-failures file, an unclean pool, a run error, or a test
//     thinblk fails that the reference does not.
//
// Lists kept here: lists/default.txt (the default set, one reason per test) and
// expected/FSTYP.txt (failures outside thinblk, each with reason and evidence).
//
// Tests: `go test ./xfstests` runs the runner against the fake check, and TestGuestFakeCheck
// boots the real guest on both back-ends with the fake check in place of xfstests (needs
// qemu-system-x86_64 and qemu-storage-daemon; THINBLK_SKIP_VM=1 opts out; THINBLK_GUEST_KEEP=1
// keeps its run directory under _build/xfstests-vmtest).
package xfstests
