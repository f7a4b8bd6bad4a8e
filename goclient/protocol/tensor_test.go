package protocol

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
)

func TestTypedConstructorsAndAccessorsRoundTrip(t *testing.T) {
	tensors := []Tensor{
		NewBool([]int{3}, []bool{true, false, true}),
		NewUint8([]int{2}, []uint8{0, 255}),
		NewInt8([]int{2}, []int8{-128, 127}),
		NewUint16([]int{1}, []uint16{0xBEEF}),
		NewInt16([]int{2}, []int16{-2, 300}),
		NewUint32([]int{1}, []uint32{0xDEADBEEF}),
		NewInt32([]int{2, 2}, []int32{-1, 2, -3, 1 << 30}),
		NewUint64([]int{1}, []uint64{1<<64 - 1}),
		NewInt64(nil, []int64{-1 << 63}),
		NewFP16([]int{2}, []uint16{Float32ToFP16(1.5), Float32ToFP16(-2)}),
		NewBF16([]int{2}, []uint16{Float32ToBF16(3), Float32ToBF16(-0.5)}),
		NewFloat32([]int{0, 3}, nil),
		NewFloat64([]int{1}, []float64{math.Pi}),
	}
	for i := range tensors {
		tensors[i].Name = tensors[i].DType.String()
	}
	body, err := AppendTensorList([]byte("prefix"), tensors)
	if err != nil {
		t.Fatal(err)
	}
	decoded, err := DecodeTensorList(body[len("prefix"):])
	if err != nil {
		t.Fatal(err)
	}
	// Little-endian bytes on the wire, whatever the host.
	if got := decoded[5].Data; !bytes.Equal(got, []byte{0xEF, 0xBE, 0xAD, 0xDE}) {
		t.Errorf("UINT32 data %x", got)
	}
	check := func(name string, got, want any, err error) {
		t.Helper()
		if err != nil || !equalValues(got, want) {
			t.Errorf("%s = %v, %v; want %v", name, got, err, want)
		}
	}
	b, err := decoded[0].Bools()
	check("Bools", b, []bool{true, false, true}, err)
	u8, err := decoded[1].Uint8s()
	check("Uint8s", u8, []uint8{0, 255}, err)
	i8, err := decoded[2].Int8s()
	check("Int8s", i8, []int8{-128, 127}, err)
	u16, err := decoded[3].Uint16s()
	check("Uint16s", u16, []uint16{0xBEEF}, err)
	i16, err := decoded[4].Int16s()
	check("Int16s", i16, []int16{-2, 300}, err)
	u32, err := decoded[5].Uint32s()
	check("Uint32s", u32, []uint32{0xDEADBEEF}, err)
	i32, err := decoded[6].Int32s()
	check("Int32s", i32, []int32{-1, 2, -3, 1 << 30}, err)
	u64, err := decoded[7].Uint64s()
	check("Uint64s", u64, []uint64{1<<64 - 1}, err)
	i64, err := decoded[8].Int64s()
	check("Int64s", i64, []int64{-1 << 63}, err)
	h, err := decoded[9].FP16Bits()
	check("FP16Bits", []float32{FP16ToFloat32(h[0]), FP16ToFloat32(h[1])}, []float32{1.5, -2}, err)
	bf, err := decoded[10].BF16Bits()
	check("BF16Bits", []float32{BF16ToFloat32(bf[0]), BF16ToFloat32(bf[1])}, []float32{3, -0.5}, err)
	f32, err := decoded[11].Float32s()
	check("Float32s", f32, []float32{}, err)
	f64, err := decoded[12].Float64s()
	check("Float64s", f64, []float64{math.Pi}, err)
	if decoded[8].Len() != 1 || decoded[11].Len() != 0 || decoded[6].Len() != 4 {
		t.Errorf("Len: %d %d %d", decoded[8].Len(), decoded[11].Len(), decoded[6].Len())
	}
	if _, err := decoded[12].Float32s(); err == nil {
		t.Error("Float32s of an FP64 tensor succeeded")
	}
	if _, err := (Tensor{DType: DTypeFP32, Shape: []int{2}, Data: make([]byte, 4)}).Float32s(); err == nil {
		t.Error("Float32s of a tensor whose data is short succeeded")
	}
}

func equalValues(got, want any) bool {
	switch w := want.(type) {
	case []bool:
		return slices.Equal(got.([]bool), w)
	case []uint8:
		return slices.Equal(got.([]uint8), w)
	case []int8:
		return slices.Equal(got.([]int8), w)
	case []uint16:
		return slices.Equal(got.([]uint16), w)
	case []int16:
		return slices.Equal(got.([]int16), w)
	case []uint32:
		return slices.Equal(got.([]uint32), w)
	case []int32:
		return slices.Equal(got.([]int32), w)
	case []uint64:
		return slices.Equal(got.([]uint64), w)
	case []int64:
		return slices.Equal(got.([]int64), w)
	case []float32:
		return slices.Equal(got.([]float32), w)
	case []float64:
		return slices.Equal(got.([]float64), w)
	}
	return false
}

