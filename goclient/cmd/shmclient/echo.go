package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"
)

const echoSummary = `Send TEXT as an ECHO request and print the reply. With -c or -n, send -n
requests from -c goroutines, each request made unique (TEXT #goroutine.i),
check every reply against its own request, and print a summary.`

func runEcho(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("echo", "[flags] TEXT", echoSummary, stderr)
	var conn connectionFlags
	conn.register(fs, 5*time.Second, "echo")
	goroutines := fs.Int("c", 1, "goroutines sending at once")
	count := fs.Int("n", 1, "requests in all, spread over the goroutines")
	if err := parseArgs(fs, args, 1, 1); err != nil {
		return err
	}
	text := fs.Arg(0)
	if *goroutines < 1 || *count < 1 {
		return fmt.Errorf("-c and -n must be at least 1")
	}
	ctx, client, closeClient, err := conn.connect(ctx, *goroutines, stderr)
	if err != nil {
		return err
	}
	defer closeClient()

	if *goroutines == 1 && *count == 1 {
		callCtx, cancel := context.WithTimeout(ctx, conn.timeout)
		defer cancel()
		reply, err := client.Echo(callCtx, []byte(text))
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, string(reply))
		return nil
	}

	// The first failure stops every goroutine, in flight or not.
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	var next, mismatches atomic.Int64
	var firstErr error
	var errOnce sync.Once
	var wg sync.WaitGroup
	start := time.Now()
	for g := range *goroutines {
		wg.Go(func() {
			for i := next.Add(1) - 1; i < int64(*count); i = next.Add(1) - 1 {
				request := []byte(fmt.Sprintf("%s #%d.%d", text, g, i))
				callCtx, cancel := context.WithTimeout(ctx, conn.timeout)
				reply, err := client.Echo(callCtx, request)
				cancel()
				if err != nil {
					errOnce.Do(func() {
						firstErr = err
						stop()
					})
					return
				}
				if !bytes.Equal(reply, request) {
					if mismatches.Add(1) == 1 {
						fmt.Fprintf(stderr, "mismatch: sent %q, got %q\n", request, reply)
					}
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if firstErr != nil {
		return firstErr
	}
	fmt.Fprintf(stdout, "%d replies over %s from %d goroutines in %v (%.0f msgs/s): %d mismatched\n",
		*count, client.Transport(), *goroutines, elapsed.Round(time.Microsecond), float64(*count)/elapsed.Seconds(), mismatches.Load())
	if mismatches.Load() > 0 {
		return fmt.Errorf("%d replies did not match their requests", mismatches.Load())
	}
	return nil
}
