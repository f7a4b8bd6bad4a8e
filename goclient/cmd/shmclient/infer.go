package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	"github.com/shmserve/shmserve/goclient/npy"
	"github.com/shmserve/shmserve/goclient/protocol"
	"github.com/shmserve/shmserve/goclient/shmclient"
)

const inferSummary = `Call the served model with INFER. Inputs are NumPy .npy files: given as
FILE.npy arguments they bind to the model's inputs by position; given as
-input NAME=FILE.npy (repeatable) they bind by name. Prints one line per
output (name, dtype, shape, the first -show values); with -out DIR, writes
each output to DIR/NAME.npy as well.`

const metadataSummary = `Print the served model's signature (the METADATA reply) as JSON: inputs and
outputs with their datatype and shape (-1 is any size), and max_batch_size.`

// namedInputs collects -input NAME=FILE.npy flags.
type namedInputs []string

func (n *namedInputs) String() string { return strings.Join(*n, ",") }

func (n *namedInputs) Set(value string) error {
	name, file, ok := strings.Cut(value, "=")
	if !ok || name == "" || file == "" {
		return fmt.Errorf("%q is not NAME=FILE.npy", value)
	}
	*n = append(*n, value)
	return nil
}

// readInputs loads the tensors of -input flags and positional files.
func readInputs(named namedInputs, positional []string) ([]shmclient.Tensor, error) {
	var inputs []shmclient.Tensor
	for _, arg := range named {
		name, file, _ := strings.Cut(arg, "=")
		t, err := npy.ReadFile(file)
		if err != nil {
			return nil, err
		}
		inputs = append(inputs, t.WithName(name))
	}
	for _, file := range positional {
		t, err := npy.ReadFile(file)
		if err != nil {
			return nil, err
		}
		inputs = append(inputs, t)
	}
	return inputs, nil
}

func runInfer(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("infer", "[flags] [FILE.npy...]", inferSummary, stderr)
	var conn connectionFlags
	conn.register(fs, 30*time.Second, "echo")
	var named namedInputs
	fs.Var(&named, "input", "an input bound by name: NAME=FILE.npy (repeatable)")
	outDir := fs.String("out", "", "write each output to DIR/NAME.npy")
	show := fs.Int("show", 8, "values of each output to print")
	if err := parseArgs(fs, args, 0, -1); err != nil {
		return err
	}
	if len(named) == 0 && fs.NArg() == 0 {
		fs.Usage()
		return errUsage
	}
	inputs, err := readInputs(named, fs.Args())
	if err != nil {
		return err
	}
	ctx, client, closeClient, err := conn.connect(ctx, 1, stderr)
	if err != nil {
		return err
	}
	defer closeClient()
	callCtx, cancel := context.WithTimeout(ctx, conn.timeout)
	defer cancel()
	start := time.Now()
	outputs, err := client.Infer(callCtx, inputs...)
	took := time.Since(start)
	if err != nil {
		return err
	}
	for _, t := range outputs {
		fmt.Fprintf(stdout, "%s %v %v %s\n", t.Name, t.DType, t.Shape, preview(t, *show))
		if *outDir != "" {
			if err := npy.WriteFile(filepath.Join(*outDir, filepath.Base(t.Name)+".npy"), t); err != nil {
				return err
			}
		}
	}
	fmt.Fprintf(stdout, "%d output(s) over %s in %s\n", len(outputs), client.Transport(), formatLatency(took))
	return nil
}

// preview formats the first n elements of t, then "..." if it has more.
func preview(t shmclient.Tensor, n int) string {
	values, err := elementStrings(t)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	if len(values) > n {
		values = append(values[:n], "...")
	}
	return "[" + strings.Join(values, " ") + "]"
}

// elementStrings formats every element of t; FP16 and BF16 as the float32
// of the same value.
func elementStrings(t shmclient.Tensor) ([]string, error) {
	var v any
	var err error
	switch t.DType {
	case protocol.DTypeBool:
		v, err = t.Bools()
	case protocol.DTypeUint8:
		v, err = t.Uint8s()
	case protocol.DTypeInt8:
		v, err = t.Int8s()
	case protocol.DTypeUint16:
		v, err = t.Uint16s()
	case protocol.DTypeInt16:
		v, err = t.Int16s()
	case protocol.DTypeUint32:
		v, err = t.Uint32s()
	case protocol.DTypeInt32:
		v, err = t.Int32s()
	case protocol.DTypeUint64:
		v, err = t.Uint64s()
	case protocol.DTypeInt64:
		v, err = t.Int64s()
	case protocol.DTypeFP32:
		v, err = t.Float32s()
	case protocol.DTypeFP64:
		v, err = t.Float64s()
	case protocol.DTypeFP16, protocol.DTypeBF16:
		bits, toFloat := t.FP16Bits, protocol.FP16ToFloat32
		if t.DType == protocol.DTypeBF16 {
			bits, toFloat = t.BF16Bits, protocol.BF16ToFloat32
		}
		var raw []uint16
		raw, err = bits()
		floats := make([]float32, len(raw))
		for i, b := range raw {
			floats[i] = toFloat(b)
		}
		v = floats
	default:
		return nil, fmt.Errorf("dtype %v", t.DType)
	}
	if err != nil {
		return nil, err
	}
	// fmt prints a slice as [a b c]; its elements are what is wanted.
	return strings.Fields(strings.Trim(fmt.Sprint(v), "[]")), nil
}

func runMetadata(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("metadata", "[flags]", metadataSummary, stderr)
	var conn connectionFlags
	conn.register(fs, 10*time.Second, "echo")
	if err := parseArgs(fs, args, 0, 0); err != nil {
		return err
	}
	ctx, client, closeClient, err := conn.connect(ctx, 1, stderr)
	if err != nil {
		return err
	}
	defer closeClient()
	callCtx, cancel := context.WithTimeout(ctx, conn.timeout)
	defer cancel()
	m, err := client.Metadata(callCtx)
	if err != nil {
		return err
	}
	out, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(stdout, "%s\n", out)
	return err
}
