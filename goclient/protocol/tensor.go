package protocol

// TensorList, the body of INFER requests and replies (spec section 3.1).
// This file and shmserve/tensors.py are the only places that know the byte
// format; spec/vectors/tensors.json keeps them honest.
//
// TensorList:
//
//	0        2        4                8
//	+--------+--------+----------------+
//	| count  | rsvd   | reserved       |   then `count` TensorHeaders, each padded to 8,
//	+--------+--------+----------------+   then each tensor's data at a multiple of 64
//
// TensorHeader:
//
//	0    1    2        4        8                16               24           24+8*rank
//	+----+----+--------+--------+----------------+----------------+------------+--------+
//	|dtyp|rank|name_len| rsvd   | data_offset    | data_len       | dims (u64) | name   |
//	+----+----+--------+--------+----------------+----------------+------------+--------+
//
// The layout is canonical: the first tensor's data starts at the end of the
// last header rounded up to 64, each next one at the end of the previous
// tensor's data rounded up to 64, and the body ends where the last tensor's
// data ends. So the encoder has no choices, and the decoder accepts exactly
// the bytes the encoder produces.

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/bits"
	"slices"
	"strconv"
	"unicode/utf8"
	"unsafe"
)

// Limits of section 3.1.
const (
	MaxTensors = 64
	MaxRank    = 8
	MaxDim     = 1<<31 - 1
	MaxNameLen = 255

	tensorListHeaderBytes = 8
	tensorHeaderBytes     = 24
	headerAlign           = 8
	dataAlign             = 64
)

// DType is a tensor element type; its value is the spec's dtype code and its
// String the KServe v2 datatype name.
type DType uint8

const (
	DTypeBool   DType = 1 // one byte, 0 or 1
	DTypeUint8  DType = 2
	DTypeInt8   DType = 3
	DTypeUint16 DType = 4
	DTypeInt16  DType = 5
	DTypeUint32 DType = 6
	DTypeInt32  DType = 7
	DTypeUint64 DType = 8
	DTypeInt64  DType = 9
	DTypeFP16   DType = 10 // IEEE binary16, carried as its uint16 bits
	DTypeBF16   DType = 11 // bfloat16, carried as its uint16 bits
	DTypeFP32   DType = 12
	DTypeFP64   DType = 13
)

var dtypeNames = [...]string{
	DTypeBool: "BOOL", DTypeUint8: "UINT8", DTypeInt8: "INT8", DTypeUint16: "UINT16",
	DTypeInt16: "INT16", DTypeUint32: "UINT32", DTypeInt32: "INT32", DTypeUint64: "UINT64",
	DTypeInt64: "INT64", DTypeFP16: "FP16", DTypeBF16: "BF16", DTypeFP32: "FP32", DTypeFP64: "FP64",
}

var dtypeSizes = [...]int{
	DTypeBool: 1, DTypeUint8: 1, DTypeInt8: 1, DTypeUint16: 2, DTypeInt16: 2, DTypeUint32: 4,
	DTypeInt32: 4, DTypeUint64: 8, DTypeInt64: 8, DTypeFP16: 2, DTypeBF16: 2, DTypeFP32: 4, DTypeFP64: 8,
}

// Valid reports whether d is one of the spec's dtype codes.
func (d DType) Valid() bool { return d >= DTypeBool && d <= DTypeFP64 }

// Size is the bytes of one element, 0 for an unknown code.
func (d DType) Size() int {
	if !d.Valid() {
		return 0
	}
	return dtypeSizes[d]
}

// String is the KServe v2 name ("FP32"), or DTYPE_<code> for an unknown code.
func (d DType) String() string {
	if !d.Valid() {
		return "DTYPE_" + strconv.Itoa(int(d))
	}
	return dtypeNames[d]
}

// ParseDType returns the DType of a KServe v2 name.
func ParseDType(name string) (DType, error) {
	for d := DTypeBool; d <= DTypeFP64; d++ {
		if dtypeNames[d] == name {
			return d, nil
		}
	}
	return 0, fmt.Errorf("unknown datatype %q", name)
}

