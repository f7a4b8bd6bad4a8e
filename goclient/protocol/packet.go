package protocol

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// PacketHeaderBytes is the big-endian length prefix plus the type byte.
const PacketHeaderBytes = 5

// AppendPacket appends the stream packet (section 5) carrying typ and body to
// dst. A body over MaxPacketBody is TOO_LARGE: the server would close the
// connection without reading it.
func AppendPacket(dst []byte, typ MsgType, body []byte) ([]byte, error) {
	if len(body) > MaxPacketBody {
		return dst, newError(CodeTooLarge, "packet body of %d bytes exceeds the maximum of %d", len(body), MaxPacketBody)
	}
	dst = binary.BigEndian.AppendUint32(dst, uint32(1+len(body)))
	dst = append(dst, byte(typ))
	return append(dst, body...), nil
}

// ReadPacket reads one stream packet whose body may be at most maxBody bytes.
// Framing failures are typed: a stream that ends early wraps ErrTruncated
// (and the io error), a zero length is ErrBadLength, a length over the limit
// is ErrTooLarge; in the last case the body is left unread, so the stream
// cannot be used again.
func ReadPacket(r io.Reader, maxBody int) (MsgType, []byte, error) {
	var prefix [4]byte
	if _, err := io.ReadFull(r, prefix[:]); err != nil {
		return 0, nil, truncated("length prefix", err)
	}
	length := binary.BigEndian.Uint32(prefix[:])
	if length == 0 {
		return 0, nil, newError(CodeBadLength, "packet length 0: every packet has a type byte")
	}
	if uint64(length)-1 > uint64(maxBody) {
		return 0, nil, newError(CodeTooLarge, "packet body of %d bytes exceeds the maximum of %d", length-1, maxBody)
	}
	packet := make([]byte, length)
	if _, err := io.ReadFull(r, packet); err != nil {
		return 0, nil, truncated(fmt.Sprintf("%d-byte packet", length), err)
	}
	return MsgType(packet[0]), packet[1:], nil
}

// truncated marks an end of stream as ErrTruncated; other read errors (a
// deadline, a reset) pass through as they are.
func truncated(what string, err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: stream ended inside the %s: %w", ErrTruncated, what, err)
	}
	return err
}
