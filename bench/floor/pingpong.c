// The floor every transport is measured against: two processes (fork) that
// bounce a payload through POSIX shared memory, as fast as this machine allows.
//
//   pingpong --mode sem|spin --size BYTES --seconds S --warmup-seconds S --samples FILE
//            [--cpus CLIENT,SERVER] [--inflight N]
//
// Each round trip copies --size bytes into the request buffer, hands it over,
// the other process copies it into the reply buffer (the echo), hands it back,
// and the first copies the reply out: the same copies the shmserve ring makes.
//
// sem:  hand-offs are sem_post / sem_wait, what a blocking ring waiter pays.
// spin: hand-offs are a release store of a sequence word and an acquire poll
//       of it, what a spinning ring waiter pays. Pollers call sched_yield every
//       POLLS_PER_YIELD polls, the same policy as the Go client's waiter, so a
//       loaded 2-core machine cannot turn two spinners into a scheduler stall.
//       --inflight N (spin only) keeps N requests in flight, each in its own
//       slot, as N callers of one ring do: one client thread refills a slot as
//       soon as its reply is in, and one server thread answers every slot whose
//       request is new. Its msgs/s is the most this machine moves at that
//       concurrency, with nothing but the copies and the hand-offs.
//
// --cpus pins the client and the server process (the same CPU twice is allowed).
// A floor is the best this machine allows, so the orchestrator runs spin on two
// CPUs (left to the scheduler on a busy machine, the two sometimes share a core,
// and each hand-off then waits for a yield) and sem both on one CPU and on two
// (a wake-up across CPUs can cost far more than one within a CPU on a VM).
//
// The semaphores are unnamed process-shared ones inside the mapping: glibc's
// named semaphores are the same futex word in a /dev/shm file, so the cost is
// identical and nothing named can leak. The shared memory is shm_open'ed and
// unlinked at once, for the same reason.
//
// Writes one uint32 little-endian latency (ns) per measured round trip to
// --samples (the orchestrator loads them into an HdrHistogram) and prints one
// JSON line to stdout.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <sched.h>
#include <semaphore.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define POLLS_PER_YIELD 256
#define CACHE_LINE 64

#define MAX_INFLIGHT 64

// One request's hand-off words, each on its own line so that the two sides
// never write the same one.
struct slot {
	_Alignas(CACHE_LINE) _Atomic uint32_t req_seq; // written by the client only
	_Alignas(CACHE_LINE) _Atomic uint32_t rep_seq; // written by the server only
};

struct control {
	_Alignas(CACHE_LINE) _Atomic uint32_t stop; // set by the client before its last hand-off
	_Alignas(CACHE_LINE) sem_t req_sem;
	_Alignas(CACHE_LINE) sem_t rep_sem;
	struct slot slots[MAX_INFLIGHT];
};

static void die(const char *what) {
	perror(what);
	exit(2);
}