// MarshalText writes the KServe name, so that JSON carries "FP32".
func (d DType) MarshalText() ([]byte, error) {
	if !d.Valid() {
		return nil, fmt.Errorf("dtype code %d has no name", uint8(d))
	}
	return []byte(dtypeNames[d]), nil
}

// UnmarshalText reads a KServe name.
func (d *DType) UnmarshalText(text []byte) error {
	parsed, err := ParseDType(string(text))
	*d = parsed
	return err
}

// Tensor is one tensor of a TensorList: its dtype, its shape (outermost dim
// first) and its elements in C order, little-endian. Name binds a request
// tensor to the model input of that name; leave it empty in every tensor of
// a request to bind by position. Replies always name their tensors.
//
// Data of a decoded tensor aliases the body it was decoded from.
type Tensor struct {
	Name  string
	DType DType
	Shape []int
	Data  []byte
}

// Len is the number of elements the shape holds (1 for rank 0), or -1 when
// the shape is invalid (a negative dim, or a product that overflows int).
func (t Tensor) Len() int {
	n, ok := elements(t.Shape)
	if !ok {
		return -1
	}
	return n
}

// WithName returns t named name, sharing its shape and data.
func (t Tensor) WithName(name string) Tensor {
	t.Name = name
	return t
}

func (t Tensor) String() string {
	label := t.Name
	if label == "" {
		label = "(unnamed)"
	}
	return fmt.Sprintf("%s %v%v", label, t.DType, t.Shape)
}

// elements is the product of shape, false when a dim is negative or the
// product overflows int. A zero dim makes it 0 whatever the other dims are.
func elements(shape []int) (int, bool) {
	if slices.ContainsFunc(shape, func(d int) bool { return d < 0 }) {
		return 0, false
	}
	if slices.Contains(shape, 0) {
		return 0, true
	}
	n := 1
	for _, d := range shape {
		hi, lo := bits.Mul64(uint64(n), uint64(d))
		if hi != 0 || lo > math.MaxInt {
			return 0, false
		}
		n = int(lo)
	}
	return n, true
}

// element is what a typed constructor or accessor moves: fixed-size values
// whose in-memory bytes are the wire bytes on a little-endian machine.
type element interface {
	~uint8 | ~int8 | ~uint16 | ~int16 | ~uint32 | ~int32 | ~uint64 | ~int64 | ~float32 | ~float64
}

// littleEndian says whether memory order is wire order, so that slices move
// with one copy instead of an encode per element.
var littleEndian = binary.NativeEndian.Uint16([]byte{1, 0}) == 1

// bytesOf views a slice's memory as bytes.
func bytesOf[T element](values []T) []byte {
	if len(values) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(values))), len(values)*int(unsafe.Sizeof(values[0])))
}

// swapElements reverses the bytes of each size-byte element of b in place:
// wire order to memory order and back on a big-endian machine.
func swapElements(b []byte, size int) {
	for i := 0; i+size <= len(b); i += size {
		for lo, hi := i, i+size-1; lo < hi; lo, hi = lo+1, hi-1 {
			b[lo], b[hi] = b[hi], b[lo]
		}
	}
}

func newTensor[T element](dtype DType, shape []int, values []T) Tensor {
	data := make([]byte, len(values)*dtype.Size())
	copy(data, bytesOf(values))
	if !littleEndian {
		swapElements(data, dtype.Size())
	}
	return Tensor{DType: dtype, Shape: shape, Data: data}
}

// Typed constructors copy values into a new Tensor of the given shape. A
// shape that does not hold len(values) elements is reported when the tensor
// is encoded (BAD_TENSOR), as the server would report it.
func NewUint8(shape []int, values []uint8) Tensor     { return newTensor(DTypeUint8, shape, values) }
func NewInt8(shape []int, values []int8) Tensor       { return newTensor(DTypeInt8, shape, values) }
func NewUint16(shape []int, values []uint16) Tensor   { return newTensor(DTypeUint16, shape, values) }
func NewInt16(shape []int, values []int16) Tensor     { return newTensor(DTypeInt16, shape, values) }
func NewUint32(shape []int, values []uint32) Tensor   { return newTensor(DTypeUint32, shape, values) }
func NewInt32(shape []int, values []int32) Tensor     { return newTensor(DTypeInt32, shape, values) }
func NewUint64(shape []int, values []uint64) Tensor   { return newTensor(DTypeUint64, shape, values) }
func NewInt64(shape []int, values []int64) Tensor     { return newTensor(DTypeInt64, shape, values) }
func NewFloat32(shape []int, values []float32) Tensor { return newTensor(DTypeFP32, shape, values) }
func NewFloat64(shape []int, values []float64) Tensor { return newTensor(DTypeFP64, shape, values) }

