package npy

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/shmserve/shmserve/goclient/protocol"
)

// python returns the interpreter with numpy that the cross-language tests
// use (SHMSERVE_PYTHON, set by the Makefile), or skips.
func python(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("SHMSERVE_PYTHON")
	if bin == "" {
		bin = filepath.Join("..", "..", ".venv", "bin", "python")
	}
	if _, err := os.Stat(bin); err != nil {
		t.Skipf("needs Python with numpy: %v (set SHMSERVE_PYTHON, or run `make test`)", err)
	}
	return bin
}

func runPython(t *testing.T, script string, args ...string) {
	t.Helper()
	cmd := exec.Command(python(t), append([]string{"-c", script}, args...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("python: %v\n%s", err, out)
	}
}

// Every array numpy writes for these dtypes, in every format version, is
// arange(n) cast to the dtype (bool: odd elements true), so the test knows
// each element without a second source of truth.
var numpyCases = []struct {
	name  string // file name stem and the dtype numpy is given
	dtype protocol.DType
	shape []int
}{
	{"float32", protocol.DTypeFP32, []int{2, 3}},
	{"float64", protocol.DTypeFP64, []int{4}},
	{"float16", protocol.DTypeFP16, []int{3, 1, 2}},
	{"bfloat16", protocol.DTypeBF16, []int{2, 2}},
	{"int8", protocol.DTypeInt8, []int{5}},
	{"int16", protocol.DTypeInt16, []int{2, 2}},
	{"int32", protocol.DTypeInt32, []int{1, 3}},
	{"int64", protocol.DTypeInt64, []int{}},
	{"uint8", protocol.DTypeUint8, []int{0, 3}},
	{"uint16", protocol.DTypeUint16, []int{3}},
	{"uint32", protocol.DTypeUint32, []int{3}},
	{"uint64", protocol.DTypeUint64, []int{2}},
	{"bool", protocol.DTypeBool, []int{2, 3}},
}

const writeArrays = `
import sys, numpy as np, ml_dtypes
out = sys.argv[1]
cases = [c.split(":") for c in sys.argv[2:]]
for name, shape in cases:
    shape = tuple(int(d) for d in shape.split("x") if d)
    n = int(np.prod(shape))
    dtype = ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)
    a = (np.arange(n) % 2 == 1) if name == "bool" else np.arange(n).astype(dtype)
    a = a.reshape(shape)
    for version in [(1, 0), (2, 0), (3, 0)]:
        with open(f"{out}/{name}-v{version[0]}.npy", "wb") as f:
            np.lib.format.write_array(f, a, version=version)
`

// expected builds arange(n) of the case's dtype the Go way.
func expected(dtype protocol.DType, shape []int) protocol.Tensor {
	n := 1
	for _, d := range shape {
		n *= d
	}
	ints := make([]int, n)
	for i := range ints {
		ints[i] = i
	}
	switch dtype {
	case protocol.DTypeFP32:
		return protocol.NewFloat32(shape, convert[float32](ints))
	case protocol.DTypeFP64:
		return protocol.NewFloat64(shape, convert[float64](ints))
	case protocol.DTypeFP16:
		bits := make([]uint16, n)
		for i := range bits {
			bits[i] = protocol.Float32ToFP16(float32(i))
		}
		return protocol.NewFP16(shape, bits)
	case protocol.DTypeBF16:
		bits := make([]uint16, n)
		for i := range bits {
			bits[i] = protocol.Float32ToBF16(float32(i))
		}
		return protocol.NewBF16(shape, bits)
	case protocol.DTypeInt8:
		return protocol.NewInt8(shape, convert[int8](ints))
	case protocol.DTypeInt16:
		return protocol.NewInt16(shape, convert[int16](ints))
	case protocol.DTypeInt32:
		return protocol.NewInt32(shape, convert[int32](ints))
	case protocol.DTypeInt64:
		return protocol.NewInt64(shape, convert[int64](ints))
	case protocol.DTypeUint8:
		return protocol.NewUint8(shape, convert[uint8](ints))
	case protocol.DTypeUint16:
		return protocol.NewUint16(shape, convert[uint16](ints))
	case protocol.DTypeUint32:
		return protocol.NewUint32(shape, convert[uint32](ints))
	case protocol.DTypeUint64:
		return protocol.NewUint64(shape, convert[uint64](ints))
	case protocol.DTypeBool:
		bools := make([]bool, n)
		for i := range bools {
			bools[i] = i%2 == 1
		}
		return protocol.NewBool(shape, bools)
	}
	panic(dtype)
}

func convert[T int8 | int16 | int32 | int64 | uint8 | uint16 | uint32 | uint64 | float32 | float64](ints []int) []T {
	out := make([]T, len(ints))
	for i, v := range ints {
		out[i] = T(v)
	}
	return out
}

func shapeArg(shape []int) string {
	dims := make([]string, len(shape))
	for i, d := range shape {
		dims[i] = fmt.Sprint(d)
	}
	return strings.Join(dims, "x")
}

func sameTensor(a, b protocol.Tensor) bool {
	return a.DType == b.DType && slices.Equal(a.Shape, b.Shape) && bytes.Equal(a.Data, b.Data)
}

func TestReadsWhatNumpyWrites(t *testing.T) {
	dir := t.TempDir()
	args := []string{dir}
	for _, c := range numpyCases {
		args = append(args, c.name+":"+shapeArg(c.shape))
	}
	runPython(t, writeArrays, args...)
	for _, c := range numpyCases {
		want := expected(c.dtype, c.shape)
		for _, version := range []int{1, 2, 3} {
			path := filepath.Join(dir, fmt.Sprintf("%s-v%d.npy", c.name, version))
			got, err := ReadFile(path)
			if err != nil || !sameTensor(got, want) {
				t.Errorf("%s: %v % x, %v; want %v % x", path, got, got.Data, err, want, want.Data)
			}
		}
	}
}

const checkArrays = `
import sys, numpy as np, ml_dtypes
for arg in sys.argv[1:]:
    path, name, shape = arg.split(":")
    shape = tuple(int(d) for d in shape.split("x") if d)
    n = int(np.prod(shape))
    a = np.load(path)
    if name == "bfloat16":
        assert a.dtype == np.dtype("V2"), a.dtype
        a = a.view(ml_dtypes.bfloat16)
        want = np.arange(n).astype(ml_dtypes.bfloat16).reshape(shape)
    elif name == "bool":
        want = (np.arange(n) % 2 == 1).reshape(shape)
    else:
        want = np.arange(n).astype(name).reshape(shape)
    assert a.dtype == want.dtype and a.shape == want.shape, (path, a.dtype, a.shape)
    assert a.flags.c_contiguous and np.array_equal(a, want), (path, a, want)
`

func TestNumpyReadsWhatWriteWrites(t *testing.T) {
	dir := t.TempDir()
	var args []string
	for _, c := range numpyCases {
		path := filepath.Join(dir, c.name+".npy")
		if err := WriteFile(path, expected(c.dtype, c.shape)); err != nil {
			t.Fatal(err)
		}
		args = append(args, path+":"+c.name+":"+shapeArg(c.shape))
		// And back: Write's output is readable here too.
		if got, err := ReadFile(path); err != nil || !sameTensor(got, expected(c.dtype, c.shape)) {
			t.Errorf("%s: read back %v, %v", path, got, err)
		}
	}
	runPython(t, checkArrays, args...)
}

func TestRefusesWhatATensorCannotHold(t *testing.T) {
	dir := t.TempDir()
	runPython(t, `
import sys, numpy as np
d = sys.argv[1]
np.save(d + "/fortran.npy", np.asfortranarray(np.zeros((2, 3), np.float32)))
np.save(d + "/big.npy", np.zeros(3, ">i4"))
np.save(d + "/complex.npy", np.zeros(2, np.complex64))
np.save(d + "/structured.npy", np.zeros(2, [("a", "<i4"), ("b", "<f4")]))
np.save(d + "/big-u1.npy", np.arange(3, dtype=">u1"))
`, dir)
	for file, want := range map[string]string{
		"fortran.npy":    "Fortran order",
		"big.npy":        "big-endian",
		"complex.npy":    "not a dtype a tensor holds",
		"structured.npy": "structured dtypes",
	} {
		_, err := ReadFile(filepath.Join(dir, file))
		if !errors.Is(err, ErrFormat) || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want an ErrFormat saying %q", file, err, want)
		}
	}
	// Byte order means nothing for one byte.
	if got, err := ReadFile(filepath.Join(dir, "big-u1.npy")); err != nil || !sameTensor(got, protocol.NewUint8([]int{3}, []uint8{0, 1, 2})) {
		t.Errorf("big-u1.npy: %v, %v", got, err)
	}
}