static uint64_t now_ns(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

// One poll that found nothing: pause, and every POLLS_PER_YIELD of them yield.
static void idle_poll(unsigned *polls) {
	if (++*polls % POLLS_PER_YIELD == 0)
		sched_yield();
	else
		__builtin_ia32_pause();
}

static void pin(int cpu) {
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (cpu >= 0 && sched_setaffinity(0, sizeof set, &set) != 0)
		die("sched_setaffinity");
}

static void sem_wait_retry(sem_t *sem) {
	while (sem_wait(sem) != 0)
		if (errno != EINTR)
			die("sem_wait");
}

// Slot i's request buffer is buffers + 2 i buffer, its reply buffer the next.
struct ring {
	struct control *c;
	uint8_t *buffers;
	size_t buffer, size;
	int inflight;
};

static uint8_t *request_of(const struct ring *r, int i) { return r->buffers + 2 * (size_t)i * r->buffer; }
static uint8_t *reply_of(const struct ring *r, int i) { return request_of(r, i) + r->buffer; }

static void serve_sem(const struct ring *r) {
	for (;;) {
		sem_wait_retry(&r->c->req_sem);
		if (atomic_load(&r->c->stop))
			return;
		memcpy(reply_of(r, 0), request_of(r, 0), r->size);
		if (sem_post(&r->c->rep_sem) != 0)
			die("sem_post");
	}
}

static void serve_spin(const struct ring *r) {
	uint32_t served[MAX_INFLIGHT] = {0};
	for (unsigned polls = 0;;) {
		int answered = 0;
		for (int i = 0; i < r->inflight; i++) {
			uint32_t seq = atomic_load_explicit(&r->c->slots[i].req_seq, memory_order_acquire);
			if (seq == served[i])
				continue;
			if (atomic_load(&r->c->stop))
				return;
			memcpy(reply_of(r, i), request_of(r, i), r->size);
			served[i] = seq;
			atomic_store_explicit(&r->c->slots[i].rep_seq, seq, memory_order_release);
			answered = 1;
		}
		if (!answered)
			idle_poll(&polls);
	}
}

// The client's side of a run: it keeps every slot's request in flight until
// `until`, and records the latency of each reply that comes after `measure_from`.
struct client {
	const uint8_t *src;
	uint8_t *dst;
	uint32_t seq[MAX_INFLIGHT];
	uint64_t sent[MAX_INFLIGHT];
	uint32_t *lat;
	size_t count, cap;
};

static void record(struct client *cl, uint64_t dt) {
	if (cl->count == cl->cap && !(cl->lat = realloc(cl->lat, (cl->cap *= 2) * sizeof *cl->lat)))
		die("realloc");
	cl->lat[cl->count++] = dt > UINT32_MAX ? UINT32_MAX : (uint32_t)dt;
}

static void send_request(const struct ring *r, struct client *cl, int i) {
	cl->sent[i] = now_ns();
	memcpy(request_of(r, i), cl->src, r->size);
	atomic_store_explicit(&r->c->slots[i].req_seq, ++cl->seq[i], memory_order_release);
}

// Runs until `until`; returns when the last reply has come, the time the
// last measured one did.
static uint64_t run_spin(const struct ring *r, struct client *cl, uint64_t measure_from, uint64_t until) {
	for (int i = 0; i < r->inflight; i++)
		send_request(r, cl, i);
	uint64_t last = now_ns();
	unsigned polls = 0;
	for (int pending = r->inflight; pending > 0;) {
		int received = 0;
		for (int i = 0; i < r->inflight; i++) {
			if (cl->sent[i] == 0 ||
			    atomic_load_explicit(&r->c->slots[i].rep_seq, memory_order_acquire) != cl->seq[i])
				continue;
			memcpy(cl->dst, reply_of(r, i), r->size);
			uint64_t now = now_ns();
			if (cl->sent[i] >= measure_from) {
				record(cl, now - cl->sent[i]);
				last = now;
			}
			received = 1;
			if (now < until) {
				send_request(r, cl, i);
			} else {
				cl->sent[i] = 0;
				pending--;
			}
		}
		if (!received)
			idle_poll(&polls);
	}
	return last;
}

static uint64_t run_sem(const struct ring *r, struct client *cl, uint64_t measure_from, uint64_t until) {
	uint64_t now = now_ns();
	while (now < until) {
		uint64_t t0 = now;
		memcpy(request_of(r, 0), cl->src, r->size);
		if (sem_post(&r->c->req_sem) != 0)
			die("sem_post");
		sem_wait_retry(&r->c->rep_sem);
		memcpy(cl->dst, reply_of(r, 0), r->size);
		now = now_ns();
		if (t0 >= measure_from)
			record(cl, now - t0);
	}
	return now;
}

int main(int argc, char **argv) {
	const char *mode = "sem", *samples_path = NULL;
	size_t size = 3072;
	double seconds = 1.0, warmup_seconds = 0.1;
	int client_cpu = -1, server_cpu = -1, inflight = 1;
	static const struct option options[] = {
		{"mode", required_argument, 0, 'm'}, {"size", required_argument, 0, 's'},
		{"seconds", required_argument, 0, 't'}, {"warmup-seconds", required_argument, 0, 'w'},
		{"samples", required_argument, 0, 'o'}, {"cpus", required_argument, 0, 'c'},
		{"inflight", required_argument, 0, 'n'}, {0, 0, 0, 0},
	};
	for (int opt; (opt = getopt_long(argc, argv, "", options, NULL)) != -1;) {
		switch (opt) {
		case 'm': mode = optarg; break;
		case 's': size = strtoull(optarg, NULL, 10); break;
		case 't': seconds = strtod(optarg, NULL); break;
		case 'w': warmup_seconds = strtod(optarg, NULL); break;
		case 'o': samples_path = optarg; break;
		case 'n': inflight = atoi(optarg); break;
		case 'c':
			if (sscanf(optarg, "%d,%d", &client_cpu, &server_cpu) != 2)
				return 2;
			break;
		default: return 2;
		}
	}
	int spin = strcmp(mode, "spin") == 0;
	if ((!spin && strcmp(mode, "sem") != 0) || seconds <= 0 || warmup_seconds < 0 || !samples_path ||
	    inflight < 1 || inflight > MAX_INFLIGHT || (!spin && inflight != 1)) {
		fprintf(stderr, "usage: %s --mode sem|spin --size BYTES --seconds S --warmup-seconds S --samples FILE "
		        "[--cpus CLIENT,SERVER] [--inflight N (spin: 1-%d)]\n", argv[0], MAX_INFLIGHT);
		return 2;
	}

	char name[64];
	snprintf(name, sizeof name, "/shmserve-bench-floor.%d", (int)getpid());
	int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
	if (fd < 0)
		die("shm_open");
	shm_unlink(name);
	size_t buffer = (size / CACHE_LINE + 1) * CACHE_LINE;
	size_t total = sizeof(struct control) + 2 * (size_t)inflight * buffer;
	if (ftruncate(fd, (off_t)total) != 0)
		die("ftruncate");
	uint8_t *mem = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	close(fd);
	struct ring r = {(struct control *)mem, mem + sizeof(struct control), buffer, size, inflight};
	if (sem_init(&r.c->req_sem, 1, 0) != 0 || sem_init(&r.c->rep_sem, 1, 0) != 0)
		die("sem_init");

	pid_t child = fork();
	if (child < 0)
		die("fork");
	if (child == 0) {
		// A killed client (Ctrl-C, a bench timeout) must not leave a spinner behind.
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() == 1)
			_exit(1);
		pin(server_cpu);
		if (spin)
			serve_spin(&r);
		else
			serve_sem(&r);
		_exit(0);
	}

	pin(client_cpu);
	uint8_t *src = malloc(size + 1);
	struct client cl = {.src = src, .dst = malloc(size + 1), .cap = 1 << 16};
	cl.lat = malloc(cl.cap * sizeof *cl.lat);
	if (!src || !cl.dst || !cl.lat)
		die("malloc");
	for (size_t i = 0; i < size; i++)
		src[i] = (uint8_t)(i * 131 + 7);
	uint64_t measure_from = now_ns() + (uint64_t)(warmup_seconds * 1e9);
	uint64_t until = measure_from + (uint64_t)(seconds * 1e9);
	uint64_t last = (spin ? run_spin : run_sem)(&r, &cl, measure_from, until);
	uint64_t elapsed = last > measure_from ? last - measure_from : 0;
	atomic_store(&r.c->stop, 1);
	if (spin)
		atomic_fetch_add_explicit(&r.c->slots[0].req_seq, 1, memory_order_release);
	else if (sem_post(&r.c->req_sem) != 0)
		die("sem_post");

	int status;
	if (waitpid(child, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		fprintf(stderr, "pingpong: server process failed\n");
		return 1;
	}
	if (memcmp(src, cl.dst, size) != 0) {
		fprintf(stderr, "pingpong: echoed payload differs\n");
		return 1;
	}
	FILE *out = fopen(samples_path, "wb");
	if (!out || fwrite(cl.lat, sizeof *cl.lat, cl.count, out) != cl.count || fclose(out) != 0)
		die(samples_path);
	printf("{\"mode\": \"%s\", \"size\": %zu, \"inflight\": %d, \"count\": %zu, \"elapsed_ns\": %llu, "
	       "\"cpus\": [%d, %d]}\n",
	       mode, size, inflight, cl.count, (unsigned long long)elapsed, client_cpu, server_cpu);
	return 0;
}