// NewFP16 takes IEEE binary16 values as their bits (see Float32ToFP16).
func NewFP16(shape []int, bits []uint16) Tensor { return newTensor(DTypeFP16, shape, bits) }

// NewBF16 takes bfloat16 values as their bits (see Float32ToBF16).
func NewBF16(shape []int, bits []uint16) Tensor { return newTensor(DTypeBF16, shape, bits) }

// NewBool stores each value as one byte, 0 or 1.
func NewBool(shape []int, values []bool) Tensor {
	data := make([]byte, len(values))
	for i, v := range values {
		if v {
			data[i] = 1
		}
	}
	return Tensor{DType: DTypeBool, Shape: shape, Data: data}
}

// values copies t's elements out as []T after checking that t holds dtype
// and that its data is exactly what its shape says.
func values[T element](t Tensor, dtype DType) ([]T, error) {
	if err := t.checkData(dtype); err != nil {
		return nil, err
	}
	out := make([]T, len(t.Data)/dtype.Size())
	copy(bytesOf(out), t.Data)
	if !littleEndian {
		swapElements(bytesOf(out), dtype.Size())
	}
	return out, nil
}

func (t Tensor) checkData(dtype DType) error {
	if t.DType != dtype {
		return fmt.Errorf("tensor %s: dtype %v, not %v", t, t.DType, dtype)
	}
	if n := t.Len(); n < 0 || n*dtype.Size() != len(t.Data) {
		return fmt.Errorf("tensor %s: %d bytes of data", t, len(t.Data))
	}
	return nil
}

// Typed accessors copy the elements out; each fails unless the tensor holds
// that dtype and its data matches its shape.
func (t Tensor) Uint8s() ([]uint8, error)     { return values[uint8](t, DTypeUint8) }
func (t Tensor) Int8s() ([]int8, error)       { return values[int8](t, DTypeInt8) }
func (t Tensor) Uint16s() ([]uint16, error)   { return values[uint16](t, DTypeUint16) }
func (t Tensor) Int16s() ([]int16, error)     { return values[int16](t, DTypeInt16) }
func (t Tensor) Uint32s() ([]uint32, error)   { return values[uint32](t, DTypeUint32) }
func (t Tensor) Int32s() ([]int32, error)     { return values[int32](t, DTypeInt32) }
func (t Tensor) Uint64s() ([]uint64, error)   { return values[uint64](t, DTypeUint64) }
func (t Tensor) Int64s() ([]int64, error)     { return values[int64](t, DTypeInt64) }
func (t Tensor) Float32s() ([]float32, error) { return values[float32](t, DTypeFP32) }
func (t Tensor) Float64s() ([]float64, error) { return values[float64](t, DTypeFP64) }

// FP16Bits returns IEEE binary16 elements as bits (see FP16ToFloat32).
func (t Tensor) FP16Bits() ([]uint16, error) { return values[uint16](t, DTypeFP16) }

// BF16Bits returns bfloat16 elements as bits (see BF16ToFloat32).
func (t Tensor) BF16Bits() ([]uint16, error) { return values[uint16](t, DTypeBF16) }

// Bools returns BOOL elements; any non-zero byte is true (a decoded tensor
// only has 0 and 1).
func (t Tensor) Bools() ([]bool, error) {
	if err := t.checkData(DTypeBool); err != nil {
		return nil, err
	}
	out := make([]bool, len(t.Data))
	for i, b := range t.Data {
		out[i] = b != 0
	}
	return out, nil
}

