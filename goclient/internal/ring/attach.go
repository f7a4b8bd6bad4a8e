package ring

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"regexp"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/shmserve/shmserve/goclient/internal/posixsem"
)

// ErrServerGone reports that no live server serves the ring: it stopped, it
// died, or a new server replaced it. A later Attach finds the new one.
var ErrServerGone = errors.New("shmserve: server gone")

// Config tunes how a Ring waits.
type Config struct {
	// Spin is how long a wait for a reply frame polls before it blocks on the
	// semaphore; 0 blocks at once.
	Spin time.Duration
	// LivenessInterval bounds every blocking wait: a blocked caller checks
	// that the server lives at least this often (spec section 10: 50 ms).
	LivenessInterval time.Duration
	// ServerUID is the user the server must run as: every object of the ring
	// must be owned by it (spec section 6.1). DefaultConfig: this process's
	// effective uid.
	ServerUID int
	// ClaimPatience bounds how long a call waits for a slot while other
	// processes hold every one; it then fails with ErrNoFreeSlot. 0: until
	// the call's context ends.
	ClaimPatience time.Duration
	// Waits, when set, counts how the waits for reply frames ended; the
	// client shares one across ring generations.
	Waits *WaitCounts
}

// DefaultConfig spins 50 µs: long enough to catch any reply the server has
// ready (an echo round trip is a few µs), short enough that a request
// waiting on a model (milliseconds) wastes little CPU before it blocks. A lone call stretches it up to 200 µs
// when replies typically take that long, and failed spins pause spinning
// (see Waiter). The calls in flight share one poller, leaving the other CPUs to
// the server.
func DefaultConfig() Config {
	return Config{
		Spin:             50 * time.Microsecond,
		LivenessInterval: 50 * time.Millisecond,
		ServerUID:        os.Geteuid(),
	}
}

// attachPollInterval paces Attach while the server creates the ring or
// loads its model (seconds): polling is cheap next to that, and the server
// posts nothing a client could wait on before READY.
const attachPollInterval = 5 * time.Millisecond

var ringNamePattern = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// CheckName validates a ring name against section 6.
func CheckName(name string) error {
	if !ringNamePattern.MatchString(name) {
		return fmt.Errorf("ring name %q must be 1-64 characters of [A-Za-z0-9_-]", name)
	}
	return nil
}

// errNotCreatedYet marks a ring whose server is still creating it (no size
// or no magic yet): Attach tries again.
var errNotCreatedYet = errors.New("ring not created yet")

