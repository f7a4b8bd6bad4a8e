// The floor every transport is measured against: two processes (fork) that
// bounce a payload through POSIX shared memory, as fast as this machine allows.
//
//   pingpong --mode sem|spin --size BYTES --seconds S --warmup-seconds S --samples FILE
//            [--cpus CLIENT,SERVER]
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

struct control {
	_Alignas(CACHE_LINE) _Atomic uint32_t req_seq; // written by the client only
	_Atomic uint32_t stop;                         // set by the client before its last hand-off
	_Alignas(CACHE_LINE) _Atomic uint32_t rep_seq; // written by the server only
	_Alignas(CACHE_LINE) sem_t req_sem;
	_Alignas(CACHE_LINE) sem_t rep_sem;
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

static void await_seq(_Atomic uint32_t *word, uint32_t want) {
	for (unsigned polls = 1; atomic_load_explicit(word, memory_order_acquire) != want; polls++) {
		if (polls % POLLS_PER_YIELD == 0)
			sched_yield();
		else
			__builtin_ia32_pause();
	}
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

static void serve(struct control *c, int spin, const uint8_t *req, uint8_t *rep, size_t size) {
	for (uint32_t seq = 1;; seq++) {
		if (spin)
			await_seq(&c->req_seq, seq);
		else
			sem_wait_retry(&c->req_sem);
		if (atomic_load(&c->stop))
			return;
		memcpy(rep, req, size);
		if (spin)
			atomic_store_explicit(&c->rep_seq, seq, memory_order_release);
		else if (sem_post(&c->rep_sem) != 0)
			die("sem_post");
	}
}

// One round trip as the client makes it; returns its latency in ns.
static uint64_t round_trip(struct control *c, int spin, uint32_t seq, uint8_t *req, const uint8_t *rep,
                           const uint8_t *src, uint8_t *dst, size_t size) {
	uint64_t t0 = now_ns();
	memcpy(req, src, size);
	if (spin) {
		atomic_store_explicit(&c->req_seq, seq, memory_order_release);
		await_seq(&c->rep_seq, seq);
	} else {
		if (sem_post(&c->req_sem) != 0)
			die("sem_post");
		sem_wait_retry(&c->rep_sem);
	}
	memcpy(dst, rep, size);
	return now_ns() - t0;
}

int main(int argc, char **argv) {
	const char *mode = "sem", *samples_path = NULL;
	size_t size = 3072;
	double seconds = 1.0, warmup_seconds = 0.1;
	int client_cpu = -1, server_cpu = -1;
	static const struct option options[] = {
		{"mode", required_argument, 0, 'm'}, {"size", required_argument, 0, 's'},
		{"seconds", required_argument, 0, 't'}, {"warmup-seconds", required_argument, 0, 'w'},
		{"samples", required_argument, 0, 'o'}, {"cpus", required_argument, 0, 'c'}, {0, 0, 0, 0},
	};
	for (int opt; (opt = getopt_long(argc, argv, "", options, NULL)) != -1;) {
		switch (opt) {
		case 'm': mode = optarg; break;
		case 's': size = strtoull(optarg, NULL, 10); break;
		case 't': seconds = strtod(optarg, NULL); break;
		case 'w': warmup_seconds = strtod(optarg, NULL); break;
		case 'o': samples_path = optarg; break;
		case 'c':
			if (sscanf(optarg, "%d,%d", &client_cpu, &server_cpu) != 2)
				return 2;
			break;
		default: return 2;
		}
	}
	int spin = strcmp(mode, "spin") == 0;
	if ((!spin && strcmp(mode, "sem") != 0) || seconds <= 0 || warmup_seconds < 0 || !samples_path) {
		fprintf(stderr, "usage: %s --mode sem|spin --size BYTES --seconds S --warmup-seconds S --samples FILE "
		        "[--cpus CLIENT,SERVER]\n", argv[0]);
		return 2;
	}

	char name[64];
	snprintf(name, sizeof name, "/shmserve-bench-floor.%d", (int)getpid());
	int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
	if (fd < 0)
		die("shm_open");
	shm_unlink(name);
	size_t buffer = (size / CACHE_LINE + 1) * CACHE_LINE;
	size_t total = sizeof(struct control) + 2 * buffer;
	if (ftruncate(fd, (off_t)total) != 0)
		die("ftruncate");
	uint8_t *mem = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	close(fd);
	struct control *c = (struct control *)mem;
	uint8_t *req = mem + sizeof(struct control), *rep = req + buffer;
	if (sem_init(&c->req_sem, 1, 0) != 0 || sem_init(&c->rep_sem, 1, 0) != 0)
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
		serve(c, spin, req, rep, size);
		_exit(0);
	}

	pin(client_cpu);
	uint8_t *src = malloc(size + 1), *dst = malloc(size + 1);
	size_t cap = 1 << 16, count = 0;
	uint32_t *lat = malloc(cap * sizeof *lat);
	if (!src || !dst || !lat)
		die("malloc");
	for (size_t i = 0; i < size; i++)
		src[i] = (uint8_t)(i * 131 + 7);
	uint32_t seq = 0;
	uint64_t warm_until = now_ns() + (uint64_t)(warmup_seconds * 1e9);
	while (now_ns() < warm_until)
		round_trip(c, spin, ++seq, req, rep, src, dst, size);
	uint64_t started = now_ns(), until = started + (uint64_t)(seconds * 1e9), now = started;
	while (now < until) {
		uint64_t dt = round_trip(c, spin, ++seq, req, rep, src, dst, size);
		if (count == cap && !(lat = realloc(lat, (cap *= 2) * sizeof *lat)))
			die("realloc");
		lat[count++] = dt > UINT32_MAX ? UINT32_MAX : (uint32_t)dt;
		now = now_ns();
	}
	uint64_t elapsed = now - started;
	atomic_store(&c->stop, 1);
	if (spin)
		atomic_store_explicit(&c->req_seq, seq + 1, memory_order_release);
	else if (sem_post(&c->req_sem) != 0)
		die("sem_post");

	int status;
	if (waitpid(child, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		fprintf(stderr, "pingpong: server process failed\n");
		return 1;
	}
	if (memcmp(src, dst, size) != 0) {
		fprintf(stderr, "pingpong: echoed payload differs\n");
		return 1;
	}
	FILE *out = fopen(samples_path, "wb");
	if (!out || fwrite(lat, sizeof *lat, count, out) != count || fclose(out) != 0)
		die(samples_path);
	printf("{\"mode\": \"%s\", \"size\": %zu, \"count\": %zu, \"elapsed_ns\": %llu, \"cpus\": [%d, %d]}\n",
	       mode, size, count, (unsigned long long)elapsed, client_cpu, server_cpu);
	return 0;
}
