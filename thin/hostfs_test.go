package thin

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Tests on a real, small host file system (a tmpfs of limited size): the
// provisioning promise must hold when another file fills the host.

// mountSmallFS mounts a tmpfs of size bytes on a new directory. Mounting
// needs root (CI runs as root); elsewhere the test is skipped, and says so.
func mountSmallFS(t *testing.T, size int64) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a small tmpfs needs root")
	}
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d", size)); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	return dir
}

// mountSmallExt4 loop-mounts a new ext4 file system of size bytes (no
// reserved blocks) on a new directory: unlike tmpfs it has FIEMAP, so
// Check sees what is allocated on the host, and a failed fallocate keeps
// what it allocated. Root only, like mountSmallFS.
func mountSmallExt4(t *testing.T, size int64) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("loop-mounting an ext4 image needs root")
	}
	img := filepath.Join(t.TempDir(), "host.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, c := range [][]string{{"mkfs.ext4", "-q", "-F", "-b", "4096", "-m", "0", img}, {"mount", "-o", "loop", img, dir}} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", c, err, out)
		}
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	return dir
}

// metaElsewhere moves a new pool's metadata directory off the small host
// file system (a symlink stays in its place): these tests are about the
// data file, and Pebble's commit fails fatally (it panics) when its log
// cannot grow on a full file system, a separate problem.
func metaElsewhere(t *testing.T, dir string) {
	t.Helper()
	meta := filepath.Join(dir, metaName)
	dst := filepath.Join(t.TempDir(), metaName)
	if err := os.CopyFS(dst, os.DirFS(meta)); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(meta); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(dst, meta); err != nil {
		t.Fatal(err)
	}
}

// hostFiller fills a host file system with a file of its own and frees
// that space again, like another tenant of the host.
type hostFiller struct {
	t    *testing.T
	path string
}

// fill writes until the host file system is full (ENOSPC).
func (h *hostFiller) fill() {
	h.t.Helper()
	f, err := os.OpenFile(h.path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		h.t.Fatal(err)
	}
	defer f.Close()
	buf := bytes.Repeat([]byte{0xee}, 64<<10)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, unix.ENOSPC) {
				h.t.Fatalf("fill host: %v", err)
			}
			break
		}
	}
	// Small writes to use up the last partial pages.
	for {
		if _, err := f.Write(buf[:4096]); err != nil {
			break
		}
	}
	var st unix.Statfs_t
	if err := unix.Statfs(h.path, &st); err != nil {
		h.t.Fatal(err)
	}
	// Bavail: ext4 keeps reserved clusters (for its own metadata) that
	// count as free blocks but no file may take.
	if st.Bavail != 0 {
		h.t.Fatalf("host not full after filling: %d blocks available", st.Bavail)
	}
}

// free gives n bytes back to the host.
func (h *hostFiller) free(n int64) {
	h.t.Helper()
	fi, err := os.Stat(h.path)
	if err != nil {
		h.t.Fatal(err)
	}
	if err := os.Truncate(h.path, max(0, fi.Size()-n)); err != nil {
		h.t.Fatal(err)
	}
}

// writeVerify writes a pattern to every 4 KiB block of [off, off+n) of v
// and reads it back: the promise says none of it may fail.
func writeVerify(t *testing.T, v *Volume, off, n int64, seed byte) {
	t.Helper()
	for pos := off; pos < off+n; pos += 4 * kib {
		want := pattern(4*kib, seed+byte(pos>>12))
		if err := v.WriteAt([][]byte{want}, pos); err != nil {
			t.Fatalf("write %s at %d (promised space, host full): %v", v.Name(), pos, err)
		}
		if got := read(t, v, pos, 4*kib); !bytes.Equal(got, want) {
			t.Fatalf("read back %s at %d: wrong data", v.Name(), pos)
		}
	}
}

func openHostPool(t *testing.T, mount func(*testing.T, int64) string, fsSize int64, poolBlocks uint64, co CreateOptions) (*Pool, *hostFiller) {
	t.Helper()
	mnt := mount(t, fsSize)
	dir := filepath.Join(mnt, "pool")
	co.BlockSize = 4 * kib
	co.Size = poolBlocks * 4 * kib
	if err := Create(dir, co); err != nil {
		t.Fatal(err)
	}
	metaElsewhere(t, dir)
	p, err := Open(dir, quietOpts())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p, &hostFiller{t: t, path: filepath.Join(mnt, "other-tenant")}
}

