package protocol

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// vectorDir holds the conformance vectors of spec section 13.
var vectorDir = filepath.Join("..", "..", "spec", "vectors")

func loadVectors(t testing.TB, file string, into any) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(vectorDir, file))
	if err != nil {
		t.Fatalf("conformance vectors: %v", err)
	}
	if err := json.Unmarshal(data, into); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
}

func mustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

type packetVectors struct {
	MaxBody int `json:"max_body"`
	Cases   []struct {
		Name    string `json:"name"`
		Hex     string `json:"hex"`
		Type    *int   `json:"type"`
		BodyHex string `json:"body_hex"`
		Error   string `json:"error"`
	} `json:"cases"`
}

// framingErrorName maps a ReadPacket error to the vectors' names.
func framingErrorName(err error) string {
	var protocolErr *Error
	switch {
	case errors.Is(err, ErrTruncated):
		return "TRUNCATED"
	case errors.As(err, &protocolErr):
		return protocolErr.Code.String()
	}
	return err.Error()
}

func TestPacketVectors(t *testing.T) {
	var vectors packetVectors
	loadVectors(t, "packets.json", &vectors)
	for _, c := range vectors.Cases {
		t.Run(c.Name, func(t *testing.T) {
			wire := mustHex(t, c.Hex)
			r := bytes.NewReader(wire)
			typ, body, err := ReadPacket(r, vectors.MaxBody)
			if c.Error != "" {
				if err == nil || framingErrorName(err) != c.Error {
					t.Fatalf("ReadPacket = %v, want %s", err, c.Error)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if int(typ) != *c.Type || !bytes.Equal(body, mustHex(t, c.BodyHex)) || r.Len() != 0 {
				t.Fatalf("ReadPacket = type %d body %x (%d bytes left)", typ, body, r.Len())
			}
			encoded, err := AppendPacket(nil, typ, body)
			if err != nil || !bytes.Equal(encoded, wire) {
				t.Fatalf("AppendPacket = %x, %v; want %x", encoded, err, wire)
			}
		})
	}
}

type bodyVectors struct {
	Cases []struct {
		Name    string `json:"name"`
		Type    *int   `json:"type"`
		BodyHex string `json:"body_hex"`
		Repeat  int    `json:"repeat"`
		Error   string `json:"error"`
		// Decoded request fields.
		Images       int     `json:"images"`
		MaxNewTokens *uint32 `json:"max_new_tokens"`
		Prompt       *string `json:"prompt"`
		// Reply bodies.
		ReplyType     *int      `json:"reply_type"`
		Index         int       `json:"index"`
		Probabilities []float64 `json:"probabilities"`
		Code          Code      `json:"code"`
		Message       string    `json:"message"`
	} `json:"cases"`
}

func TestBodyVectors(t *testing.T) {
	var vectors bodyVectors
	loadVectors(t, "bodies.json", &vectors)
	for _, c := range vectors.Cases {
		t.Run(c.Name, func(t *testing.T) {
			body := bytes.Repeat(mustHex(t, c.BodyHex), max(c.Repeat, 1))
			if c.ReplyType != nil {
				checkReplyVector(t, MsgType(*c.ReplyType), body, c.Index, c.Probabilities, c.Code, c.Message)
				return
			}
			typ := MsgType(*c.Type)
			err := CheckRequest(typ, body)
			if c.Error != "" {
				var protocolErr *Error
				if !errors.As(err, &protocolErr) || protocolErr.Code.String() != c.Error {
					t.Fatalf("CheckRequest = %v, want %s", err, c.Error)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Images > 0 && len(body)/ImageBytes != c.Images {
				t.Fatalf("%d images, want %d", len(body)/ImageBytes, c.Images)
			}
			if c.Prompt != nil {
				request, err := DecodePromptRequest(body)
				if err != nil || request.Prompt != *c.Prompt || request.MaxNewTokens != *c.MaxNewTokens {
					t.Fatalf("DecodePromptRequest = %+v, %v", request, err)
				}
				if encoded := AppendPromptRequest(nil, request); !bytes.Equal(encoded, body) {
					t.Fatalf("AppendPromptRequest = %x, want %x", encoded, body)
				}
			}
		})
	}
}

func checkReplyVector(t *testing.T, typ MsgType, body []byte, index int, probabilities []float64, code Code, message string) {
	switch typ {
	case TypeClassifyScores:
		records, err := DecodeScoreRecords(body)
		if err != nil || len(records) != 1 || records[0].Index != index {
			t.Fatalf("DecodeScoreRecords = %+v, %v", records, err)
		}
		for i, p := range probabilities {
			if records[0].Probabilities[i] != float32(p) {
				t.Fatalf("probability[%d] = %v, want %v", i, records[0].Probabilities[i], p)
			}
		}
		if encoded := AppendScoreRecord(nil, records[0]); !bytes.Equal(encoded, body) {
			t.Fatalf("AppendScoreRecord = %x, want %x", encoded, body)
		}
	case TypeError:
		decoded, err := DecodeErrorBody(body)
		if err != nil || decoded.Code != code || decoded.Message != message {
			t.Fatalf("DecodeErrorBody = %v, %v", decoded, err)
		}
		if encoded := AppendErrorBody(nil, decoded); !bytes.Equal(encoded, body) {
			t.Fatalf("AppendErrorBody = %x, want %x", encoded, body)
		}
	default:
		t.Fatalf("no decoder for reply type %v", typ)
	}
}

type tensorVectors struct {
	Signature  json.RawMessage  `json:"signature"`
	DTypeCodes map[string]uint8 `json:"dtype_codes"`
	Cases      []struct {
		Name    string `json:"name"`
		BodyHex string `json:"body_hex"`
		Reply   bool   `json:"reply"`
		Error   string `json:"error"`
		OK      []struct {
			Name     string `json:"name"`
			DataType string `json:"datatype"`
			Shape    []int  `json:"shape"`
			DataHex  string `json:"data_hex"`
		} `json:"ok"`
	} `json:"cases"`
}

// TestTensorVectors decodes every case of tensors.json. A request case is
// also bound to the file's signature, as the server would (section 3.1,
// errors 1-6), so the expected tensors come in signature order under the
// inputs' names; a reply case is compared as decoded. Every decoded list
// re-encodes to the same bytes: the layout is canonical.
func TestTensorVectors(t *testing.T) {
	var vectors tensorVectors
	loadVectors(t, "tensors.json", &vectors)
	for name, code := range vectors.DTypeCodes {
		if d := DType(code); d.String() != name || d.Size() == 0 {
			t.Errorf("dtype %s: code %d is %v here", name, code, d)
		}
	}
	if len(vectors.DTypeCodes) != int(DTypeFP64) {
		t.Errorf("%d dtypes in the vectors, %d here", len(vectors.DTypeCodes), DTypeFP64)
	}
	signature, err := DecodeMetadata(vectors.Signature)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range vectors.Cases {
		t.Run(c.Name, func(t *testing.T) {
			body := mustHex(t, c.BodyHex)
			if err := CheckRequest(TypeInfer, body); err != nil && !c.Reply {
				checkVectorError(t, err, c.Error)
				return
			}
			tensors, err := DecodeTensorList(body)
			if err == nil && !c.Reply {
				tensors, err = signature.Bind(tensors)
			}
			if c.Error != "" {
				checkVectorError(t, err, c.Error)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(tensors) != len(c.OK) {
				t.Fatalf("%d tensors, want %d", len(tensors), len(c.OK))
			}
			for i, want := range c.OK {
				got := tensors[i]
				name := got.Name
				if !c.Reply {
					name = signature.Inputs[i].Name
				}
				if name != want.Name || got.DType.String() != want.DataType || !slices.Equal(got.Shape, want.Shape) ||
					!bytes.Equal(got.Data, mustHex(t, want.DataHex)) {
					t.Errorf("tensor %d = %s %v%v %x, want %+v", i, name, got.DType, got.Shape, got.Data, want)
				}
			}
			decoded, _ := DecodeTensorList(body)
			if encoded, err := AppendTensorList(nil, decoded); err != nil || !bytes.Equal(encoded, body) {
				t.Fatalf("AppendTensorList = %x, %v; want %x", encoded, err, body)
			}
		})
	}
}

func checkVectorError(t *testing.T, err error, want string) {
	t.Helper()
	var protocolErr *Error
	if !errors.As(err, &protocolErr) || protocolErr.Code.String() != want {
		t.Fatalf("err = %v, want %s", err, want)
	}
}
