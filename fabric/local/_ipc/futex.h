/*
 * futex.h: the few kernel services fabric's shared-memory objects need.
 *
 * Every word here lives in a MAP_SHARED memfd mapping that several processes
 * map, possibly at different addresses, so the futex calls are the *shared*
 * variants (no FUTEX_PRIVATE_FLAG): the kernel keys them on (inode, offset).
 * Header-only and static so each extension module gets its own copy and there
 * is no global state.
 */
#ifndef FABRIC_FUTEX_H
#define FABRIC_FUTEX_H

#include <errno.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/* Sleep while *word == expected, for at most timeout_s seconds (< 0: forever).
 * Returns 0 when woken (or the value had already changed), -ETIMEDOUT, or
 * -EINTR; callers re-check their condition in every case. */
static inline int
fx_wait(_Atomic uint32_t *word, uint32_t expected, double timeout_s)
{
    struct timespec ts, *tsp = NULL;
    if (timeout_s >= 0) {
        ts.tv_sec = (time_t)timeout_s;
        ts.tv_nsec = (long)((timeout_s - (double)ts.tv_sec) * 1e9);
        tsp = &ts;
    }
    long rc = syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, expected, tsp, NULL, 0);
    if (rc == 0 || errno == EAGAIN)
        return 0;
    return -errno;
}

/* Wake up to n sleepers on word (INT32_MAX: all). */
static inline void
fx_wake(_Atomic uint32_t *word, int n)
{
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, n, NULL, NULL, 0);
}

/* Seconds on the monotonic clock, for deadlines. */
static inline double
fx_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Whether a process with this pid exists (EPERM still means it exists). */
static inline int
fx_pid_alive(pid_t pid)
{
    return pid > 0 && (kill(pid, 0) == 0 || errno == EPERM);
}

#endif /* FABRIC_FUTEX_H */