// sameSpace compares what a refused operation must not change: the pool's
// space and the data file's on the host (what a failed fallocate took is
// given back).
func sameSpace(t *testing.T, before, after Status) {
	t.Helper()
	b, a := before.Pool, after.Pool
	// The data file's host usage may grow by the file system's own
	// metadata: on ext4 a hole punched back splits an extent, and a file
	// with more extents than its inode holds gets an extent tree block.
	const fsMeta = 16 << 10
	if b.AllocatedBytes != a.AllocatedBytes || b.ReservedBytes != a.ReservedBytes || b.FreeBytes != a.FreeBytes ||
		a.DataHostBytes < b.DataHostBytes || a.DataHostBytes > b.DataHostBytes+fsMeta || fmt.Sprint(before.Volumes) != fmt.Sprint(after.Volumes) {
		t.Fatalf("a refused operation changed the pool:\n%+v\n%+v", before, after)
	}
}

// TestHostFullKeepsPromise: a pool over-committed on a 24 MiB tmpfs and on
// a 24 MiB ext4. What was provisioned, what a snapshot reserved for
// copy-on-write and what reserve mode reserved can all be written after
// another file filled the host; a provision, a snapshot and reserve mode
// on that the host cannot back are refused up front and change nothing
// (the pool's space, and on the host the data file's); an unprovisioned
// write on the full host fails with ErrNoSpace (the error policy) and
// works again once the host has space. On ext4 Check also sees that
// spares and provisioned blocks are allocated on the host.
func TestHostFullKeepsPromise(t *testing.T) {
	t.Run("tmpfs", func(t *testing.T) { testHostFullKeepsPromise(t, mountSmallFS) })
	t.Run("ext4", func(t *testing.T) { testHostFullKeepsPromise(t, mountSmallExt4) })
}

func testHostFullKeepsPromise(t *testing.T, mount func(*testing.T, int64) string) {
	p, host := openHostPool(t, mount, 24<<20, 8192, CreateOptions{}) // 32 MiB pool
	v := mustVolume(t, p, "v", 4<<20)
	u := mustVolume(t, p, "u", 4<<20)
	w := mustVolume(t, p, "w", 1<<20)
	// 1 MiB written and then provisioned, 1 MiB provisioned only.
	write(t, v, 0, pattern(1<<20, 1))
	if err := v.WriteZeroes(0, 2<<20, false); err != nil {
		t.Fatal(err)
	}
	if err := p.SetReserveMode("w", true); err != nil {
		t.Fatal(err)
	}
	checkAccounting(t, p)
	host.fill()

	writeVerify(t, v, 0, 2<<20, 10)
	writeVerify(t, w, 0, 1<<20, 20)
	// Unprovisioned space on a full host follows the error policy.
	err := u.WriteAt([][]byte{pattern(64*kib, 3)}, 0)
	if !errors.Is(err, ErrNoSpace) || !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("unprovisioned write on a full host: %v, want ErrNoSpace (host ENOSPC)", err)
	}
	// What the host cannot back is refused up front. The host has a
	// little space, less than any of these needs: what a fallocate took
	// before it failed is given back.
	host.free(256 << 10)
	before := p.Status()
	if err := u.WriteZeroes(0, 1<<20, false); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("provisioning 1 MiB on a host with 256 KiB free: %v, want ErrNoSpace", err)
	}
	sameSpace(t, before, p.Status())
	if err := p.CreateSnapshot("v", "s", false); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("snapshot needing host space on a full host: %v, want ErrNoSpace", err)
	}
	sameSpace(t, before, p.Status())
	if err := p.SetReserveMode("u", true); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("reserve mode on a full host: %v, want ErrNoSpace", err)
	}
	sameSpace(t, before, p.Status())
	if len(p.Volumes()) != 3 {
		t.Fatalf("volumes %v", p.Volumes())
	}
	checkAccounting(t, p)

	// The host frees space: the snapshot reserves its copies on the host,
	// the host fills again, and every provisioned block is still writable
	// (copy on write from the spares); the snapshot keeps the old data.
	host.free(4 << 20)
	if err := u.WriteAt([][]byte{pattern(64*kib, 3)}, 0); err != nil {
		t.Fatalf("unprovisioned write after the host freed space: %v", err)
	}
	if err := p.CreateSnapshot("v", "s", false); err != nil {
		t.Fatal(err)
	}
	host.fill()
	writeVerify(t, v, 0, 2<<20, 30)
	s, _ := p.Volume("s")
	for pos := int64(0); pos < 2<<20; pos += 4 * kib {
		if got := read(t, s, pos, 4*kib); !bytes.Equal(got, pattern(4*kib, 10+byte(pos>>12))) {
			t.Fatalf("snapshot changed at %d", pos)
		}
	}
	checkAccounting(t, p)
}

