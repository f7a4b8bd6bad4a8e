// Package npy reads and writes NumPy .npy files (format versions 1.0, 2.0
// and 3.0) as protocol.Tensor values, so that a Go program can feed INFER
// with arrays saved by numpy.save and save its outputs for numpy.load.
//
// Only what a tensor can hold is accepted: a little-endian (or one-byte)
// scalar dtype in C order. Fortran order, big-endian data, structured and
// object dtypes are refused with an error that says so. numpy has no
// bfloat16 of its own: numpy.save writes ml_dtypes.bfloat16 as the raw
// 2-byte type "<V2", so this package reads "<V2" as BF16 and writes BF16 as
// "<V2" (in Python, numpy.load(f).view(ml_dtypes.bfloat16) restores it).
//
// The file is untrusted: the header's length, syntax and values are
// checked before anything is allocated from them, and data is read in
// bounded pieces, so a lying header costs an error, not memory.
package npy

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
	"os"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/shmserve/shmserve/goclient/protocol"
)

const magic = "\x93NUMPY"

// MaxHeaderBytes bounds the header dictionary; numpy.load refuses headers
// over 10,000 bytes by default, and a tensor's header is under 200.
const MaxHeaderBytes = 64 << 10

// ErrFormat reports a file that is not a .npy file this package can read;
// the message says what was wrong.
var ErrFormat = errors.New("npy")

func formatError(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrFormat, fmt.Sprintf(format, args...))
}

// descrs maps each dtype to the descr numpy writes for it.
var descrs = map[protocol.DType]string{
	protocol.DTypeBool: "|b1", protocol.DTypeUint8: "|u1", protocol.DTypeInt8: "|i1",
	protocol.DTypeUint16: "<u2", protocol.DTypeInt16: "<i2", protocol.DTypeUint32: "<u4",
	protocol.DTypeInt32: "<i4", protocol.DTypeUint64: "<u8", protocol.DTypeInt64: "<i8",
	protocol.DTypeFP16: "<f2", protocol.DTypeBF16: "<V2", protocol.DTypeFP32: "<f4",
	protocol.DTypeFP64: "<f8",
}

// dtypeOf parses a descr: a byte order ('<', '|', '=' or '>'), a kind and
// a size.
func dtypeOf(descr string) (protocol.DType, error) {
	if len(descr) < 2 {
		return 0, formatError("descr %q is not a NumPy dtype string", descr)
	}
	order, kind := descr[0], descr[1:]
	oneByte := len(kind) == 2 && kind[1] == '1'
	switch {
	case order == '>' && !oneByte:
		return 0, formatError("descr %q is big-endian; save it little-endian (arr.astype(arr.dtype.newbyteorder('<')))", descr)
	case order == '|' && !oneByte:
		return 0, formatError("descr %q: a multi-byte type needs a byte order", descr)
	case order != '<' && order != '=' && order != '|' && order != '>':
		return 0, formatError("descr %q does not start with a byte order", descr)
	}
	// '=' is native order, which numpy only writes as '<' on a
	// little-endian machine; '|' and '>' only reach here for one byte.
	for d, known := range descrs {
		if known[1:] == kind {
			return d, nil
		}
	}
	return 0, formatError("descr %q is not a dtype a tensor holds (want one of bool, [u]int8..64, float16/32/64, bfloat16 as <V2)", descr)
}

