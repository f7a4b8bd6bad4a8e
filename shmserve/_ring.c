/* The ring server's per-message work (spec/PROTOCOL.md sections 8-10), in C11.
 *
 * shmserve/transports/shm.py owns everything that is policy: dispatch, models, flow control,
 * cancellation, reclaim, lifecycle. This module owns what happens per message: waiting for
 * the doorbell (spin, then timed semaphore waits, with the GIL released), scanning the slots
 * for new requests, answering ECHO without entering Python, and publishing reply frames.
 *
 * Shared memory is untrusted: every value read from it is loaded once into a local and
 * checked before use; geometry comes only from the constructor. Words the other side
 * changes are read with acquire loads and published with release stores, which is what spec
 * section 10 asks for on every CPU (on x86-64 they compile to plain moves).
 *
 * One thread (the ring thread) calls every method except notify(), which any thread may
 * call; the watch flags are written only through watch(), so Python's view of them is exact.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE /* sem_clockwait, a glibc extension */
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

/* Byte layout (spec section 7). shmserve/layout.py is the reference; shm.py checks these
 * against it through LAYOUT at import, so the two cannot drift apart silently. */
#define HEADER_SIZE 256
#define H_DOORBELL 128
#define S_OWNER 0
#define S_REQ_SEQ 4
#define S_REQ_ID 8
#define S_REQ_LEN 16
#define S_REQ_TYPE 20
#define S_ACK_SEQ 24
#define S_CANCEL_SEQ 28
#define S_FRAME_SEQ 64
#define S_FRAME_REQ_SEQ 68
#define S_FRAME_REQ_ID 72
#define S_FRAME_LEN 80
#define S_FRAME_TYPE 84
#define S_FRAME_FLAGS 85
#define S_DATA 128
#define FRAME_FLAG_FINAL 1
#define MSG_ECHO 0x00

/* watch() flags: Python holds state for the slot (an open request, or a reply waiting for an
 * ack). Such a slot is checked for cancel (and ack) on every scan, and a new request there is
 * handed to Python even when it is an echo, since Python must drop that state first. */
#define WATCH_OPEN 1
#define WATCH_ACK 2

#define EVENT_CANCEL 1
#define EVENT_ACK 2

/* Polls between clock reads while spinning, and between yields: a yield lets a client
 * spinning on the same CPU run (two spinners on one core otherwise starve each other). */
#define POLLS_PER_CLOCK 64
#define POLLS_PER_YIELD 256

/* Frames at least this long are copied with the GIL released, so model threads keep
 * running while a large reply is copied; below it releasing costs more than the copy. */
#define NOGIL_COPY_BYTES (64 * 1024)
/* Clients post the request semaphore only when its count is 0 (section 10), so a wait that
 * keeps getting tokens while the doorbell stays put is facing a flooded count (set towards
 * SEM_VALUE_MAX by someone who can write the ring's files). Draining it would keep a CPU busy
 * for minutes; past this many stray tokens in one wait the doorbell is polled with naps. */
#define STRAY_TOKENS_PER_WAIT 4
#define FLOODED_NAP_NS 1000000

typedef struct {
    uint32_t slot, seq, len, owner;
    uint64_t id;
    uint8_t type;
} Ready;

typedef struct {
    uint32_t slot, kind;
} Event;

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    unsigned char *base;
    uint32_t slot_count, req_capacity, resp_capacity;
    size_t stride;
    sem_t *request_sem;
    sem_t **slot_sems;
    uint32_t *served;  /* the req_seq last taken from each slot */
    uint8_t *watch;
    Ready *ready;
    Event *events;
    uint64_t bell;     /* the doorbell value the last scan started from */
    uint32_t scan_from; /* the slot the last scan found something in; rung scans start there */
    int rescan;        /* scan at the next poll without waiting */
    int echo_inline;
    atomic_uint notified;
    /* Read by metrics from any thread, written by the ring thread only. */
    _Atomic uint64_t inline_echoes;
    _Atomic uint64_t flooded_waits;
} RingObject;

/* -- shared-memory words ----------------------------------------------------------------- */

