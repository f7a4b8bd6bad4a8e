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
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"sync"
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
