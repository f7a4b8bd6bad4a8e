package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/shmserve/shmserve/goclient/sidecar"
)

// spawnFlags start a server for the duration of one command, configured
// from the addresses the command dials: shm://NAME serves --name NAME over
// shm,unix (so that a -fallback to its default socket works, see
// shmclient.DefaultSocketPath);
// unix:///path adds unix with --socket path; tcp://host:port adds tcp with
// --tcp-host and --tcp-port.
type spawnFlags struct {
	enabled   bool
	binary    string
	model     string
	transport string
	args      string
	wait      time.Duration
}

func (f *spawnFlags) register(fs *flag.FlagSet, model string) {
	fs.BoolVar(&f.enabled, "spawn", false, "start a server (shmserve serve) that serves the -addr address(es) for this command, and stop it at exit")
	fs.StringVar(&f.binary, "spawn-bin", "", "shmserve executable for -spawn (default $SHMSERVE_BIN, else shmserve in PATH)")
	fs.StringVar(&f.model, "spawn-model", model, "-spawn: the server's --model")
	fs.StringVar(&f.transport, "spawn-transport", "", "-spawn: the server's --transport (default: what -addr needs)")
	fs.StringVar(&f.args, "spawn-args", "", "-spawn: more server arguments, split at spaces (no quoting), e.g. \"--slots 8 --threads 1\"")
	fs.DurationVar(&f.wait, "spawn-wait", 2*time.Minute, "-spawn: how long to wait for the server to be ready")
}

// start runs the server when -spawn is set. The returned ctx ends on SIGINT
// or SIGTERM, so that the command returns and stop runs: the server is
// in its own process group and does not see the terminal's ^C itself. stop
// waits until the server has stopped and cleaned up.
func (f *spawnFlags) start(ctx context.Context, addrs string, stderr io.Writer) (context.Context, func(), error) {
	if !f.enabled {
		return ctx, func() {}, nil
	}
	cfg, err := f.config(strings.Split(addrs, ","))
	if err != nil {
		return nil, nil, err
	}
	// The server logs at INFO by default; a command prints its results, and
	// the server's warnings are enough beside them.
	if os.Getenv("SHMSERVE_LOG") == "" {
		cfg.Env = append(cfg.Env, "SHMSERVE_LOG=WARNING")
	}
	cfg.Stderr = stderr
	cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	startCtx, cancel := context.WithTimeout(ctx, f.wait)
	defer cancel()
	sc, err := sidecar.Start(startCtx, cfg)
	if err != nil {
		return nil, nil, err
	}
	ctx, stopSignals := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	// A second ^C then kills the command at once.
	context.AfterFunc(ctx, stopSignals)
	stop := func() {
		stopSignals()
		stopCtx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		if err := sc.Stop(stopCtx); err != nil {
			fmt.Fprintf(stderr, "shmclient: %v\n", err)
		}
	}
	return ctx, stop, nil
}

// config derives the server's arguments from the addresses to dial.
func (f *spawnFlags) config(addrs []string) (sidecar.Config, error) {
	cfg := sidecar.Config{Binary: f.binary, Model: f.model, Args: strings.Fields(f.args)}
	var transports []string
	addTransport := func(names ...string) {
		for _, name := range names {
			if !slices.Contains(transports, name) {
				transports = append(transports, name)
			}
		}
	}
	set := map[string]string{}
	setArg := func(flag, value string) error {
		if old, ok := set[flag]; ok && old != value {
			return fmt.Errorf("-spawn starts one server, which cannot have both %s %s and %s %s", flag, old, flag, value)
		}
		set[flag] = value
		return nil
	}
	for _, addr := range addrs {
		scheme, rest, _ := strings.Cut(addr, "://")
		var err error
		switch scheme {
		case "shm":
			addTransport("shm", "unix")
			err = setArg("--name", rest)
		case "unix":
			addTransport("unix")
			err = setArg("--socket", rest)
		case "tcp":
			addTransport("tcp")
			host, port, splitErr := net.SplitHostPort(rest)
			if splitErr != nil {
				return cfg, fmt.Errorf("-spawn: %s: %w", addr, splitErr)
			}
			if err = setArg("--tcp-host", host); err == nil {
				err = setArg("--tcp-port", port)
			}
		default:
			return cfg, fmt.Errorf("-spawn cannot serve %q (want shm://, unix:// or tcp://)", addr)
		}
		if err != nil {
			return cfg, err
		}
	}
	cfg.Transport = f.transport
	if cfg.Transport == "" {
		cfg.Transport = strings.Join(transports, ",")
	}
	cfg.Name = set["--name"]
	var derived []string
	for _, flag := range []string{"--socket", "--tcp-host", "--tcp-port"} {
		if value, ok := set[flag]; ok {
			derived = append(derived, flag, value)
		}
	}
	cfg.Args = append(derived, cfg.Args...)
	return cfg, nil
}
