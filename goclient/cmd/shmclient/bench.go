package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"runtime"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/shmserve/shmserve/goclient/load"
	"github.com/shmserve/shmserve/goclient/protocol"
	"github.com/shmserve/shmserve/goclient/shmclient"
)

const benchSummary = `Measure ECHO round trips of -size bytes against each address in -addr
(comma-separated), in one run: after -warmup unmeasured requests each, the
addresses take turns for -reps rounds of -n/-reps requests, so that drift in
the machine's speed affects them alike. Prints p50/p99/p99.9/mean latency and
msgs/s per address, and how the second address compares with the first.

With -infer, the requests are INFER calls of the served model instead, with
the tensors of the .npy files it lists (comma-separated; FILE.npy binds by
position, NAME=FILE.npy by name); every reply must have the dtypes and
shapes of the first. -json prints the results as one JSON object.`

type benchTarget struct {
	addr    string
	client  *shmclient.Client
	latency *latencies
	busy    time.Duration // wall time spent on this target's measured rounds
}

func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("bench", "[flags]", benchSummary, stderr)
	var conn connectionFlags
	conn.register(fs, 10*time.Minute, "echo")
	requests := fs.Int("n", 20000, "measured requests per address")
	size := fs.Int("size", 3072, "bytes per ECHO request")
	concurrency := fs.Int("c", 1, "requests in flight at once per address (goroutines; also the socket pool size)")
	warmup := fs.Int("warmup", 1000, "unmeasured requests per address before measuring")
	reps := fs.Int("reps", 5, "rounds the addresses take turns in")
	inferFiles := fs.String("infer", "", "measure INFER with these .npy inputs (FILE.npy or NAME=FILE.npy, comma-separated) instead of ECHO")
	asJSON := fs.Bool("json", false, "print the results as JSON")
	if err := parseArgs(fs, args, 0, 0); err != nil {
		return err
	}
	if *requests < 1 || *concurrency < 1 || *reps < 1 || *size < 0 || *warmup < 0 {
		return fmt.Errorf("-n, -c and -reps must be at least 1, -size and -warmup at least 0")
	}
	ctx, stopServer, err := conn.startServer(ctx, stderr)
	if err != nil {
		return err
	}
	defer stopServer()
	request, err := newBenchRequest(*inferFiles, *size)
	if err != nil {
		return err
	}

	var targets []*benchTarget
	for _, addr := range strings.Split(conn.addr, ",") {
		client, err := conn.dial(ctx, addr, *concurrency, stderr)
		if err != nil {
			return err
		}
		defer client.Close()
		targets = append(targets, &benchTarget{addr: addr, client: client, latency: newLatencies()})
	}
	workers := func(t *benchTarget) []func(context.Context) error {
		return request.calls(t.client, *concurrency)
	}
	for _, t := range targets {
		if _, err := load.Run(ctx, workers(t), load.Options{Timeout: conn.timeout, WarmupCalls: *warmup}); err != nil {
			return fmt.Errorf("%s: warm-up: %w", t.addr, err)
		}
	}
	for rep := range *reps {
		// Spread -n over the rounds; the first rounds take the remainder.
		n := *requests / *reps
		if rep < *requests%*reps {
			n++
		}
		for _, t := range targets {
			measured, err := load.Run(ctx, workers(t), load.Options{Timeout: conn.timeout, Calls: n})
			if err != nil {
				return fmt.Errorf("%s: %w", t.addr, err)
			}
			t.latency.merge(measured.Latency)
			t.busy += measured.Elapsed
		}
	}
	if *asJSON {
		return printBenchJSON(stdout, targets, request, *concurrency, *reps, conn)
	}
	printBench(stdout, targets, request, *concurrency, *reps, conn)
	return nil
}

// benchRequest is what bench sends: an ECHO of random bytes, or an INFER.
type benchRequest struct {
	op     string // "echo" or "infer"
	what   string // for humans: "echo 3072 bytes", "infer x.npy (FP32[1 3072])"
	bytes  int    // the request body
	echo   []byte
	inputs []shmclient.Tensor
}

func newBenchRequest(inferFiles string, size int) (benchRequest, error) {
	if inferFiles == "" {
		payload := make([]byte, size)
		rand.Read(payload)
		return benchRequest{op: "echo", what: fmt.Sprintf("echo %d bytes", size), bytes: size, echo: payload}, nil
	}
	var named namedInputs
	var positional []string
	for _, arg := range strings.Split(inferFiles, ",") {
		if strings.Contains(arg, "=") {
			if err := named.Set(arg); err != nil {
				return benchRequest{}, err
			}
		} else {
			positional = append(positional, arg)
		}
	}
	inputs, err := readInputs(named, positional)
	if err != nil {
		return benchRequest{}, err
	}
	body, err := protocol.AppendTensorList(nil, inputs)
	if err != nil {
		return benchRequest{}, err
	}
	return benchRequest{op: "infer", what: fmt.Sprintf("infer %s %v (%d bytes)", inferFiles, inputs, len(body)),
		bytes: len(body), inputs: inputs}, nil
}

