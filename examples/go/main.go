// Command example serves examples/models/regressor.py, a user model outside
// shmserve's package, and calls it from Go with Infer:
//
//	go run .                   # starts the sidecar itself, then stops it
//	go run . -addr shm://NAME  # uses a sidecar already serving the model
//
// The sidecar is $SHMSERVE_BIN, else shmserve on PATH (`make venv` puts it
// in .venv/bin).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/shmserve/shmserve/goclient/protocol"
	"github.com/shmserve/shmserve/goclient/shmclient"
	"github.com/shmserve/shmserve/goclient/sidecar"
)

func main() {
	if err := run(context.Background(), os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "example:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("example", flag.ContinueOnError)
	addr := fs.String("addr", "", "a sidecar serving the regressor (shm://NAME, unix:///path, tcp://host:port); empty: start one")
	model := fs.String("model", "../models/regressor.py:build", "the model the started sidecar serves")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if *addr == "" {
		sc, err := sidecar.Start(ctx, sidecar.Config{
			Model: *model, Transport: "shm", Name: fmt.Sprintf("regressor-%d", os.Getpid()),
			MaxRestartsPerMinute: -1,
		})
		if err != nil {
			return err
		}
		defer sc.Stop(context.Background())
		*addr = sc.Ready().Addr("shm")
	}
	client, err := shmclient.Dial(ctx, *addr)
	if err != nil {
		return err
	}
	defer client.Close()

	m, err := client.Metadata(ctx)
	if err != nil {
		return err
	}
	if len(m.Inputs) != 1 || len(m.Inputs[0].Shape) != 2 {
		return fmt.Errorf("model %q takes %v, not one matrix", m.Name, m.Inputs)
	}
	features := m.Inputs[0].Shape[1]
	fmt.Fprintf(stdout, "model %s over %s: %s %v%v -> %s %v%v, batches of up to %d rows\n", m.Name, client.Transport(),
		m.Inputs[0].Name, m.Inputs[0].DType, m.Inputs[0].Shape, m.Outputs[0].Name, m.Outputs[0].DType, m.Outputs[0].Shape, m.MaxBatchSize)

	scales := []float32{-1, 0, 1, 2.5}
	predictions, err := predict(ctx, client, features, scales)
	if err != nil {
		return err
	}
	for i, s := range scales {
		fmt.Fprintf(stdout, "x = %4.1f * ones(%d): y = %.4f (the data's truth %.4f)\n", s, features, predictions[i], truth(features, s))
	}
	return nil
}

// predict asks the model about one row per scale, each row scale * ones,
// in one batched INFER.
func predict(ctx context.Context, client *shmclient.Client, features int, scales []float32) ([]float32, error) {
	x := make([]float32, 0, len(scales)*features)
	for _, s := range scales {
		for range features {
			x = append(x, s)
		}
	}
	outputs, err := client.Infer(ctx, protocol.NewFloat32([]int{len(scales), features}, x).WithName("x"))
	if err != nil {
		return nil, err
	}
	return outputs[0].Float32s()
}

// truth is the function regressor.py draws its data from: y = x @ w + 0.5
// with w[i] = (i + 1) / features; for x = s * ones that is s * (features + 1) / 2 + 0.5.
func truth(features int, s float32) float32 { return s*float32(features+1)/2 + 0.5 }
