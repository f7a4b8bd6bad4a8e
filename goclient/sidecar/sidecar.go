// Package sidecar runs the shmserve Python server as a child of a Go
// program and keeps it running: Start launches `shmserve serve ...` and
// returns once the server has printed its ready line; a server that dies is
// restarted (with backoff, a bounded number of times per minute); Stop
// terminates it. A Go program killed outright (SIGKILL, a crash) takes its
// server down with it: the child gets SIGTERM from the kernel and removes its
// shared-memory objects as on a normal stop.
//
//	sc, err := sidecar.Start(ctx, sidecar.Config{Model: "cifar", Name: "demo"})
//	if err != nil { ... }             // err includes the server's stderr
//	defer sc.Stop(context.Background())
//	client, err := shmclient.Dial(ctx, sc.Ready().Addr("shm"))
//
// A shmclient ring client re-attaches to a restarted server by itself; a
// socket client reconnects on its next call.
package sidecar

import (
	"bufio"
	"context"
	"encoding/json"
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

// Config says what to run and how to supervise it. The zero value runs
// `shmserve serve` with the server's defaults.
type Config struct {
	// Binary is the shmserve executable: a path, or a name looked up in
	// PATH. Empty means $SHMSERVE_BIN, else "shmserve". It must exec the
	// server, as the virtualenv's shmserve script does: a wrapper that forks
	// it (`uv run`, a shell script without exec) would keep signals, the
	// parent-death one included, from reaching the server.
	Binary string
	// Model, Transport and Name become --model, --transport and --name;
	// empty ones are left to the server (cifar, shm,unix, default).
	Model, Transport, Name string
	// Args are further `shmserve serve` arguments, e.g. {"--socket",
	// "/run/app/s.sock", "--slots", "16"}.
	Args []string
	// Env is added to this process's environment for the child.
	Env []string

	// Logger gets the supervisor's events and, unless Stderr is set, the
	// child's stderr line by line. Default slog.Default().
	Logger *slog.Logger
	// Stderr, when set, gets the child's stderr as written.
	Stderr io.Writer
	// OnReady is called once the server is ready: by Start before it
	// returns, then after every restart from the supervisor's goroutine (a
	// slow OnReady delays noticing the next exit).
	OnReady func(Ready)

	// ReadyTimeout bounds each restart's wait for the ready line (Start's
	// first wait is bounded by its ctx). Default 2 minutes: a Gemma model
	// compiles before it is ready.
	ReadyTimeout time.Duration
	// StopGrace is how long a stop waits after SIGTERM before SIGKILL.
	// Default 10s: the server gives requests in flight 2s, and its HTTP
	// transport up to 10s.
	StopGrace time.Duration
	// MaxRestartsPerMinute bounds restarts in any 60s window; a server that
	// would need more is left dead, Done is closed and Err says why, so that
	// the program can fail as a whole (a crash-looping model would not
	// recover by itself). Default 5; negative: never restart.
	MaxRestartsPerMinute int
	// MinBackoff and MaxBackoff bound the delay before a restart: it starts
	// at MinBackoff (default 100ms) and doubles after every restart that
	// failed or ran less than a minute, up to MaxBackoff (default 10s).
	MinBackoff, MaxBackoff time.Duration
}

// Ready is the server's ready line (spec/PROTOCOL.md section 14): one JSON
// object on its stdout once it serves. ParseReady is the only reader of it.
type Ready struct {
	Event        string `json:"event"`
	ReadyVersion int    `json:"ready_version"`
	// PID is the server's own pid (the child's, unless Binary is a
	// wrapper that forks).
	PID   int            `json:"pid"`
	Model map[string]any `json:"model"`
	// Transports holds one entry per transport served: "shm", "unix", "tcp",
	// "http".
	Transports map[string]TransportReady `json:"transports"`
}

// TransportReady is one transport's entry of the ready line.
type TransportReady struct {
	// Address is what shmclient.Dial takes (shm://NAME, unix:///path,
	// tcp://host:port), or the HTTP base URL.
	Address string `json:"address"`
	// Name, Generation (16 hex digits, new on every start) and Slots: the ring.
	Name       string `json:"name,omitempty"`
	Generation string `json:"generation,omitempty"`
	Slots      int    `json:"slots,omitempty"`
	Path       string `json:"path,omitempty"` // unix
	Host       string `json:"host,omitempty"` // tcp, http
	Port       int    `json:"port,omitempty"` // tcp, http: the port bound
}

// ReadyVersion is the version of the ready line this package reads.
const ReadyVersion = 1

// ParseReady reads a ready line; anything else, or a version this package
// does not know, is an error.
func ParseReady(line []byte) (Ready, error) {
	var r Ready
	if err := json.Unmarshal(line, &r); err != nil || r.Event != "ready" {
		return Ready{}, fmt.Errorf("not a ready line: %q", strings.TrimSpace(string(line)))
	}
	if r.ReadyVersion != ReadyVersion {
		return Ready{}, fmt.Errorf("ready line version %d; this client reads %d", r.ReadyVersion, ReadyVersion)
	}
	for name, t := range r.Transports {
		if t.Address == "" {
			return Ready{}, fmt.Errorf("ready line: transport %q has no address", name)
		}
	}
	return r, nil
}

// Addr returns the address of a transport the server serves ("shm",
// "unix" (or its older name "uds"), "tcp", "http"), or "".
func (r Ready) Addr(transport string) string {
	if transport == "uds" {
		transport = "unix"
	}
	return r.Transports[transport].Address
}

// Ring returns the ring's entry (name, generation, slots); zero when the
// server does not serve the ring.
func (r Ready) Ring() TransportReady { return r.Transports["shm"] }

// ErrGaveUp reports that the server died more often than
// Config.MaxRestartsPerMinute allows, or that restarts are disabled.
var ErrGaveUp = errors.New("sidecar: server died and was not restarted")

// Sidecar supervises one server process.
type Sidecar struct {
	cfg    Config
	binary string
	args   []string
	logger *slog.Logger

	mu       sync.Mutex
	ready    Ready
	restarts int
	err      error

	stopOnce sync.Once
	stopCh   chan struct{}
	stopCtx  context.Context // written before stopCh closes
	stopErr  error           // written before done closes
	done     chan struct{}
}

const (
	defaultReadyTimeout = 2 * time.Minute
	defaultStopGrace    = 10 * time.Second
	defaultMaxRestarts  = 5
	defaultMinBackoff   = 100 * time.Millisecond
	defaultMaxBackoff   = 10 * time.Second
	// stableAfter is how long a server must have run for its death not to
	// count as a failure of the previous restart (the backoff starts over).
	stableAfter = time.Minute
	// drainGrace bounds the wait for the rest of a dead child's output,
	// which a grandchild holding the pipe could keep open.
	drainGrace = time.Second
)

// Start runs the server and waits, bounded by ctx, for its ready line. On
// failure (the server exited, printed something else, or ctx ended) the
// child is stopped and the error includes the end of its stderr. ctx only
// bounds this first start: cancelling it later stops nothing; call Stop.
func Start(ctx context.Context, cfg Config) (*Sidecar, error) {
	cfg = withDefaults(cfg)
	binary := cfg.Binary
	if binary == "" {
		binary = os.Getenv("SHMSERVE_BIN")
	}
	if binary == "" {
		binary = "shmserve"
	}
	path, err := exec.LookPath(binary)
	if err != nil {
		return nil, fmt.Errorf("sidecar: %w (set Config.Binary or SHMSERVE_BIN)", err)
	}
	s := &Sidecar{
		cfg:    cfg,
		binary: path,
		args:   serveArgs(cfg),
		logger: cfg.Logger,
		stopCh: make(chan struct{}),
		done:   make(chan struct{}),
	}
	c, err := s.spawn(ctx)
	if err != nil {
		return nil, err
	}
	s.becameReady(c)
	go s.supervise(c)
	return s, nil
}

func withDefaults(cfg Config) Config {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.ReadyTimeout <= 0 {
		cfg.ReadyTimeout = defaultReadyTimeout
	}
	if cfg.StopGrace <= 0 {
		cfg.StopGrace = defaultStopGrace
	}
	if cfg.MaxRestartsPerMinute == 0 {
		cfg.MaxRestartsPerMinute = defaultMaxRestarts
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = defaultMinBackoff
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = max(defaultMaxBackoff, cfg.MinBackoff)
	}
	return cfg
}

func serveArgs(cfg Config) []string {
	args := []string{"serve"}
	for _, flag := range []struct{ name, value string }{
		{"--model", cfg.Model}, {"--transport", cfg.Transport}, {"--name", cfg.Name},
	} {
		if flag.value != "" {
			args = append(args, flag.name, flag.value)
		}
	}
	return append(args, cfg.Args...)
}

// Ready returns the ready line of the server now running (after a restart,
// the new one's: new pid and generation, and new ports where they were 0).
func (s *Sidecar) Ready() Ready {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ready
}

// Restarts counts the restarts that reached ready.
func (s *Sidecar) Restarts() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.restarts
}

