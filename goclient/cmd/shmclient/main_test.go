package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/jpeg"
	"image/png"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/shmserve/shmserve/goclient/internal/crosstest"
	"github.com/shmserve/shmserve/goclient/internal/ring/ringtest"
	"github.com/shmserve/shmserve/goclient/npy"
	"github.com/shmserve/shmserve/goclient/protocol"
)

// labelByRed classifies an image by its first red sample rounded to tens
// (JPEG may move it by a few), so a test can tell which image a label came
// from.
func labelByRed(_ context.Context, typ protocol.MsgType, body []byte) []ringtest.Message {
	if typ == protocol.TypeClassify {
		return []ringtest.Message{{Type: typ, Body: []byte(protocol.Labels[(int(body[0])+5)/10%10])}}
	}
	if typ == protocol.TypePromptStream {
		return []ringtest.Message{
			{Type: protocol.TypeStreamChunk, Body: []byte("stre")},
			{Type: protocol.TypeStreamChunk, Body: []byte("amed")},
			{Type: protocol.TypeStreamEnd},
		}
	}
	return []ringtest.Message{{Type: typ, Body: body}}
}

func startServer(t *testing.T) string {
	t.Helper()
	return startServerWith(t, labelByRed)
}

func startServerWith(t *testing.T, handler ringtest.Handler) string {
	t.Helper()
	name := crosstest.UniqueName()
	server, err := ringtest.Start(name, ringtest.Options{Slots: 4, Handler: handler})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Stop(0) })
	return "shm://" + name
}

func runCLI(t *testing.T, args ...string) (stdout, stderr string, status int) {
	t.Helper()
	var out, errOut bytes.Buffer
	status = run(args, &out, &errOut)
	return out.String(), errOut.String(), status
}

func writeImage(t *testing.T, path string, size int, red uint8, encode func(*os.File, image.Image) error) {
	t.Helper()
	img := image.NewRGBA(image.Rect(0, 0, size, size))
	for y := range size {
		for x := range size {
			img.Set(x, y, color.RGBA{R: red, G: 1, B: 2, A: 255})
		}
	}
	file, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	if err := encode(file, img); err != nil {
		t.Fatal(err)
	}
}

func encodePNG(f *os.File, img image.Image) error { return png.Encode(f, img) }
func encodeJPEG(f *os.File, img image.Image) error {
	return jpeg.Encode(f, img, &jpeg.Options{Quality: 100})
}

func TestClassifyPrintsLabelsInOrderAndReportsBadFiles(t *testing.T) {
	addr := startServer(t)
	dir := t.TempDir()
	writeImage(t, filepath.Join(dir, "a.png"), 32, 30, encodePNG)   // cat
	writeImage(t, filepath.Join(dir, "b.png"), 64, 50, encodePNG)   // dog, after scaling
	writeImage(t, filepath.Join(dir, "c.jpg"), 32, 100, encodeJPEG) // airplane
	os.WriteFile(filepath.Join(dir, "d.txt"), []byte("not an image"), 0o600)
	stdout, _, status := runCLI(t, "classify", "-addr", addr, "-c", "3", dir, filepath.Join(dir, "missing.png"))
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	want := []string{
		filepath.Join(dir, "a.png") + " cat",
		filepath.Join(dir, "b.png") + " dog",
		filepath.Join(dir, "c.jpg") + " airplane",
		filepath.Join(dir, "d.txt") + " error: decode: image: unknown format",
	}
	for i, line := range want {
		if lines[i] != line {
			t.Errorf("line %d = %q, want %q", i, lines[i], line)
		}
	}
	if !strings.HasPrefix(lines[4], filepath.Join(dir, "missing.png")+" error:") ||
		!strings.HasPrefix(lines[5], "classified 3 of 5 images over shm") || !strings.Contains(lines[5], "p99") {
		t.Errorf("last lines %q", lines[4:])
	}
	if status != 1 {
		t.Errorf("status %d, want 1 when a file failed", status)
	}
}

func TestPlanarConversion(t *testing.T) {
	img := image.NewRGBA(image.Rect(0, 0, 32, 32))
	img.Set(5, 2, color.RGBA{R: 10, G: 20, B: 30, A: 255})
	planar := planarRGB32(img)
	at := 2*32 + 5
	if planar[at] != 10 || planar[1024+at] != 20 || planar[2048+at] != 30 {
		t.Fatalf("pixel (5,2) = %d %d %d", planar[at], planar[1024+at], planar[2048+at])
	}
}