// Attach maps the ring NAME and waits, bounded by ctx, until its server is
// READY (spec section 11). It fails at once with ErrServerGone when no live
// server serves NAME.
func Attach(ctx context.Context, name string, cfg Config) (*Ring, error) {
	if err := CheckName(name); err != nil {
		return nil, err
	}
	for {
		r, err := mapRing(name, cfg)
		if err == nil {
			if err = r.awaitReady(ctx); err == nil {
				return r, nil
			}
			r.Close()
			return nil, err
		}
		if !errors.Is(err, errNotCreatedYet) {
			return nil, err
		}
		if err := sleepCtx(ctx, attachPollInterval); err != nil {
			return nil, fmt.Errorf("attach ring %s: %w", name, err)
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-timer.C:
		return nil
	}
}

// mapRing opens, maps and validates the shared memory, then opens the
// semaphores and the liveness lock. The mapping is sized from the object
// itself and checked against the header, so a corrupt header cannot make the
// client read outside it.
func mapRing(name string, cfg Config) (*Ring, error) {
	fd, err := unix.Open(ShmPath(name), unix.O_RDWR|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil, fmt.Errorf("%w: no ring %s (%s does not exist)", ErrServerGone, name, ShmPath(name))
	}
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: ShmPath(name), Err: err}
	}
	defer unix.Close(fd)
	var stat unix.Stat_t
	if err := unix.Fstat(fd, &stat); err != nil {
		return nil, &os.PathError{Op: "fstat", Path: ShmPath(name), Err: err}
	}
	// Before a byte is read or written: whoever owns the memory reads the
	// requests and writes the replies.
	if err := checkOwned(ShmPath(name), &stat, cfg.ServerUID, nil); err != nil {
		return nil, err
	}
	if stat.Size < HeaderSize {
		return nil, errNotCreatedYet
	}
	mem, err := unix.Mmap(fd, 0, int(stat.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, &os.PathError{Op: "mmap", Path: ShmPath(name), Err: err}
	}
	r := &Ring{name: name, mem: mem, inode: stat.Ino, pid: uint32(os.Getpid()), dead: make(chan struct{})}
	r.users.Store(1)
	if r.geo, err = ValidateHeader(mem, len(mem)); err != nil {
		r.unmap()
		if magicUnwritten(mem) {
			return nil, errNotCreatedYet
		}
		return nil, fmt.Errorf("ring %s: %w", name, err)
	}
	groupAccess := binary.LittleEndian.Uint32(mem[HeaderFlagsOffset:])&HeaderFlagGroupAccess != 0
	if err := checkOwned(ShmPath(name), &stat, cfg.ServerUID, &groupAccess); err != nil {
		r.unmap()
		return nil, err
	}
	if err := r.openObjects(cfg.ServerUID, groupAccess); err != nil {
		r.unmap()
		return nil, err
	}
	r.initSlots(cfg)
	if err := r.checkAlive(); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

func magicUnwritten(mem []byte) bool {
	for _, b := range mem[HeaderMagicOffset : HeaderMagicOffset+len(Magic)] {
		if b != 0 {
			return false
		}
	}
	return true
}

// openObjects opens the liveness lock and the semaphores, each checked to be
// the server's (section 6.1): another user's lock would fake a live server.
// The server creates them all before it writes magic, so a missing one means
// it is gone.
func (r *Ring) openObjects(serverUID int, groupAccess bool) error {
	fd, err := unix.Open(LockPath(r.name), unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return r.goneIfMissing(&os.PathError{Op: "open", Path: LockPath(r.name), Err: err})
	}
	r.lock = os.NewFile(uintptr(fd), LockPath(r.name))
	var stat unix.Stat_t
	if err := unix.Fstat(fd, &stat); err != nil {
		return &os.PathError{Op: "fstat", Path: LockPath(r.name), Err: err}
	}
	if err := checkOwned(LockPath(r.name), &stat, serverUID, &groupAccess); err != nil {
		return err
	}
	open := func(semName string) (*posixsem.Semaphore, error) {
		sem, err := posixsem.Open(semName)
		if err != nil {
			return nil, r.goneIfMissing(err)
		}
		if err := checkPath(SemPath(semName), serverUID, groupAccess); err != nil {
			sem.Close()
			return nil, r.goneIfMissing(err)
		}
		return sem, nil
	}
	if r.requestSem, err = open(RequestSemName(r.name)); err != nil {
		return err
	}
	r.slotSems = make([]*posixsem.Semaphore, r.geo.SlotCount)
	for i := range r.slotSems {
		if r.slotSems[i], err = open(SlotSemName(r.name, i)); err != nil {
			return err
		}
	}
	return nil
}

func (r *Ring) goneIfMissing(err error) error {
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%w: ring %s is being removed: %w", ErrServerGone, r.name, err)
	}
	return err
}

func (r *Ring) initSlots(cfg Config) {
	r.serverState = atomicU32(r.mem, HeaderServerStateOffset)
	r.doorbell = (*atomic.Uint64)(unsafe.Pointer(&r.mem[HeaderDoorbellOffset]))
	r.slots = make([]slot, r.geo.SlotCount)
	r.free = newFreeSlots(r.geo.SlotCount)
	for i := range r.slots {
		s := &r.slots[i]
		s.index = i
		s.mem = r.geo.slot(r.mem, i)
		s.replyData = s.mem[SlotDataOffset+r.geo.ReqCapacity:][:r.geo.RespCapacity]
		s.owner = atomicU32(s.mem, SlotOwnerOffset)
		s.reqSeq = atomicU32(s.mem, SlotReqSeqOffset)
		s.ackSeq = atomicU32(s.mem, SlotAckSeqOffset)
		s.cancelSeq = atomicU32(s.mem, SlotCancelSeqOffset)
		s.frameSeq = atomicU32(s.mem, SlotFrameSeqOffset)
		s.sem = r.slotSems[i]
		s.initFrameMoved()
		r.free.put(s)
	}
	r.claimPatience = cfg.ClaimPatience
	r.waiter = NewWaiter(cfg.Spin, cfg.LivenessInterval)
	r.waiter.counts = cfg.Waits
	r.reaperWaiter = NewWaiter(0, cfg.LivenessInterval)
}

