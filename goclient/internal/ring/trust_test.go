package ring_test

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shmserve/shmserve/goclient/internal/ring"
	"github.com/shmserve/shmserve/goclient/internal/ring/ringtest"
	"github.com/shmserve/shmserve/goclient/protocol"
)

// ringFiles are the files of every object a client opens (section 6).
func ringFiles(name string) map[string]string {
	return map[string]string{
		"shared memory":     ring.ShmPath(name),
		"liveness lock":     ring.LockPath(name),
		"request semaphore": ring.SemPath(ring.RequestSemName(name)),
		"slot semaphore":    ring.SemPath(ring.SlotSemName(name, 1)),
	}
}

func mapValues(m map[string]string) []string {
	var values []string
	for _, v := range m {
		values = append(values, v)
	}
	return values
}

func attachErr(name string, cfg ring.Config) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	r, err := ring.Attach(ctx, name, cfg)
	if err == nil {
		r.Close()
	}
	return err
}

// A ring that another user created first (or widened) must not get a byte:
// it would read the requests and write the replies.
func TestAttachRefusesObjectsOthersMayOpen(t *testing.T) {
	for what, path := range ringFiles("") {
		t.Run(what, func(t *testing.T) {
			server := startServer(t, ringtest.Options{Slots: 2})
			path := path + server.Name
			if what != "shared memory" {
				path = ringFiles(server.Name)[what]
			}
			for _, mode := range []os.FileMode{0o606, 0o660} {
				if err := os.Chmod(path, mode); err != nil {
					t.Fatal(err)
				}
				if err := attachErr(server.Name, ring.DefaultConfig()); !errors.Is(err, ring.ErrUntrusted) {
					t.Fatalf("attach with %s mode %o = %v, want ErrUntrusted", what, mode, err)
				}
			}
			os.Chmod(path, 0o600)
			if err := attachErr(server.Name, ring.DefaultConfig()); err != nil {
				t.Fatalf("attach once %s is 0600 again = %v", what, err)
			}
		})
	}
}

func TestAttachAcceptsGroupModeOnAGroupAccessRing(t *testing.T) {
	server := startServer(t, ringtest.Options{Slots: 2})
	setHeaderFlags(t, server.Name, ring.HeaderFlagGroupAccess)
	for _, path := range append(mapValues(ringFiles(server.Name)), ring.SemPath(ring.SlotSemName(server.Name, 0))) {
		if err := os.Chmod(path, 0o660); err != nil {
			t.Fatal(err)
		}
	}
	if err := attachErr(server.Name, ring.DefaultConfig()); err != nil {
		t.Fatalf("attach to a 0660 group-access ring = %v", err)
	}
}

func TestAttachRefusesAnotherUsersRing(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give the ring's files to another user")
	}
	const nobody = 65534
	for what, path := range ringFiles("") {
		t.Run(what, func(t *testing.T) {
			server := startServer(t, ringtest.Options{Slots: 2})
			path := path + server.Name
			if what != "shared memory" {
				path = ringFiles(server.Name)[what]
			}
			if err := os.Chown(path, nobody, -1); err != nil {
				t.Fatal(err)
			}
			if err := attachErr(server.Name, ring.DefaultConfig()); !errors.Is(err, ring.ErrUntrusted) {
				t.Fatalf("attach with %s owned by uid %d = %v, want ErrUntrusted", what, nobody, err)
			}
			for _, path := range append(mapValues(ringFiles(server.Name)), ring.SemPath(ring.SlotSemName(server.Name, 0))) {
				os.Chown(path, nobody, -1)
			}
			cfg := ring.DefaultConfig()
			cfg.ServerUID = nobody
			if err := attachErr(server.Name, cfg); err != nil {
				t.Fatalf("attach naming uid %d as the server's = %v", nobody, err)
			}
		})
	}
}

func TestAttachRefusesASymlinkedRing(t *testing.T) {
	server := startServer(t, ringtest.Options{Slots: 2})
	alias := uniqueName()
	if err := os.Symlink(ring.ShmPath(server.Name), ring.ShmPath(alias)); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(ring.ShmPath(alias))
	if err := attachErr(alias, ring.DefaultConfig()); !errors.Is(err, unix.ELOOP) {
		t.Fatalf("attach through a symlink = %v, want ELOOP", err)
	}
}

func setHeaderFlags(t *testing.T, name string, flags uint32) {
	t.Helper()
	f, err := os.OpenFile(ring.ShmPath(name), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	mem, err := unix.Mmap(int(f.Fd()), 0, ring.HeaderSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	binary.LittleEndian.PutUint32(mem[ring.HeaderFlagsOffset:], flags)
}

// setSemaphoreValue writes a count straight into the semaphore's file (glibc
// keeps it in the low 32 bits of the first word), as anyone who may open it
// can: posting 2^31 times would take minutes.
func setSemaphoreValue(t *testing.T, semName string, value uint32) {
	t.Helper()
	f, err := os.OpenFile(ring.SemPath(semName), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var word [4]byte
	binary.LittleEndian.PutUint32(word[:], value)
	if _, err := f.WriteAt(word[:], 0); err != nil {
		t.Fatal(err)
	}
}

// Draining a count at SEM_VALUE_MAX took one cgo call 18 s, deaf to the
// call's deadline; bounded, the call is answered as usual.
func TestSaturatedSlotSemaphoresKeepTheDeadline(t *testing.T) {
	server := startServer(t, ringtest.Options{Slots: 2})
	r := attach(t, server.Name, ring.DefaultConfig())
	for i := range 2 {
		setSemaphoreValue(t, ring.SlotSemName(server.Name, i), 0x7fffffff)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	start := time.Now()
	reply, _, err := call(ctx, r, protocol.TypeEcho, []byte("x"))
	if elapsed := time.Since(start); elapsed > 1500*time.Millisecond {
		t.Fatalf("a 1 s call took %v", elapsed)
	}
	if err != nil || string(reply) != "x" {
		t.Fatalf("echo with saturated slot semaphores = %q, %v", reply, err)
	}
}

// A process may hold every slot claimed and idle for as long as it lives: a
// call then fails with a typed error, not a bare deadline.
func TestEverySlotHeldByOthersIsErrNoFreeSlot(t *testing.T) {
	server := startServer(t, ringtest.Options{Slots: 2})
	server.SetOwner(0, 1)
	server.SetOwner(1, 1)
	defer server.SetOwner(0, 0)
	defer server.SetOwner(1, 0)
	cfg := ring.DefaultConfig()
	cfg.ClaimPatience = 50 * time.Millisecond
	r := attach(t, server.Name, cfg)
	start := time.Now()
	_, _, err := call(testCtx(t), r, protocol.TypeEcho, []byte("x"))
	if !errors.Is(err, ring.ErrNoFreeSlot) || !ring.NotSent(err) {
		t.Fatalf("call with every slot held = %v, want ErrNoFreeSlot, not sent", err)
	}
	if elapsed := time.Since(start); elapsed > time.Second {
		t.Fatalf("a claim with 50ms patience gave up after %v", elapsed)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	r = attach(t, server.Name, ring.DefaultConfig()) // no patience: the deadline ends it
	if _, _, err := call(ctx, r, protocol.TypeEcho, []byte("x")); !errors.Is(err, ring.ErrNoFreeSlot) ||
		!errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("call without patience = %v, want ErrNoFreeSlot and DeadlineExceeded", err)
	}
}
