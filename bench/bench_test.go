package bench

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/thinblk/thinblk/internal/servetest"
	"github.com/thinblk/thinblk/rawdisk"
	"github.com/thinblk/thinblk/virtio/blk"
)

func TestCaseNames(t *testing.T) {
	cs := DefaultCases()
	if len(cs) != 14 {
		t.Fatalf("%d default cases, want 14", len(cs))
	}
	seen := map[string]bool{}
	for _, c := range cs {
		if seen[c.Name()] {
			t.Fatalf("duplicate case name %s", c.Name())
		}
		seen[c.Name()] = true
	}
	for _, want := range []string{"randread-4k-qd32-q1", "randwrite-4k-qd128-q2", "read-1m-qd8-q1", "write-1m-qd8-q1"} {
		if !seen[want] {
			t.Errorf("missing case %s", want)
		}
	}
}

func TestSummarize(t *testing.T) {
	lat := make([]int64, 100)
	for i := range lat {
		lat[i] = int64(100-i) * 1000 // 100 us .. 1 us
	}
	r := summarize(Case{Op: RandRead, BlockSize: 4096, QueueDepth: 1, Queues: 1}, lat, time.Second)
	if r.Ops != 100 || r.IOPS != 100 || r.MeanUs != 50.5 || r.P50Us != 51 || r.P99Us != 100 {
		t.Fatalf("summary %+v", r)
	}
}

func TestParseFio(t *testing.T) {
	out := []byte(`note: a warning line
{"jobs": [{"read": {"iops": 1000.5, "bw_bytes": 4098048, "total_ios": 3001,
  "lat_ns": {"mean": 31000}, "clat_ns": {"percentile": {"50.000000": 29000, "99.000000": 81408}}},
  "write": {"iops": 0, "total_ios": 0}}]}`)
	r, err := parseFio(Case{Op: RandRead, BlockSize: 4096, QueueDepth: 32, Queues: 1}, out)
	if err != nil {
		t.Fatal(err)
	}
	if r.IOPS != 1000.5 || r.Ops != 3001 || r.MeanUs != 31 || r.P99Us != 81.408 || r.P50Us != 29 {
		t.Fatalf("parsed %+v", r)
	}
	if _, err := parseFio(Case{Op: RandWrite}, []byte(`{"jobs": []}`)); err == nil {
		t.Fatalf("no error for output without jobs")
	}
}

// serveInProcess runs thinblk's back-end on img in this process.
func serveInProcess(t *testing.T, img string, queues int) string {
	disk, err := rawdisk.Open(img, rawdisk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { disk.Close() })
	sock, _ := servetest.Serve(t, disk, blk.Options{NumQueues: queues})
	return sock
}

func qsdBin(t *testing.T) string {
	p, err := exec.LookPath("qemu-storage-daemon")
	if err != nil {
		if os.Getenv("THINBLK_SKIP_QSD") == "1" {
			t.Skip("qemu-storage-daemon missing, THINBLK_SKIP_QSD=1")
		}
		t.Fatalf("qemu-storage-daemon not found (set THINBLK_SKIP_QSD=1 to skip): %v", err)
	}
	return p
}

// TestRunDriver runs short cases against both back-ends and checks that
// requests completed and the statistics are coherent.
func TestRunDriver(t *testing.T) {
	img := filepath.Join(t.TempDir(), "b.raw")
	if err := PrepareFile(img, 16<<20); err != nil {
		t.Fatal(err)
	}
	socks := map[string]string{"thinblk": serveInProcess(t, img, 2)}
	srv, err := StartQSD(qsdBin(t), img, filepath.Join(t.TempDir(), "q.sock"), 2, QSDOptions{AIO: "threads"})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	socks["qsd"] = srv.Socket
	for name, sock := range socks {
		for _, c := range []Case{
			{Op: RandRead, BlockSize: 4096, QueueDepth: 4, Queues: 2},
			{Op: SeqWrite, BlockSize: 1 << 20, QueueDepth: 2, Queues: 1},
		} {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			var r Result
			var err error
			// thinblk refuses a connection while the previous one is being torn down.
			for i := 0; i < 50; i++ {
				if r, err = RunDriver(ctx, sock, c, DriverOptions{Duration: 200 * time.Millisecond}); err == nil {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			cancel()
			if err != nil {
				t.Fatalf("%s %s: %v", name, c.Name(), err)
			}
			if r.Ops < int64(c.QueueDepth*c.Queues) || r.IOPS <= 0 || r.P50Us <= 0 || r.P99Us < r.P50Us {
				t.Errorf("%s %s: implausible result %+v", name, c.Name(), r)
			}
			t.Logf("%s %s: %.0f IOPS, mean %.1f us, p99 %.1f us", name, c.Name(), r.IOPS, r.MeanUs, r.P99Us)
		}
	}
}

func TestPrepareFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "x.raw")
	if err := PrepareFile(p, 3<<20); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil || fi.Size() != 3<<20 {
		t.Fatalf("size %v %v", fi, err)
	}
	b, _ := os.ReadFile(p)
	if b[0] != 7 || b[len(b)-1] == 0 && b[len(b)-2] == 0 {
		t.Fatalf("file not filled")
	}
}

// TestWriteSpan: PrepareFile and Fill write every byte of the span, the
// last short write included, and nothing past it.
func TestWriteSpan(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "span"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const span = 1<<20 + 5
	if err := writeSpan(f, span); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(f.Name())
	if err != nil || len(b) != span {
		t.Fatalf("%d bytes written, want %d (%v)", len(b), span, err)
	}
	for i, c := range b {
		if want := byte(i%(1<<20)*31 + 7); c != want {
			t.Fatalf("byte %d = %d, want %d", i, c, want)
		}
	}
}