// TestHostFullQueuePolicy: with the queue policy an unprovisioned write on
// a full host waits, and completes once the host has space again, without
// a restart.
func TestHostFullQueuePolicy(t *testing.T) {
	t.Run("tmpfs", func(t *testing.T) { testHostFullQueuePolicy(t, mountSmallFS) })
	t.Run("ext4", func(t *testing.T) { testHostFullQueuePolicy(t, mountSmallExt4) })
}

func testHostFullQueuePolicy(t *testing.T, mount func(*testing.T, int64) string) {
	p, host := openHostPool(t, mount, 16<<20, 8192, CreateOptions{NoSpace: NoSpaceQueue, NoSpaceTimeout: time.Minute, LowWater: 0.1})
	u := mustVolume(t, p, "u", 4<<20)
	var events []Event
	evc := make(chan Event, 16)
	stop := p.Watch(func(ev Event) {
		if ev.Host {
			evc <- ev
		}
	})
	defer stop()
	host.fill()
	p.noteHostSpace() // the background ticker's look (off in tests)
	st := p.Status().Pool
	if st.HostFreeBytes >= 4*kib || !st.HostBelowLowWater || st.HostUnbackedBytes != st.FreeBytes {
		t.Fatalf("status on a full host: %+v", st)
	}
	done := make(chan error, 1)
	go func() { done <- u.WriteAt([][]byte{pattern(256*kib, 5)}, 0) }()
	select {
	case err := <-done:
		t.Fatalf("write on a full host with the queue policy returned at once: %v", err)
	case <-time.After(time.Second):
	}
	host.free(2 << 20)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("queued write after the host freed space: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("queued write did not resume after the host freed space")
	}
	if got := read(t, u, 0, 256*kib); !bytes.Equal(got, pattern(256*kib, 5)) {
		t.Fatal("queued write's data wrong")
	}
	host.free(8 << 20)
	p.noteHostSpace()
	for len(events) < 4 {
		select {
		case ev := <-evc:
			events = append(events, ev)
		case <-time.After(5 * time.Second):
			t.Fatalf("host space events: %+v, want four", events)
		}
	}
	if events[0].Type != LowWater || events[1].Type != OutOfSpace || events[2].Type != SpaceAvailable || events[3].Type != AboveLowWater {
		t.Fatalf("host space events: %+v, want low-water, out-of-space, space-available, above-low-water", events)
	}
	checkAccounting(t, p)
}

// TestHostAllocatedFiemap: Check's probe of host allocation on the test
// directory's file system (ext4 here; fallocated extents are unwritten
// and must count).
func TestHostAllocatedFiemap(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	df, err := openOSDataFile(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer df.Close()
	d := df.(*osDataFile)
	if err := d.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	if _, err := d.hostAllocated(0, 4096); errors.Is(err, errors.ErrUnsupported) {
		t.Skipf("no FIEMAP on the test directory's file system: %v", err)
	}
	if err := d.Allocate(128<<10, 64<<10); err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteAt(pattern(4096, 1), 512<<10); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		off, n int64
		want   bool
	}{{128 << 10, 64 << 10, true}, {132 << 10, 4 << 10, true}, {0, 4 << 10, false}, {128 << 10, 128 << 10, false},
		{120 << 10, 16 << 10, false}, {512 << 10, 4 << 10, true}} {
		got, err := d.hostAllocated(c.off, c.n)
		if err != nil || got != c.want {
			t.Errorf("hostAllocated(%d, %d) = %v, %v; want %v", c.off, c.n, got, err, c.want)
		}
	}
}