func TestEchoAndPromptCommands(t *testing.T) {
	addr := startServer(t)
	if stdout, stderr, status := runCLI(t, "echo", "-addr", addr, "hello there"); status != 0 || stdout != "hello there\n" {
		t.Fatalf("echo: %q %q %d", stdout, stderr, status)
	}
	stdout, stderr, status := runCLI(t, "echo", "-addr", addr, "-c", "4", "-n", "200", "x")
	if status != 0 || !strings.Contains(stdout, "200 replies over shm from 4 goroutines") || !strings.Contains(stdout, "0 mismatched") {
		t.Fatalf("echo -c: %q %q %d", stdout, stderr, status)
	}
	if stdout, stderr, status := runCLI(t, "prompt", "-addr", addr, "-stream", "hi"); status != 0 || stdout != "streamed\n" {
		t.Fatalf("prompt -stream: %q %q %d", stdout, stderr, status)
	}
}

func TestBenchComparesTwoAddresses(t *testing.T) {
	first, second := startServer(t), startServer(t)
	stdout, stderr, status := runCLI(t, "bench", "-addr", first+","+second, "-n", "500", "-warmup", "50", "-c", "2", "-reps", "2")
	if status != 0 || strings.Count(stdout, "shm://") < 2 || !strings.Contains(stdout, "shm vs shm: latency") {
		t.Fatalf("bench: %q %q %d", stdout, stderr, status)
	}
}

// -timeout bounds each request, as -h says: a run far longer than it, of
// requests far shorter, must succeed.
func TestBenchTimeoutIsPerRequest(t *testing.T) {
	addr := startServerWith(t, func(ctx context.Context, typ protocol.MsgType, body []byte) []ringtest.Message {
		time.Sleep(time.Millisecond)
		return []ringtest.Message{{Type: typ, Body: body}}
	})
	start := time.Now()
	stdout, stderr, status := runCLI(t, "bench", "-addr", addr, "-n", "300", "-warmup", "0", "-reps", "1", "-timeout", "100ms")
	if status != 0 {
		t.Fatalf("bench of 300 1-ms requests with -timeout 100ms failed after %v: %q %q", time.Since(start), stdout, stderr)
	}
	if elapsed := time.Since(start); elapsed < 300*time.Millisecond {
		t.Fatalf("300 requests of at least 1ms each took %v", elapsed)
	}
}

func TestUsage(t *testing.T) {
	if _, stderr, status := runCLI(t); status != 2 || !strings.Contains(stderr, "commands:") {
		t.Fatalf("no arguments: %q %d", stderr, status)
	}
	if _, stderr, status := runCLI(t, "bench", "-h"); status != 2 || !strings.Contains(stderr, "-warmup") {
		t.Fatalf("bench -h: %q %d", stderr, status)
	}
	if _, stderr, status := runCLI(t, "echo"); status != 2 || !strings.Contains(stderr, "usage: shmclient echo") {
		t.Fatalf("echo without TEXT: %q %d", stderr, status)
	}
	if _, stderr, status := runCLI(t, "echo", "-addr", "shm://no-such-ring-here", "x"); status != 1 || !strings.Contains(stderr, "server gone") {
		t.Fatalf("echo to a missing ring: %q %d", stderr, status)
	}
}

func TestSpawnConfigFollowsTheAddresses(t *testing.T) {
	for _, tc := range []struct {
		addrs, transport, args string
		want                   string // transport | name | args
	}{
		{"shm://demo", "", "", "shm,unix|demo|[]"},
		{"shm://demo,unix:///tmp/d.sock,tcp://127.0.0.1:9999", "", "--slots 8", "shm,unix,tcp|demo|[--socket /tmp/d.sock --tcp-host 127.0.0.1 --tcp-port 9999 --slots 8]"},
		{"tcp://[::1]:7000", "tcp,http", "", "tcp,http||[--tcp-host ::1 --tcp-port 7000]"},
	} {
		f := spawnFlags{model: "echo", transport: tc.transport, args: tc.args}
		cfg, err := f.config(strings.Split(tc.addrs, ","))
		if got := fmt.Sprintf("%s|%s|%v", cfg.Transport, cfg.Name, cfg.Args); err != nil || got != tc.want || cfg.Model != "echo" {
			t.Errorf("%s: %s (model %s), %v; want %s", tc.addrs, got, cfg.Model, err, tc.want)
		}
	}
	for _, addrs := range []string{"shm://a,shm://b", "http://localhost:8080", "tcp://nohostport"} {
		if _, err := (&spawnFlags{}).config(strings.Split(addrs, ",")); err == nil {
			t.Errorf("%s: no error", addrs)
		}
	}
}