func encode(t testing.TB, tensor protocol.Tensor) []byte {
	var buf bytes.Buffer
	if err := Write(&buf, tensor); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestMalformedFilesAreErrors(t *testing.T) {
	valid := encode(t, protocol.NewFloat32([]int{2}, []float32{1, 2}))
	if (len(valid)-8)%64 != 0 || !bytes.HasPrefix(valid, []byte("\x93NUMPY\x01\x00")) {
		t.Fatalf("Write: % x", valid)
	}
	bools := encode(t, protocol.NewBool([]int{2}, []bool{true, false}))
	withHeader := func(dict string) []byte {
		header := dict + "\n"
		out := append([]byte("\x93NUMPY\x01\x00"), byte(len(header)), byte(len(header)>>8))
		return append(append(out, header...), 0, 0, 0, 0, 0, 0, 0, 0)
	}
	for what, file := range map[string][]byte{
		"empty":               nil,
		"bad magic":           append([]byte("\x93NUMPZ"), valid[6:]...),
		"version 4.0":         append([]byte("\x93NUMPY\x04\x00"), valid[8:]...),
		"header past the end": valid[:20],
		"huge v2 header":      []byte("\x93NUMPY\x02\x00\xff\xff\xff\xff{"),
		"data short":          valid[:len(valid)-1],
		"data long":           append(slices.Clone(valid), 0),
		"no shape":            withHeader("{'descr': '<f4', 'fortran_order': False}"),
		"key twice":           withHeader("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,)}"),
		"unknown key":         withHeader("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}"),
		"negative dim":        withHeader("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,)}"),
		"shape overflows":     withHeader("{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296)}"),
		"dim over int64":      withHeader("{'descr': '<f8', 'fortran_order': False, 'shape': (99999999999999999999,)}"),
		"unclosed string":     withHeader("{'descr': '<f4"),
		"unclosed dict":       withHeader("{'descr': '<f4', 'fortran_order': False, 'shape': (2,)"),
		"text after":          withHeader("{'descr': '<f4', 'fortran_order': False, 'shape': (2,)} x"),
		"|f4":                 withHeader("{'descr': '|f4', 'fortran_order': False, 'shape': (2,)}"),
		"bool byte 2":         append(bools[:len(bools)-2], 1, 2),
	} {
		if _, err := Read(bytes.NewReader(file)); !errors.Is(err, ErrFormat) {
			t.Errorf("%s: %v, want ErrFormat", what, err)
		}
	}
	// A header claiming terabytes of data costs what the file has.
	huge := withHeader("{'descr': '<f8', 'fortran_order': False, 'shape': (1000000, 1000000)}")
	if _, err := Read(bytes.NewReader(huge)); !errors.Is(err, ErrFormat) || !strings.Contains(err.Error(), "8 bytes of data") {
		t.Errorf("huge shape: %v", err)
	}
}

func TestWriteRefusesABadTensor(t *testing.T) {
	for _, tensor := range []protocol.Tensor{
		{DType: 99, Shape: []int{1}, Data: []byte{0}},
		{DType: protocol.DTypeFP32, Shape: []int{2}, Data: make([]byte, 4)},
	} {
		if err := Write(&bytes.Buffer{}, tensor); err == nil {
			t.Errorf("Write(%v): no error", tensor)
		}
	}
}

func FuzzRead(f *testing.F) {
	for _, c := range numpyCases {
		f.Add(encode(f, expected(c.dtype, c.shape)))
	}
	f.Add([]byte("\x93NUMPY\x03\x00\x76\x00\x00\x00{'descr': '<V2', 'fortran_order': False, 'shape': (1,), }\n\x00\x00"))
	f.Fuzz(func(t *testing.T, file []byte) {
		tensor, err := Read(bytes.NewReader(file))
		if err != nil {
			return
		}
		// What it reads, it writes, and reads back the same.
		again, err := Read(bytes.NewReader(encode(t, tensor)))
		if err != nil || !sameTensor(again, tensor) {
			t.Fatalf("round trip of %v: %v, %v", tensor, again, err)
		}
	})
}