// Done is closed when supervision ends: after Stop, or when the server
// died and was not restarted (see Err).
func (s *Sidecar) Done() <-chan struct{} { return s.done }

// Err is nil while the server is supervised and after Stop; after Done
// without Stop it wraps ErrGaveUp.
func (s *Sidecar) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Stop ends supervision and the server: SIGTERM, then SIGKILL after
// Config.StopGrace or when ctx ends, whichever comes first. It returns once
// the child is reaped, with an error if it had to be killed (a killed server
// leaves its /dev/shm objects to the next server of the same name). Calling
// Stop again returns the first call's result.
func (s *Sidecar) Stop(ctx context.Context) error {
	s.stopOnce.Do(func() {
		s.stopCtx = ctx
		close(s.stopCh)
	})
	<-s.done
	return s.stopErr
}

// stopAbort is what cuts a stop's grace short: Stop's ctx once Stop was
// called, else nothing.
func (s *Sidecar) stopAbort() <-chan struct{} {
	select {
	case <-s.stopCh:
		return s.stopCtx.Done()
	default:
		return nil
	}
}

func (s *Sidecar) becameReady(c *child) {
	s.mu.Lock()
	s.ready = c.ready
	s.mu.Unlock()
	s.logger.Info("sidecar: server ready", "pid", c.ready.PID, "transports", c.ready.Transports)
	if s.cfg.OnReady != nil {
		s.cfg.OnReady(c.ready)
	}
}

