package main

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestExampleAgainstARealServer runs the example as `go run .` does: it
// starts the sidecar serving ../models/regressor.py and calls it. The fitted
// model must predict the truth its data came from, within what the noise
// (scale 0.01 on 10,000 samples) allows.
func TestExampleAgainstARealServer(t *testing.T) {
	if os.Getenv("SHMSERVE_BIN") == "" {
		venv, _ := filepath.Abs(filepath.Join("..", "..", ".venv", "bin", "shmserve"))
		if _, err := os.Stat(venv); err != nil {
			t.Skip("needs the sidecar: set SHMSERVE_BIN or run `make venv`")
		}
		t.Setenv("SHMSERVE_BIN", venv)
	}
	var out bytes.Buffer
	if err := run(context.Background(), nil, &out); err != nil {
		t.Fatalf("%v\n%s", err, &out)
	}
	t.Log("\n" + out.String())
	// The sidecar the example started removed its ring when it stopped.
	if left, _ := filepath.Glob(fmt.Sprintf("/dev/shm/*shmserve.regressor-%d*", os.Getpid())); len(left) > 0 {
		t.Errorf("left in /dev/shm: %v", left)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 5 || lines[0] != "model regressor over shm: x FP32[-1 8] -> y FP32[-1 1], batches of up to 256 rows" {
		t.Fatalf("output:\n%s", &out)
	}
	for _, line := range lines[1:] {
		var scale, got, want float64
		if _, err := fmt.Sscanf(line, "x = %f * ones(8): y = %f (the data's truth %f)", &scale, &got, &want); err != nil {
			t.Fatalf("%q: %v", line, err)
		}
		if math.Abs(got-want) > 0.01 {
			t.Errorf("%s: off by %.4f", line, got-want)
		}
	}
}
