package ring_test

import (
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/shmserve/shmserve/goclient/internal/ring"
	"github.com/shmserve/shmserve/goclient/internal/ring/ringtest"
	"github.com/shmserve/shmserve/goclient/protocol"
)

type ringVector struct {
	Name  string `json:"name"`
	Kind  string `json:"kind"`
	Hex   string `json:"hex"`
	OK    bool   `json:"ok"`
	Error string `json:"error"`
	// header cases
	MappingSize  int    `json:"mapping_size"`
	SlotCount    int    `json:"slot_count"`
	SlotStride   int    `json:"slot_stride"`
	ReqCapacity  int    `json:"req_capacity"`
	RespCapacity int    `json:"resp_capacity"`
	TotalSize    int    `json:"total_size"`
	Generation   string `json:"generation"`
	ServerState  uint32 `json:"server_state"`
	// frame cases
	ReqSeq    uint32 `json:"req_seq"`
	ReqID     string `json:"req_id"`
	Final     bool   `json:"final"`
	FrameType int    `json:"frame_type"`
	FrameLen  int    `json:"frame_len"`
	// request cases
	ReqType int `json:"req_type"`
	ReqLen  int `json:"req_len"`
}

// reqID reads the vectors' req_id: hex for frames, a number for requests.
func (v ringVector) reqID(t testing.TB) uint64 {
	id, err := strconv.ParseUint(v.ReqID, 16, 64)
	if err != nil {
		t.Fatalf("%s: req_id %q: %v", v.Name, v.ReqID, err)
	}
	return id
}

func loadRingVectors(t testing.TB) []ringVector {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "..", "..", "spec", "vectors", "ring.json"))
	if err != nil {
		t.Fatalf("conformance vectors: %v", err)
	}
	var file struct {
		Cases []json.RawMessage `json:"cases"`
	}
	if err := json.Unmarshal(data, &file); err != nil {
		t.Fatal(err)
	}
	vectors := make([]ringVector, len(file.Cases))
	for i, raw := range file.Cases {
		// req_id is a hex string in frame cases and a number in request
		// cases; decode it as text either way.
		var fields map[string]json.RawMessage
		json.Unmarshal(raw, &fields)
		if id, ok := fields["req_id"]; ok && len(id) > 0 && id[0] != '"' {
			n, _ := strconv.ParseUint(string(id), 10, 64)
			fields["req_id"], _ = json.Marshal(strconv.FormatUint(n, 16))
			raw, _ = json.Marshal(fields)
		}
		if err := json.Unmarshal(raw, &vectors[i]); err != nil {
			t.Fatal(err)
		}
	}
	return vectors
}

func decodeHex(t testing.TB, s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// vectorErrorName is the name the vectors use for err.
func vectorErrorName(err error) string {
	var invalid *ring.ValidationError
	var protocolErr *protocol.Error
	switch {
	case errors.As(err, &invalid):
		return invalid.Name
	case errors.As(err, &protocolErr):
		return protocolErr.Code.String()
	}
	return err.Error()
}

func TestRingVectors(t *testing.T) {
	for _, v := range loadRingVectors(t) {
		t.Run(v.Kind+"/"+v.Name, func(t *testing.T) {
			b := decodeHex(t, v.Hex)
			var err error
			switch v.Kind {
			case "header":
				var g ring.Geometry
				if g, err = ring.ValidateHeader(b, v.MappingSize); err == nil {
					got := []any{g.SlotCount, g.SlotStride, g.ReqCapacity, g.RespCapacity, g.TotalSize, fmt.Sprintf("%016x", g.Generation), binary.LittleEndian.Uint32(b[ring.HeaderServerStateOffset:])}
					want := []any{v.SlotCount, v.SlotStride, v.ReqCapacity, v.RespCapacity, v.TotalSize, v.Generation, v.ServerState}
					for i := range got {
						if got[i] != want[i] {
							t.Fatalf("geometry %+v, want %v", g, want)
						}
					}
				}
			case "frame":
				var f ring.FrameHeader
				if f, err = ring.ValidateFrame(b, v.RespCapacity, v.ReqSeq, v.reqID(t)); err == nil {
					if f.Final != v.Final || int(f.Type) != v.FrameType || f.Len != v.FrameLen {
						t.Fatalf("frame %+v", f)
					}
				}
			case "request":
				var r ringtest.RequestRecord
				if r, err = ringtest.ValidateRequest(b, v.ReqCapacity); err == nil {
					if int(r.Type) != v.ReqType || r.Len != v.ReqLen || r.ID != v.reqID(t) {
						t.Fatalf("request %+v", r)
					}
				}
			default:
				t.Fatalf("unknown kind %q", v.Kind)
			}
			switch {
			case v.Error != "" && err == nil:
				t.Fatalf("accepted, want %s", v.Error)
			case v.Error != "" && vectorErrorName(err) != v.Error:
				t.Fatalf("error %v, want %s", err, v.Error)
			case v.Error == "" && err != nil:
				t.Fatalf("rejected: %v", err)
			}
		})
	}
}

func FuzzValidateHeader(f *testing.F) {
	for _, v := range loadRingVectors(f) {
		if v.Kind == "header" {
			f.Add(decodeHex(f, v.Hex), v.MappingSize)
		}
	}
	f.Fuzz(func(t *testing.T, header []byte, mappingSize int) {
		g, err := ring.ValidateHeader(header, mappingSize)
		if err != nil {
			var invalid *ring.ValidationError
			if !errors.As(err, &invalid) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		if g.TotalSize != mappingSize || g.TotalSize != ring.HeaderSize+g.SlotCount*g.SlotStride ||
			g.SlotStride < ring.SlotDataOffset+g.ReqCapacity+g.RespCapacity || g.SlotStride%ring.CacheLine != 0 || g.Generation == 0 {
			t.Fatalf("accepted an inconsistent geometry %+v for a %d-byte mapping", g, mappingSize)
		}
	})
}

func FuzzValidateFrame(f *testing.F) {
	for _, v := range loadRingVectors(f) {
		if v.Kind == "frame" {
			f.Add(decodeHex(f, v.Hex), uint32(v.RespCapacity), v.ReqSeq, v.reqID(f))
		}
	}
	f.Fuzz(func(t *testing.T, line []byte, respCapacity uint32, reqSeq uint32, reqID uint64) {
		frame, err := ring.ValidateFrame(line, int(respCapacity), reqSeq, reqID)
		if err != nil {
			var invalid *ring.ValidationError
			if !errors.As(err, &invalid) || !errors.Is(err, protocol.ErrProtocolViolation) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		if frame.Len > int(respCapacity) || !frame.Type.IsReply() ||
			binary.LittleEndian.Uint32(line[4:]) != reqSeq || binary.LittleEndian.Uint64(line[8:]) != reqID {
			t.Fatalf("accepted a frame that does not answer the request: %+v", frame)
		}
	})
}