func TestSpawnServesTheCommandAndStopsAtExit(t *testing.T) {
	bin, name := crosstest.Binary(t), crosstest.UniqueName()
	dir := t.TempDir()
	writeImage(t, filepath.Join(dir, "a.png"), 32, 30, encodePNG)
	writeImage(t, filepath.Join(dir, "b.jpg"), 48, 200, encodeJPEG)
	stdout, stderr, status := runCLI(t, "classify", "-spawn", "-spawn-bin", bin, "-spawn-args", "--threads 1",
		"-addr", "shm://"+name, dir)
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	if status != 0 || len(lines) != 3 || !strings.HasPrefix(lines[2], "classified 2 of 2 images over shm") {
		t.Fatalf("classify -spawn: %q %q %d", stdout, stderr, status)
	}
	for i, file := range []string{"a.png", "b.jpg"} {
		label := strings.TrimPrefix(lines[i], filepath.Join(dir, file)+" ")
		if !slices.Contains(protocol.Labels[:], label) {
			t.Errorf("line %d: %q", i, lines[i])
		}
	}
	crosstest.AssertNoRingObjects(t, name)

	socket := filepath.Join(crosstest.SocketDir(t), "s.sock")
	stdout, stderr, status = runCLI(t, "echo", "-spawn", "-spawn-bin", bin, "-addr", "unix://"+socket, "-c", "2", "-n", "50", "hi")
	if status != 0 || !strings.Contains(stdout, "50 replies over unix") {
		t.Fatalf("echo -spawn over unix: %q %q %d", stdout, stderr, status)
	}
	if _, err := os.Stat(socket); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the spawned server's socket outlived the command: %v", err)
	}
}

func TestSpawnFailureShowsTheServersError(t *testing.T) {
	name := crosstest.UniqueName()
	_, stderr, status := runCLI(t, "echo", "-spawn", "-spawn-bin", crosstest.Binary(t), "-spawn-args", "--slots zero",
		"-addr", "shm://"+name, "x")
	if status != 1 || !strings.Contains(stderr, "invalid int value: 'zero'") {
		t.Fatalf("echo -spawn with a bad argument: %q %d", stderr, status)
	}
	crosstest.AssertNoRingObjects(t, name)
}

// fakeModel answers METADATA with a one-input signature and INFER with its
// inputs, each named out<i>, as a served model would.
func fakeModel(_ context.Context, typ protocol.MsgType, body []byte) []ringtest.Message {
	switch typ {
	case protocol.TypeMetadata:
		return []ringtest.Message{{Type: typ, Body: []byte(`{"name": "fake", "platform": "shmserve", "versions": ["1"],
			"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
			"outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}], "max_batch_size": 8}`)}}
	case protocol.TypeInfer:
		tensors, err := protocol.DecodeTensorList(body)
		if err == nil {
			for i := range tensors {
				if tensors[i].Name == "" {
					tensors[i].Name = fmt.Sprintf("out%d", i)
				}
			}
			body, err = protocol.AppendTensorList(nil, tensors)
		}
		if err != nil {
			return []ringtest.Message{{Type: protocol.TypeError, Body: protocol.AppendErrorBody(nil, &protocol.Error{Code: protocol.CodeBadTensor, Message: err.Error()})}}
		}
		return []ringtest.Message{{Type: typ, Body: body}}
	}
	return []ringtest.Message{{Type: typ, Body: body}}
}