// TestCheckFindsUnbackedPromises: Check reports a provisioned block and a
// spare whose host space went away behind the pool's back.
func TestCheckFindsUnbackedPromises(t *testing.T) {
	p, _ := newPool(t, 64, CreateOptions{})
	d, ok := p.data.(*osDataFile)
	if !ok {
		t.Fatal("pool data file is not a file")
	}
	if _, err := d.hostAllocated(0, 4096); errors.Is(err, errors.ErrUnsupported) {
		t.Skipf("no FIEMAP on the test directory's file system: %v", err)
	}
	v := mustVolume(t, p, "v", 16*bs4k)
	write(t, v, 0, pattern(2*bs4k, 1))
	if err := v.WriteZeroes(0, 4*bs4k, false); err != nil {
		t.Fatal(err)
	}
	checkAccounting(t, p)
	p.mu.Lock()
	e, _, err := p.resolveLocked(v.st.rec.Layer, 0)
	spare, ok := p.spare.findSet(0)
	p.mu.Unlock()
	if err != nil || !e.Mapped() || !ok {
		t.Fatalf("entry %+v (%v), spare %v", e, err, ok)
	}
	for _, b := range []uint64{e.PBlock, spare} {
		if err := d.PunchHole(int64(b)*bs4k, bs4k); err != nil {
			t.Fatal(err)
		}
	}
	err = p.Check(nil)
	var ce *CheckError
	if !errors.As(err, &ce) || !strings.Contains(err.Error(), "1 spare blocks are not allocated on the host") ||
		!strings.Contains(err.Error(), "1 provisioned mapped blocks are not allocated on the host") {
		t.Fatalf("check after punching a provisioned block and a spare: %v %+v", err, ce)
	}
}

// TestHostReserveModeFillsHoles: a volume of 64 KiB blocks whose first
// writes covered 4 KiB of each (the rest of such a block is a hole on the
// host) goes into reserve mode; after the host fills up, every byte of the
// volume can still be written.
func TestHostReserveModeFillsHoles(t *testing.T) {
	mnt := mountSmallFS(t, 16<<20)
	dir := filepath.Join(mnt, "pool")
	if err := Create(dir, CreateOptions{Size: 32 << 20, BlockSize: 64 * kib}); err != nil {
		t.Fatal(err)
	}
	metaElsewhere(t, dir)
	p, err := Open(dir, quietOpts())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	v := mustVolume(t, p, "v", 2<<20)
	for off := int64(0); off < 1<<20; off += 64 * kib {
		write(t, v, off, pattern(4*kib, byte(off>>16)))
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := p.SetReserveMode("v", true); err != nil {
		t.Fatal(err)
	}
	host := &hostFiller{t: t, path: filepath.Join(mnt, "other-tenant")}
	host.fill()
	writeVerify(t, v, 0, 2<<20, 40)
	checkAccounting(t, p)
}

// TestPreallocatedPool: pool create --preallocate allocates the whole data
// file on a 24 MiB tmpfs; another file then fills the host, yet writes to
// unprovisioned space succeed, discards give nothing back to the host (no
// punching), and the flag survives a reopen. A preallocated pool larger
// than the host's free space is refused and leaves nothing behind.
func TestPreallocatedPool(t *testing.T) {
	mnt := mountSmallFS(t, 24<<20)
	dir := filepath.Join(mnt, "pool")
	if err := Create(dir, CreateOptions{Size: 16 << 20, BlockSize: 64 * kib, Preallocate: true}); err != nil {
		t.Fatal(err)
	}
	metaElsewhere(t, dir)
	p, err := Open(dir, quietOpts())
	if err != nil {
		t.Fatal(err)
	}
	st := p.Status().Pool
	if !st.Preallocated || st.DataHostBytes < 16<<20 || st.HostFreeBytes != 0 || st.HostUnbackedBytes != 0 {
		t.Fatalf("preallocated pool status: %+v", st)
	}
	host := &hostFiller{t: t, path: filepath.Join(mnt, "other-tenant")}
	host.fill()
	v := mustVolume(t, p, "v", 32<<20)
	writeVerify(t, v, 0, 8<<20, 50)
	if err := v.Discard(0, 8<<20); err != nil {
		t.Fatal(err)
	}
	checkAccounting(t, p)
	if got := p.Status().Pool.DataHostBytes; got < 16<<20 {
		t.Fatalf("a discard punched a preallocated pool: data file takes %d bytes", got)
	}
	writeVerify(t, v, 8<<20, 8<<20, 60)
	p.Close()
	if p, err = Open(dir, quietOpts()); err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if !p.Status().Pool.Preallocated {
		t.Fatal("preallocated flag lost on reopen")
	}
	checkAccounting(t, p)
	host.free(4 << 20)
	dir2 := filepath.Join(mnt, "big")
	if err := Create(dir2, CreateOptions{Size: 64 << 20, Preallocate: true}); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("preallocating 64 MiB on a host with 4 MiB free: %v, want ErrNoSpace", err)
	}
	if IsPool(dir2) {
		t.Fatal("a refused preallocated pool left its files")
	}
}

