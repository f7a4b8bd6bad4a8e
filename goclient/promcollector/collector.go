// Package promcollector exports a shmclient.Client's Stats as Prometheus
// metrics. It is a package of its own so that programs that do not use
// Prometheus never link client_golang: shmclient does not import it.
//
//	prometheus.MustRegister(promcollector.New(client, prometheus.Labels{"server": "cifar"}))
package promcollector

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/shmserve/shmserve/goclient/shmclient"
)

// Collector reads the client's Stats at every scrape, so the metrics cost
// the calls nothing beyond the counting shmclient does anyway.
type Collector struct {
	client    *shmclient.Client
	calls     *prometheus.Desc
	errors    *prometheus.Desc
	inFlight  *prometheus.Desc
	ringWaits *prometheus.Desc
	fallbacks *prometheus.Desc
	transport *prometheus.Desc
}

// New returns a Collector of client's metrics. constLabels go on every
// metric; a program with several clients in one registry needs them to
// tell the clients apart.
func New(client *shmclient.Client, constLabels prometheus.Labels) *Collector {
	desc := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("shmclient_"+name, help, labels, constLabels)
	}
	return &Collector{
		client:    client,
		calls:     desc("calls_total", "Requests made, by message type, whatever their outcome.", "type"),
		errors:    desc("errors_total", "Requests that failed, by protocol error code or client verdict (DEADLINE_EXCEEDED, NO_FREE_SLOT, SERVER_GONE, ...).", "code"),
		inFlight:  desc("in_flight", "Requests under way."),
		ringWaits: desc("ring_waits_total", "Waits for a ring reply frame, by whether they found it spinning or blocked on the semaphore.", "how"),
		fallbacks: desc("fallbacks_total", "Times the fallback transport was taken: at dial, or for a ring call that found every slot held."),
		transport: desc("transport_info", "The transport in use (shm, unix or tcp), as a label.", "transport"),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.calls, c.errors, c.inFlight, c.ringWaits, c.fallbacks, c.transport} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	s := c.client.Stats()
	counter := func(d *prometheus.Desc, n uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(n), labels...)
	}
	for typ, n := range s.Calls {
		counter(c.calls, n, typ.String())
	}
	for code, n := range s.Errors {
		counter(c.errors, n, code)
	}
	counter(c.ringWaits, s.RingSpun, "spin")
	counter(c.ringWaits, s.RingBlocked, "block")
	counter(c.fallbacks, s.Fallbacks)
	ch <- prometheus.MustNewConstMetric(c.inFlight, prometheus.GaugeValue, float64(s.InFlight))
	ch <- prometheus.MustNewConstMetric(c.transport, prometheus.GaugeValue, 1, s.Transport)
}