// FP16ToFloat32 converts IEEE binary16 bits to the float32 of the same
// value (every binary16 value, subnormals and NaN payloads included, is
// exact in binary32).
func FP16ToFloat32(h uint16) float32 {
	sign := uint32(h>>15) << 31
	exp := uint32(h>>10) & 0x1F
	mant := uint32(h) & 0x3FF
	switch {
	case exp == 0x1F: // Inf or NaN, payload kept
		return math.Float32frombits(sign | 0xFF<<23 | mant<<13)
	case exp != 0: // normal
		return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
	case mant == 0:
		return math.Float32frombits(sign)
	}
	// Subnormal: shift the mantissa up until its leading 1 is the implicit bit.
	shift := uint32(bits.LeadingZeros32(mant)) - 21 // leading 1 to bit 10
	mant = (mant << shift) & 0x3FF
	return math.Float32frombits(sign | (127-15+1-shift)<<23 | mant<<13)
}

// Float32ToFP16 rounds f to the nearest binary16, ties to even, as numpy's
// astype(float16) does: beyond the largest finite value is Inf, NaN stays
// NaN (quiet, keeping the top payload bits).
func Float32ToFP16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xFF
	mant := b & 0x7FFFFF
	if exp == 0xFF {
		if mant == 0 {
			return sign | 0x7C00
		}
		return sign | 0x7E00 | uint16(mant>>13)
	}
	// The value as a binary16 exponent; below 1 it is subnormal there.
	e := exp - 127 + 15
	if e >= 0x1F {
		return sign | 0x7C00
	}
	var shift uint32
	if e <= 0 {
		if e < -10 { // below half the smallest subnormal: rounds to zero
			return sign
		}
		mant |= 0x800000 // the implicit bit becomes explicit
		shift = uint32(14 - e)
		e = 0
	} else {
		shift = 13
	}
	half := uint32(1) << (shift - 1)
	rest := mant & (1<<shift - 1)
	h := uint32(e)<<10 | mant>>shift
	// Rounding up may carry into the exponent, which is what rounding the
	// largest subnormal to the smallest normal, or a value to Inf, needs.
	if rest > half || (rest == half && h&1 == 1) {
		h++
	}
	return sign | uint16(h)
}

// BF16ToFloat32 converts bfloat16 bits: they are the top half of a float32.
func BF16ToFloat32(b uint16) float32 { return math.Float32frombits(uint32(b) << 16) }

// Float32ToBF16 rounds f to the nearest bfloat16, ties to even, keeping NaN
// a (quiet) NaN, as ml_dtypes and JAX do.
func Float32ToBF16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7FFFFFFF > 0x7F800000 {
		return uint16(b>>16) | 0x40
	}
	b += 0x7FFF + (b>>16)&1
	return uint16(b >> 16)
}

func align(n, to uint64) uint64 { return (n + to - 1) / to * to }

// AppendTensorList appends the canonical TensorList of tensors to dst (the
// body starts at len(dst)). It refuses what a server would refuse in any
// TensorList: more than MaxTensors tensors, an unknown dtype (BAD_DTYPE), a
// name over 255 bytes or not UTF-8, a rank over 8, a dim outside 0..2^31-1,
// data that is not the shape's size, a BOOL byte other than 0 or 1
// (BAD_TENSOR). Whether a request has at least one tensor, and whether they
// bind, is Bind's question.
func AppendTensorList(dst []byte, tensors []Tensor) ([]byte, error) {
	if len(tensors) > MaxTensors {
		return dst, newError(CodeBadTensor, "%d tensors: at most %d", len(tensors), MaxTensors)
	}
	pos := uint64(tensorListHeaderBytes)
	for i, t := range tensors {
		if err := t.check(i); err != nil {
			return dst, err
		}
		pos = align(pos+tensorHeaderBytes+8*uint64(len(t.Shape))+uint64(len(t.Name)), headerAlign)
	}
	size := pos
	if len(tensors) > 0 {
		size = align(pos, dataAlign)
		for i, t := range tensors {
			if i > 0 {
				size = align(size, dataAlign)
			}
			size += uint64(len(t.Data))
		}
	}
	if size > math.MaxInt-uint64(len(dst)) {
		return dst, newError(CodeTooLarge, "a TensorList of %d bytes", size)
	}
	start := len(dst)
	dst = slices.Grow(dst, int(size))[:start+int(size)]
	body := dst[start:]
	clear(body) // padding and reserved fields are zero
	binary.LittleEndian.PutUint16(body, uint16(len(tensors)))
	at := uint64(tensorListHeaderBytes)
	cursor := align(pos, dataAlign)
	for _, t := range tensors {
		h := body[at:]
		h[0], h[1] = byte(t.DType), byte(len(t.Shape))
		binary.LittleEndian.PutUint16(h[2:], uint16(len(t.Name)))
		binary.LittleEndian.PutUint64(h[8:], cursor)
		binary.LittleEndian.PutUint64(h[16:], uint64(len(t.Data)))
		for j, d := range t.Shape {
			binary.LittleEndian.PutUint64(h[tensorHeaderBytes+8*j:], uint64(d))
		}
		copy(h[tensorHeaderBytes+8*len(t.Shape):], t.Name)
		at = align(at+tensorHeaderBytes+8*uint64(len(t.Shape))+uint64(len(t.Name)), headerAlign)
		copy(body[cursor:], t.Data)
		cursor = align(cursor+uint64(len(t.Data)), dataAlign)
	}
	return dst, nil
}

