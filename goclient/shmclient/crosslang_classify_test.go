package shmclient

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"slices"
	"testing"

	"github.com/shmserve/shmserve/goclient/internal/crosstest"
	"github.com/shmserve/shmserve/goclient/protocol"
	"github.com/shmserve/shmserve/goclient/sidecar"
)

// constantImage is a planar RGB image of one colour: deterministic input
// whose class only the model decides.
func constantImage(r, g, b byte) []byte {
	img := make([]byte, protocol.ImageBytes)
	for i, v := range []byte{r, g, b} {
		copy(img[i*protocol.ImagePlane:(i+1)*protocol.ImagePlane], bytes.Repeat([]byte{v}, protocol.ImagePlane))
	}
	return img
}

// probabilityTolerance allows for a batched forward pass rounding
// differently from a single one.
const probabilityTolerance = 1e-4

func checkScores(t *testing.T, what string, got protocol.Scores) {
	t.Helper()
	sum := float32(0)
	for _, p := range got.Probabilities {
		sum += p
	}
	if math.Abs(float64(sum)-1) > 1e-3 || got.Index != argmax(got.Probabilities[:]) {
		t.Errorf("%s: index %d, probabilities %v (sum %v)", what, got.Index, got.Probabilities, sum)
	}
}

func argmax(p []float32) int {
	return slices.Index(p, slices.Max(p))
}

func sameProbabilities(a, b []float32) bool {
	for i := range a {
		if math.Abs(float64(a[i]-b[i])) > probabilityTolerance {
			return false
		}
	}
	return len(a) == len(b)
}

// serverError sends a request that a Client would refuse before sending it,
// and returns the ERROR the server answers with.
func serverError(t *testing.T, client *Client, typ protocol.MsgType, body []byte) error {
	t.Helper()
	err := client.transport.exchange(testCtx(t), typ, body, func(replyType protocol.MsgType, reply []byte) error {
		if replyType != protocol.TypeError {
			return fmt.Errorf("a %v reply, want ERROR", replyType)
		}
		return errorReply(reply)
	})
	if err == nil {
		t.Fatalf("%v request of %d bytes: no error", typ, len(body))
	}
	return err
}

type httpClassification struct {
	Label         string    `json:"label"`
	Index         int       `json:"index"`
	Probabilities []float32 `json:"probabilities"`
	Error         *struct {
		Code int    `json:"code"`
		Name string `json:"name"`
	} `json:"error"`
}

func postClassify(t *testing.T, baseURL string, body []byte) (int, httpClassification) {
	t.Helper()
	request, err := http.NewRequestWithContext(testCtx(t), http.MethodPost, baseURL+"/classify", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	request.Header.Set("Content-Type", "application/octet-stream")
	response, err := http.DefaultClient.Do(request)
	if err != nil {
		t.Fatal(err)
	}
	defer response.Body.Close()
	raw, err := io.ReadAll(response.Body)
	var decoded httpClassification
	if err == nil {
		err = json.Unmarshal(raw, &decoded)
	}
	if err != nil {
		t.Fatalf("POST /classify: status %d, body %q: %v", response.StatusCode, raw, err)
	}
	return response.StatusCode, decoded
}

func TestCrossLanguageClassifyOverEveryTransport(t *testing.T) {
	name := crosstest.UniqueName()
	server := crosstest.Start(t, sidecar.Config{
		Model: "cifar", Transport: "shm,unix,tcp,http", Name: name, MaxRestartsPerMinute: -1,
		Args: []string{"--socket", crosstest.SocketDir(t) + "/s.sock", "--port", "0", "--tcp-port", "0"},
	})
	ready := server.Ready()
	images := [][]byte{
		constantImage(0, 0, 0), constantImage(255, 255, 255), constantImage(200, 30, 30),
		constantImage(40, 160, 60), constantImage(90, 140, 230), constantImage(128, 128, 128),
	}

	// The first transport's answers are the reference for the others.
	var want []protocol.Scores
	for _, transport := range []string{"shm", "unix", "tcp"} {
		addr := ready.Addr(transport)
		client := dial(t, addr)
		batch, err := client.ClassifyBatch(testCtx(t), images)
		if err != nil {
			t.Fatalf("%s: ClassifyBatch: %v", addr, err)
		}
		for i, img := range images {
			label, err := client.Classify(testCtx(t), img)
			if err != nil {
				t.Fatalf("%s: Classify image %d: %v", addr, i, err)
			}
			scores, err := client.ClassifyScores(testCtx(t), img)
			if err != nil {
				t.Fatalf("%s: ClassifyScores image %d: %v", addr, i, err)
			}
			what := fmt.Sprintf("%s image %d", addr, i)
			checkScores(t, what, scores)
			checkScores(t, what+" in a batch", batch[i])
			if len(want) <= i {
				want = append(want, scores)
			}
			if label != scores.Label() || scores.Index != want[i].Index || batch[i].Index != want[i].Index ||
				!sameProbabilities(scores.Probabilities[:], want[i].Probabilities[:]) ||
				!sameProbabilities(batch[i].Probabilities[:], want[i].Probabilities[:]) {
				t.Errorf("%s: Classify %q, ClassifyScores %+v, in a batch %+v; want %s %+v",
					what, label, scores, batch[i], want[i].Label(), want[i])
			}
		}
		for _, size := range []int{0, protocol.ImageBytes - 1, protocol.ImageBytes + 1} {
			if _, err := client.Classify(testCtx(t), make([]byte, size)); !errors.Is(err, protocol.ErrBadLength) {
				t.Errorf("%s: Classify of %d bytes = %v, want BAD_LENGTH before sending", addr, size, err)
			}
			for _, typ := range []protocol.MsgType{protocol.TypeClassify, protocol.TypeClassifyScores, protocol.TypeClassifyBatch} {
				if err := serverError(t, client, typ, make([]byte, size)); !errors.Is(err, protocol.ErrBadLength) {
					t.Errorf("%s: the server answers a %d-byte %v with %v, want BAD_LENGTH", addr, size, typ, err)
				}
			}
		}
	}

	for i, scores := range want {
		sorted := slices.Sorted(slices.Values(scores.Probabilities[:]))
		t.Logf("image %d: %s (p=%.3f, next %.3f)", i, scores.Label(), sorted[9], sorted[8])
	}
	for i, img := range images {
		status, got := postClassify(t, ready.Addr("http"), img)
		if status != http.StatusOK || got.Index != want[i].Index || got.Label != want[i].Label() ||
			!sameProbabilities(got.Probabilities, want[i].Probabilities[:]) {
			t.Errorf("POST /classify image %d: %d %+v, want %s %+v", i, status, got, want[i].Label(), want[i])
		}
	}
	for _, size := range []int{0, protocol.ImageBytes - 1, protocol.ImageBytes + 1} {
		status, got := postClassify(t, ready.Addr("http"), make([]byte, size))
		if status != http.StatusBadRequest || got.Error == nil || got.Error.Code != int(protocol.CodeBadLength) || got.Error.Name != "BAD_LENGTH" {
			t.Errorf("POST /classify of %d bytes: %d %+v, want 400 BAD_LENGTH", size, status, got.Error)
		}
	}
}