func TestInferReadsAndWritesNpy(t *testing.T) {
	addr := startServerWith(t, fakeModel)
	dir := t.TempDir()
	x := protocol.NewFloat32([]int{2, 3}, []float32{1, 2.5, -3, 4, 5, 6})
	ids := protocol.NewInt64([]int{12}, []int64{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11})
	for name, tensor := range map[string]protocol.Tensor{"x.npy": x, "ids.npy": ids} {
		if err := npy.WriteFile(filepath.Join(dir, name), tensor); err != nil {
			t.Fatal(err)
		}
	}
	out := t.TempDir()
	stdout, stderr, status := runCLI(t, "infer", "-addr", addr, "-out", out, filepath.Join(dir, "x.npy"), filepath.Join(dir, "ids.npy"))
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	if status != 0 || len(lines) != 3 || lines[0] != "out0 FP32 [2 3] [1 2.5 -3 4 5 6]" ||
		lines[1] != "out1 INT64 [12] [0 1 2 3 4 5 6 7 ...]" || !strings.HasPrefix(lines[2], "2 output(s) over shm in ") {
		t.Fatalf("infer: %q %q %d", stdout, stderr, status)
	}
	for name, want := range map[string]protocol.Tensor{"out0.npy": x, "out1.npy": ids} {
		got, err := npy.ReadFile(filepath.Join(out, name))
		if err != nil || got.DType != want.DType || !slices.Equal(got.Shape, want.Shape) || !bytes.Equal(got.Data, want.Data) {
			t.Errorf("%s: %v, %v", name, got, err)
		}
	}
	stdout, stderr, status = runCLI(t, "infer", "-addr", addr, "-input", "x="+filepath.Join(dir, "x.npy"))
	if status != 0 || !strings.HasPrefix(stdout, "x FP32 [2 3] [1 2.5 -3 4 5 6]\n") {
		t.Fatalf("infer -input: %q %q %d", stdout, stderr, status)
	}
	if _, stderr, status := runCLI(t, "infer", "-addr", addr, filepath.Join(dir, "missing.npy")); status != 1 || !strings.Contains(stderr, "missing.npy") {
		t.Fatalf("infer of a missing file: %q %d", stderr, status)
	}
	if _, stderr, status := runCLI(t, "infer", "-addr", addr); status != 2 || !strings.Contains(stderr, "usage: shmclient infer") {
		t.Fatalf("infer without inputs: %q %d", stderr, status)
	}
	if _, stderr, status := runCLI(t, "infer", "-addr", addr, "-input", "noequals"); status != 2 || !strings.Contains(stderr, "NAME=FILE.npy") {
		t.Fatalf("infer -input without NAME=: %q %d", stderr, status)
	}
}

func TestMetadataPrintsTheSignature(t *testing.T) {
	stdout, stderr, status := runCLI(t, "metadata", "-addr", startServerWith(t, fakeModel))
	var m protocol.Metadata
	if err := json.Unmarshal([]byte(stdout), &m); status != 0 || err != nil || m.Name != "fake" || m.MaxBatchSize != 8 ||
		len(m.Inputs) != 1 || m.Inputs[0].DType != protocol.DTypeFP32 || !slices.Equal(m.Inputs[0].Shape, []int{-1, 3}) {
		t.Fatalf("metadata: %q %q %d (%v)", stdout, stderr, status, err)
	}
}

func TestBenchMeasuresInferAsJSON(t *testing.T) {
	addr := startServerWith(t, fakeModel)
	file := filepath.Join(t.TempDir(), "x.npy")
	if err := npy.WriteFile(file, protocol.NewFloat32([]int{1, 3072}, make([]float32, 3072))); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, status := runCLI(t, "bench", "-addr", addr, "-infer", file, "-n", "300", "-warmup", "20", "-c", "2", "-reps", "2", "-json")
	var result struct {
		Op           string `json:"op"`
		RequestBytes int    `json:"request_bytes"`
		Results      []struct {
			Requests int64   `json:"requests"`
			P50      int64   `json:"p50_ns"`
			Rate     float64 `json:"msgs_per_s"`
		} `json:"results"`
	}
	if err := json.Unmarshal([]byte(stdout), &result); status != 0 || err != nil || result.Op != "infer" ||
		result.RequestBytes != 64+3072*4 || len(result.Results) != 1 || result.Results[0].Requests != 300 ||
		result.Results[0].P50 <= 0 || result.Results[0].Rate <= 0 {
		t.Fatalf("bench -infer -json: %q %q %d (%v)", stdout, stderr, status, err)
	}
}
