// The ready line, spec section 14: the contract between the server and this package.

package sidecar

import (
	"encoding/json"
	"fmt"
	"strings"
)

// Ready is the server's ready line (spec/PROTOCOL.md section 14): one JSON
// object on its stdout once it serves. ParseReady is the only reader of it.
type Ready struct {
	Event        string `json:"event"`
	ReadyVersion int    `json:"ready_version"`
	// PID is the server's own pid (the child's, unless Binary is a
	// wrapper that forks).
	PID   int            `json:"pid"`
	Model map[string]any `json:"model"`
	// Transports holds one entry per transport served: "shm", "unix", "tcp",
	// "http".
	Transports map[string]TransportReady `json:"transports"`
	// Metrics is the URL of the server's Prometheus metrics
	// (http://HOST:PORT/metrics), or "" when it serves none.
	Metrics string `json:"metrics,omitempty"`
}

// TransportReady is one transport's entry of the ready line.
type TransportReady struct {
	// Address is what shmclient.Dial takes (shm://NAME, unix:///path,
	// tcp://host:port), or the HTTP base URL.
	Address string `json:"address"`
	// Name, Generation (16 hex digits, new on every start) and Slots: the ring.
	Name       string `json:"name,omitempty"`
	Generation string `json:"generation,omitempty"`
	Slots      int    `json:"slots,omitempty"`
	Path       string `json:"path,omitempty"` // unix
	Host       string `json:"host,omitempty"` // tcp, http
	Port       int    `json:"port,omitempty"` // tcp, http: the port bound
}

// ReadyVersion is the version of the ready line this package reads.
const ReadyVersion = 1

// ParseReady reads a ready line; anything else, or a version this package
// does not know, is an error.
func ParseReady(line []byte) (Ready, error) {
	var r Ready
	if err := json.Unmarshal(line, &r); err != nil || r.Event != "ready" {
		return Ready{}, fmt.Errorf("not a ready line: %q", strings.TrimSpace(string(line)))
	}
	if r.ReadyVersion != ReadyVersion {
		return Ready{}, fmt.Errorf("ready line version %d; this client reads %d", r.ReadyVersion, ReadyVersion)
	}
	for name, t := range r.Transports {
		if t.Address == "" {
			return Ready{}, fmt.Errorf("ready line: transport %q has no address", name)
		}
	}
	return r, nil
}

// Addr returns the address of a transport the server serves ("shm",
// "unix" (or its older name "uds"), "tcp", "http"), or "".
func (r Ready) Addr(transport string) string {
	if transport == "uds" {
		transport = "unix"
	}
	return r.Transports[transport].Address
}

// Ring returns the ring's entry (name, generation, slots); zero when the
// server does not serve the ring.
func (r Ready) Ring() TransportReady { return r.Transports["shm"] }
