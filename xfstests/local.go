package xfstests

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
)

// LocalLauncher runs check as a host process in Dir: the runner's tests drive the fake
// check in testdata with it. Config is written to ResultBase/../local.config and passed as
// HOST_OPTIONS; check writes its results to ResultBase.
type LocalLauncher struct {
	Dir        string // tree holding check
	Config     Config
	ConfigPath string
	ResultBase string
	// Args go before the test names (e.g. "-g", "quick" with no tests).
	Args []string
	// Env is added to check's environment.
	Env []string
}

// Start implements Launcher.
func (l *LocalLauncher) Start(ctx context.Context, session int, tests []string, out io.Writer) (Session, error) {
	text, err := l.Config.Render()
	if err != nil {
		return nil, err
	}
	if err := writeFile(l.ConfigPath, []byte(text)); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(l.ResultBase, 0o755); err != nil {
		return nil, fmt.Errorf("result dir: %w", err)
	}
	argv := append(append([]string{filepath.Join(l.Dir, "check")}, l.Args...), tests...)
	cmd := exec.Command("bash", argv...)
	cmd.Dir = l.Dir
	cmd.Env = append(append(os.Environ(), l.Env...), "HOST_OPTIONS="+l.ConfigPath, "RESULT_BASE="+l.ResultBase)
	cmd.Stdout, cmd.Stderr = out, out
	// Own process group: a hang is ended by killing the whole group, the test's children too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start check: %w", err)
	}
	s := &procSession{cmd: cmd, done: make(chan struct{})}
	go func() {
		s.err = cmd.Wait()
		close(s.done)
	}()
	return s, nil
}

type procSession struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error
	once sync.Once
}

func (s *procSession) Wait() error {
	<-s.done
	return s.err
}

func (s *procSession) Kill() {
	s.once.Do(func() { _ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL) })
}
