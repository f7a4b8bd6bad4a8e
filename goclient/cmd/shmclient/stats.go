package main

import (
	"sync"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
)

// latencies records request latencies in nanoseconds, from 1 ns to a
// minute at 3 significant digits; safe for concurrent use.
type latencies struct {
	mu        sync.Mutex
	histogram *hdrhistogram.Histogram
}

func newLatencies() *latencies {
	return &latencies{histogram: hdrhistogram.New(1, int64(time.Minute), 3)}
}

func (l *latencies) record(d time.Duration) {
	l.mu.Lock()
	l.histogram.RecordValue(max(int64(d), 1))
	l.mu.Unlock()
}

func (l *latencies) merge(other *hdrhistogram.Histogram) {
	l.mu.Lock()
	l.histogram.Merge(other)
	l.mu.Unlock()
}

func (l *latencies) count() int64 { return l.histogram.TotalCount() }

func (l *latencies) quantile(percent float64) time.Duration {
	return time.Duration(l.histogram.ValueAtQuantile(percent))
}

func (l *latencies) mean() time.Duration { return time.Duration(l.histogram.Mean()) }

// formatLatency prints microsecond latencies with one decimal, the
// resolution that matters at these speeds.
func formatLatency(d time.Duration) string {
	switch {
	case d < time.Millisecond:
		return time.Duration(d).Round(100 * time.Nanosecond).String()
	case d < time.Second:
		return d.Round(10 * time.Microsecond).String()
	}
	return d.Round(time.Millisecond).String()
}
