package shmclient

// INFER and METADATA against the real Python server serving user models
// from a file outside the package (examples/models/identity.py), over every
// client transport.

import (
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"slices"
	"sync"
	"testing"

	"github.com/shmserve/shmserve/goclient/internal/crosstest"
	"github.com/shmserve/shmserve/goclient/protocol"
	"github.com/shmserve/shmserve/goclient/sidecar"
)

// startExampleModel serves examples/models/identity.py:factory over shm,
// uds and tcp and returns the three addresses.
func startExampleModel(t *testing.T, factory string) []string {
	t.Helper()
	file, err := filepath.Abs(filepath.Join("..", "..", "examples", "models", "identity.py"))
	if err != nil {
		t.Fatal(err)
	}
	server := crosstest.Start(t, sidecar.Config{
		Model: file + ":" + factory, Transport: "shm,unix,tcp", Name: crosstest.UniqueName(), MaxRestartsPerMinute: -1,
		Args: []string{"--socket", filepath.Join(crosstest.SocketDir(t), "s.sock"), "--tcp-port", "0"},
	})
	ready := server.Ready()
	return []string{ready.Addr("shm"), ready.Addr("unix"), ready.Addr("tcp")}
}

// checkTensors fails unless got is want exactly: names, dtypes, shapes and
// every byte.
func checkTensors(t *testing.T, what string, got, want []Tensor) {
	t.Helper()
	if len(got) != len(want) {
		t.Errorf("%s: %d tensors %v, want %v", what, len(got), got, want)
		return
	}
	for i := range want {
		g, w := got[i], want[i]
		if g.Name != w.Name || g.DType != w.DType || !slices.Equal(g.Shape, w.Shape) || !bytes.Equal(g.Data, w.Data) {
			t.Errorf("%s: output %d is %v % x, want %v % x", what, i, g, g.Data, w, w.Data)
		}
	}
}

// wantCode fails unless err is a *protocol.Error of code.
func wantCode(t *testing.T, what string, err error, code protocol.Code) {
	t.Helper()
	var protocolErr *protocol.Error
	if !errors.As(err, &protocolErr) || protocolErr.Code != code {
		t.Errorf("%s: %v, want %v", what, err, code)
	}
}

// typedRequest is a request to the typed model of rows rows, made from
// seed, and the reply the model must give.
func typedRequest(seed, rows int, named bool) (inputs, want []Tensor) {
	a := make([]int32, rows*4)
	b := make([]float64, rows)
	mask := make([]bool, rows)
	img := make([]uint8, rows*4)
	a2, bSum, maskNot := make([]int32, len(a)), make([]float64, rows), make([]bool, rows)
	for r := range rows {
		sum := 0.0
		for j := range 4 {
			v := int32(seed*1000 + r*10 + j - 500)
			a[r*4+j], a2[r*4+j] = v, 2*v
			sum += float64(v)
			img[r*4+j] = uint8(seed + 3*r + j)
		}
		b[r] = float64(seed) + 0.25*float64(r)
		bSum[r] = b[r] + sum
		mask[r], maskNot[r] = (seed+r)%2 == 0, (seed+r)%2 != 0
	}
	inputs = []Tensor{
		protocol.NewInt32([]int{rows, 4}, a), protocol.NewFloat64([]int{rows}, b),
		protocol.NewBool([]int{rows}, mask), protocol.NewUint8([]int{rows, 2, 2}, img),
	}
	if named {
		// Named inputs bind whatever order they come in.
		inputs = []Tensor{inputs[3].WithName("img"), inputs[1].WithName("b"), inputs[0].WithName("a"), inputs[2].WithName("mask")}
	}
	want = []Tensor{
		protocol.NewInt32([]int{rows, 4}, a2).WithName("a2"), protocol.NewFloat64([]int{rows}, bSum).WithName("b_sum"),
		protocol.NewBool([]int{rows}, maskNot).WithName("mask_not"), protocol.NewUint8([]int{rows, 2, 2}, img).WithName("img"),
	}
	return inputs, want
}

