package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Server is a back-end process started for a benchmark.
type Server struct {
	Name   string
	Socket string
	cmd    *exec.Cmd
	out    bytes.Buffer
	exited chan error
}

// Stop kills the back-end and waits for it.
func (s *Server) Stop() {
	if s.cmd.ProcessState == nil {
		// SIGTERM first: thinblk then flushes and removes its socket.
		s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.exited:
			return
		case <-time.After(5 * time.Second):
		}
		s.cmd.Process.Kill()
	}
	<-s.exited
}

// CPUTime is the CPU time (user+system, all threads) the back-end process
// has used so far, from /proc at clock-tick resolution.
func (s *Server) CPUTime() (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", s.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	// Fields after the parenthesised command name; utime and stime are
	// fields 14 and 15 of the whole line.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("parse /proc/%d/stat", s.cmd.Process.Pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("parse /proc/%d/stat: %d fields", s.cmd.Process.Pid, len(f))
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("parse /proc/%d/stat times", s.cmd.Process.Pid)
	}
	// USER_HZ is 100 on Linux/amd64.
	return time.Duration(ut+st) * 10 * time.Millisecond, nil
}

// ContextSwitches is how many times the back-end's threads have been
// switched out so far (voluntarily or not), summed over the threads that
// still exist, from /proc.
func (s *Server) ContextSwitches() (int64, error) {
	dir := fmt.Sprintf("/proc/%d/task", s.cmd.Process.Pid)
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var n int64
	for _, t := range tasks {
		b, err := os.ReadFile(filepath.Join(dir, t.Name(), "status"))
		if err != nil {
			continue // the thread exited
		}
		for _, line := range strings.Split(string(b), "\n") {
			k, v, ok := strings.Cut(line, ":")
			if ok && (k == "voluntary_ctxt_switches" || k == "nonvoluntary_ctxt_switches") {
				c, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
				if err != nil {
					return 0, fmt.Errorf("parse %s/%s/status: %w", dir, t.Name(), err)
				}
				n += c
			}
		}
	}
	return n, nil
}

// Output is what the back-end printed.
func (s *Server) Output() string { return s.out.String() }

func startServer(name, sock string, argv []string) (*Server, error) {
	os.Remove(sock)
	s := &Server{Name: name, Socket: sock, exited: make(chan error, 1)}
	s.cmd = exec.Command(argv[0], argv[1:]...)
	s.cmd.Stdout, s.cmd.Stderr = &s.out, &s.out
	// Do not outlive the benchmark, even if it is killed.
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() { s.exited <- s.cmd.Wait() }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if fi, err := os.Stat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			// The file appears just before listen(2); give it a moment.
			time.Sleep(50 * time.Millisecond)
			return s, nil
		}
		select {
		case err := <-s.exited:
			s.exited <- err
			return nil, fmt.Errorf("%s exited before listening: %v\n%s", name, err, s.out.String())
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.Stop()
			return nil, fmt.Errorf("%s did not create %s within 10 s\n%s", name, sock, s.out.String())
		}
	}
}

// StartThinblk runs `thinblk serve --raw FILE --socket SOCK --queues N`.
// Extra flags (e.g. --no-uring) are passed on.
func StartThinblk(bin, file, sock string, queues int, direct bool, extra ...string) (*Server, error) {
	argv := []string{bin, "serve", "--raw", file, "--socket", sock, "--queues", strconv.Itoa(queues), "--log-level", "warn"}
	if direct {
		argv = append(argv, "--direct")
	}
	argv = append(argv, extra...)
	return startServer("thinblk", sock, argv)
}

// StartNull runs `thinblk serve --null SIZE --socket SOCK --queues N`: the
// same vhost-user path and device as StartThinblk with a disk that does no
// I/O, the ceiling of what the back-end and the driver carry here.
func StartNull(bin, sock string, size int64, queues int, extra ...string) (*Server, error) {
	argv := []string{bin, "serve", "--null", strconv.FormatInt(size, 10), "--socket", sock, "--queues", strconv.Itoa(queues), "--log-level", "warn"}
	argv = append(argv, extra...)
	return startServer("null", sock, argv)
}

// QSDOptions pick qemu-storage-daemon's I/O path.
type QSDOptions struct {
	Direct bool   // cache.direct=on (O_DIRECT)
	AIO    string // "io_uring", "threads" or "native" (native needs Direct)
}

