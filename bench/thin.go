package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/thinblk/thinblk/vhostuser/frontend"
)

// ThinPool is a thin pool served by `thinblk serve DIR` for a benchmark.
type ThinPool struct {
	Bin, Dir string
	*Server
}

// StartThinPool creates a fresh pool of poolSize bytes in dir with one
// volume, name, of volSize bytes, and serves it with the given queues.
// The volume's socket is dir/name.sock (ThinPool.Socket).
func StartThinPool(bin, dir string, poolSize, volSize int64, name string, queues int) (*ThinPool, error) {
	if err := os.RemoveAll(dir); err != nil {
		return nil, err
	}
	if out, err := exec.Command(bin, "pool", "create", dir, "--size", strconv.FormatInt(poolSize, 10)).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("pool create: %v\n%s", err, out)
	}
	p := &ThinPool{Bin: bin, Dir: dir}
	if err := p.CreateVolume(name, volSize); err != nil {
		return nil, err
	}
	srv, err := startServer("thinblk-pool", filepath.Join(dir, name+".sock"),
		[]string{bin, "serve", dir, "--queues", strconv.Itoa(queues), "--log-level", "warn"})
	if err != nil {
		return nil, err
	}
	p.Server = srv
	return p, nil
}

// CreateVolume adds a volume (through the running serve when there is one)
// and waits for its socket.
func (p *ThinPool) CreateVolume(name string, size int64) error {
	if out, err := exec.Command(p.Bin, "volume", "create", p.Dir, name, "--size", strconv.FormatInt(size, 10)).CombinedOutput(); err != nil {
		return fmt.Errorf("volume create: %v\n%s", err, out)
	}
	if p.Server == nil {
		return nil
	}
	sock := p.VolumeSocket(name)
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if fi, err := os.Stat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return nil
		}
	}
	return fmt.Errorf("no socket %s for the new volume", sock)
}

// DeleteVolume removes a volume (through the running serve).
func (p *ThinPool) DeleteVolume(name string) error {
	if out, err := exec.Command(p.Bin, "volume", "delete", p.Dir, name).CombinedOutput(); err != nil {
		return fmt.Errorf("volume delete: %v\n%s", err, out)
	}
	return nil
}

// VolumeSocket is where serve exports volume name.
func (p *ThinPool) VolumeSocket(name string) string { return filepath.Join(p.Dir, name+".sock") }

// PoolStatus is the part of `thinblk status --json` the benchmark reads.
type PoolStatus struct {
	Pool struct {
		MetadataBytes uint64 `json:"metadata_bytes"`
		BlockSize     uint64 `json:"block_size"`
	} `json:"pool"`
	Volumes []struct {
		Name        string `json:"name"`
		MappedBytes uint64 `json:"mapped_bytes"`
	} `json:"volumes"`
}

// Status asks the running serve for the pool's status.
func (p *ThinPool) Status() (PoolStatus, error) {
	var st PoolStatus
	out, err := exec.Command(p.Bin, "status", p.Dir, "--json").Output()
	if err != nil {
		return st, fmt.Errorf("status: %w", err)
	}
	return st, json.Unmarshal(out, &st)
}

// RSS is the serve process's resident memory in bytes.
func (s *Server) RSS() (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) >= 1 {
				kb, err := strconv.ParseInt(f[0], 10, 64)
				return kb << 10, err
			}
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", s.cmd.Process.Pid)
}

// Fill writes every byte of [0, span) of the disk at sock with 1 MiB
// writes and flushes, so that later reads and overwrites hit mapped
// blocks.
func Fill(ctx context.Context, sock string, span int64) error {
	d, err := frontend.Dial(ctx, sock, frontend.Options{MemSize: 8 << 20})
	if err != nil {
		return err
	}
	defer d.Close()
	if err := writeSpan(d, span); err != nil {
		return fmt.Errorf("fill: %w", err)
	}
	return d.Flush()
}