func TestCrossLanguageInferBatchedDTypesFrom16Goroutines(t *testing.T) {
	wantMetadata := Metadata{
		Name: "typed", Platform: "shmserve", Versions: []string{"1"}, MaxBatchSize: 64,
		Inputs: []protocol.TensorSpec{
			{Name: "a", DType: protocol.DTypeInt32, Shape: []int{-1, 4}}, {Name: "b", DType: protocol.DTypeFP64, Shape: []int{-1}},
			{Name: "mask", DType: protocol.DTypeBool, Shape: []int{-1}}, {Name: "img", DType: protocol.DTypeUint8, Shape: []int{-1, 2, 2}},
		},
		Outputs: []protocol.TensorSpec{
			{Name: "a2", DType: protocol.DTypeInt32, Shape: []int{-1, 4}}, {Name: "b_sum", DType: protocol.DTypeFP64, Shape: []int{-1}},
			{Name: "mask_not", DType: protocol.DTypeBool, Shape: []int{-1}}, {Name: "img", DType: protocol.DTypeUint8, Shape: []int{-1, 2, 2}},
		},
	}
	for _, addr := range startExampleModel(t, "typed") {
		t.Run(addr[:3], func(t *testing.T) {
			client := dial(t, addr)
			m, err := client.Metadata(testCtx(t))
			if err != nil || !reflect.DeepEqual(m, wantMetadata) {
				t.Fatalf("Metadata = %+v, %v; want %+v", m, err, wantMetadata)
			}
			var wg sync.WaitGroup
			for g := range 16 {
				wg.Go(func() {
					// Half the goroutines decode into one Outputs, whose
					// storage replies of changing row counts reuse.
					var out Outputs
					for i := range 25 {
						seed, rows := g*100+i, 1+(g+i)%5
						inputs, want := typedRequest(seed, rows, g%2 == 0)
						var got []Tensor
						var err error
						if g%4 < 2 {
							err = client.InferInto(testCtx(t), &out, inputs...)
							got = out.Tensors
						} else {
							got, err = client.Infer(testCtx(t), inputs...)
						}
						if err != nil {
							t.Errorf("goroutine %d request %d: %v", g, i, err)
							return
						}
						checkTensors(t, fmt.Sprintf("goroutine %d request %d (%d rows)", g, i, rows), got, want)
					}
				})
			}
			wg.Wait()

			valid, _ := typedRequest(1, 2, true)
			with := func(i int, replacement Tensor) []Tensor {
				tensors := slices.Clone(valid)
				tensors[i] = replacement.WithName(valid[i].Name)
				return tensors
			}
			for _, tc := range []struct {
				what   string
				inputs []Tensor
				code   protocol.Code
			}{
				{"an unknown input name", append(slices.Clone(valid[:3]), valid[3].WithName("nope")), protocol.CodeBadInput},
				{"a missing input", valid[:3], protocol.CodeBadInput},
				{"an input given twice", append(slices.Clone(valid[:3]), valid[2]), protocol.CodeBadInput},
				{"some names, not all", append(slices.Clone(valid[:3]), valid[3].WithName("")), protocol.CodeBadInput},
				{"five tensors for four inputs", append(slices.Clone(valid), protocol.NewUint8([]int{1}, []uint8{0}).WithName("e")), protocol.CodeBadInput},
				{"b as FP32", with(1, protocol.NewFloat32([]int{2}, []float32{1, 2})), protocol.CodeBadDType},
				{"img of rank 2", with(0, protocol.NewUint8([]int{2, 4}, make([]uint8, 8))), protocol.CodeBadShape},
				{"a with 3 columns", with(2, protocol.NewInt32([]int{2, 3}, make([]int32, 6))), protocol.CodeBadShape},
				{"batches of 2 and 3", with(1, protocol.NewFloat64([]int{3}, []float64{1, 2, 3})), protocol.CodeBadShape},
			} {
				_, err := client.Infer(testCtx(t), tc.inputs...)
				wantCode(t, tc.what, err, tc.code)
			}
			over, _ := typedRequest(1, 65, false)
			_, err = client.Infer(testCtx(t), over...)
			wantCode(t, "a batch of 65 rows, max_batch_size 64", err, protocol.CodeBadShape)
			// The server goes on serving after every refusal.
			inputs, want := typedRequest(7, 3, false)
			got, err := client.Infer(testCtx(t), inputs...)
			if err != nil {
				t.Fatal(err)
			}
			checkTensors(t, "after the refusals", got, want)
		})
	}
}