// supervise waits for the child to exit and restarts it, until Stop or
// until the restart budget is spent.
func (s *Sidecar) supervise(c *child) {
	defer close(s.done)
	var recent []time.Time // restart attempts in the last minute
	failures := 0          // restarts in a row that did not last stableAfter
	for {
		select {
		case <-s.stopCh:
			s.stopErr = c.terminate(s.cfg.StopGrace, s.stopCtx.Done())
			c.drained() // so that the caller has all of its output once Stop returns
			return
		case <-c.exited:
		}
		if time.Since(c.readyAt) >= stableAfter {
			failures = 0
		}
		s.logger.Warn("sidecar: server exited", "pid", c.pid, "status", c.status(),
			"ran", time.Since(c.readyAt).Round(time.Millisecond), "stderr_tail", c.stderr.last())
		for {
			now := time.Now()
			for len(recent) > 0 && now.Sub(recent[0]) >= time.Minute {
				recent = recent[1:]
			}
			if s.cfg.MaxRestartsPerMinute < 0 || len(recent) >= s.cfg.MaxRestartsPerMinute {
				s.giveUp(c, len(recent))
				return
			}
			delay := s.backoff(failures)
			failures++
			select {
			case <-s.stopCh:
				return
			case <-time.After(delay):
			}
			recent = append(recent, time.Now())
			next, err := s.restart()
			if err == nil {
				c = next
				break
			}
			select {
			case <-s.stopCh:
				return
			default:
			}
			s.logger.Warn("sidecar: restart failed", "err", err)
			c = &child{exitErr: err, stderr: &tail{}}
		}
		s.mu.Lock()
		s.restarts++
		s.mu.Unlock()
		s.becameReady(c)
	}
}

// backoff is MinBackoff doubled once per failure, at most MaxBackoff.
func (s *Sidecar) backoff(failures int) time.Duration {
	delay := s.cfg.MinBackoff
	for range failures {
		if delay >= s.cfg.MaxBackoff/2 {
			return s.cfg.MaxBackoff
		}
		delay *= 2
	}
	return delay
}

// restart spawns a new child, giving up when ReadyTimeout passes or Stop
// is called.
func (s *Sidecar) restart() (*child, error) {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.ReadyTimeout)
	defer cancel()
	go func() {
		select {
		case <-s.stopCh:
			cancel()
		case <-ctx.Done():
		}
	}()
	return s.spawn(ctx)
}

func (s *Sidecar) giveUp(last *child, attempts int) {
	var err error
	if s.cfg.MaxRestartsPerMinute < 0 {
		err = fmt.Errorf("%w (restarts disabled): %s", ErrGaveUp, last.status())
	} else {
		err = fmt.Errorf("%w: %d restarts in the last minute, the last one: %s", ErrGaveUp, attempts, last.status())
	}
	s.mu.Lock()
	s.err = err
	s.mu.Unlock()
	s.logger.Error("sidecar: giving up", "err", err)
}

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
