// Command shmclient talks to a shmserve server from the command line:
//
//	shmclient echo     [flags] TEXT           send TEXT, print the reply
//	shmclient classify [flags] FILE|DIR...    classify PNG/JPEG images
//	shmclient prompt   [flags] TEXT           generate text, optionally streamed
//	shmclient infer    [flags] [FILE.npy...]  call the model with .npy inputs
//	shmclient metadata [flags]                print the model's signature
//	shmclient bench    [flags]                compare transports' latency and throughput
//
// Every subcommand takes -addr (shm://NAME, unix:///path or tcp://host:port)
// and documents its flags with -h. With -spawn, a subcommand starts the
// server itself for its duration (`shmserve serve` serving the -addr
// addresses, model from -spawn-model, more arguments in -spawn-args) and
// stops it at exit:
//
//	shmclient classify -spawn -addr shm://demo DIR
//
// runs `shmserve serve --model cifar --transport shm,unix --name demo`.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/shmserve/shmserve/goclient/shmclient"
)

type command struct {
	name, args, summary string
	run                 func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

var commands = []command{
	{"echo", "[flags] TEXT", "send TEXT and print the reply; with -c or -n, check every reply", runEcho},
	{"classify", "[flags] FILE|DIR...", "classify PNG/JPEG images (DIRs are walked) and print `path label` lines", runClassify},
	{"prompt", "[flags] TEXT", "generate text from TEXT, printing chunks as they stream", runPrompt},
	{"infer", "[flags] [FILE.npy...]", "call the model with INFER on .npy inputs; print or save (-out) the outputs", runInfer},
	{"metadata", "[flags]", "print the model's signature (METADATA) as JSON", runMetadata},
	{"bench", "[flags]", "measure ECHO (or INFER, -infer) latency and throughput of one or more transports", runBench},
}

// errUsage marks a bad command line; its message has already been printed.
var errUsage = errors.New("usage")

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		return 2
	}
	for _, c := range commands {
		if c.name != args[0] {
			continue
		}
		err := c.run(context.Background(), args[1:], stdout, stderr)
		switch {
		case err == nil:
			return 0
		case errors.Is(err, flag.ErrHelp) || errors.Is(err, errUsage):
			return 2
		}
		fmt.Fprintf(stderr, "shmclient %s: %v\n", c.name, err)
		return 1
	}
	fmt.Fprintf(stderr, "shmclient: unknown command %q\n\n", args[0])
	usage(stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: shmclient COMMAND [flags] [args]")
	fmt.Fprintln(w, "\ncommands:")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-9s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun `shmclient COMMAND -h` for a command's flags.")
}

// newFlagSet returns a flag set whose -h prints the command's synopsis.
func newFlagSet(name, args, summary string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("shmclient "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: shmclient %s %s\n\n%s\n\nflags:\n", name, args, summary)
		fs.PrintDefaults()
	}
	return fs
}

// connectionFlags are the flags every command has for reaching the server.
type connectionFlags struct {
	addr      string
	fallback  string
	timeout   time.Duration
	serverUID int
	spin      time.Duration
	liveness  time.Duration
	spawn     spawnFlags
}

// register adds the flags; spawnModel is the model -spawn serves unless
// -spawn-model says otherwise.
func (f *connectionFlags) register(fs *flag.FlagSet, timeout time.Duration, spawnModel string) {
	fs.StringVar(&f.addr, "addr", "shm://default", "server address: shm://NAME, unix:///path/to.sock or tcp://host:port")
	fs.StringVar(&f.fallback, "fallback", "", "address to use when -addr cannot be reached, or its ring has no free slot (e.g. unix://"+shmclient.DefaultSocketPath("default")+")")
	fs.IntVar(&f.serverUID, "server-uid", os.Geteuid(), "the uid the server must run as: a ring or unix socket of another user is refused")
	fs.DurationVar(&f.timeout, "timeout", timeout, "deadline of each request (and of connecting)")
	fs.DurationVar(&f.spin, "spin", 50*time.Microsecond, "shm: how long to poll for a reply before blocking; 0 blocks at once")
	fs.DurationVar(&f.liveness, "liveness", 50*time.Millisecond, "shm: how often a blocked request checks that the server lives")
	f.spawn.register(fs, spawnModel)
}

// startServer runs the server for -spawn (see spawnFlags.start); the
// command uses the returned ctx and calls stop when it is done.
func (f *connectionFlags) startServer(ctx context.Context, stderr io.Writer) (context.Context, func(), error) {
	return f.spawn.start(ctx, f.addr, stderr)
}

// connect is every single-address subcommand's prologue: the server for
// -spawn, then a client of -addr with conns connections. The func closes the
// client, then stops that server.
func (f *connectionFlags) connect(ctx context.Context, conns int, stderr io.Writer) (context.Context, *shmclient.Client, func(), error) {
	ctx, stopServer, err := f.startServer(ctx, stderr)
	if err != nil {
		return nil, nil, nil, err
	}
	client, err := f.dial(ctx, f.addr, conns, stderr)
	if err != nil {
		stopServer()
		return nil, nil, nil, err
	}
	return ctx, client, func() { client.Close(); stopServer() }, nil
}

func (f *connectionFlags) dial(ctx context.Context, addr string, conns int, stderr io.Writer) (*shmclient.Client, error) {
	ctx, cancel := context.WithTimeout(ctx, f.timeout)
	defer cancel()
	opts := []shmclient.Option{
		shmclient.WithSpin(f.spin),
		shmclient.WithLivenessInterval(f.liveness),
		shmclient.WithConns(conns),
		shmclient.WithServerUID(f.serverUID),
		shmclient.WithLogger(slog.New(slog.NewTextHandler(stderr, nil))),
	}
	if f.fallback != "" {
		opts = append(opts, shmclient.WithFallback(f.fallback))
	}
	return shmclient.Dial(ctx, addr, opts...)
}

// parseArgs parses flags and checks the count of positional arguments.
func parseArgs(fs *flag.FlagSet, args []string, minArgs, maxArgs int) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage // flag has printed the error and the usage
	}
	if n := fs.NArg(); n < minArgs || (maxArgs >= 0 && n > maxArgs) {
		fs.Usage()
		return errUsage
	}
	return nil
}