func TestCrossLanguageInferFloat32AndTooLarge(t *testing.T) {
	addrs := startExampleModel(t, "identity")
	x := make([]float32, 2*3072)
	for i := range x {
		x[i] = float32(i)/7 - 300
	}
	for _, addr := range addrs {
		client := dial(t, addr)
		input := protocol.NewFloat32([]int{2, 3072}, x)
		got, err := client.Infer(testCtx(t), input)
		if err != nil {
			t.Fatalf("%s: %v", addr, err)
		}
		checkTensors(t, addr, got, []Tensor{input.WithName("y")})
		_, err = client.Infer(testCtx(t), protocol.NewFloat64([]int{1, 2}, []float64{1, 2}))
		wantCode(t, addr+": FP64 to an FP32 input", err, protocol.CodeBadDType)
		_, err = client.Infer(testCtx(t), protocol.NewFloat32([]int{4}, make([]float32, 4)))
		wantCode(t, addr+": rank 1 to a rank-2 input", err, protocol.CodeBadShape)
		_, err = client.Infer(testCtx(t), protocol.NewFloat32([]int{2, 2}, make([]float32, 3)))
		wantCode(t, addr+": 3 values for a 2x2 shape", err, protocol.CodeBadTensor)
		_, err = client.Infer(testCtx(t))
		wantCode(t, addr+": no tensors", err, protocol.CodeBadTensor)
		// Over the ring's req_capacity (256 KiB), or a packet's 16 MiB:
		// refused before sending.
		width := 256 << 10 / 4
		if client.Transport() != "shm" {
			width = protocol.MaxPacketBody / 4
		}
		if _, err := client.Infer(testCtx(t), protocol.NewFloat32([]int{1, width}, make([]float32, width))); !errors.Is(err, ErrTooLarge) {
			t.Errorf("%s: a request over the limit = %v, want ErrTooLarge", addr, err)
		}
	}
}

func TestCrossLanguageInferUnbatchedInt64AndBF16(t *testing.T) {
	for _, addr := range startExampleModel(t, "unbatched") {
		client := dial(t, addr)
		m, err := client.Metadata(testCtx(t))
		if err != nil || m.MaxBatchSize != 0 || len(m.Inputs) != 2 || m.Inputs[1].DType != protocol.DTypeBF16 ||
			!slices.Equal(m.Inputs[1].Shape, []int{2, 2}) || m.Outputs[0].Name != "next_ids" {
			t.Fatalf("%s: Metadata = %+v, %v", addr, m, err)
		}
		h, h2 := make([]uint16, 4), make([]uint16, 4)
		for i, f := range []float32{1.5, -0.375, 3e38, 1e-20} {
			h[i], h2[i] = protocol.Float32ToBF16(f), protocol.Float32ToBF16(2*f)
		}
		ids := []int64{-1 << 62, 0, 1<<63 - 2}
		got, err := client.Infer(testCtx(t), protocol.NewInt64([]int{3}, ids), protocol.NewBF16([]int{2, 2}, h))
		if err != nil {
			t.Fatalf("%s: %v", addr, err)
		}
		checkTensors(t, addr, got, []Tensor{
			protocol.NewInt64([]int{3}, []int64{-1<<62 + 1, 1, 1<<63 - 1}).WithName("next_ids"),
			protocol.NewBF16([]int{2, 2}, h2).WithName("h2"),
		})
		_, err = client.Infer(testCtx(t), protocol.NewInt64([]int{1, 3}, ids), protocol.NewBF16([]int{2, 2}, h))
		wantCode(t, addr+": a batch dim the model does not have", err, protocol.CodeBadShape)
		_, err = client.Infer(testCtx(t), protocol.NewInt64([]int{3}, ids), protocol.NewFP16([]int{2, 2}, h))
		wantCode(t, addr+": FP16 for BF16", err, protocol.CodeBadDType)
	}
}

func TestCrossLanguageInferModelFailureIsInternal(t *testing.T) {
	for _, addr := range startExampleModel(t, "broken") {
		client := dial(t, addr)
		for i := range 3 {
			_, err := client.Infer(testCtx(t), protocol.NewFloat32([]int{2}, []float32{1, -2}))
			wantCode(t, fmt.Sprintf("%s: a negative input, call %d", addr, i), err, protocol.CodeInternal)
			input := protocol.NewFloat32([]int{2}, []float32{1, 2})
			got, err := client.Infer(testCtx(t), input)
			if err != nil {
				t.Fatalf("%s: after INTERNAL: %v", addr, err)
			}
			checkTensors(t, addr, got, []Tensor{input.WithName("y")})
		}
	}
}
