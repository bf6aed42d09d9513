/*
 * slowfork: an LD_PRELOAD shim that charges every fork() CPU time, to
 * reproduce on a fast machine a server that forks slowly (the 2-CPU PVM
 * guests where a fork costs 7 ms and PostgreSQL admits ~55 sessions a
 * second). It spins SLOWFORK_PARENT_US (default 7000) of thread CPU time
 * before the fork and SLOWFORK_CHILD_US (default 5000) in the child, so
 * that, as there, the cost grows with the other load on the CPUs.
 *
 *   gcc -O2 -shared -fPIC -o /tmp/slowfork.so slowfork.c -ldl
 *   go test -race -c -o /tmp/itest ./integration/
 *   cd integration && SLOWFORK_PARENT_US=14000 SLOWFORK_CHILD_US=3000 \
 *     LD_PRELOAD=/tmp/slowfork.so /tmp/itest -test.run 'TestFleetRestart/postgres' -test.v
 *
 * faultlab's servers inherit the environment (less the database tools'
 * own variables), so the postmaster forks through the shim; Go does not
 * call fork(), and MariaDB starts threads, so neither is affected. Not
 * part of any test.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static void spin(long us) {
	struct timespec a, b;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
	for (;;) {
		clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
		if ((b.tv_sec - a.tv_sec) * 1000000L + (b.tv_nsec - a.tv_nsec) / 1000 >= us)
			return;
	}
}

static long env_us(const char *name, long def) {
	const char *v = getenv(name);
	return v ? atol(v) : def;
}

pid_t fork(void) {
	static pid_t (*real_fork)(void);
	if (!real_fork)
		real_fork = (pid_t (*)(void))dlsym(RTLD_NEXT, "fork");
	spin(env_us("SLOWFORK_PARENT_US", 7000));
	pid_t pid = real_fork();
	if (pid == 0)
		spin(env_us("SLOWFORK_CHILD_US", 5000));
	return pid;
}