func TestAppendTensorListRefusesWhatAServerWould(t *testing.T) {
	ok := NewFloat32([]int{2}, []float32{1, 2})
	for _, tc := range []struct {
		name    string
		tensors []Tensor
		want    *Error
	}{
		{"65 tensors", slices.Repeat([]Tensor{ok}, 65), ErrBadTensor},
		{"shape and data disagree", []Tensor{NewFloat32([]int{3}, []float32{1, 2})}, ErrBadTensor},
		{"negative dim", []Tensor{{DType: DTypeUint8, Shape: []int{-1}}}, ErrBadTensor},
		{"dim over 2^31-1", []Tensor{{DType: DTypeUint8, Shape: []int{0, MaxDim + 1}}}, ErrBadTensor},
		{"rank 9", []Tensor{{DType: DTypeUint8, Shape: make([]int, 9)}}, ErrBadTensor},
		{"long name", []Tensor{ok.WithName(string(make([]byte, 256)))}, ErrBadTensor},
		{"name not UTF-8", []Tensor{ok.WithName("\xff")}, ErrBadTensor},
		{"unknown dtype", []Tensor{{DType: 99, Shape: []int{1}, Data: []byte{0}}}, ErrBadDType},
		{"BOOL byte 2", []Tensor{{DType: DTypeBool, Shape: []int{1}, Data: []byte{2}}}, ErrBadTensor},
		{"overflowing shape", []Tensor{{DType: DTypeFP64, Shape: []int{MaxDim, MaxDim, MaxDim}}}, ErrBadTensor},
	} {
		if _, err := AppendTensorList(nil, tc.tensors); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	// An empty list is a valid reply: just the list header.
	if body, err := AppendTensorList(nil, nil); err != nil || !bytes.Equal(body, make([]byte, 8)) {
		t.Errorf("empty list = %x, %v", body, err)
	}
	if tensors, err := DecodeTensorList(make([]byte, 8)); err != nil || len(tensors) != 0 {
		t.Errorf("decode empty list = %v, %v", tensors, err)
	}
}

// A zero dim after dims whose product wraps around 2^64 must not pass for an
// empty tensor, nor must a product that wraps to 0 itself.
func TestDecodeRejectsShapesThatOverflow(t *testing.T) {
	for _, shape := range [][]int{{1 << 30, 1 << 30, 1 << 30}, {MaxDim, MaxDim, MaxDim, 0, 2}} {
		body := make([]byte, 8, 64)
		binary.LittleEndian.PutUint16(body, 1)
		header := make([]byte, 24+8*len(shape))
		header[0], header[1] = byte(DTypeUint8), byte(len(shape))
		binary.LittleEndian.PutUint64(header[8:], align(uint64(8+len(header)), 64))
		for i, d := range shape {
			binary.LittleEndian.PutUint64(header[24+8*i:], uint64(d))
		}
		body = append(body, header...)
		body = append(body, make([]byte, int(align(uint64(len(body)), 64))-len(body))...)
		_, err := DecodeTensorList(body)
		empty := slices.Contains(shape, 0)
		if empty && err != nil || !empty && !errors.Is(err, ErrBadTensor) {
			t.Errorf("shape %v: %v", shape, err)
		}
	}
}

func TestFP16Conversions(t *testing.T) {
	for _, tc := range []struct {
		f    float32
		bits uint16
	}{
		{0, 0}, {1, 0x3C00}, {-2, 0xC000}, {65504, 0x7BFF}, {float32(math.Inf(1)), 0x7C00},
		{6.1035156e-05, 0x0400}, // smallest normal
		{5.9604645e-08, 0x0001}, // smallest subnormal
		{65520, 0x7C00},         // halfway to the next binade rounds to Inf
		{2.9802322e-08, 0x0000}, // half the smallest subnormal: ties to even, 0
		{2.9802326e-08, 0x0001}, // just above it
		{1.0009766, 0x3C01},     // 1 + 2^-10
		{1.00048828125, 0x3C00}, // 1 + 2^-11: a tie, to even
		{1.00146484375, 0x3C02}, // 1 + 3*2^-11: a tie, to even (up)
		{6.097555e-05, 0x03FF},  // largest subnormal
		{6.103e-05, 0x0400},     // rounds up into the normals
		{float32(math.Copysign(0, -1)), 0x8000},
	} {
		if got := Float32ToFP16(tc.f); got != tc.bits {
			t.Errorf("Float32ToFP16(%g) = %#04x, want %#04x", tc.f, got, tc.bits)
		}
	}
	// Every finite binary16 survives the round trip, and NaN stays NaN.
	for h := range 1 << 16 {
		f := FP16ToFloat32(uint16(h))
		if h&0x7C00 == 0x7C00 && h&0x3FF != 0 {
			if !math.IsNaN(float64(f)) || Float32ToFP16(f)&0x7FFF <= 0x7C00 {
				t.Fatalf("NaN %#04x -> %v -> %#04x", h, f, Float32ToFP16(f))
			}
			continue
		}
		if back := Float32ToFP16(f); back != uint16(h) {
			t.Fatalf("%#04x -> %v -> %#04x", h, f, back)
		}
	}
}

func TestBF16Conversions(t *testing.T) {
	for _, tc := range []struct {
		f    float32
		bits uint16
	}{
		{1, 0x3F80}, {-2, 0xC000}, {float32(math.Inf(-1)), 0xFF80},
		{math.Float32frombits(0x3F808000), 0x3F80}, // a tie, to even (down)
		{math.Float32frombits(0x3F818000), 0x3F82}, // a tie, to even (up)
		{math.Float32frombits(0x3F808001), 0x3F81},
		{math.Float32frombits(0x7F7FFFFF), 0x7F80}, // the largest float32 rounds to Inf
	} {
		if got := Float32ToBF16(tc.f); got != tc.bits {
			t.Errorf("Float32ToBF16(%g) = %#04x, want %#04x", tc.f, got, tc.bits)
		}
	}
	if nan := Float32ToBF16(math.Float32frombits(0x7F800001)); nan&0x7F80 != 0x7F80 || nan&0x7F == 0 {
		t.Errorf("a NaN with only low payload bits became %#04x", nan)
	}
}

// TestHalfFloatsAgainstNumPy compares the conversions with numpy's float16
// and ml_dtypes' bfloat16 (what the server's models use) on every binary16
// value and on float32s around each rounding boundary. It runs the Python
// of $SHMSERVE_PYTHON, which the Makefile sets.
func TestHalfFloatsAgainstNumPy(t *testing.T) {
	python := os.Getenv("SHMSERVE_PYTHON")
	if python == "" {
		t.Skip("SHMSERVE_PYTHON is not set (the Makefile sets it to the venv's python)")
	}
	// Inputs: float32 bits spread over the whole range plus the neighbours of
	// every binary16 and bfloat16 halfway point.
	var inputs []uint32
	for h := range uint32(1 << 16) {
		mid := math.Float32bits(FP16ToFloat32(uint16(h))) + 1<<12 // halfway to the next binary16 (normals)
		inputs = append(inputs, h<<16|h, h<<16+0x8000, mid-1, mid, mid+1)
	}
	dir := t.TempDir()
	in := filepath.Join(dir, "in.bin")
	raw := make([]byte, 4*len(inputs))
	for i, v := range inputs {
		binary.LittleEndian.PutUint32(raw[4*i:], v)
	}
	if err := os.WriteFile(in, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	script := `
import sys, numpy as np, ml_dtypes
d = sys.argv[1]
x = np.fromfile(d + "/in.bin", "<u4").view("<f4")
with np.errstate(all="ignore"):
    np.arange(65536, dtype="<u2").view("<f2").astype("<f4").tofile(d + "/fp16_to_f32.bin")
    x.astype("<f2").tofile(d + "/f32_to_fp16.bin")
    x.astype(ml_dtypes.bfloat16).tofile(d + "/f32_to_bf16.bin")
`
	if out, err := exec.Command(python, "-c", script, dir).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", python, err, out)
	}
	read := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	widened := read("fp16_to_f32.bin")
	for h := range 1 << 16 {
		want := binary.LittleEndian.Uint32(widened[4*h:])
		if got := math.Float32bits(FP16ToFloat32(uint16(h))); got != want && !(isNaN32(got) && isNaN32(want)) {
			t.Fatalf("FP16ToFloat32(%#04x) = %#08x, numpy %#08x", h, got, want)
		}
	}
	fp16, bf16 := read("f32_to_fp16.bin"), read("f32_to_bf16.bin")
	for i, v := range inputs {
		f := math.Float32frombits(v)
		if got, want := Float32ToFP16(f), binary.LittleEndian.Uint16(fp16[2*i:]); got != want && !(isNaN16(got, 0x7C00) && isNaN16(want, 0x7C00)) {
			t.Fatalf("Float32ToFP16(%#08x) = %#04x, numpy %#04x", v, got, want)
		}
		if got, want := Float32ToBF16(f), binary.LittleEndian.Uint16(bf16[2*i:]); got != want && !(isNaN16(got, 0x7F80) && isNaN16(want, 0x7F80)) {
			t.Fatalf("Float32ToBF16(%#08x) = %#04x, ml_dtypes %#04x", v, got, want)
		}
	}
}

func isNaN32(b uint32) bool { return b&0x7F800000 == 0x7F800000 && b&0x7FFFFF != 0 }

func isNaN16(b, expMask uint16) bool { return b&expMask == expMask && b&^(expMask|0x8000) != 0 }
