// Command thinblk-xfstests runs xfstests (fstests) in QEMU guests whose TEST and SCRATCH
// disks are thinblk volumes, and the same tests on qemu-storage-daemon for comparison.
//
// Usage:
//
//	thinblk-xfstests --xfstests DIR [--fstyp xfs|ext4] [--tests "generic/001 xfs/011" | --group quick]
//	                 [--backend thinblk|qsd|both] [--out RUNDIR] [flags]
//
// DIR is a built upstream xfstests tree (thinblk neither ships nor builds it). The guest runs
// the host's own userland: the host root is shared read-only over 9p under a tmpfs overlay
// (Debian's non-cloud kernel, built by images/xfstests-image.sh), the run directory is shared
// read-write. TEST and SCRATCH are two volumes of one over-committed thin pool served by
// `thinblk serve` with 2 queues (for qsd: two sparse raw files of the same virtual size); the
// guest finds them by PCI slot and checks thinblk's serials. Without --tests or --group the
// curated default list (xfstests/lists/default.txt, one reason per test) runs.
//
// Each finished test is printed as it ends. A test running longer than --test-timeout is
// killed with its guest, reported failed, and the run goes on in a new guest (or stops with
// --stop-on-hang). Results land in RUNDIR: report.json, junit.xml, summary.txt, and per
// back-end check.out (check's output), results/ (check's RESULT_BASE) and failures/ (each
// failure's .out.bad, .full and .dmesg), session*/ (guest script, console and QEMU logs).
// One run at a time per run directory (RUNDIR/.lock).
// After the thinblk run the pool must pass `thinblk check` and have consistent accounting.
//
// Exit status: 0 when every failure is listed in the expected-failures file
// (xfstests/expected/FSTYP.txt, or --expected), no test failed on thinblk that passed on the
// reference, and the pool is clean; 1 otherwise; 2 for usage errors.
//
// Flags:
//
//	--xfstests DIR         built xfstests tree (default $XFSTESTS_DIR)
//	--fstyp T              xfs or ext4 (default xfs)
//	--tests "A B"          tests to run (space or comma separated)
//	--group G              an xfstests group (from the tree's tests/*/group.list)
//	--backend B            thinblk, qsd, both (default: thinblk,qsd), file (QEMU's own
//	                       virtio-blk-pci on sparse raw files, no vhost-user), or a list: thinblk,qsd,file
//	--out DIR              run directory (default _build/xfstests/FSTYP-YYYYmmdd-HHMMSS)
//	--expected FILE        expected-failures file (default: the repository's for FSTYP)
//	--test-timeout D       longest time one test may run (default 10m)
//	--stop-on-hang         stop the run after a hung test instead of going on
//	--repeat N             run the tests N times on each back-end, each time on new disks in a
//	                       new guest, the back-ends taking turns; the summary, report.json
//	                       and summary.txt give each test's failure rate per back-end, and
//	                       each repetition's files are under RUNDIR/BACKEND/repN
//	--volume-size S        virtual size of TEST and SCRATCH (default 10G)
//	--pool-size S          real size of the thin pool (default 12G: less than 2 volumes)
//	--queues N             virtqueues per disk (default 2)
//	--memory MB, --cpus N  guest size (default 2048, 2)
//	--thinblk BIN          thinblk binary (default: built from this checkout)
//	--install-packages     apt-get install the Debian packages the run needs, if missing
//	--list                 print the default list with its reasons and exit
//	-v                     log QEMU command lines and set-up steps to stderr
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/thinblk/thinblk/guesttests"
	"github.com/thinblk/thinblk/xfstests"
)