// Read reads one .npy array from r. The tensor is unnamed; its data is a
// fresh copy.
func Read(r io.Reader) (protocol.Tensor, error) {
	br := bufio.NewReader(r)
	prefix := make([]byte, len(magic)+2)
	if _, err := io.ReadFull(br, prefix); err != nil {
		return protocol.Tensor{}, formatError("reading the magic string: %v", err)
	}
	if string(prefix[:len(magic)]) != magic {
		return protocol.Tensor{}, formatError("not a .npy file (the magic string is % x)", prefix[:len(magic)])
	}
	major, minor := prefix[len(magic)], prefix[len(magic)+1]
	var lengthBytes int
	switch {
	case major == 1 && minor == 0:
		lengthBytes = 2
	case (major == 2 || major == 3) && minor == 0:
		lengthBytes = 4
	default:
		return protocol.Tensor{}, formatError("format version %d.%d (this reader knows 1.0, 2.0 and 3.0)", major, minor)
	}
	lengthField := make([]byte, 4)
	if _, err := io.ReadFull(br, lengthField[:lengthBytes]); err != nil {
		return protocol.Tensor{}, formatError("reading the header length: %v", err)
	}
	headerLen := uint64(binary.LittleEndian.Uint32(lengthField))
	if headerLen > MaxHeaderBytes {
		return protocol.Tensor{}, formatError("header of %d bytes, at most %d", headerLen, MaxHeaderBytes)
	}
	header := make([]byte, headerLen)
	if _, err := io.ReadFull(br, header); err != nil {
		return protocol.Tensor{}, formatError("reading the %d-byte header: %v", headerLen, err)
	}
	// Versions 1.0 and 2.0 are latin-1, 3.0 UTF-8; the keys and values a
	// tensor needs are ASCII either way, and a quoted descr outside ASCII
	// is refused by dtypeOf.
	if major == 3 && !utf8.Valid(header) {
		return protocol.Tensor{}, formatError("a version 3.0 header that is not UTF-8")
	}
	h, err := parseHeader(string(header))
	if err != nil {
		return protocol.Tensor{}, err
	}
	n, ok := elements(h.shape)
	size := uint64(h.dtype.Size())
	hi, dataLen := bits.Mul64(n, size)
	if !ok || hi != 0 || dataLen > math.MaxInt {
		return protocol.Tensor{}, formatError("shape %v of %v is too large", h.shape, h.dtype)
	}
	// ReadAll grows as data arrives: a header that claims more than the
	// file has costs what the file has.
	data, err := io.ReadAll(io.LimitReader(br, int64(dataLen)+1))
	if err != nil {
		return protocol.Tensor{}, err
	}
	if uint64(len(data)) < dataLen {
		return protocol.Tensor{}, formatError("%d bytes of data, shape %v of %v needs %d", len(data), h.shape, h.dtype, dataLen)
	}
	if uint64(len(data)) > dataLen {
		return protocol.Tensor{}, formatError("bytes after the %d bytes of data that shape %v of %v holds", dataLen, h.shape, h.dtype)
	}
	if h.dtype == protocol.DTypeBool {
		for i, b := range data {
			if b > 1 {
				return protocol.Tensor{}, formatError("bool element %d is byte %d, not 0 or 1", i, b)
			}
		}
	}
	if data == nil {
		data = []byte{}
	}
	return protocol.Tensor{DType: h.dtype, Shape: h.shape, Data: data}, nil
}

// elements is the product of shape, false on overflow.
func elements(shape []int) (uint64, bool) {
	n := uint64(1)
	for _, d := range shape {
		hi, lo := bits.Mul64(n, uint64(d))
		if hi != 0 {
			return 0, false
		}
		n = lo
	}
	return n, true
}

// ReadFile reads the .npy file at path.
func ReadFile(path string) (protocol.Tensor, error) {
	f, err := os.Open(path)
	if err != nil {
		return protocol.Tensor{}, err
	}
	defer f.Close()
	t, err := Read(f)
	if err != nil {
		return protocol.Tensor{}, fmt.Errorf("%s: %w", path, err)
	}
	return t, nil
}

// Write writes t as a version 1.0 .npy file (2.0 if its header would not
// fit 1.0's 16-bit length), C order, as numpy.save does. t's name is not
// stored: a .npy file holds one unnamed array.
func Write(w io.Writer, t protocol.Tensor) error {
	descr, ok := descrs[t.DType]
	if !ok {
		return fmt.Errorf("npy: tensor %v: unknown dtype", t)
	}
	if n := t.Len(); n < 0 || n*t.DType.Size() != len(t.Data) {
		return fmt.Errorf("npy: tensor %v: %d bytes of data do not fill its shape", t, len(t.Data))
	}
	dims := make([]string, len(t.Shape))
	for i, d := range t.Shape {
		dims[i] = strconv.Itoa(d)
	}
	shape := strings.Join(dims, ", ")
	if len(dims) == 1 {
		shape += ","
	}
	dict := fmt.Sprintf("{'descr': '%s', 'fortran_order': False, 'shape': (%s), }", descr, shape)
	// The data starts at a multiple of 64, after the header's padding and
	// its final newline.
	version, lengthBytes := byte(1), 2
	pad := func() int { return (64 - (len(magic)+2+lengthBytes+len(dict)+1)%64) % 64 }
	if len(dict)+1+pad() > math.MaxUint16 {
		version, lengthBytes = 2, 4
	}
	header := dict + strings.Repeat(" ", pad()) + "\n"
	out := make([]byte, 0, len(magic)+2+lengthBytes+len(header))
	out = append(out, magic...)
	out = append(out, version, 0)
	if lengthBytes == 2 {
		out = binary.LittleEndian.AppendUint16(out, uint16(len(header)))
	} else {
		out = binary.LittleEndian.AppendUint32(out, uint32(len(header)))
	}
	out = append(out, header...)
	if _, err := w.Write(out); err != nil {
		return err
	}
	_, err := w.Write(t.Data)
	return err
}

// WriteFile writes t to path as a .npy file.
func WriteFile(path string, t protocol.Tensor) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := Write(f, t); err != nil {
		f.Close()
		return fmt.Errorf("%s: %w", path, err)
	}
	return f.Close()
}
