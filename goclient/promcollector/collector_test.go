package promcollector

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/shmserve/shmserve/goclient/internal/crosstest"
	"github.com/shmserve/shmserve/goclient/internal/ring/ringtest"
	"github.com/shmserve/shmserve/goclient/protocol"
	"github.com/shmserve/shmserve/goclient/shmclient"
)

func TestCollectorAfterRingCalls(t *testing.T) {
	name := crosstest.UniqueName()
	server, err := ringtest.Start(name, ringtest.Options{Slots: 2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		server.Stop(0)
		ringtest.RemoveObjects(name)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client, err := shmclient.Dial(ctx, "shm://"+name, shmclient.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	for range 3 {
		if _, err := client.Echo(ctx, []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := client.Classify(ctx, []byte("short")); err == nil {
		t.Fatal("Classify of 5 bytes succeeded")
	}
	cancelled, cancelNow := context.WithCancel(ctx)
	cancelNow()
	client.Classify(cancelled, make([]byte, protocol.ImageBytes))

	collector := New(client, prometheus.Labels{"server": "test"})
	want := `
# HELP shmclient_calls_total Requests made, by message type, whatever their outcome.
# TYPE shmclient_calls_total counter
shmclient_calls_total{server="test",type="CLASSIFY"} 2
shmclient_calls_total{server="test",type="ECHO"} 3
# HELP shmclient_errors_total Requests that failed, by protocol error code or client verdict (DEADLINE_EXCEEDED, NO_FREE_SLOT, SERVER_GONE, ...).
# TYPE shmclient_errors_total counter
shmclient_errors_total{code="BAD_LENGTH",server="test"} 1
shmclient_errors_total{code="CONTEXT_CANCELED",server="test"} 1
# HELP shmclient_fallbacks_total Times the fallback transport was taken: at dial, or for a ring call that found every slot held.
# TYPE shmclient_fallbacks_total counter
shmclient_fallbacks_total{server="test"} 0
# HELP shmclient_in_flight Requests under way.
# TYPE shmclient_in_flight gauge
shmclient_in_flight{server="test"} 0
# HELP shmclient_transport_info The transport in use (shm, unix or tcp), as a label.
# TYPE shmclient_transport_info gauge
shmclient_transport_info{server="test",transport="shm"} 1
`
	if err := testutil.CollectAndCompare(collector, strings.NewReader(want),
		"shmclient_calls_total", "shmclient_errors_total", "shmclient_fallbacks_total",
		"shmclient_in_flight", "shmclient_transport_info"); err != nil {
		t.Error(err)
	}

	// How the three ECHO replies were waited for depends on timing; that
	// there were three waits does not.
	registry := prometheus.NewPedanticRegistry()
	registry.MustRegister(collector)
	families, err := registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	waits := map[string]float64{}
	for _, family := range families {
		if family.GetName() != "shmclient_ring_waits_total" {
			continue
		}
		for _, m := range family.GetMetric() {
			for _, label := range m.GetLabel() {
				if label.GetName() == "how" {
					waits[label.GetValue()] = m.GetCounter().GetValue()
				}
			}
		}
	}
	if len(waits) != 2 || waits["spin"]+waits["block"] != 3 {
		t.Errorf("ring waits = %v, want spin and block adding up to 3", waits)
	}
	if problems, err := testutil.CollectAndLint(collector); err != nil || len(problems) != 0 {
		t.Errorf("lint: %v, %v", problems, err)
	}
}
