// Command gobench is the Go side of the transport benchmark (bench/run.py).
//
// It reads a plan (JSON, on stdin), dials every target once, runs the plan's
// cells in the order given (the orchestrator interleaves them across
// repetitions), and writes one JSON line per cell to stdout: call count,
// errors, elapsed time and the latency HdrHistogram in its standard V2
// compressed base64 encoding, which the orchestrator decodes and merges.
//
// A cell keeps conc calls in flight, each from its own goroutine, in closed
// loop (package goclient/load): warm-up first, then the measured phase without
// a pause in between, so neither side falls asleep at the switch.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"

	"github.com/shmserve/shmserve/goclient/load"
)

// Plan is what the orchestrator asks for in one run of this program.
type Plan struct {
	Targets   map[string]TargetSpec `json:"targets"`
	Cells     []Cell                `json:"cells"`
	WarmupMS  int                   `json:"warmup_ms"`
	MeasureMS int                   `json:"measure_ms"`
	// MinCalls stretches a cell's measuring window (up to maxStretch) until
	// that many calls completed in it: on a loaded machine one stalled call
	// can outlast a short window.
	MinCalls int64 `json:"min_calls"`
}

const maxStretch = 30 * time.Second

// TargetSpec names one server endpoint. The URL scheme picks the client:
// shm://, unix:// and tcp:// use the shmserve Go client library, http:// a
// net/http JSON client, grpc:// grpc-go, zmq:///PATH and nng:///PATH
// ZeroMQ and NNG over ipc://PATH (mq.go).
type TargetSpec struct {
	URL string `json:"url"`
	// SpinUS is the ring client's spin budget; 0 blocks at once.
	SpinUS float64 `json:"spin_us"`
	// Conns is how many connections a stream or HTTP client keeps: at least
	// the highest concurrency, so no call waits for a connection.
	Conns int `json:"conns"`
	// ServerPGID is the server's process group: the CPU time of all its
	// processes (gunicorn workers too) is charged to the cells run against it.
	ServerPGID int `json:"server_pgid"`
	// GoMaxProcs, when set, is this driver's GOMAXPROCS during the target's
	// cells: a client that leaves the server a CPU of its own.
	GoMaxProcs int `json:"gomaxprocs"`
	// CPU, when set, is the one CPU every thread of this driver runs on
	// during the target's cells (the server pinned to the same one shares
	// it, as the C floor's one-CPU semaphore placement does).
	CPU *int `json:"cpu"`
}

// Cell is one measurement.
type Cell struct {
	Target string `json:"target"`
	// Op is echo, classify, classify_batch or prompt.
	Op    string `json:"op"`
	Size  int    `json:"size"`  // echo payload bytes
	Conc  int    `json:"conc"`  // calls in flight
	Batch int    `json:"batch"` // images per classify_batch call
	// Prompt and MaxNewTokens define a prompt call.
	Prompt       string `json:"prompt"`
	MaxNewTokens int    `json:"max_new_tokens"`
}

// Result is one output line.
type Result struct {
	Cell
	Count      int64  `json:"count"`
	Errors     int64  `json:"errors"` // 1 when a call failed: the first failure stops the cell
	FirstError string `json:"first_error,omitempty"`
	ElapsedNS  int64  `json:"elapsed_ns"`
	// Units is how many items one call carries: images for classify_batch, else 1.
	Units      int    `json:"units"`
	Histogram  string `json:"hist"`
	GoMaxProcs int    `json:"gomaxprocs"`
	// CPU seconds used during the measured window by this process and by
	// the server's process group: what spinning or a heavy stack costs.
	ClientCPU float64 `json:"client_cpu_s"`
	ServerCPU float64 `json:"server_cpu_s"`
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "gobench:", err)
		os.Exit(1)
	}
}

func run() error {
	var plan Plan
	if err := json.NewDecoder(os.Stdin).Decode(&plan); err != nil {
		return fmt.Errorf("reading the plan: %w", err)
	}
	targets := map[string]Target{}
	defer func() {
		for _, t := range targets {
			t.Close()
		}
	}()
	ctx := context.Background()
	for name, spec := range plan.Targets {
		t, err := Dial(ctx, spec)
		if err != nil {
			return fmt.Errorf("target %s (%s): %w", name, spec.URL, err)
		}
		targets[name] = t
	}
	out := json.NewEncoder(os.Stdout)
	warmup := time.Duration(plan.WarmupMS) * time.Millisecond
	measure := time.Duration(plan.MeasureMS) * time.Millisecond
	for _, cell := range plan.Cells {
		t, ok := targets[cell.Target]
		if !ok {
			return fmt.Errorf("cell names unknown target %q", cell.Target)
		}
		spec := plan.Targets[cell.Target]
		result, err := runPlaced(ctx, t, spec, cell, warmup, measure, plan.MinCalls)
		if err != nil {
			return fmt.Errorf("%s %s size %d conc %d: %w", cell.Target, cell.Op, cell.Size, cell.Conc, err)
		}
		if err := out.Encode(result); err != nil {
			return err
		}
	}
	return nil
}

// runPlaced runs one cell with this driver's GOMAXPROCS and CPUs as spec
// asks, and puts them back after it.
func runPlaced(ctx context.Context, t Target, spec TargetSpec, cell Cell, warmup, measure time.Duration, minCalls int64) (result Result, err error) {
	defaultProcs := runtime.GOMAXPROCS(0)
	defer runtime.GOMAXPROCS(defaultProcs)
	if spec.GoMaxProcs > 0 {
		runtime.GOMAXPROCS(spec.GoMaxProcs)
	}
	if spec.CPU != nil {
		restore, err := pinAll(*spec.CPU)
		if err != nil {
			return Result{}, err
		}
		defer func() {
			if restoreErr := restore(); restoreErr != nil && err == nil {
				err = fmt.Errorf("unpinning after the cell: %w", restoreErr)
			}
		}()
	}
	return runCell(ctx, t, cell, warmup, measure, minCalls, spec.ServerPGID)
}

func runCell(ctx context.Context, t Target, cell Cell, warmup, measure time.Duration, minCalls int64, pgid int) (Result, error) {
	calls := make([]func(context.Context) error, cell.Conc)
	units := 1
	for i := range calls {
		call, n, err := t.Call(cell)
		if err != nil {
			return Result{}, err
		}
		calls[i], units = call, n
	}
	var clientCPU, serverCPU float64
	measuring := false
	measured, callErr := load.Run(ctx, calls, load.Options{
		WarmupDuration: warmup, Duration: measure, MinCalls: int(minCalls), MaxDuration: maxStretch,
		OnMeasure: func() {
			measuring = true
			clientCPU, serverCPU = selfCPU(), groupCPU(pgid)
		},
	})
	if measured.Latency == nil {
		return Result{}, callErr // the cell could not start
	}
	if measuring {
		clientCPU, serverCPU = selfCPU()-clientCPU, groupCPU(pgid)-serverCPU
	}
	encoded, err := measured.Latency.Encode(hdrhistogram.V2CompressedEncodingCookieBase)
	if err != nil {
		return Result{}, err
	}
	result := Result{Cell: cell, Count: measured.Calls,
		ElapsedNS: measured.Elapsed.Nanoseconds(), Units: units, Histogram: string(encoded),
		GoMaxProcs: runtime.GOMAXPROCS(0), ClientCPU: clientCPU, ServerCPU: serverCPU}
	if callErr != nil {
		// A failing call is a broken bench, not a data point: it stopped the
		// cell, and the orchestrator reports its cause.
		result.Errors, result.FirstError = 1, callErr.Error()
	}
	return result, nil
}
