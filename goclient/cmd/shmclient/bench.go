package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/shmserve/shmserve/goclient/shmclient"
)

const benchSummary = `Measure ECHO round trips of -size bytes against each address in -addr
(comma-separated), in one run: after -warmup unmeasured requests each, the
addresses take turns for -reps rounds of -n/-reps requests, so that drift in
the machine's speed affects them alike. Prints p50/p99/p99.9/mean latency and
msgs/s per address, and how the second address compares with the first.`

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
	payload := make([]byte, *size)
	rand.Read(payload)

	var targets []*benchTarget
	for _, addr := range strings.Split(conn.addr, ",") {
		client, err := conn.dial(ctx, addr, *concurrency, stderr)
		if err != nil {
			return err
		}
		defer client.Close()
		targets = append(targets, &benchTarget{addr: addr, client: client, latency: newLatencies()})
	}
	for _, t := range targets {
		if _, err := echoLoad(ctx, t.client, *warmup, *concurrency, conn.timeout, payload, nil); err != nil {
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
			elapsed, err := echoLoad(ctx, t.client, n, *concurrency, conn.timeout, payload, t.latency)
			if err != nil {
				return fmt.Errorf("%s: %w", t.addr, err)
			}
			t.busy += elapsed
		}
	}
	printBench(stdout, targets, *size, *concurrency, *reps, conn)
	return nil
}

// echoLoad sends requests echoes from concurrency goroutines, each with its
// own timeout, checking every reply, and returns the wall time they took.
func echoLoad(ctx context.Context, client *shmclient.Client, requests, concurrency int, timeout time.Duration, payload []byte, latency *latencies) (time.Duration, error) {
	// The first failure stops every goroutine, in flight or not.
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	var next atomic.Int64
	var firstErr error
	var errOnce sync.Once
	var wg sync.WaitGroup
	start := time.Now()
	for range concurrency {
		wg.Go(func() {
			local := newLatencies()
			for next.Add(1) <= int64(requests) {
				callCtx, cancel := context.WithTimeout(ctx, timeout)
				sent := time.Now()
				reply, err := client.Echo(callCtx, payload)
				took := time.Since(sent)
				cancel()
				if err == nil && !bytes.Equal(reply, payload) {
					err = fmt.Errorf("reply of %d bytes differs from the %d-byte request", len(reply), len(payload))
				}
				if err != nil {
					errOnce.Do(func() {
						firstErr = err
						stop()
					})
					return
				}
				local.record(took)
			}
			if latency != nil {
				latency.merge(local)
			}
		})
	}
	wg.Wait()
	return time.Since(start), firstErr
}

func printBench(w io.Writer, targets []*benchTarget, size, concurrency, reps int, conn connectionFlags) {
	fmt.Fprintf(w, "echo %d bytes, %d in flight, %d interleaved rounds, GOMAXPROCS=%d, NumCPU=%d, shm spin %v\n",
		size, concurrency, reps, runtime.GOMAXPROCS(0), runtime.NumCPU(), conn.spin)
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

func (t *benchTarget) rate() float64 { return float64(t.latency.count()) / t.busy.Seconds() }
