// Child plumbing: one run of the server process, its pipes, its exit and its stderr tail.

package sidecar

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"
)

// child is one run of the server.
type child struct {
	cmd     *exec.Cmd
	pid     int
	readyAt time.Time
	ready   Ready
	stderr  *tail
	// stderrDone and stdoutDone are closed when those pipes reach EOF.
	stderrDone, stdoutDone chan struct{}
	// exited is closed once the child is reaped (cmd.ProcessState is set).
	exited chan struct{}
	// exitErr describes a child that never ran (a failed restart).
	exitErr error
}

func (c *child) status() string {
	switch {
	case c.exitErr != nil:
		return c.exitErr.Error()
	case c.cmd != nil && c.cmd.ProcessState != nil:
		return c.cmd.ProcessState.String()
	}
	return "running"
}

// spawn starts the server and waits for its ready line.
func (s *Sidecar) spawn(ctx context.Context) (*child, error) {
	stdoutR, stdoutW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("sidecar: %w", err)
	}
	stderrR, stderrW, err := os.Pipe()
	if err != nil {
		stdoutR.Close()
		stdoutW.Close()
		return nil, fmt.Errorf("sidecar: %w", err)
	}
	cmd := exec.Command(s.binary, s.args...)
	// Pipes of our own rather than StdoutPipe: exec closes those in Wait,
	// which would race with the readers below.
	cmd.Stdout, cmd.Stderr = stdoutW, stderrW
	cmd.Env = append(os.Environ(), s.cfg.Env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// The kernel sends SIGTERM when the forking thread dies, which the
		// server handles as a normal stop (see run for the thread).
		Pdeathsig: syscall.SIGTERM,
		// A process group of its own keeps a terminal's ^C away from the
		// server: the Go program decides when its server stops, and a
		// server stopping by itself would be restarted.
		Setpgid: true,
	}
	c := &child{cmd: cmd, stderr: &tail{}, stderrDone: make(chan struct{}), stdoutDone: make(chan struct{}),
		exited: make(chan struct{})}
	started := make(chan error, 1)
	go c.run(started)
	err = <-started
	// The child holds its own copies; ours would keep the readers from EOF.
	stdoutW.Close()
	stderrW.Close()
	if err != nil {
		stdoutR.Close()
		stderrR.Close()
		return nil, fmt.Errorf("sidecar: %w", err)
	}
	c.pid = cmd.Process.Pid
	s.logger.Debug("sidecar: started", "pid", c.pid, "cmd", append([]string{s.binary}, s.args...))
	go c.forwardStderr(stderrR, s.cfg.Stderr, s.logger)
	firstLine := make(chan []byte, 1)
	go c.readStdout(stdoutR, firstLine, s.logger)

	select {
	case line, ok := <-firstLine:
		if ok {
			ready, err := ParseReady(line)
			if err != nil {
				c.terminate(s.cfg.StopGrace, s.stopAbort())
				return nil, c.failure(fmt.Sprintf("server printed no ready line: %v", err), nil)
			}
			c.ready = ready
			c.readyAt = time.Now()
			return c, nil
		}
		// stdout closed without a line: the child is on its way out.
		select {
		case <-c.exited:
		case <-ctx.Done():
			c.terminate(s.cfg.StopGrace, s.stopAbort())
		}
		return nil, c.failure("server exited before it was ready", nil)
	case <-c.exited:
		return nil, c.failure("server exited before it was ready", nil)
	case <-ctx.Done():
		c.terminate(s.cfg.StopGrace, s.stopAbort())
		return nil, c.failure("server not ready", ctx.Err())
	}
}

// run forks the child and reaps it. Pdeathsig fires when the thread that
// forked the child exits, not the process (go.dev/issue/27505), and the Go
// runtime ends a thread whenever a goroutine exits while locked to it. So the
// fork happens on a thread this goroutine keeps locked until the child is
// reaped: no other goroutine can run there, and it cannot end before.
func (c *child) run(started chan<- error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := c.cmd.Start(); err != nil {
		started <- err
		return
	}
	started <- nil
	c.cmd.Wait() // the status it reports is in cmd.ProcessState
	close(c.exited)
}