// check is what AppendTensorList requires of tensor i.
func (t Tensor) check(i int) error {
	label := tensorRef{i, t.Name}
	switch {
	case len(t.Name) > MaxNameLen:
		return newError(CodeBadTensor, "%s: name of %d bytes, at most %d", label, len(t.Name), MaxNameLen)
	case !utf8.ValidString(t.Name):
		return newError(CodeBadTensor, "%s: name is not UTF-8", label)
	case len(t.Shape) > MaxRank:
		return newError(CodeBadTensor, "%s: rank %d is over %d", label, len(t.Shape), MaxRank)
	case !t.DType.Valid():
		return newError(CodeBadDType, "%s: unknown dtype code %d", label, uint8(t.DType))
	}
	for _, d := range t.Shape {
		if d < 0 || d > MaxDim {
			return newError(CodeBadTensor, "%s: dim %d in %v is outside 0..%d", label, d, t.Shape, MaxDim)
		}
	}
	if n := t.Len(); n < 0 || n > math.MaxInt/t.DType.Size() || n*t.DType.Size() != len(t.Data) {
		return newError(CodeBadTensor, "%s: %d bytes of data, but %v%v is %d elements of %d bytes",
			label, len(t.Data), t.DType, t.Shape, n, t.DType.Size())
	}
	if t.DType == DTypeBool {
		if err := checkBools(label, t.Data); err != nil {
			return err
		}
	}
	return nil
}

func checkBools(label tensorRef, data []byte) error {
	for _, b := range data {
		if b > 1 {
			return newError(CodeBadTensor, "%s: a BOOL byte is %d, not 0 or 1", label, b)
		}
	}
	return nil
}

// tensorRef names tensor i in an error message. It formats only when an
// error is made, so checking a tensor that passes allocates nothing.
type tensorRef struct {
	i    int
	name string
}

func (r tensorRef) String() string {
	if r.name == "" {
		return fmt.Sprintf("tensor %d", r.i)
	}
	return fmt.Sprintf("tensor %d (%q)", r.i, r.name)
}

// DecodeTensorList decodes a TensorList with every check of section 3.1,
// errors 1-2, in the spec's order: BAD_LENGTH for a body under 8 bytes,
// BAD_DTYPE for an unknown dtype code, BAD_TENSOR for anything else
// malformed. It never reads outside body, and the tensors' Data alias it.
// It accepts 0..MaxTensors tensors, as a reply may carry; Bind adds the
// rules for requests.
func DecodeTensorList(body []byte) ([]Tensor, error) { return DecodeTensorListInto(nil, body) }