// HostPackages are the Debian packages the run needs on the host: QEMU and the guest image's
// tools, and what xfstests uses at run time in the guest (the guest runs the host userland).
var HostPackages = []string{
	"qemu-system-x86", "qemu-utils", "busybox-static", "cpio", "kmod", "udev", "binutils",
	"xfsprogs", "e2fsprogs", "util-linux", "fdisk", "fio", "attr", "acl", "quota", "bc",
	"dmsetup", "psmisc", "dbench", "gawk", "perl", "python3", "sqlite3", "libaio1",
	"liburing2", "uuid-runtime", "thin-provisioning-tools", "xfsdump", "indent", "iproute2",
	"passwd", "procps", "file", "libcap2-bin", "lvm2",
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("thinblk-xfstests", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		dir         = fs.String("xfstests", os.Getenv("XFSTESTS_DIR"), "built xfstests tree")
		fstyp       = fs.String("fstyp", "xfs", "xfs or ext4")
		tests       = fs.String("tests", "", "tests to run, space or comma separated")
		group       = fs.String("group", "", "xfstests group to run")
		backend     = fs.String("backend", "both", "thinblk, qsd, both (thinblk,qsd) or file (QEMU's own virtio-blk on a raw file), or a comma-separated list")
		out         = fs.String("out", "", "run directory (default _build/xfstests/FSTYP-TIME)")
		expected    = fs.String("expected", "", "expected-failures file (default: the repository's for FSTYP)")
		testTimeout = fs.Duration("test-timeout", 10*time.Minute, "longest time one test may run")
		stopOnHang  = fs.Bool("stop-on-hang", false, "stop after a hung test instead of going on")
		repeat      = fs.Int("repeat", 1, "run the tests N times on each back-end (new disks and guest each time) and print failure rates")
		volSize     = fs.String("volume-size", "10G", "virtual size of TEST and SCRATCH")
		poolSize    = fs.String("pool-size", "12G", "real size of the thin pool")
		queues      = fs.Int("queues", 2, "virtqueues per disk")
		memory      = fs.Int("memory", 2048, "guest memory in MiB")
		cpus        = fs.Int("cpus", 2, "guest vCPUs")
		thinblkBin  = fs.String("thinblk", "", "thinblk binary (default: built from this checkout)")
		install     = fs.Bool("install-packages", false, "apt-get install missing Debian packages the run needs")
		list        = fs.Bool("list", false, "print the default list with reasons and exit")
		verbose     = fs.Bool("v", false, "log set-up steps and QEMU command lines to stderr")
	)
	fs.Usage = func() {
		fmt.Fprintln(stderr, `usage: thinblk-xfstests --xfstests DIR [--fstyp xfs|ext4] [--tests "generic/001 xfs/011" | --group G] [--backend thinblk|qsd|both] [--out RUNDIR]`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	usage := func(msg string) int {
		fmt.Fprintln(stderr, "thinblk-xfstests: "+msg)
		fs.Usage()
		return 2
	}
	if fs.NArg() > 0 {
		return usage("unexpected arguments: " + strings.Join(fs.Args(), " "))
	}
	if *fstyp != "xfs" && *fstyp != "ext4" {
		return usage("--fstyp: want xfs or ext4")
	}
	if *repeat < 1 {
		return usage("--repeat: want 1 or more")
	}
	if *list {
		l, err := xfstests.DefaultList(*fstyp)
		if err != nil {
			fmt.Fprintln(stderr, "thinblk-xfstests:", err)
			return 1
		}
		for _, e := range l {
			fmt.Fprintf(stdout, "%-12s %s\n", e.Test, e.Reason)
		}
		return 0
	}
	var backends []string
	for _, b := range strings.Split(*backend, ",") {
		switch b {
		case "both":
			backends = append(backends, "thinblk", "qsd")
		case "thinblk", "qsd", "file":
			backends = append(backends, b)
		default:
			return usage("--backend: want thinblk, qsd, file or both, or a comma-separated list")
		}
	}
	if *tests != "" && *group != "" {
		return usage("--tests and --group exclude each other")
	}
	if *dir == "" {
		return usage("--xfstests DIR (or $XFSTESTS_DIR) is required: a built upstream xfstests tree")
	}
	xdir, err := filepath.Abs(*dir)
	if err == nil {
		_, err = os.Stat(filepath.Join(xdir, "check"))
	}
	if err != nil {
		return usage(fmt.Sprintf("--xfstests %s: no check script there: %v", *dir, err))
	}
	logf := func(string, ...any) {}
	if *verbose {
		logf = func(format string, a ...any) { fmt.Fprintf(stderr, "thinblk-xfstests: "+format+"\n", a...) }
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if *install {
		if err := installPackages(ctx, stderr); err != nil {
			fmt.Fprintln(stderr, "thinblk-xfstests:", err)
			return 1
		}
	}
	var selected []string
	switch {
	case *tests != "":
		selected = strings.FieldsFunc(*tests, func(r rune) bool { return r == ' ' || r == ',' || r == '\t' || r == '\n' })
	case *group != "":
		selected, err = xfstests.ResolveGroup(xdir, *fstyp, *group)
		if err != nil {
			fmt.Fprintln(stderr, "thinblk-xfstests:", err)
			return 1
		}
	default:
		l, err := xfstests.DefaultList(*fstyp)
		if err != nil {
			fmt.Fprintln(stderr, "thinblk-xfstests:", err)
			return 1
		}
		for _, e := range l {
			selected = append(selected, e.Test)
		}
	}
	exp, err := xfstests.LoadExpected(*fstyp, *expected)
	if err != nil {
		fmt.Fprintln(stderr, "thinblk-xfstests:", err)
		return 1
	}
	root, err := guesttests.RepoRoot()
	if err != nil {
		fmt.Fprintln(stderr, "thinblk-xfstests: run it from a thinblk checkout:", err)
		return 1
	}
	build := guesttests.BuildDir(root)
	if *out == "" {
		*out = filepath.Join(build, "xfstests", *fstyp+"-"+time.Now().UTC().Format("20060102-150405"))
	}
	outDir, err := filepath.Abs(*out)
	if err != nil {
		fmt.Fprintln(stderr, "thinblk-xfstests:", err)
		return 1
	}
	if strings.ContainsAny(outDir, " \t\n,") {
		return usage("--out: the run directory's path may not contain spaces or commas (it goes on the guest's kernel command line)")
	}
	// Two runs in one directory would start two back-ends on the same socket paths; the second
	// one's serve fails while its guest reaches the first one's disks.
	unlock, err := lockRunDir(outDir)
	if err != nil {
		fmt.Fprintln(stderr, "thinblk-xfstests:", err)
		return 1
	}
	defer unlock()
	bin := *thinblkBin
	if bin == "" && contains(backends, "thinblk") {
		logf("building thinblk")
		if bin, err = guesttests.BuildThinblk(ctx, root); err != nil {
			fmt.Fprintln(stderr, "thinblk-xfstests:", err)
			return 1
		}
	}
	logf("building the guest image")
	im, err := xfstests.EnsureGuestImage(ctx, root, filepath.Join(build, "xfstests-image"))
	if err != nil {
		fmt.Fprintln(stderr, "thinblk-xfstests:", err)
		return 1
	}
	times := ""
	if *repeat > 1 {
		times = fmt.Sprintf(", %d times each (back-ends taking turns)", *repeat)
	}
	fmt.Fprintf(stdout, "thinblk-xfstests: %d %s tests on %s%s; results in %s\n", len(selected), *fstyp, strings.Join(backends, " and "), times, outDir)
	rep := xfstests.RunSuite(ctx, xfstests.SuiteOptions{
		XfstestsDir: xdir, OutDir: outDir, FSTYP: *fstyp, Tests: selected, Backends: backends,
		ThinblkBin: bin, Image: im, VolumeSize: *volSize, PoolSize: *poolSize, Queues: *queues,
		MemoryMB: *memory, CPUs: *cpus, TestTimeout: *testTimeout, StopOnHang: *stopOnHang,
		Expected: exp, Repeat: *repeat, Progress: stdout, Logf: logf,
	})
	return finish(rep, outDir, stdout, stderr)
}

// finish writes the reports and prints the summary; it returns the exit status.
func finish(rep *xfstests.Report, outDir string, stdout, stderr io.Writer) int {
	status := 0
	if err := rep.WriteJSON(filepath.Join(outDir, "report.json")); err != nil {
		fmt.Fprintln(stderr, "thinblk-xfstests:", err)
		status = 1
	}
	if err := rep.WriteJUnit(filepath.Join(outDir, "junit.xml")); err != nil {
		fmt.Fprintln(stderr, "thinblk-xfstests:", err)
		status = 1
	}
	var sb strings.Builder
	rep.WriteTable(&sb)
	_ = os.WriteFile(filepath.Join(outDir, "summary.txt"), []byte(sb.String()), 0o644)
	fmt.Fprint(stdout, "\n"+sb.String())
	fmt.Fprintf(stdout, "reports: %s/{report.json,junit.xml,summary.txt}\n", outDir)
	if !rep.OK() {
		status = 1
	}
	return status
}

// lockRunDir creates dir and holds an exclusive lock on dir/.lock until the returned func runs.
func lockRunDir(dir string) (func(), error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("run directory %s is in use by another thinblk-xfstests run: %w", dir, err)
	}
	return func() { f.Close() }, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// installPackages installs the HostPackages dpkg does not list as installed.
func installPackages(ctx context.Context, stderr io.Writer) error {
	var missing []string
	for _, p := range HostPackages {
		out, err := exec.CommandContext(ctx, "dpkg-query", "-W", "-f=${Status}", p).Output()
		if err != nil || !strings.Contains(string(out), "install ok installed") {
			missing = append(missing, p)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	fmt.Fprintf(stderr, "thinblk-xfstests: installing %s\n", strings.Join(missing, " "))
	inst := func() error {
		cmd := exec.CommandContext(ctx, "apt-get", append([]string{"install", "-y", "--no-install-recommends"}, missing...)...)
		cmd.Stdout, cmd.Stderr = stderr, stderr
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		return cmd.Run()
	}
	if err := inst(); err != nil {
		upd := exec.CommandContext(ctx, "apt-get", "update")
		upd.Stdout, upd.Stderr = stderr, stderr
		if err := upd.Run(); err != nil {
			return fmt.Errorf("apt-get update: %w", err)
		}
		if err := inst(); err != nil {
			return fmt.Errorf("apt-get install %s: %w", strings.Join(missing, " "), err)
		}
	}
	return nil
}