// StartQSD runs qemu-storage-daemon exporting file over vhost-user-blk.
// Image locking is off so that thinblk can serve the same file at the
// same time (the benchmark runs both, one at a time).
func StartQSD(bin, file, sock string, queues int, o QSDOptions) (*Server, error) {
	direct := "off"
	if o.Direct {
		direct = "on"
	}
	aio := o.AIO
	if aio == "" {
		aio = "io_uring"
	}
	argv := []string{bin,
		"--blockdev", fmt.Sprintf("driver=file,node-name=f0,filename=%s,cache.direct=%s,aio=%s,locking=off", file, direct, aio),
		"--blockdev", "driver=raw,node-name=d0,file=f0",
		"--export", fmt.Sprintf("type=vhost-user-blk,id=e0,addr.type=unix,addr.path=%s,node-name=d0,writable=on,num-queues=%d", sock, queues),
	}
	return startServer("qemu-storage-daemon", sock, argv)
}

// FioOptions pick fio's I/O path on the host file.
type FioOptions struct {
	Bin      string // default "fio"
	Direct   bool
	IOEngine string // default io_uring
	Duration time.Duration
}

// RunFio runs case c with fio directly on file: numjobs = queues,
// iodepth = queue depth per job, the same meaning as in RunDriver.
func RunFio(ctx context.Context, file string, c Case, o FioOptions) (Result, error) {
	bin := o.Bin
	if bin == "" {
		bin = "fio"
	}
	engine := o.IOEngine
	if engine == "" {
		engine = "io_uring"
	}
	direct := "0"
	if o.Direct {
		direct = "1"
	}
	args := []string{"--name=" + c.Name(), "--filename=" + file, "--rw=" + string(c.Op),
		"--bs=" + strconv.Itoa(c.BlockSize), "--iodepth=" + strconv.Itoa(c.QueueDepth),
		"--numjobs=" + strconv.Itoa(c.Queues), "--group_reporting", "--ioengine=" + engine,
		"--direct=" + direct, "--time_based", fmt.Sprintf("--runtime=%dms", o.Duration.Milliseconds()),
		"--norandommap", "--randrepeat=0", "--output-format=json"}
	if c.Op == SeqRead || c.Op == SeqWrite {
		args = append(args, "--offset_increment="+strconv.FormatInt(fileSizeOr(file)/int64(c.Queues), 10))
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return Result{}, fmt.Errorf("fio %s: %w\n%s", c.Name(), err, stderr.String())
	}
	return parseFio(c, out)
}

func fileSizeOr(file string) int64 {
	fi, err := os.Stat(file)
	if err != nil {
		return 0
	}
	return fi.Size()
}

type fioStats struct {
	IOPS  float64 `json:"iops"`
	BW    float64 `json:"bw_bytes"`
	Total int64   `json:"total_ios"`
	Lat   struct {
		Mean float64 `json:"mean"`
	} `json:"lat_ns"`
	Clat struct {
		Percentile map[string]float64 `json:"percentile"`
	} `json:"clat_ns"`
}

func parseFio(c Case, out []byte) (Result, error) {
	// fio may print warnings before the JSON document.
	if i := bytes.IndexByte(out, '{'); i > 0 {
		out = out[i:]
	}
	var doc struct {
		Jobs []struct {
			Read  fioStats `json:"read"`
			Write fioStats `json:"write"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return Result{}, fmt.Errorf("parse fio output: %w", err)
	}
	if len(doc.Jobs) == 0 {
		return Result{}, fmt.Errorf("fio output has no jobs")
	}
	s := doc.Jobs[0].Read
	if c.Op == RandWrite || c.Op == SeqWrite {
		s = doc.Jobs[0].Write
	}
	return Result{
		Case:   c.Name(),
		Ops:    s.Total,
		IOPS:   s.IOPS,
		MBps:   s.BW / 1e6,
		MeanUs: s.Lat.Mean / 1e3,
		P50Us:  s.Clat.Percentile["50.000000"] / 1e3,
		P99Us:  s.Clat.Percentile["99.000000"] / 1e3,
	}, nil
}

// PrepareFile creates (or reuses) a fully written file of size bytes, so
// that reads hit allocated blocks, not holes.
func PrepareFile(path string, size int64) error {
	if fi, err := os.Stat(path); err == nil && fi.Size() == size {
		var st syscall.Stat_t
		if syscall.Stat(path, &st) == nil && st.Blocks*512 >= size {
			return nil
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := writeSpan(f, size); err != nil {
		return fmt.Errorf("fill %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	return nil
}

// writeSpan writes every byte of [0, span) of w with 1 MiB writes of a
// fixed pattern.
func writeSpan(w io.WriterAt, span int64) error {
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i*31 + 7)
	}
	for off := int64(0); off < span; off += int64(len(buf)) {
		n := min(int64(len(buf)), span-off)
		if _, err := w.WriteAt(buf[:n], off); err != nil {
			return fmt.Errorf("write at %d: %w", off, err)
		}
	}
	return nil
}

// DropCache writes back a file's dirty pages and drops its pages from the
// host page cache, so that what is cached next follows only the writes
// and reads that come after.
func DropCache(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return err
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		return fmt.Errorf("drop page cache of %s: %w", path, err)
	}
	return nil
}