// DecodeTensorListInto is DecodeTensorList into dst's storage: its tensors,
// their shapes and names are reused where they are large enough (a name
// where it is the same), so decoding replies of settled shapes allocates
// nothing. dst's tensors are overwritten, even when it fails.
func DecodeTensorListInto(dst []Tensor, body []byte) ([]Tensor, error) {
	size := uint64(len(body))
	if size < tensorListHeaderBytes {
		return nil, newError(CodeBadLength, "TensorList of %d bytes: the header needs %d", size, tensorListHeaderBytes)
	}
	count := int(binary.LittleEndian.Uint16(body))
	if binary.LittleEndian.Uint16(body[2:]) != 0 || binary.LittleEndian.Uint32(body[4:]) != 0 {
		return nil, newError(CodeBadTensor, "TensorList reserved bytes are not 0")
	}
	if count > MaxTensors {
		return nil, newError(CodeBadTensor, "tensor_count %d is over %d", count, MaxTensors)
	}
	tensors := slices.Grow(dst[:0], count)[:count]
	// Where each header says its data is; checked once every header is read,
	// since the canonical offsets follow from where the headers end.
	type extent struct{ offset, length uint64 }
	var extents [MaxTensors]extent
	pos := uint64(tensorListHeaderBytes)
	for i := range tensors {
		label := tensorRef{i, ""}
		if pos+tensorHeaderBytes > size {
			return nil, newError(CodeBadTensor, "%s: header past the end of the %d-byte body", label, size)
		}
		h := body[pos:]
		code, rank, nameLen := DType(h[0]), uint64(h[1]), uint64(binary.LittleEndian.Uint16(h[2:]))
		dataOffset, dataLen := binary.LittleEndian.Uint64(h[8:]), binary.LittleEndian.Uint64(h[16:])
		switch {
		case binary.LittleEndian.Uint32(h[4:]) != 0:
			return nil, newError(CodeBadTensor, "%s: reserved bytes are not 0", label)
		case rank > MaxRank:
			return nil, newError(CodeBadTensor, "%s: rank %d is over %d", label, rank, MaxRank)
		case nameLen > MaxNameLen:
			return nil, newError(CodeBadTensor, "%s: name_len %d is over %d", label, nameLen, MaxNameLen)
		}
		end := pos + tensorHeaderBytes + 8*rank + nameLen
		if end > size {
			return nil, newError(CodeBadTensor, "%s: header past the end of the %d-byte body", label, size)
		}
		name := body[end-nameLen : end]
		if !utf8.Valid(name) {
			return nil, newError(CodeBadTensor, "%s: name is not UTF-8", label)
		}
		t := Tensor{Name: tensors[i].Name, DType: code, Shape: slices.Grow(tensors[i].Shape[:0], int(rank))[:rank]}
		if t.Name != string(name) { // compared without a copy
			t.Name = string(name)
		}
		label = tensorRef{i, t.Name}
		for j := range t.Shape {
			d := binary.LittleEndian.Uint64(h[tensorHeaderBytes+8*j:])
			if d > MaxDim {
				return nil, newError(CodeBadTensor, "%s: dim %d is over %d", label, d, MaxDim)
			}
			t.Shape[j] = int(d)
		}
		if !code.Valid() {
			return nil, newError(CodeBadDType, "%s: unknown dtype code %d", label, uint8(code))
		}
		n, fits := elements(t.Shape)
		hi, want := bits.Mul64(uint64(n), uint64(code.Size()))
		if !fits || hi != 0 || dataLen != want {
			return nil, newError(CodeBadTensor, "%s: data_len %d is not %v%v's size", label, dataLen, code, t.Shape)
		}
		tensors[i], extents[i] = t, extent{dataOffset, dataLen}
		pos = align(end, headerAlign)
	}
	cursor, end := align(pos, dataAlign), pos
	for i := range tensors {
		t := &tensors[i]
		label := tensorRef{i, t.Name}
		if extents[i].offset != cursor {
			return nil, newError(CodeBadTensor, "%s: data_offset %d, the canonical layout puts it at %d", label, extents[i].offset, cursor)
		}
		if cursor > size || extents[i].length > size-cursor {
			return nil, newError(CodeBadTensor, "%s: data ends past the %d-byte body", label, size)
		}
		end = cursor + extents[i].length
		t.Data = body[cursor:end:end]
		cursor = align(end, dataAlign)
	}
	if end != size {
		return nil, newError(CodeBadTensor, "%d bytes after the last tensor", size-end)
	}
	for i, t := range tensors {
		if t.DType == DTypeBool {
			if err := checkBools(tensorRef{i, t.Name}, t.Data); err != nil {
				return nil, err
			}
		}
	}
	return tensors, nil
}