// atomicU32 views a 4-byte-aligned field of shared memory as an atomic.
func atomicU32(mem []byte, offset int) *atomic.Uint32 {
	return (*atomic.Uint32)(unsafe.Pointer(&mem[offset]))
}

// awaitReady waits for server_state READY, checking liveness as it polls,
// since a server may die while it loads its model.
func (r *Ring) awaitReady(ctx context.Context) error {
	for {
		switch state := ServerState(r.serverState.Load()); state {
		case StateReady:
			return nil
		case StateStopping, StateStopped:
			return r.markDead(fmt.Sprintf("server is %v", state))
		}
		if err := r.checkAlive(); err != nil {
			return err
		}
		if err := sleepCtx(ctx, attachPollInterval); err != nil {
			return fmt.Errorf("waiting for ring %s to become READY (server_state %v): %w",
				r.name, ServerState(r.serverState.Load()), err)
		}
	}
}

// checkAlive applies the liveness rules of section 11. The server holds the
// lock exclusively for its whole life, so a shared lock that succeeds proves
// it is gone, however it died; a new inode under the name means a new server
// replaced it. STOPPING does not count: a stopping server still answers every
// request it read (at worst with SHUTTING_DOWN), so waiting goes on.
func (r *Ring) checkAlive() error {
	if err := r.deadErr.Load(); err != nil {
		return *err
	}
	if state := ServerState(r.serverState.Load()); state == StateStopped {
		return r.markDead("server is STOPPED")
	}
	err := unix.Flock(int(r.lock.Fd()), unix.LOCK_SH|unix.LOCK_NB)
	if err == nil {
		unix.Flock(int(r.lock.Fd()), unix.LOCK_UN)
		return r.markDead("its server died (the liveness lock is free)")
	}
	if !errors.Is(err, unix.EWOULDBLOCK) {
		return fmt.Errorf("liveness probe on %s: %w", LockPath(r.name), err)
	}
	var stat unix.Stat_t
	switch err := unix.Stat(ShmPath(r.name), &stat); {
	case errors.Is(err, unix.ENOENT):
		return r.markDead("its shared memory was unlinked")
	case err != nil:
		return &os.PathError{Op: "stat", Path: ShmPath(r.name), Err: err}
	case stat.Ino != r.inode:
		return r.markDead("a new server replaced it")
	}
	return nil
}

// markDead records why the server is gone, wakes every caller of this
// process waiting for a slot, and retires the ring; the first reason wins.
func (r *Ring) markDead(reason string) error {
	err := fmt.Errorf("%w: ring %s generation %016x (server pid %d): %s",
		ErrServerGone, r.name, r.geo.Generation, r.geo.ServerPID, reason)
	if r.deadErr.CompareAndSwap(nil, &err) {
		close(r.dead)
		r.Close()
	}
	return *r.deadErr.Load()
}

// Close retires the ring: new calls fail with ErrServerGone, and the mapping
// and semaphores are released once the last call and reaper have finished
// with them. Close does not wait for them.
func (r *Ring) Close() error {
	if r.closing.CompareAndSwap(false, true) {
		r.releaseUser()
	}
	return nil
}

// Retired reports whether the ring takes no new calls.
func (r *Ring) Retired() bool { return r.closing.Load() }

// acquireUser keeps the mapping alive for one call or reaper; it fails once
// the ring is retired.
func (r *Ring) acquireUser() bool {
	if r.closing.Load() {
		return false
	}
	for {
		n := r.users.Load()
		if n == 0 {
			return false
		}
		if r.users.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

func (r *Ring) releaseUser() {
	if r.users.Add(-1) == 0 {
		r.unmap()
	}
}

func (r *Ring) unmap() {
	for _, sem := range r.slotSems {
		if sem != nil {
			sem.Close()
		}
	}
	if r.requestSem != nil {
		r.requestSem.Close()
	}
	if r.lock != nil {
		r.lock.Close()
	}
	unix.Munmap(r.mem)
}