// calls returns the calls of n workers sending this request to client, each
// checking its reply.
func (r benchRequest) calls(client *shmclient.Client, n int) []func(context.Context) error {
	calls := make([]func(context.Context) error, n)
	if r.op == "echo" {
		for i := range calls {
			var reply []byte // the worker's own, reused from call to call
			calls[i] = func(ctx context.Context) error {
				var err error
				reply, err = client.EchoAppend(ctx, reply[:0], r.echo)
				if err == nil && !bytes.Equal(reply, r.echo) {
					err = fmt.Errorf("reply of %d bytes differs from the %d-byte request", len(reply), len(r.echo))
				}
				return err
			}
		}
		return calls
	}
	// Outputs may differ in value from call to call (a batch of other
	// requests may round differently), never in kind: every worker's reply
	// is checked against the first of all. Each worker decodes into its own
	// Outputs (a tuned caller's pattern, as EchoAppend is for echo), so the
	// first reply's kind is kept as a copy.
	var first []shmclient.Tensor
	var once sync.Once
	for i := range calls {
		var out shmclient.Outputs
		calls[i] = func(ctx context.Context) error {
			if err := client.InferInto(ctx, &out, r.inputs...); err != nil {
				return err
			}
			once.Do(func() {
				for _, t := range out.Tensors {
					first = append(first, shmclient.Tensor{Name: t.Name, DType: t.DType, Shape: slices.Clone(t.Shape)})
				}
			})
			if !sameKind(out.Tensors, first) {
				return fmt.Errorf("outputs %v, the first reply had %v", out.Tensors, first)
			}
			return nil
		}
	}
	return calls
}

func sameKind(a, b []shmclient.Tensor) bool {
	return slices.EqualFunc(a, b, func(x, y shmclient.Tensor) bool {
		return x.Name == y.Name && x.DType == y.DType && slices.Equal(x.Shape, y.Shape)
	})
}

func printBench(w io.Writer, targets []*benchTarget, request benchRequest, concurrency, reps int, conn connectionFlags) {
	fmt.Fprintf(w, "%s, %d in flight, %d interleaved rounds, GOMAXPROCS=%d, NumCPU=%d, shm spin %v\n",
		request.what, concurrency, reps, runtime.GOMAXPROCS(0), runtime.NumCPU(), conn.spin)
	table := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(table, "address\ttransport\trequests\tp50\tp99\tp99.9\tmean\tmsgs/s\t")
	for _, t := range targets {
		fmt.Fprintf(table, "%s\t%s\t%d\t%s\t%s\t%s\t%s\t%.0f\t\n", t.addr, t.client.Transport(), t.latency.count(),
			formatLatency(t.latency.quantile(50)), formatLatency(t.latency.quantile(99)),
			formatLatency(t.latency.quantile(99.9)), formatLatency(t.latency.mean()), t.rate())
	}
	table.Flush()
	if len(targets) >= 2 {
		first, second := targets[0], targets[1]
		ratio := func(q float64) float64 {
			return float64(second.latency.quantile(q)) / float64(first.latency.quantile(q))
		}
		fmt.Fprintf(w, "%s vs %s: latency %.1fx lower at p50, %.1fx at p99, %.1fx at p99.9; %.1fx the msgs/s\n",
			first.client.Transport(), second.client.Transport(), ratio(50), ratio(99), ratio(99.9), first.rate()/second.rate())
	}
}

// printBenchJSON prints what printBench does, for programs (bench/infer.py).
func printBenchJSON(w io.Writer, targets []*benchTarget, request benchRequest, concurrency, reps int, conn connectionFlags) error {
	type result struct {
		Addr      string  `json:"addr"`
		Transport string  `json:"transport"`
		Requests  int64   `json:"requests"`
		P50       int64   `json:"p50_ns"`
		P99       int64   `json:"p99_ns"`
		P999      int64   `json:"p999_ns"`
		Mean      int64   `json:"mean_ns"`
		Rate      float64 `json:"msgs_per_s"`
	}
	out := struct {
		Op           string   `json:"op"`
		Request      string   `json:"request"`
		RequestBytes int      `json:"request_bytes"`
		Concurrency  int      `json:"concurrency"`
		Reps         int      `json:"reps"`
		GOMAXPROCS   int      `json:"gomaxprocs"`
		SpinNS       int64    `json:"spin_ns"`
		Results      []result `json:"results"`
	}{Op: request.op, Request: request.what, RequestBytes: request.bytes, Concurrency: concurrency, Reps: reps,
		GOMAXPROCS: runtime.GOMAXPROCS(0), SpinNS: int64(conn.spin)}
	for _, t := range targets {
		out.Results = append(out.Results, result{
			Addr: t.addr, Transport: t.client.Transport(), Requests: t.latency.count(),
			P50: int64(t.latency.quantile(50)), P99: int64(t.latency.quantile(99)), P999: int64(t.latency.quantile(99.9)),
			Mean: int64(t.latency.mean()), Rate: t.rate(),
		})
	}
	return json.NewEncoder(w).Encode(out)
}

func (t *benchTarget) rate() float64 { return float64(t.latency.count()) / t.busy.Seconds() }