// terminate sends SIGTERM, then SIGKILL after grace or when abort closes,
// and returns once the child is reaped.
func (c *child) terminate(grace time.Duration, abort <-chan struct{}) error {
	select {
	case <-c.exited:
		return nil
	default:
	}
	c.cmd.Process.Signal(syscall.SIGTERM)
	timer := time.NewTimer(grace)
	defer timer.Stop()
	select {
	case <-c.exited:
		return nil
	case <-timer.C:
	case <-abort:
	}
	c.cmd.Process.Kill()
	<-c.exited
	return fmt.Errorf("sidecar: server %d did not stop on SIGTERM; killed", c.pid)
}

// failure describes a child that did not get ready, with its exit status
// and the end of its stderr, which says why (argparse, a missing model...).
// cause, when not nil, is wrapped.
func (c *child) failure(what string, cause error) error {
	detail := ""
	select {
	case <-c.exited:
		c.drained()
		detail = " (" + c.cmd.ProcessState.String() + ")"
	default:
	}
	if text := c.stderr.String(); text != "" {
		detail += "; stderr:\n" + text
	} else {
		detail += "; no stderr"
	}
	if cause != nil {
		return fmt.Errorf("sidecar: %s: %w%s", what, cause, detail)
	}
	return fmt.Errorf("sidecar: %s%s", what, detail)
}

// drained waits, for a little while, until a reaped child's output is
// read to the end.
func (c *child) drained() {
	timeout := time.NewTimer(drainGrace)
	defer timeout.Stop()
	for _, done := range []chan struct{}{c.stderrDone, c.stdoutDone} {
		select {
		case <-done:
		case <-timeout.C:
			return
		}
	}
}

// readStdout hands the first line to firstLine (closing it without one at
// EOF) and logs the rest, which keeps the child from blocking on a full
// pipe.
func (c *child) readStdout(r *os.File, firstLine chan<- []byte, logger *slog.Logger) {
	defer close(c.stdoutDone)
	defer r.Close()
	reader := bufio.NewReaderSize(r, 64<<10)
	line, err := reader.ReadSlice('\n')
	if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
		close(firstLine)
		return
	}
	firstLine <- append([]byte(nil), line...)
	for {
		line, err := reader.ReadSlice('\n')
		if len(line) > 0 {
			logger.Info("sidecar: server stdout", "pid", c.pid, "line", strings.TrimRight(string(line), "\n"))
		}
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			return
		}
	}
}

// forwardStderr copies the child's stderr to w, or logs it line by line,
// and keeps its end for error messages.
func (c *child) forwardStderr(r *os.File, w io.Writer, logger *slog.Logger) {
	defer close(c.stderrDone)
	defer r.Close()
	reader := bufio.NewReaderSize(r, 16<<10)
	for {
		line, err := reader.ReadSlice('\n')
		if len(line) > 0 {
			c.stderr.add(string(line))
			if w != nil {
				w.Write(line)
			} else {
				logger.Info("sidecar: server stderr", "pid", c.pid, "line", strings.TrimRight(string(line), "\n"))
			}
		}
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			return
		}
	}
}

// tail keeps the last lines of a child's stderr.
type tail struct {
	mu    sync.Mutex
	lines []string
	size  int
}

const (
	tailLines = 30
	tailBytes = 8 << 10
)

func (t *tail) add(line string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.lines = append(t.lines, line)
	t.size += len(line)
	for len(t.lines) > 1 && (len(t.lines) > tailLines || t.size > tailBytes) {
		t.size -= len(t.lines[0])
		t.lines = t.lines[1:]
	}
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.Join(t.lines, "")
}

func (t *tail) last() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.lines) == 0 {
		return ""
	}
	return strings.TrimRight(t.lines[len(t.lines)-1], "\n")
}