// TestDataOnBlockDevice: a pool whose data is a loop device over a file
// of old bytes. A partial first write never shows those bytes, a discard
// goes down to the device (the loop's file gives its space back to the
// host), the host space fields are empty (it cannot run out), and Check
// is clean.
func TestDataOnBlockDevice(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("loop devices need root")
	}
	backing := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(backing, bytes.Repeat([]byte{0xab}, 32<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "--find", "--show", backing).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	defer exec.Command("losetup", "-d", dev).Run()
	dir := filepath.Join(t.TempDir(), "pool")
	if err := Create(dir, CreateOptions{Size: 64 << 20, BlockSize: 64 * kib, DataDevice: dev}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("pool larger than its device: %v, want ErrInvalid", err)
	}
	if err := Create(dir, CreateOptions{Size: 16 << 20, BlockSize: 64 * kib, DataDevice: dev}); err != nil {
		t.Fatal(err)
	}
	p, err := Open(dir, quietOpts())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	st := p.Status().Pool
	if st.DataDevice != dev || st.HostFreeBytes != 0 || st.HostUnbackedBytes != 0 || st.Preallocated {
		t.Fatalf("status of a pool on %s: %+v", dev, st)
	}
	v := mustVolume(t, p, "v", 32<<20)
	write(t, v, 4096, pattern(512, 1))
	want := make([]byte, 64*kib)
	copy(want[4096:], pattern(512, 1))
	if got := read(t, v, 0, 64*kib); !bytes.Equal(got, want) {
		t.Fatal("a partial first write on a device shows the device's old bytes")
	}
	writeVerify(t, v, 64*kib, 8<<20, 70)
	if err := v.WriteZeroes(16<<20, 1<<20, false); err != nil {
		t.Fatal(err)
	}
	var before unix.Stat_t
	unix.Stat(backing, &before)
	if err := v.Discard(0, 9<<20); err != nil {
		t.Fatal(err)
	}
	checkAccounting(t, p)
	var after unix.Stat_t
	unix.Stat(backing, &after)
	if after.Blocks*512 > before.Blocks*512-4<<20 {
		t.Fatalf("discard not passed down: the loop's file takes %d bytes, before %d", after.Blocks*512, before.Blocks*512)
	}
	if got := read(t, v, 0, 64*kib); !bytes.Equal(got, make([]byte, 64*kib)) {
		t.Fatal("discarded block does not read as zeros")
	}
	writeVerify(t, v, 0, 1<<20, 80) // reuses discarded (punched) blocks
}