static inline _Atomic uint32_t *word32(unsigned char *p) { return (_Atomic uint32_t *)p; }
static inline _Atomic uint64_t *word64(unsigned char *p) { return (_Atomic uint64_t *)p; }
static inline uint32_t load_acquire32(unsigned char *p) {
    return atomic_load_explicit(word32(p), memory_order_acquire);
}
static inline uint32_t load_relaxed32(unsigned char *p) {
    return atomic_load_explicit(word32(p), memory_order_relaxed);
}
static inline uint64_t load_relaxed64(unsigned char *p) {
    return atomic_load_explicit(word64(p), memory_order_relaxed);
}
static inline uint8_t load_relaxed8(unsigned char *p) {
    return atomic_load_explicit((_Atomic uint8_t *)p, memory_order_relaxed);
}
static inline void store_relaxed32(unsigned char *p, uint32_t v) {
    atomic_store_explicit(word32(p), v, memory_order_relaxed);
}
static inline void store_relaxed64(unsigned char *p, uint64_t v) {
    atomic_store_explicit(word64(p), v, memory_order_relaxed);
}
static inline void store_relaxed8(unsigned char *p, uint8_t v) {
    atomic_store_explicit((_Atomic uint8_t *)p, v, memory_order_relaxed);
}

static inline unsigned char *slot_base(RingObject *r, uint32_t slot) {
    return r->base + HEADER_SIZE + (size_t)slot * r->stride;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* sem_post as the wake-up hint it is. EOVERFLOW (anyone who may write the ring may also set
 * the count to SEM_VALUE_MAX) leaves tokens enough to wake the waiter. */
static inline void wake(sem_t *sem) { (void)sem_post(sem); }

/* -- waiting ----------------------------------------------------------------------------- */

static inline int bell_changed(RingObject *r) {
    return atomic_load_explicit(word64(r->base + H_DOORBELL), memory_order_acquire) != r->bell ||
           atomic_load_explicit(&r->notified, memory_order_acquire);
}

/* Section 10's wait, without the GIL: spin for spin_ns, then timed waits on the request
 * semaphore until block_ns have passed in all (tokens without a doorbell change, stray posts
 * or a count set to SEM_VALUE_MAX, must not keep the caller from its housekeeping). */
static void wait_for_bell(RingObject *r, int64_t spin_ns, int64_t block_ns) {
    if (bell_changed(r)) return;
    int64_t start = now_ns();
    if (spin_ns > 0) {
        int64_t deadline = start + spin_ns;
        for (uint32_t polls = 1;; polls++) {
            if (bell_changed(r)) return;
            cpu_relax();
            if (polls % POLLS_PER_CLOCK == 0) {
                if (now_ns() >= deadline) break;
                if (polls % POLLS_PER_YIELD == 0) sched_yield();
            }
        }
    }
    if (block_ns <= 0) return;
    int64_t give_up = now_ns() + block_ns;
    struct timespec deadline = {(time_t)(give_up / 1000000000), (long)(give_up % 1000000000)};
    uint32_t stray = 0;
    while (!bell_changed(r)) {
        if (stray == STRAY_TOKENS_PER_WAIT) {
            atomic_fetch_add_explicit(&r->flooded_waits, 1, memory_order_relaxed);
            stray++;
        }
        if (stray > STRAY_TOKENS_PER_WAIT) {
            if (now_ns() >= give_up) return;
            struct timespec nap = {0, FLOODED_NAP_NS};
            nanosleep(&nap, NULL);
            continue;
        }
        if (sem_clockwait(r->request_sem, CLOCK_MONOTONIC, &deadline) == 0) {
            /* A client stores the doorbell, fences, then reads the count (section 10). The
             * token's acquire alone does not order this thread's decrement before the next
             * doorbell load on arm64; without the fence both sides can miss each other. */
            atomic_thread_fence(memory_order_seq_cst);
            stray++;
            if (now_ns() >= give_up) return;
        } else if (errno != EINTR) {
            return; /* ETIMEDOUT; EINVAL cannot happen on a semaphore this process opened */
        }
    }
}

/* -- publishing -------------------------------------------------------------------------- */

/* Section 9 steps 1-3: reply data and fields, then the release store of frame_seq, then the
 * post. The caller has checked len <= resp_capacity. */
static void publish(RingObject *r, uint32_t slot, uint32_t seq, uint64_t id, uint8_t type,
                    const void *data, size_t len, int final) {
    unsigned char *s = slot_base(r, slot);
    memmove(s + S_DATA + r->req_capacity, data, len);
    store_relaxed32(s + S_FRAME_REQ_SEQ, seq);
    store_relaxed64(s + S_FRAME_REQ_ID, id);
    store_relaxed32(s + S_FRAME_LEN, (uint32_t)len);
    store_relaxed8(s + S_FRAME_TYPE, type);
    store_relaxed8(s + S_FRAME_FLAGS, final ? FRAME_FLAG_FINAL : 0);
    atomic_store_explicit(word32(s + S_FRAME_SEQ), load_relaxed32(s + S_FRAME_SEQ) + 1,
                          memory_order_release);
    wake(r->slot_sems[slot]);
}

/* -- scanning ---------------------------------------------------------------------------- */

/* One slot of a scan: takes its new request (answering an echo in place) or its cancel/ack
 * event when the slot is watched. Returns whether the slot had either. */
static int scan_slot(RingObject *r, uint32_t slot, uint32_t max_ready, uint32_t *n,
                     uint32_t *ne) {
    unsigned char *s = slot_base(r, slot);
    uint32_t seq = load_acquire32(s + S_REQ_SEQ);
    uint8_t watch = r->watch[slot];
    if (seq != r->served[slot]) {
        if (*n == max_ready) {
            r->rescan = 1; /* served stays behind: the next poll takes it */
            return 1;
        }
        uint64_t id = load_relaxed64(s + S_REQ_ID);
        uint32_t len = load_relaxed32(s + S_REQ_LEN);
        uint8_t type = load_relaxed8(s + S_REQ_TYPE);
        uint32_t owner = load_relaxed32(s + S_OWNER);
        r->served[slot] = seq;
        if (r->echo_inline && !watch && type == MSG_ECHO && owner != 0 &&
            len <= r->req_capacity && len <= r->resp_capacity) {
            publish(r, slot, seq, id, MSG_ECHO, s + S_DATA, len, 1);
            atomic_store_explicit(&r->inline_echoes,
                                  atomic_load_explicit(&r->inline_echoes, memory_order_relaxed) + 1,
                                  memory_order_relaxed);
            return 1;
        }
        r->ready[(*n)++] = (Ready){slot, seq, len, owner, id, type};
        return 1; /* a new request supersedes its slot's old state: no events for it */
    }
    if (!watch) return 0;
    if (load_acquire32(s + S_CANCEL_SEQ) == seq) {
        r->events[(*ne)++] = (Event){slot, EVENT_CANCEL};
        return 1;
    }
    if ((watch & WATCH_ACK) && load_acquire32(s + S_ACK_SEQ) == load_relaxed32(s + S_FRAME_SEQ)) {
        r->events[(*ne)++] = (Event){slot, EVENT_ACK};
        return 1;
    }
    return 0;
}

/* Takes every new request (up to max_ready handed to Python), answering echoes in place,
 * and collects cancel/ack events of watched slots. Runs without the GIL. Returns whether
 * notify() was called since the last scan.
 *
 * Every publish, ack and cancel rings the doorbell once after it is stored (section 10), so
 * once the scan has found as many requests and events as the doorbell moved, the slots it
 * has not looked at hold nothing that was rung for: it stops there (a lone client's slot is
 * then the only one read, not every slot's line), and the next scan starts at the last slot
 * found. A scan the doorbell did not prompt (a timed-out wait, notify, watch) looks at every
 * slot, so a request published without a ring, or passed over because one found in its
 * place had not rung yet, waits one interval at most. */
static int scan(RingObject *r, uint32_t max_ready, uint32_t *n_ready, uint32_t *n_events) {
    uint32_t n = 0, ne = 0;
    r->rescan = 0;
    uint64_t bell = atomic_load_explicit(word64(r->base + H_DOORBELL), memory_order_acquire);
    uint64_t rung = bell - r->bell, found = 0;
    r->bell = bell;
    int notified = (int)atomic_exchange_explicit(&r->notified, 0, memory_order_acquire);
    uint32_t from = rung ? r->scan_from : 0;
    for (uint32_t i = 0; i < r->slot_count && !(rung && found >= rung); i++) {
        uint32_t slot = from + i < r->slot_count ? from + i : from + i - r->slot_count;
        if (scan_slot(r, slot, max_ready, &n, &ne)) {
            found++;
            r->scan_from = slot;
        }
    }
    *n_ready = n;
    *n_events = ne;
    return notified;
}

/* Waits and scans until there is something for Python: new requests that are not echoes,
 * events, a notify(), or the end of the wait (spin_ns + block_ns from the call). Wake-ups
 * that brought only echoes, answered by scan, wait again here: returning to the
 * interpreter after each would cost more than the echo, and a request that arrives while
 * the interpreter runs waits for it. */
static void serve_until_work(RingObject *r, int64_t spin_ns, int64_t block_ns,
                             uint32_t max_ready, uint32_t *n_ready, uint32_t *n_events) {
    if (spin_ns < 0) spin_ns = 0;
    if (block_ns < 0) block_ns = 0;
    int64_t give_up = now_ns() + spin_ns + block_ns;
    for (int64_t spin = spin_ns, block = block_ns;;) {
        if (!r->rescan) wait_for_bell(r, spin, block);
        int notified = scan(r, max_ready, n_ready, n_events);
        if (*n_ready || *n_events || notified || r->rescan) return;
        int64_t left = give_up - now_ns();
        if (left <= 0) return;
        spin = spin_ns < left ? spin_ns : left; /* the same spin first, within what is left */
        block = left - spin;
    }
}

/* -- Python methods ---------------------------------------------------------------------- */

static int check_open(RingObject *r) {
    if (!r->has_view) {
        PyErr_SetString(PyExc_ValueError, "ring is closed");
        return -1;
    }
    return 0;
}

static int check_slot(RingObject *r, unsigned long slot) {
    if (check_open(r)) return -1;
    if (slot >= r->slot_count) {
        PyErr_Format(PyExc_IndexError, "slot %lu outside 0..%u", slot, r->slot_count - 1);
        return -1;
    }
    return 0;
}

static PyObject *tuple_of_ready(Ready *q) {
    return Py_BuildValue("(IIKBII)", q->slot, q->seq, (unsigned long long)q->id, q->type, q->len,
                         q->owner);
}

PyDoc_STRVAR(poll_doc,
"poll(spin_ns, block_ns, max_ready) -> (requests, events)\n\n"
"Waits (GIL released) until the doorbell moves or notify() is called: spins for spin_ns,\n"
"then blocks up to block_ns in timed semaphore waits. Returns at once when the last poll\n"
"left work behind or watch() changed a flag. Then scans every slot: answers echoes in place\n"
"(a scan that found nothing else waits again, within spin_ns + block_ns of the call),\n"
"returns at most max_ready new requests as (slot, seq, req_id, type, length, owner), unchecked\n"
"(length and owner are as read: the caller validates them), and (slot, kind) events of\n"
"watched slots: EVENT_CANCEL when cancel_seq names the slot's request, EVENT_ACK when a\n"
"WATCH_ACK slot's ack_seq equals its frame_seq.");

static PyObject *Ring_poll(RingObject *r, PyObject *args) {
    long long spin_ns, block_ns;
    unsigned int max_ready;
    if (!PyArg_ParseTuple(args, "LLI:poll", &spin_ns, &block_ns, &max_ready)) return NULL;
    if (check_open(r)) return NULL;
    if (max_ready == 0) {
        PyErr_SetString(PyExc_ValueError, "max_ready must be at least 1");
        return NULL;
    }
    if (max_ready > r->slot_count) max_ready = r->slot_count;
    uint32_t n = 0, ne = 0;
    Py_BEGIN_ALLOW_THREADS
    serve_until_work(r, spin_ns, block_ns, max_ready, &n, &ne);
    Py_END_ALLOW_THREADS
    PyObject *requests = PyList_New(n), *events = PyList_New(ne), *result = NULL;
    if (!requests || !events) goto done;
    for (uint32_t i = 0; i < n; i++) {
        PyObject *item = tuple_of_ready(&r->ready[i]);
        if (!item) goto done;
        PyList_SET_ITEM(requests, i, item);
    }
    for (uint32_t i = 0; i < ne; i++) {
        PyObject *item = Py_BuildValue("(II)", r->events[i].slot, r->events[i].kind);
        if (!item) goto done;
        PyList_SET_ITEM(events, i, item);
    }
    result = PyTuple_Pack(2, requests, events);
done:
    Py_XDECREF(requests);
    Py_XDECREF(events);
    return result;
}

PyDoc_STRVAR(publish_doc,
"publish(slot, seq, req_id, msg_type, data, final)\n\n"
"Writes one reply frame (section 9): data (any contiguous buffer of at most resp_capacity\n"
"bytes) and the frame fields, then the release store of frame_seq, then the slot's post.");

static PyObject *Ring_publish(RingObject *r, PyObject *args) {
    unsigned long slot;
    unsigned int seq;
    unsigned long long id;
    unsigned char type;
    Py_buffer data;
    int final;
    if (!PyArg_ParseTuple(args, "kIKby*p:publish", &slot, &seq, &id, &type, &data, &final))
        return NULL;
    PyObject *result = NULL;
    if (check_slot(r, slot)) goto done;
    if ((size_t)data.len > r->resp_capacity) {
        PyErr_Format(PyExc_ValueError, "frame of %zd bytes exceeds resp_capacity %u", data.len,
                     r->resp_capacity);
        goto done;
    }
    if (data.len >= NOGIL_COPY_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        publish(r, (uint32_t)slot, seq, id, type, data.buf, (size_t)data.len, final);
        Py_END_ALLOW_THREADS
    } else {
        publish(r, (uint32_t)slot, seq, id, type, data.buf, (size_t)data.len, final);
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&data);
    return result;
}

PyDoc_STRVAR(notify_doc,
"notify()\n\nWakes poll() (from any thread): it returns even though the doorbell did not move.");

static PyObject *Ring_notify(RingObject *r, PyObject *Py_UNUSED(ignored)) {
    if (check_open(r)) return NULL;
    atomic_store_explicit(&r->notified, 1, memory_order_relaxed);
    /* The flag before the count, as a client's doorbell (section 10): post only at 0. */
    atomic_thread_fence(memory_order_seq_cst);
    int value;
    if (sem_getvalue(r->request_sem, &value) != 0 || value == 0) wake(r->request_sem);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(watch_doc,
"watch(slot, flags)\n\nSets the slot's WATCH_OPEN / WATCH_ACK flags (0: Python holds no state\n"
"for it). A change makes the next poll scan without waiting.");

static PyObject *Ring_watch(RingObject *r, PyObject *args) {
    unsigned long slot;
    unsigned int flags;
    if (!PyArg_ParseTuple(args, "kI:watch", &slot, &flags)) return NULL;
    if (check_slot(r, slot)) return NULL;
    if (r->watch[slot] != (uint8_t)flags) {
        r->watch[slot] = (uint8_t)flags;
        r->rescan = 1;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(served_doc, "served(slot) -> the req_seq last taken from the slot");

static PyObject *Ring_served(RingObject *r, PyObject *arg) {
    unsigned long slot = PyLong_AsUnsignedLong(arg);
    if (slot == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if (check_slot(r, slot)) return NULL;
    return PyLong_FromUnsignedLong(r->served[slot]);
}

PyDoc_STRVAR(reclaim_doc,
"reclaim(slot)\n\nTakes the slot's current req_seq as served and stores owner = 0 (a dead\n"
"client's slot, section 9).");

static PyObject *Ring_reclaim(RingObject *r, PyObject *arg) {
    unsigned long slot = PyLong_AsUnsignedLong(arg);
    if (slot == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if (check_slot(r, slot)) return NULL;
    unsigned char *s = slot_base(r, (uint32_t)slot);
    r->served[slot] = load_acquire32(s + S_REQ_SEQ);
    atomic_store_explicit(word32(s + S_OWNER), 0, memory_order_release);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(owners_doc, "owners() -> [(slot, owner), ...] for every slot whose owner is not 0");

static PyObject *Ring_owners(RingObject *r, PyObject *Py_UNUSED(ignored)) {
    if (check_open(r)) return NULL;
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    for (uint32_t slot = 0; slot < r->slot_count; slot++) {
        uint32_t owner = load_acquire32(slot_base(r, slot) + S_OWNER);
        if (!owner) continue;
        PyObject *item = Py_BuildValue("(II)", slot, owner);
        if (!item || PyList_Append(list, item)) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    }
    return list;
}

static void close_sems(RingObject *r) {
    if (r->request_sem) sem_close(r->request_sem);
    r->request_sem = NULL;
    if (r->slot_sems) {
        for (uint32_t i = 0; i < r->slot_count; i++)
            if (r->slot_sems[i]) sem_close(r->slot_sems[i]);
        PyMem_Free(r->slot_sems);
        r->slot_sems = NULL;
    }
}

static void release(RingObject *r) {
    close_sems(r);
    PyMem_Free(r->served);
    PyMem_Free(r->watch);
    PyMem_Free(r->ready);
    PyMem_Free(r->events);
    r->served = NULL;
    r->watch = NULL;
    r->ready = NULL;
    r->events = NULL;
    if (r->has_view) PyBuffer_Release(&r->view);
    r->has_view = 0;
    r->base = NULL;
}

PyDoc_STRVAR(close_doc, "close()\n\nReleases the mapping and the semaphore handles; idempotent.");

static PyObject *Ring_close(RingObject *r, PyObject *Py_UNUSED(ignored)) {
    release(r);
    Py_RETURN_NONE;
}

static PyObject *Ring_get_echo_inline(RingObject *r, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(r->echo_inline);
}

static int Ring_set_echo_inline(RingObject *r, PyObject *value, void *Py_UNUSED(closure)) {
    if (!value) {
        PyErr_SetString(PyExc_AttributeError, "echo_inline cannot be deleted");
        return -1;
    }
    int truth = PyObject_IsTrue(value);
    if (truth < 0) return -1;
    r->echo_inline = truth;
    return 0;
}

static PyObject *Ring_get_inline_echoes(RingObject *r, void *Py_UNUSED(closure)) {
    return PyLong_FromUnsignedLongLong(atomic_load_explicit(&r->inline_echoes, memory_order_relaxed));
}

static PyObject *Ring_get_flooded_waits(RingObject *r, void *Py_UNUSED(closure)) {
    return PyLong_FromUnsignedLongLong(atomic_load_explicit(&r->flooded_waits, memory_order_relaxed));
}

static sem_t *open_sem(PyObject *name) {
    const char *path = PyUnicode_AsUTF8(name);
    if (!path) return NULL;
    sem_t *sem = sem_open(path, 0);
    if (sem == SEM_FAILED) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        return NULL;
    }
    return sem;
}

/* Ring(mapping, slot_count, req_capacity, resp_capacity, request_sem_name, slot_sem_names) */
static int Ring_init(RingObject *r, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"mapping", "slot_count", "req_capacity", "resp_capacity",
                             "request_sem", "slot_sems", NULL};
    PyObject *mapping, *request_name, *slot_names;
    unsigned int count, req_capacity, resp_capacity;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OIIIUO:Ring", kwlist, &mapping, &count,
                                     &req_capacity, &resp_capacity, &request_name, &slot_names))
        return -1;
    release(r);
    if (count < 1 || count > 1024 || req_capacity % 64 || resp_capacity % 64 ||
        req_capacity > (1u << 30) || resp_capacity > (1u << 30)) {
        PyErr_SetString(PyExc_ValueError, "geometry outside spec section 7");
        return -1;
    }
    size_t stride = ((size_t)S_DATA + req_capacity + resp_capacity + 63) / 64 * 64;
    if (PyObject_GetBuffer(mapping, &r->view, PyBUF_WRITABLE)) return -1;
    r->has_view = 1;
    if ((size_t)r->view.len < HEADER_SIZE + (size_t)count * stride ||
        (uintptr_t)r->view.buf % 64) {
        PyErr_SetString(PyExc_ValueError, "mapping too small or not 64-byte aligned");
        goto fail;
    }
    r->base = r->view.buf;
    r->slot_count = count;
    r->req_capacity = req_capacity;
    r->resp_capacity = resp_capacity;
    r->stride = stride;
    r->served = PyMem_Calloc(count, sizeof *r->served);
    r->watch = PyMem_Calloc(count, sizeof *r->watch);
    r->ready = PyMem_Calloc(count, sizeof *r->ready);
    r->events = PyMem_Calloc(count, sizeof *r->events);
    r->slot_sems = PyMem_Calloc(count, sizeof *r->slot_sems);
    if (!r->served || !r->watch || !r->ready || !r->events || !r->slot_sems) {
        PyErr_NoMemory();
        goto fail;
    }
    PyObject *names = PySequence_Fast(slot_names, "slot_sems must be a sequence of names");
    if (!names) goto fail;
    if (PySequence_Fast_GET_SIZE(names) != (Py_ssize_t)count) {
        Py_DECREF(names);
        PyErr_SetString(PyExc_ValueError, "need one slot semaphore name per slot");
        goto fail;
    }
    for (uint32_t i = 0; i < count; i++) {
        r->slot_sems[i] = open_sem(PySequence_Fast_GET_ITEM(names, i));
        if (!r->slot_sems[i]) {
            Py_DECREF(names);
            goto fail;
        }
    }
    Py_DECREF(names);
    if (!(r->request_sem = open_sem(request_name))) goto fail;
    /* The slots' req_seq as found: a freshly zeroed ring has nothing to serve. */
    for (uint32_t i = 0; i < count; i++) r->served[i] = load_acquire32(slot_base(r, i) + S_REQ_SEQ);
    r->bell = atomic_load_explicit(word64(r->base + H_DOORBELL), memory_order_acquire);
    r->echo_inline = 1;
    r->scan_from = 0;
    r->rescan = 0;
    atomic_init(&r->notified, 0);
    atomic_init(&r->inline_echoes, 0);
    atomic_init(&r->flooded_waits, 0);
    return 0;
fail:
    release(r);
    return -1;
}

static void Ring_dealloc(RingObject *r) {
    release(r);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

PyDoc_STRVAR(fence_doc,
"fence()\n\nA full memory fence. Python's own stores to the mapping have no order; a fence\n"
"before a word store makes it a release store (section 10), e.g. server_state or magic.");

static PyObject *ring_fence(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored)) {
    atomic_thread_fence(memory_order_seq_cst);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"fence", ring_fence, METH_NOARGS, fence_doc},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef Ring_methods[] = {
    {"poll", (PyCFunction)Ring_poll, METH_VARARGS, poll_doc},
    {"publish", (PyCFunction)Ring_publish, METH_VARARGS, publish_doc},
    {"notify", (PyCFunction)Ring_notify, METH_NOARGS, notify_doc},
    {"watch", (PyCFunction)Ring_watch, METH_VARARGS, watch_doc},
    {"served", (PyCFunction)Ring_served, METH_O, served_doc},
    {"reclaim", (PyCFunction)Ring_reclaim, METH_O, reclaim_doc},
    {"owners", (PyCFunction)Ring_owners, METH_NOARGS, owners_doc},
    {"close", (PyCFunction)Ring_close, METH_NOARGS, close_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Ring_getset[] = {
    {"echo_inline", (getter)Ring_get_echo_inline, (setter)Ring_set_echo_inline,
     "answer ECHO requests in poll() without returning them (off while stopping)", NULL},
    {"inline_echoes", (getter)Ring_get_inline_echoes, NULL,
     "ECHO requests answered in poll() since the ring was opened", NULL},
    {"flooded_waits", (getter)Ring_get_flooded_waits, NULL,
     "waits that met a flooded request semaphore and polled the doorbell with naps", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmserve._ring.Ring",
    .tp_basicsize = sizeof(RingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The server side of one ring's hot path (see the module docstring).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
};

static struct PyModuleDef ring_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmserve._ring",
    .m_doc = "The shared-memory ring's per-message work, in C (see shmserve/_ring.c).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__ring(void) {
    if (PyType_Ready(&RingType) < 0) return NULL;
    PyObject *m = PyModule_Create(&ring_module);
    if (!m) return NULL;
    PyObject *layout = Py_BuildValue(
        "{sisisisisisisisisisisisisisisisisi}", "HEADER_SIZE", HEADER_SIZE, "H_DOORBELL",
        H_DOORBELL, "S_OWNER", S_OWNER, "S_REQ_SEQ", S_REQ_SEQ, "S_REQ_ID", S_REQ_ID, "S_REQ_LEN",
        S_REQ_LEN, "S_REQ_TYPE", S_REQ_TYPE, "S_ACK_SEQ", S_ACK_SEQ, "S_CANCEL_SEQ", S_CANCEL_SEQ,
        "S_FRAME_SEQ", S_FRAME_SEQ, "S_FRAME_REQ_SEQ", S_FRAME_REQ_SEQ, "S_FRAME_REQ_ID",
        S_FRAME_REQ_ID, "S_FRAME_LEN", S_FRAME_LEN, "S_FRAME_TYPE", S_FRAME_TYPE, "S_FRAME_FLAGS",
        S_FRAME_FLAGS, "S_DATA", S_DATA, "FRAME_FLAG_FINAL", FRAME_FLAG_FINAL);
    if (!layout || PyModule_AddObject(m, "LAYOUT", layout) ||
        PyModule_AddIntConstant(m, "WATCH_OPEN", WATCH_OPEN) ||
        PyModule_AddIntConstant(m, "WATCH_ACK", WATCH_ACK) ||
        PyModule_AddIntConstant(m, "EVENT_CANCEL", EVENT_CANCEL) ||
        PyModule_AddIntConstant(m, "EVENT_ACK", EVENT_ACK)) {
        Py_XDECREF(layout);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&RingType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType)) {
        Py_DECREF(&RingType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
