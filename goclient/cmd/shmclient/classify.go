package main

import (
	"context"
	"fmt"
	"image"
	_ "image/jpeg" // registers the JPEG decoder with image.Decode
	_ "image/png"  // registers the PNG decoder with image.Decode
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/image/draw"

	"github.com/shmserve/shmserve/goclient/protocol"
	"github.com/shmserve/shmserve/goclient/shmclient"
)

const classifySummary = `Classify PNG and JPEG images with the CIFAR-10 model and print one
"path label" line per image, in argument order (directories are walked in
lexical order). A file that cannot be read, decoded or classified gets a
"path error: ..." line instead, and the run goes on; the exit status is 1 if
any file failed. A summary follows: images, images/s and request latency.

Images are converted to the model's input, planar RGB 32x32: other sizes are
scaled to 32x32 with bilinear interpolation (golang.org/x/image/draw.BiLinear)
without keeping the aspect ratio, and transparent pixels become black.`

func runClassify(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := newFlagSet("classify", "[flags] FILE|DIR...", classifySummary, stderr)
	var conn connectionFlags
	conn.register(flags, 10*time.Second, "cifar")
	workers := flags.Int("c", 1, "images in flight at once")
	if err := parseArgs(flags, args, 1, -1); err != nil {
		return err
	}
	paths, err := expandPaths(flags.Args())
	if err != nil {
		return err
	}
	ctx, client, closeClient, err := conn.connect(ctx, max(*workers, 1), stderr)
	if err != nil {
		return err
	}
	defer closeClient()

	type result struct {
		line string
		ok   bool
	}
	results := make([]chan result, len(paths))
	for i := range results {
		results[i] = make(chan result, 1)
	}
	latency := newLatencies()
	jobs := make(chan int)
	var wg sync.WaitGroup
	for range max(*workers, 1) {
		wg.Go(func() {
			for i := range jobs {
				label, err := classifyFile(ctx, client, paths[i], conn.timeout, latency)
				if err != nil {
					results[i] <- result{line: fmt.Sprintf("%s error: %v", paths[i], err)}
				} else {
					results[i] <- result{line: paths[i] + " " + label, ok: true}
				}
			}
		})
	}
	start := time.Now()
	go func() {
		for i := range paths {
			jobs <- i
		}
		close(jobs)
	}()
	failed := 0
	for _, done := range results {
		r := <-done
		fmt.Fprintln(stdout, r.line)
		if !r.ok {
			failed++
		}
	}
	wg.Wait()
	elapsed := time.Since(start)
	classified := len(paths) - failed
	fmt.Fprintf(stdout, "classified %d of %d images over %s in %v: %.1f images/s",
		classified, len(paths), client.Transport(), elapsed.Round(time.Millisecond), float64(classified)/elapsed.Seconds())
	if latency.count() > 0 {
		fmt.Fprintf(stdout, ", request latency p50 %s p99 %s", formatLatency(latency.quantile(50)), formatLatency(latency.quantile(99)))
	}
	fmt.Fprintln(stdout)
	if failed > 0 {
		return fmt.Errorf("%d of %d files failed", failed, len(paths))
	}
	return nil
}

// expandPaths replaces each directory by the regular files under it.
func expandPaths(args []string) ([]string, error) {
	var paths []string
	for _, arg := range args {
		info, err := os.Stat(arg)
		if err != nil || !info.IsDir() {
			paths = append(paths, arg) // a missing file gets its error line later
			continue
		}
		err = filepath.WalkDir(arg, func(path string, entry fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if entry.Type().IsRegular() {
				paths = append(paths, path)
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	return paths, nil
}

func classifyFile(ctx context.Context, client *shmclient.Client, path string, timeout time.Duration, latency *latencies) (string, error) {
	file, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer file.Close()
	img, _, err := image.Decode(file)
	if err != nil {
		return "", fmt.Errorf("decode: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := time.Now()
	label, err := client.Classify(ctx, planarRGB32(img))
	if err == nil {
		latency.record(time.Since(start))
	}
	return label, err
}

// planarRGB32 converts img to the model's input: 32x32, R plane then G
// plane then B plane, each row-major (spec section 3).
func planarRGB32(img image.Image) []byte {
	const side = protocol.ImageSide
	rgba := image.NewRGBA(image.Rect(0, 0, side, side))
	if b := img.Bounds(); b.Dx() == side && b.Dy() == side {
		draw.Draw(rgba, rgba.Bounds(), img, b.Min, draw.Src)
	} else {
		draw.BiLinear.Scale(rgba, rgba.Bounds(), img, b, draw.Src, nil)
	}
	planar := make([]byte, protocol.ImageBytes)
	for y := range side {
		for x := range side {
			pixel := rgba.Pix[y*rgba.Stride+4*x:]
			at := y*side + x
			planar[at] = pixel[0]
			planar[protocol.ImagePlane+at] = pixel[1]
			planar[2*protocol.ImagePlane+at] = pixel[2]
		}
	}
	return planar
}