// TestHostFullMetadataHeadroom: the metadata on the same small host file
// system as the data (a 24 MiB tmpfs). After another file filled the host,
// every provisioned block is written over and over, each write committed
// (FLUSH), and the pool is reopened on the full host in between: the
// commits (Pebble's log beyond its preallocation, the flush of the log at
// open) need host space for the metadata store, which takes it from the
// headroom the pool keeps, and none fails. A write to unprovisioned space
// follows the no-space policy meanwhile (it must not eat what the
// metadata needs), and works once the host has space again and the
// headroom is restored. With no headroom (MetaHeadroom -1) the same
// sequence fails the pool: "pebble: fatal commit error ... no space left
// on device".
func TestHostFullMetadataHeadroom(t *testing.T) {
	for _, headroom := range []int64{-1, 0} {
		t.Run(fmt.Sprint("headroom=", headroom), func(t *testing.T) {
			err := fullHostCommits(t, headroom)
			if headroom < 0 {
				if err == nil {
					t.Fatal("without headroom the commits on the full host succeeded: the test does not exercise the metadata's need for space")
				}
				t.Logf("without headroom: %v", err)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

// openWithin opens a pool, or gives up after d: then it frees the host
// (Pebble's open waits for space to flush its log, for ever) and
// reports that.
func openWithin(dir string, o OpenOptions, d time.Duration, host *hostFiller) (*Pool, error) {
	type opened struct {
		p   *Pool
		err error
	}
	ch := make(chan opened, 1)
	go func() {
		p, err := Open(dir, o)
		ch <- opened{p, err}
	}()
	select {
	case r := <-ch:
		return r.p, r.err
	case <-time.After(d):
		os.Remove(host.path)
		if r := <-ch; r.p != nil {
			r.p.Close()
		}
		return nil, fmt.Errorf("open did not return within %v (it returned once the host had space)", d)
	}
}

func fullHostCommits(t *testing.T, headroom int64) error {
	mnt := mountSmallFS(t, 24<<20)
	dir := filepath.Join(mnt, "pool")
	if err := Create(dir, CreateOptions{BlockSize: 4 * kib, Size: 8192 * 4 * kib}); err != nil {
		t.Fatal(err)
	}
	o := quietOpts()
	o.MetaHeadroom = headroom
	p, err := Open(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if p != nil {
			p.Close()
		}
	}()
	st := p.Status().Pool
	if headroom == 0 && (st.MetaHeadroomWantBytes != (24<<20)/16 || st.MetaHeadroomBytes != st.MetaHeadroomWantBytes) {
		t.Fatalf("metadata headroom %d of %d, want 1/16 of the 24 MiB host", st.MetaHeadroomBytes, st.MetaHeadroomWantBytes)
	}
	host := &hostFiller{t: t, path: filepath.Join(mnt, "other-tenant")}
	v := mustVolume(t, p, "v", 4<<20)
	mustVolume(t, p, "u", 4<<20)
	if err := v.WriteZeroes(0, 2<<20, false); err != nil {
		t.Fatal(err)
	}
	host.fill()
	const rounds = 8
	for round := range rounds {
		if round == 2 {
			// A restart on the full host: Pebble flushes its log at open.
			uses := p.headroomUses.Load()
			p.Close()
			// Close gave the intent log's file back: Pebble's open must
			// find no space but its headroom.
			host.fill()
			// Without headroom the open never returns: 3 s tell that.
			wait := time.Minute
			if headroom < 0 {
				wait = 3 * time.Second
			}
			if p, err = openWithin(dir, o, wait, host); err != nil {
				return fmt.Errorf("reopen on the full host: %w", err)
			}
			p.headroomUses.Add(uses)
			v, _ = p.Volume("v")
			host.fill() // what the old log gave back

		}
		for pos := int64(0); pos < 2<<20; pos += 4 * kib {
			if err := v.WriteAt([][]byte{pattern(4*kib, byte(round)+byte(pos>>12))}, pos); err != nil {
				return fmt.Errorf("round %d: provisioned write at %d on the full host: %w", round, pos, err)
			}
			if err := v.Flush(); err != nil {
				return fmt.Errorf("round %d: flush after the write at %d on the full host: %w", round, pos, err)
			}
		}
	}
	for pos := int64(0); pos < 2<<20; pos += 4 * kib {
		if got := read(t, v, pos, 4*kib); !bytes.Equal(got, pattern(4*kib, rounds-1+byte(pos>>12))) {
			t.Fatalf("read back at %d: wrong data", pos)
		}
	}
	st = p.Status().Pool
	t.Logf("the metadata store used its headroom %d times; %d of %d bytes left", p.headroomUses.Load(), st.MetaHeadroomBytes, st.MetaHeadroomWantBytes)
	if p.headroomUses.Load() == 0 {
		t.Fatal("the metadata store used none of its headroom: the test does not exercise it")
	}
	u, _ := p.Volume("u")
	// A piece of headroom given up, its space taken by the other tenant:
	// data gets no new host space until the headroom is back.
	pieces, _ := filepath.Glob(filepath.Join(dir, metaName, "thinblk-headroom.*"))
	if len(pieces) == 0 {
		t.Fatal("no piece of headroom left")
	}
	if err := os.Remove(pieces[0]); err != nil {
		t.Fatal(err)
	}
	host.fill()
	if err := p.store.RestoreHeadroom(); err == nil {
		t.Fatal("headroom restored on a full host")
	}
	err = u.WriteAt([][]byte{pattern(4*kib, 3)}, 0)
	if !errors.Is(err, errHeadroomShort) || !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("unprovisioned write while the metadata's headroom is short: %v, want the headroom's no-space", err)
	}
	if err := os.Remove(host.path); err != nil {
		t.Fatal(err)
	}
	write(t, u, 0, pattern(4*kib, 3))
	if st = p.Status().Pool; st.MetaHeadroomBytes != st.MetaHeadroomWantBytes {
		t.Fatalf("headroom not restored once the host had space: %d of %d", st.MetaHeadroomBytes, st.MetaHeadroomWantBytes)
	}
	checkAccounting(t, p)
	return nil
}

// TestHostUnbackedCountsMissingHeadroom: where the metadata shares the
// data's host file system, the pieces of the metadata's headroom that are
// missing are taken back before data gets new host space, so the
// over-commitment status reports counts them: it is the same before and
// after the headroom is restored (on a 32 MiB tmpfs whose metadata lost
// half its 2 MiB headroom while the host was full, then got 4 MiB back).
func TestHostUnbackedCountsMissingHeadroom(t *testing.T) {
	mnt := mountSmallFS(t, 32<<20)
	dir := filepath.Join(mnt, "pool")
	if err := Create(dir, CreateOptions{BlockSize: 4 * kib, Size: 16 << 20}); err != nil {
		t.Fatal(err)
	}
	p, err := Open(dir, quietOpts())
	if err != nil {
		t.Fatal(err)
	}
	p.Close()
	host := &hostFiller{t: t, path: filepath.Join(mnt, "other-tenant")}
	host.fill()
	// Half the headroom goes to the other tenant while the pool is down.
	for _, i := range []int{2, 3} {
		if err := os.Remove(filepath.Join(dir, metaName, fmt.Sprintf("thinblk-headroom.%d", i))); err != nil {
			t.Fatal(err)
		}
	}
	host.fill()
	if p, err = openWithin(dir, quietOpts(), time.Minute, host); err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	host.free(4 << 20)
	short := p.Status().Pool
	if short.MetaHeadroomBytes >= short.MetaHeadroomWantBytes || short.HostFreeBytes < 3<<20 {
		t.Fatalf("headroom %d of %d with %d bytes free on the host: the test needs it short with space to restore it",
			short.MetaHeadroomBytes, short.MetaHeadroomWantBytes, short.HostFreeBytes)
	}
	p.noteHostSpace() // restores the headroom (serve's ticker)
	restored := p.Status().Pool
	if restored.MetaHeadroomBytes != restored.MetaHeadroomWantBytes {
		t.Fatalf("headroom %d of %d after the host had space again", restored.MetaHeadroomBytes, restored.MetaHeadroomWantBytes)
	}
	t.Logf("host free %d -> %d bytes, unbacked %d -> %d bytes", short.HostFreeBytes, restored.HostFreeBytes, short.HostUnbackedBytes, restored.HostUnbackedBytes)
	if short.HostUnbackedBytes != restored.HostUnbackedBytes || short.HostUnbackedBytes < 12<<20 {
		t.Fatalf("over-commitment with the headroom short: %d bytes, restored: %d bytes; want the same (about 13 MiB)",
			short.HostUnbackedBytes, restored.HostUnbackedBytes)
	}
}
