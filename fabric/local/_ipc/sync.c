/*
 * _sync: fabric's synchronization primitives on shared memory.
 *
 * Theory of operation
 * -------------------
 * Each primitive is a small struct at (buffer, offset) inside a memfd mapping
 * (a _shm Block) that several processes map, maybe at different addresses. A
 * Python object here holds a Py_buffer export of that mapping, so the mapping
 * outlives every object using it. All words are C11 atomics on 32-bit (futex)
 * or 64-bit words; the futex calls are the shared variants (futex.h).
 *
 * Layouts (offsets in bytes; every struct fits the 64-byte SIZE):
 *
 *   Lock / RLock   0 word      0 = free, else the owner's process ident
 *                  4 waiters   threads asleep (or about to sleep) on word
 *                  8 magic     kind tag, checked when a handle attaches
 *                 12 count     RLock depth          } written by the owner
 *                 16 thread    RLock owner thread   } only, read by anyone
 *                 24 spin      adaptive spin budget in ns
 *                 28 takeovers dead owners replaced so far
 *   Semaphore      0 value (futex word), 4 waiters, 8 magic, 12 bound, 16 spin
 *   Event          0 word = set-generation << 1 | flag (futex word),
 *                  4 waiters, 8 magic, 12 spin
 *   Condition      0 seq (futex word, bumped by every notify), 4 sleepers,
 *                  8 magic, 12 tickets, 16 last, 20 waiting, 24 tokens, 28 spin
 *
 * Process ident: pid (22 bits: Linux's PID_MAX_LIMIT is 2^22) | the low 10
 * bits of the process start time (from /proc/<pid>/stat) << 22. Putting the
 * whole identity in the lock word makes acquire one CAS and makes a take-over
 * a CAS on the same word: nobody can observe a half-written owner record.
 * The start-time tag defeats pid reuse (a recycled pid matches the dead
 * owner's tag with probability 1/1024). The ident is cached per process and
 * reset by a pthread_atfork child handler, so the fast path makes no syscall.
 *
 * Fast paths take one atomic RMW: CAS 0 -> ident (acquire), XCHG -> 0
 * (release), CAS value -> value-1 (semaphore). Slow paths release the GIL,
 * spin by sched_yield() for an adaptive budget (SPIN_MIN_NS..SPIN_MAX_NS,
 * halved after a spin that did not pay off, so idle waiters soon stop
 * spinning), then register in the waiter count and FUTEX_WAIT in slices of at
 * most SLICE_S seconds; after each slice they return to the interpreter to run
 * signal handlers (WAIT_AGAIN) and come back.
 * Releasers FUTEX_WAKE only when the waiter count is non-zero; the waiter
 * increments the count *before* re-reading the word and the releaser writes
 * the word *before* reading the count, both seq_cst (Dekker), so one of them
 * always sees the other: no lost wake-up. A waiter that leaves without
 * consuming what it was woken for passes the wake-up on.
 *
 * Memory orders, in general (each use says why when it departs from this):
 * taking a lock or a unit is an acquire RMW; giving it back is a seq_cst RMW
 * (release for the data it guards, seq_cst for the Dekker pairing above);
 * waiter/sleeper counts are seq_cst for the same pairing; fields only the
 * owner writes (RLock count and thread) are relaxed, ordered for the next
 * owner by the lock word itself; statistics, magic and the spin budget are
 * relaxed snapshots or hints.
 *
 * Dead owners: a Lock/RLock waiter checks, once per slice (and once more
 * before a timed acquire gives up), whether the process named by the word is
 * still alive; if not it CASes the word from the dead ident to its own and
 * the caller is told with OwnerDiedWarning. Detection takes at most SLICE_S
 * after the death or after the waiter started, plus scheduling.
 *
 * Condition: tickets count waits begun; notify(n) (under the lock) moves
 * min(n, waiting) from `waiting` to `tokens`, records `last` = tickets and
 * bumps seq. A waiter consumes a token (CAS) only if its ticket is older than
 * `last`, so a notify only wakes threads that were waiting when it was called
 * and wakes at most n of them. A timed-out waiter withdraws (waiting -= 1)
 * under the lock after reacquiring it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "pythread.h"
#include "structmember.h"

#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "futex.h"

#define SIZE 64
#define PID_BITS 22
#define PID_MASK ((1u << PID_BITS) - 1)
#define TAG_MASK 0x3FFu
#define SLICE_S 0.05
#ifndef SPIN_MIN_NS
#define SPIN_MIN_NS 10000
#endif
#ifndef SPIN_INIT_NS
#define SPIN_INIT_NS 50000
#endif
#ifndef SPIN_MAX_NS
#define SPIN_MAX_NS 200000
#endif
#define TIMEOUT_MAX 9223372036.0

#define MAGIC_LOCK 0x4b434c66u  /* "fLCK" */
#define MAGIC_RLOCK 0x4b4c5266u /* "fRLK" */
#define MAGIC_SEM 0x4d455366u   /* "fSEM" */
#define MAGIC_EVENT 0x54564566u /* "fEVT" */
#define MAGIC_COND 0x444e4366u  /* "fCND" */

/* WAIT_AGAIN: a signal arrived or a sleep slice ended; the caller takes the
 * GIL, runs pending signal handlers and calls again. Returning once per slice
 * bounds how long a signal that landed just before FUTEX_WAIT goes unhandled. */
enum { WAIT_AGAIN = -1, WAIT_TIMEOUT = 0, WAIT_OK = 1, WAIT_DEAD_OWNER = 2 };

typedef _Atomic uint32_t au32;

struct mutex_shm {
    au32 word, waiters, magic, count;
    _Atomic uint64_t thread;
    au32 spin, takeovers;
};

struct sem_shm {
    au32 value, waiters, magic, bound, spin;
};

struct event_shm {
    au32 word, waiters, magic, spin;
};

struct cond_shm {
    au32 seq, sleepers, magic, tickets, last, waiting, tokens, spin;
};

_Static_assert(sizeof(struct mutex_shm) <= SIZE, "mutex layout");
_Static_assert(sizeof(struct cond_shm) <= SIZE, "cond layout");

/* Set once in module init, read-only afterwards. */
static PyObject *OwnerDiedWarning;
static int spin_enabled;

/* The calling process's ident; 0 = not computed yet (or reset after fork). */
static au32 process_ident;

/* ------------------------------------------------------------------ helpers */

static inline int64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* A bounded busy-wait: the caller polls its condition between spin_more calls. */
typedef struct {
    int64_t start, end;
} spin_t;

static inline void
spin_begin(spin_t *s, au32 *budget, double deadline)
{
    /* relaxed: the budget is a hint; a stale value only changes how long we spin */
    uint32_t b = atomic_load_explicit(budget, memory_order_relaxed);
    s->start = now_ns();
    s->end = s->start + (b ? b : SPIN_INIT_NS);
    if (deadline >= 0 && (int64_t)(deadline * 1e9) < s->end)
        s->end = (int64_t)(deadline * 1e9);
}

/* Yield until the budget is spent. Yielding rather than pausing serves both
 * placements: when the other side runs on another CPU we re-check the word
 * within a syscall's time, and when it shares our CPU (common on a busy
 * machine) only giving it the CPU lets it make progress. */
static inline int
spin_more(spin_t *s)
{
    if (now_ns() >= s->end)
        return 0;
    sched_yield();
    return 1;
}

/* Grow the budget to twice what a successful spin took; halve it after a miss. */
static void
spin_end(spin_t *s, au32 *budget, int ok)
{
    uint32_t b = atomic_load_explicit(budget, memory_order_relaxed);
    int64_t nb = b ? b : SPIN_INIT_NS;
    if (ok) {
        int64_t took = 2 * (now_ns() - s->start);
        if (took > nb)
            nb = took;
    }
    else
        nb /= 2;
    nb = nb < SPIN_MIN_NS ? SPIN_MIN_NS : nb > SPIN_MAX_NS ? SPIN_MAX_NS : nb;
    atomic_store_explicit(budget, (uint32_t)nb, memory_order_relaxed);
}

/* Deadline in fx_now() seconds for a timeout (< 0: none). */
static inline double
deadline_after(double timeout)
{
    return timeout < 0 ? -1.0 : fx_now() + timeout;
}

/* Seconds to sleep next: at most one slice, at most until the deadline. */
static inline double
next_sleep(double now, double deadline)
{
    double s = SLICE_S;
    if (deadline >= 0 && deadline - now < s)
        s = deadline - now;
    return s < 0 ? 0 : s;
}

/* Read state and start time (clock ticks) from /proc/<pid>/stat.
 * Returns 1 on success, 0 if the process is gone or hidden, -1 if unparsable. */
static int
read_proc_stat(pid_t pid, char *state, unsigned long long *start)
{
    char path[48], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    char *p = strrchr(buf, ')'); /* the command name may itself hold ')' */
    if (p == NULL || p[1] != ' ')
        return -1;
    p += 2;
    *state = *p;
    for (int field = 3; field < 22; field++) {
        p = strchr(p, ' ');
        if (p == NULL)
            return -1;
        p++;
    }
    *start = strtoull(p, NULL, 10);
    return 1;
}

static uint32_t
compute_ident(void)
{
    pid_t pid = getpid();
    char state;
    unsigned long long start = 0;
    if (read_proc_stat(pid, &state, &start) != 1)
        start = 0; /* no /proc: others cannot check our tag either */
    uint32_t ident = ((uint32_t)pid & PID_MASK) | (((uint32_t)start & TAG_MASK) << PID_BITS);
    /* relaxed: every thread computes the same value; the race is benign */
    atomic_store_explicit(&process_ident, ident, memory_order_relaxed);
    return ident;
}

static inline uint32_t
my_ident(void)
{
    uint32_t ident = atomic_load_explicit(&process_ident, memory_order_relaxed);
    return ident ? ident : compute_ident();
}

static void
reset_ident_in_child(void)
{
    atomic_store_explicit(&process_ident, 0, memory_order_relaxed);
}

/* Whether the process named by ident has exited (or is a zombie, or its pid
 * now belongs to a younger process). Unknowable cases count as alive. */
static int
ident_dead(uint32_t ident)
{
    pid_t pid = (pid_t)(ident & PID_MASK);
    char state;
    unsigned long long start;
    int rc = read_proc_stat(pid, &state, &start);
    if (rc == 0) /* gone, or hidden from us by hidepid: ask kill() */
        return kill(pid, 0) < 0 && errno == ESRCH;
    if (rc < 0)
        return 0;
    if (state == 'Z' || state == 'X' || state == 'x')
        return 1;
    return ((uint32_t)start & TAG_MASK) != (ident >> PID_BITS);
}

/* --------------------------------------------------------- argument parsing */

/* Convert a timeout object: None -> -1 (forever). */
static int
timeout_arg(PyObject *obj, double *out, int *given)
{
    *given = obj != NULL && obj != Py_None;
    if (!*given) {
        *out = -1;
        return 0;
    }
    double t = PyFloat_AsDouble(obj);
    if (t == -1.0 && PyErr_Occurred())
        return -1;
    if (isnan(t)) {
        PyErr_SetString(PyExc_ValueError, "timeout must not be NaN");
        return -1;
    }
    *out = t;
    return 0;
}

/* Parse (blocking=True, timeout=..., *, block=None) as threading and
 * multiprocessing both spell it. lock_style: threading.Lock rules (-1 means
 * forever, other negatives are errors); otherwise threading.Semaphore rules
 * (negative means do not wait). Sets *timeout < 0 for "wait forever". */
static int
parse_acquire(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, int lock_style,
              int *blocking, double *timeout)
{
    PyObject *blocking_obj = NULL, *timeout_obj = NULL;
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "acquire() takes at most 2 arguments (%zd given)", nargs);
        return -1;
    }
    if (nargs > 0)
        blocking_obj = args[0];
    if (nargs > 1)
        timeout_obj = args[1];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        PyObject **slot;
        if (PyUnicode_CompareWithASCIIString(name, "blocking") == 0 ||
            PyUnicode_CompareWithASCIIString(name, "block") == 0)
            slot = &blocking_obj;
        else if (PyUnicode_CompareWithASCIIString(name, "timeout") == 0)
            slot = &timeout_obj;
        else {
            PyErr_Format(PyExc_TypeError, "acquire() got an unexpected keyword argument '%U'", name);
            return -1;
        }
        if (*slot != NULL) {
            PyErr_Format(PyExc_TypeError, "acquire() got multiple values for argument '%U'", name);
            return -1;
        }
        *slot = args[nargs + i];
    }
    *blocking = 1;
    if (blocking_obj != NULL && (*blocking = PyObject_IsTrue(blocking_obj)) < 0)
        return -1;
    int given;
    if (timeout_arg(timeout_obj, timeout, &given) < 0)
        return -1;
    if (lock_style) {
        if (!*blocking && given && *timeout != -1) {
            PyErr_SetString(PyExc_ValueError, "can't specify a timeout for a non-blocking call");
            return -1;
        }
        if (*timeout < 0 && *timeout != -1) {
            PyErr_SetString(PyExc_ValueError, "timeout value must be positive");
            return -1;
        }
    }
    else {
        if (!*blocking && given) {
            PyErr_SetString(PyExc_ValueError, "can't specify timeout for non-blocking acquire");
            return -1;
        }
        if (given && *timeout < 0)
            *timeout = 0;
    }
    if (*timeout > TIMEOUT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "timeout value is too large");
        return -1;
    }
    if (*timeout == 0) /* threading: a zero timeout never waits */
        *blocking = 0;
    return 0;
}

/* Parse wait(timeout=None) for Event and Condition: negative means do not wait. */
static int
parse_wait(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, double *timeout)
{
    PyObject *obj = NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw > 1) {
        PyErr_SetString(PyExc_TypeError, "wait() takes at most 1 argument");
        return -1;
    }
    if (nargs == 1)
        obj = args[0];
    else if (nkw == 1) {
        if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "timeout") != 0) {
            PyErr_Format(PyExc_TypeError, "wait() got an unexpected keyword argument '%U'",
                         PyTuple_GET_ITEM(kwnames, 0));
            return -1;
        }
        obj = args[0];
    }
    int given;
    if (timeout_arg(obj, timeout, &given) < 0)
        return -1;
    if (given && *timeout < 0)
        *timeout = 0;
    if (*timeout > TIMEOUT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "timeout value is too large");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------- base object */

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    void *shm;
} SharedObject;

/* Attach self to (buffer, offset); create: stamp magic, else check it. */
static int
shared_attach(SharedObject *self, PyObject *buffer, Py_ssize_t offset, uint32_t magic,
              int create, const char *what)
{
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE) < 0)
        return -1;
    if (offset < 0 || offset % 8 != 0 || offset + SIZE > self->view.len) {
        PyBuffer_Release(&self->view);
        self->view.obj = NULL;
        PyErr_Format(PyExc_ValueError, "offset %zd is out of range or not 8-byte aligned", offset);
        return -1;
    }
    self->shm = (char *)self->view.buf + offset;
    au32 *mg = (au32 *)((char *)self->shm + 8);
    /* relaxed: the block reached this process through pickling/fd passing,
     * which already orders the creator's writes before our reads */
    if (create)
        atomic_store_explicit(mg, magic, memory_order_relaxed);
    else if (atomic_load_explicit(mg, memory_order_relaxed) != magic) {
        PyBuffer_Release(&self->view);
        self->view.obj = NULL;
        PyErr_Format(PyExc_ValueError, "the shared memory at offset %zd does not hold a %s", offset, what);
        return -1;
    }
    return 0;
}

static void
shared_dealloc(SharedObject *self)
{
    if (self->view.obj != NULL)
        PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* --------------------------------------------------------------- Lock/RLock */

typedef struct {
    SharedObject base;
    int recursive;
} LockObject;

#define MUTEX(o) ((struct mutex_shm *)((SharedObject *)(o))->shm)

static PyTypeObject LockType, RLockType;

static PyObject *
lock_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", "offset", "create", NULL};
    PyObject *buffer;
    Py_ssize_t offset;
    int create = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "On|p:Lock", kwlist, &buffer, &offset, &create))
        return NULL;
    LockObject *self = (LockObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->recursive = PyType_IsSubtype(type, &RLockType);
    if (shared_attach(&self->base, buffer, offset, self->recursive ? MAGIC_RLOCK : MAGIC_LOCK, create,
                      self->recursive ? "fabric RLock" : "fabric Lock") < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

/* Wait for the mutex with the GIL released. Returns WAIT_OK, WAIT_DEAD_OWNER
 * (taken from a dead owner, whose ident goes to *dead), WAIT_TIMEOUT or
 * WAIT_AGAIN. */
static int
mutex_lock_slow(struct mutex_shm *m, uint32_t me, double deadline, uint32_t *dead, int spin)
{
    uint32_t w;
    if (spin && spin_enabled) {
        spin_t sp;
        spin_begin(&sp, &m->spin, deadline);
        do {
            /* relaxed poll; the acquire CAS below orders the critical section */
            w = atomic_load_explicit(&m->word, memory_order_relaxed);
            if (w == 0 && atomic_compare_exchange_weak_explicit(&m->word, &w, me, memory_order_acquire,
                                                                memory_order_relaxed)) {
                spin_end(&sp, &m->spin, 1);
                return WAIT_OK;
            }
        } while (spin_more(&sp));
        spin_end(&sp, &m->spin, 0);
    }
    /* seq_cst: Dekker with the releaser's XCHG then waiters load */
    atomic_fetch_add_explicit(&m->waiters, 1, memory_order_seq_cst);
    double next_check = fx_now() + SLICE_S;
    int rc;
    for (;;) {
        w = atomic_load_explicit(&m->word, memory_order_seq_cst);
        if (w == 0) {
            if (atomic_compare_exchange_strong_explicit(&m->word, &w, me, memory_order_acquire,
                                                        memory_order_relaxed)) {
                rc = WAIT_OK;
                break;
            }
            continue;
        }
        double now = fx_now();
        int expired = deadline >= 0 && now >= deadline;
        if (now >= next_check || expired) {
            if (ident_dead(w)) {
                /* acquire: we now own whatever the dead owner protected */
                if (atomic_compare_exchange_strong_explicit(&m->word, &w, me, memory_order_acquire,
                                                            memory_order_relaxed)) {
                    atomic_fetch_add_explicit(&m->takeovers, 1, memory_order_relaxed);
                    *dead = w;
                    rc = WAIT_DEAD_OWNER;
                    break;
                }
                continue;
            }
            rc = expired ? WAIT_TIMEOUT : WAIT_AGAIN;
            break;
        }
        double sleep = next_sleep(now, deadline);
        if (next_check - now < sleep)
            sleep = next_check - now;
        if (fx_wait(&m->word, w, sleep) == -EINTR) {
            rc = WAIT_AGAIN;
            break;
        }
    }
    atomic_fetch_sub_explicit(&m->waiters, 1, memory_order_seq_cst);
    /* a wake-up meant for a waiter may have landed on us: pass it on */
    if (rc <= 0 && atomic_load_explicit(&m->word, memory_order_seq_cst) == 0 &&
        atomic_load_explicit(&m->waiters, memory_order_seq_cst) > 0)
        fx_wake(&m->word, 1);
    return rc;
}

/* Release the word (the caller checked ownership) and wake one sleeper. */
static inline uint32_t
mutex_unlock_word(struct mutex_shm *m)
{
    /* seq_cst: release for the critical section, and Dekker with the waiter */
    uint32_t old = atomic_exchange_explicit(&m->word, 0, memory_order_seq_cst);
    if (old != 0 && atomic_load_explicit(&m->waiters, memory_order_seq_cst) > 0)
        fx_wake(&m->word, 1);
    return old;
}

static inline int
mutex_owned(LockObject *self, uint32_t me, uint64_t tid)
{
    struct mutex_shm *m = MUTEX(self);
    /* relaxed: only this thread writes `thread` to tid, and it reads its own writes */
    uint32_t w = atomic_load_explicit(&m->word, memory_order_relaxed);
    if (!self->recursive)
        return w != 0;
    return w == me && atomic_load_explicit(&m->thread, memory_order_relaxed) == tid;
}

static int
warn_owner_died(uint32_t dead)
{
    return PyErr_WarnFormat(OwnerDiedWarning, 1,
                            "the owner of this lock (pid %u) died holding it; "
                            "the lock was taken over by pid %u and the data it guards may be inconsistent",
                            dead & PID_MASK, my_ident() & PID_MASK);
}

/* Block (GIL released, signals checked) until the mutex is ours or the deadline passes. */
static int
mutex_lock_blocking(struct mutex_shm *m, uint32_t me, double deadline, uint32_t *dead, int interruptible)
{
    int rc, spin = 1;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        rc = mutex_lock_slow(m, me, deadline, dead, spin);
        Py_END_ALLOW_THREADS
        if (rc != WAIT_AGAIN)
            return rc;
        if (interruptible && PyErr_CheckSignals() < 0)
            return WAIT_AGAIN;
        spin = 0;
    }
}

static PyObject *
lock_acquire_impl(LockObject *self, int blocking, double timeout)
{
    struct mutex_shm *m = MUTEX(self);
    uint32_t me = my_ident();
    uint64_t tid = 0;
    if (self->recursive) {
        tid = PyThread_get_thread_ident();
        if (mutex_owned(self, me, tid)) {
            uint32_t c = atomic_load_explicit(&m->count, memory_order_relaxed);
            if (c == UINT32_MAX) {
                PyErr_SetString(PyExc_OverflowError, "internal lock count overflowed");
                return NULL;
            }
            atomic_store_explicit(&m->count, c + 1, memory_order_relaxed);
            Py_RETURN_TRUE;
        }
    }
    uint32_t expected = 0, dead = 0;
    int rc = WAIT_OK;
    /* acquire: orders the critical section after the previous owner's release */
    if (!atomic_compare_exchange_strong_explicit(&m->word, &expected, me, memory_order_acquire,
                                                 memory_order_relaxed)) {
        if (!blocking)
            Py_RETURN_FALSE;
        rc = mutex_lock_blocking(m, me, deadline_after(timeout), &dead, 1);
        if (rc == WAIT_AGAIN)
            return NULL;
        if (rc == WAIT_TIMEOUT)
            Py_RETURN_FALSE;
    }
    if (self->recursive) {
        atomic_store_explicit(&m->thread, tid, memory_order_relaxed);
        atomic_store_explicit(&m->count, 1, memory_order_relaxed);
    }
    if (rc == WAIT_DEAD_OWNER && warn_owner_died(dead) < 0) {
        /* The warning became an exception, so the caller will not hold the
         * lock: hand it back to the dead owner so the next acquirer is told. */
        if (self->recursive) {
            atomic_store_explicit(&m->count, 0, memory_order_relaxed);
            atomic_store_explicit(&m->thread, 0, memory_order_relaxed);
        }
        uint32_t mine = me;
        atomic_compare_exchange_strong_explicit(&m->word, &mine, dead, memory_order_release,
                                                memory_order_relaxed);
        return NULL;
    }
    Py_RETURN_TRUE;
}

static PyObject *
lock_acquire(LockObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int blocking = 1;
    double timeout = -1;
    if ((nargs || kwnames) && parse_acquire(args, nargs, kwnames, 1, &blocking, &timeout) < 0)
        return NULL;
    return lock_acquire_impl(self, blocking, timeout);
}

static PyObject *
lock_enter(LockObject *self, PyObject *Py_UNUSED(ignored))
{
    return lock_acquire_impl(self, 1, -1);
}

/* Release one level; 0 on success, -1 with RuntimeError set. */
static int
lock_release_impl(LockObject *self)
{
    struct mutex_shm *m = MUTEX(self);
    if (!self->recursive) {
        if (mutex_unlock_word(m) == 0) {
            PyErr_SetString(PyExc_RuntimeError, "release unlocked lock");
            return -1;
        }
        return 0;
    }
    if (!mutex_owned(self, my_ident(), PyThread_get_thread_ident())) {
        PyErr_SetString(PyExc_RuntimeError, "cannot release un-acquired lock");
        return -1;
    }
    uint32_t c = atomic_load_explicit(&m->count, memory_order_relaxed);
    atomic_store_explicit(&m->count, c - 1, memory_order_relaxed);
    if (c > 1)
        return 0;
    atomic_store_explicit(&m->thread, 0, memory_order_relaxed);
    mutex_unlock_word(m);
    return 0;
}

static PyObject *
lock_release(LockObject *self, PyObject *Py_UNUSED(ignored))
{
    if (lock_release_impl(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
lock_exit(LockObject *self, PyObject *Py_UNUSED(args))
{
    return lock_release(self, NULL);
}

static PyObject *
lock_locked(LockObject *self, PyObject *Py_UNUSED(ignored))
{
    /* relaxed: a snapshot, stale as soon as it is returned anyway */
    return PyBool_FromLong(atomic_load_explicit(&MUTEX(self)->word, memory_order_relaxed) != 0);
}

static PyObject *
lock_is_owned(LockObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(mutex_owned(self, my_ident(), PyThread_get_thread_ident()));
}

/* (owner_pid or 0, waiters, takeovers, count, owner thread) */
static PyObject *
lock_stats(LockObject *self, PyObject *Py_UNUSED(ignored))
{
    struct mutex_shm *m = MUTEX(self);
    uint32_t w = atomic_load_explicit(&m->word, memory_order_relaxed);
    int rec = self->recursive && w != 0;
    return Py_BuildValue("IIIIK", w & PID_MASK, atomic_load_explicit(&m->waiters, memory_order_relaxed),
                         atomic_load_explicit(&m->takeovers, memory_order_relaxed),
                         rec ? atomic_load_explicit(&m->count, memory_order_relaxed) : (w != 0),
                         rec ? (unsigned long long)atomic_load_explicit(&m->thread, memory_order_relaxed) : 0ULL);
}

static PyMethodDef lock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))lock_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire(blocking=True, timeout=-1) -> bool\n\nAlso accepts block= and timeout=None."},
    {"release", (PyCFunction)lock_release, METH_NOARGS, "Release the lock."},
    {"__enter__", (PyCFunction)lock_enter, METH_NOARGS, "Acquire the lock."},
    {"__exit__", (PyCFunction)lock_exit, METH_VARARGS, "Release the lock."},
    {"locked", (PyCFunction)lock_locked, METH_NOARGS, "Return whether the lock is held."},
    {"_is_owned", (PyCFunction)lock_is_owned, METH_NOARGS, "Whether the caller may wait on a Condition with it."},
    {"_stats", (PyCFunction)lock_stats, METH_NOARGS, "(owner pid, waiters, takeovers, count, thread)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fabric.local._sync.Lock",
    .tp_basicsize = sizeof(LockObject),
    .tp_dealloc = (destructor)shared_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Lock(buffer, offset, create=False): a mutex in shared memory.",
    .tp_methods = lock_methods,
    .tp_new = lock_new,
};

static PyTypeObject RLockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fabric.local._sync.RLock",
    .tp_basicsize = sizeof(LockObject),
    .tp_dealloc = (destructor)shared_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "RLock(buffer, offset, create=False): a reentrant mutex in shared memory.",
    .tp_methods = lock_methods,
    .tp_new = lock_new,
};

/* ---------------------------------------------------------------- Semaphore */

#define SEM(o) ((struct sem_shm *)((SharedObject *)(o))->shm)
#define SEM_MAX 0x7fffffffu

static PyObject *
sem_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", "offset", "create", "value", "bound", NULL};
    PyObject *buffer;
    Py_ssize_t offset;
    int create = 0, bound = 0;
    long long value = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "On|pLp:Semaphore", kwlist, &buffer, &offset, &create,
                                     &value, &bound))
        return NULL;
    if (create && value < 0) {
        PyErr_SetString(PyExc_ValueError, "semaphore initial value must be >= 0");
        return NULL;
    }
    if (create && value > SEM_MAX) {
        PyErr_Format(PyExc_OverflowError, "semaphore initial value must be <= %u", SEM_MAX);
        return NULL;
    }
    SharedObject *self = (SharedObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (shared_attach(self, buffer, offset, MAGIC_SEM, create, "fabric Semaphore") < 0) {
        Py_DECREF(self);
        return NULL;
    }
    if (create) {
        /* relaxed: published to other processes by pickling (see shared_attach) */
        atomic_store_explicit(&SEM(self)->value, (uint32_t)value, memory_order_relaxed);
        atomic_store_explicit(&SEM(self)->bound, bound ? (uint32_t)value : 0, memory_order_relaxed);
    }
    return (PyObject *)self;
}

static inline int
sem_try(struct sem_shm *s)
{
    uint32_t v = atomic_load_explicit(&s->value, memory_order_relaxed);
    while (v > 0)
        /* acquire: pairs with the releaser's add */
        if (atomic_compare_exchange_weak_explicit(&s->value, &v, v - 1, memory_order_acquire,
                                                  memory_order_relaxed))
            return 1;
    return 0;
}

static int
sem_wait_slow(struct sem_shm *s, double deadline, int spin)
{
    if (spin && spin_enabled) {
        spin_t sp;
        spin_begin(&sp, &s->spin, deadline);
        do {
            if (sem_try(s)) {
                spin_end(&sp, &s->spin, 1);
                return WAIT_OK;
            }
        } while (spin_more(&sp));
        spin_end(&sp, &s->spin, 0);
    }
    /* seq_cst: Dekker with release's add then waiters load */
    atomic_fetch_add_explicit(&s->waiters, 1, memory_order_seq_cst);
    int rc;
    for (;;) {
        atomic_thread_fence(memory_order_seq_cst);
        if (sem_try(s)) {
            rc = WAIT_OK;
            break;
        }
        double now = fx_now();
        if (deadline >= 0 && now >= deadline) {
            rc = WAIT_TIMEOUT;
            break;
        }
        int r = fx_wait(&s->value, 0, next_sleep(now, deadline));
        if (r == -EINTR || (r == -ETIMEDOUT && (deadline < 0 || fx_now() < deadline))) {
            rc = WAIT_AGAIN;
            break;
        }
    }
    atomic_fetch_sub_explicit(&s->waiters, 1, memory_order_seq_cst);
    if (rc != WAIT_OK && atomic_load_explicit(&s->value, memory_order_seq_cst) > 0 &&
        atomic_load_explicit(&s->waiters, memory_order_seq_cst) > 0)
        fx_wake(&s->value, 1);
    return rc;
}

static PyObject *
sem_acquire(SharedObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int blocking = 1;
    double timeout = -1;
    if ((nargs || kwnames) && parse_acquire(args, nargs, kwnames, 0, &blocking, &timeout) < 0)
        return NULL;
    struct sem_shm *s = SEM(self);
    if (sem_try(s))
        Py_RETURN_TRUE;
    if (!blocking)
        Py_RETURN_FALSE;
    double deadline = deadline_after(timeout);
    int rc, spin = 1;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        rc = sem_wait_slow(s, deadline, spin);
        Py_END_ALLOW_THREADS
        if (rc != WAIT_AGAIN)
            break;
        if (PyErr_CheckSignals() < 0)
            return NULL;
        spin = 0;
    }
    return PyBool_FromLong(rc == WAIT_OK);
}

static PyObject *
sem_enter(SharedObject *self, PyObject *Py_UNUSED(ignored))
{
    return sem_acquire(self, NULL, 0, NULL);
}

static PyObject *
sem_release_n(SharedObject *self, long long n)
{
    struct sem_shm *s = SEM(self);
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "n must be one or more");
        return NULL;
    }
    uint32_t bound = atomic_load_explicit(&s->bound, memory_order_relaxed);
    uint32_t limit = bound ? bound : SEM_MAX;
    uint32_t v = atomic_load_explicit(&s->value, memory_order_relaxed);
    do {
        if ((long long)v + n > (long long)limit) {
            if (bound)
                PyErr_SetString(PyExc_ValueError, "Semaphore released too many times");
            else
                PyErr_Format(PyExc_OverflowError, "semaphore value would exceed %u", SEM_MAX);
            return NULL;
        }
        /* seq_cst: release for the waker's writes, and Dekker with the waiter */
    } while (!atomic_compare_exchange_weak_explicit(&s->value, &v, v + (uint32_t)n, memory_order_seq_cst,
                                                    memory_order_relaxed));
    if (atomic_load_explicit(&s->waiters, memory_order_seq_cst) > 0)
        fx_wake(&s->value, n > INT32_MAX ? INT32_MAX : (int)n);
    Py_RETURN_NONE;
}

/* Parse the optional count argument `n` (positional or keyword) of
 * release(n=1) and notify(n=1) into *n. With `saturate`, an int too large for
 * a long long becomes LLONG_MAX (or 0 when too negative) instead of raising
 * OverflowError. Return 0, or -1 with an exception set. */
static int
parse_count(const char *method, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
            int saturate, long long *n)
{
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    *n = 1;
    if (nargs + nkw > 1) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most 1 argument", method);
        return -1;
    }
    if (nkw == 1 && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "n") != 0) {
        PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", method,
                     PyTuple_GET_ITEM(kwnames, 0));
        return -1;
    }
    if (nargs + nkw == 0)
        return 0;
    if (!saturate) {
        *n = PyLong_AsLongLong(args[0]);
        return (*n == -1 && PyErr_Occurred()) ? -1 : 0;
    }
    int overflow;
    *n = PyLong_AsLongLongAndOverflow(args[0], &overflow);
    if (*n == -1 && PyErr_Occurred())
        return -1;
    if (overflow)
        *n = overflow > 0 ? LLONG_MAX : 0;
    return 0;
}

static PyObject *
sem_release(SharedObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    long long n;
    if (parse_count("release", args, nargs, kwnames, 0, &n) < 0)
        return NULL;
    return sem_release_n(self, n);
}

static PyObject *
sem_exit(SharedObject *self, PyObject *Py_UNUSED(args))
{
    return sem_release_n(self, 1);
}

static PyObject *
sem_get_value(SharedObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromUnsignedLong(atomic_load_explicit(&SEM(self)->value, memory_order_relaxed));
}

/* (value, waiters, bound or 0) */
static PyObject *
sem_stats(SharedObject *self, PyObject *Py_UNUSED(ignored))
{
    struct sem_shm *s = SEM(self);
    return Py_BuildValue("III", atomic_load_explicit(&s->value, memory_order_relaxed),
                         atomic_load_explicit(&s->waiters, memory_order_relaxed),
                         atomic_load_explicit(&s->bound, memory_order_relaxed));
}

static PyMethodDef sem_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))sem_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire(blocking=True, timeout=None) -> bool\n\nAlso accepts block=."},
    {"release", (PyCFunction)(void (*)(void))sem_release, METH_FASTCALL | METH_KEYWORDS,
     "release(n=1): add n to the counter, waking up to n waiters."},
    {"__enter__", (PyCFunction)sem_enter, METH_NOARGS, "Acquire the semaphore."},
    {"__exit__", (PyCFunction)sem_exit, METH_VARARGS, "Release the semaphore."},
    {"get_value", (PyCFunction)sem_get_value, METH_NOARGS, "Return the current counter."},
    {"_stats", (PyCFunction)sem_stats, METH_NOARGS, "(value, waiters, bound)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SemType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fabric.local._sync.Semaphore",
    .tp_basicsize = sizeof(SharedObject),
    .tp_dealloc = (destructor)shared_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Semaphore(buffer, offset, create=False, value=1, bound=False): a counter in shared memory.",
    .tp_methods = sem_methods,
    .tp_new = sem_new,
};

/* -------------------------------------------------------------------- Event */

#define EVENT(o) ((struct event_shm *)((SharedObject *)(o))->shm)

static PyObject *
event_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", "offset", "create", NULL};
    PyObject *buffer;
    Py_ssize_t offset;
    int create = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "On|p:Event", kwlist, &buffer, &offset, &create))
        return NULL;
    SharedObject *self = (SharedObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (shared_attach(self, buffer, offset, MAGIC_EVENT, create, "fabric Event") < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyObject *
event_is_set(SharedObject *self, PyObject *Py_UNUSED(ignored))
{
    /* acquire: a caller seeing the flag also sees what the setter wrote before set() */
    return PyBool_FromLong(atomic_load_explicit(&EVENT(self)->word, memory_order_acquire) & 1);
}

static PyObject *
event_set(SharedObject *self, PyObject *Py_UNUSED(ignored))
{
    struct event_shm *e = EVENT(self);
    uint32_t w = atomic_load_explicit(&e->word, memory_order_relaxed);
    do {
        if (w & 1)
            Py_RETURN_NONE;
        /* seq_cst: release for the setter's writes, and Dekker with the waiter */
    } while (!atomic_compare_exchange_weak_explicit(&e->word, &w, (w + 2) | 1, memory_order_seq_cst,
                                                    memory_order_relaxed));
    if (atomic_load_explicit(&e->waiters, memory_order_seq_cst) > 0)
        fx_wake(&e->word, INT32_MAX);
    Py_RETURN_NONE;
}

static PyObject *
event_clear(SharedObject *self, PyObject *Py_UNUSED(ignored))
{
    /* relaxed: clearing publishes nothing; waiters only look for a new generation */
    atomic_fetch_and_explicit(&EVENT(self)->word, ~1u, memory_order_relaxed);
    Py_RETURN_NONE;
}

/* Wait until the word moves away from w0 (whose flag is clear): a set() happened. */
static int
event_wait_slow(struct event_shm *e, uint32_t w0, double deadline, int spin)
{
    if (spin && spin_enabled) {
        spin_t sp;
        spin_begin(&sp, &e->spin, deadline);
        do {
            if (atomic_load_explicit(&e->word, memory_order_acquire) != w0) {
                spin_end(&sp, &e->spin, 1);
                return WAIT_OK;
            }
        } while (spin_more(&sp));
        spin_end(&sp, &e->spin, 0);
    }
    atomic_fetch_add_explicit(&e->waiters, 1, memory_order_seq_cst);
    int rc;
    for (;;) {
        if (atomic_load_explicit(&e->word, memory_order_seq_cst) != w0) {
            rc = WAIT_OK;
            break;
        }
        double now = fx_now();
        if (deadline >= 0 && now >= deadline) {
            rc = WAIT_TIMEOUT;
            break;
        }
        int r = fx_wait(&e->word, w0, next_sleep(now, deadline));
        if (r == -EINTR || (r == -ETIMEDOUT && (deadline < 0 || fx_now() < deadline))) {
            rc = WAIT_AGAIN;
            break;
        }
    }
    atomic_fetch_sub_explicit(&e->waiters, 1, memory_order_seq_cst);
    return rc;
}

static PyObject *
event_wait(SharedObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    double timeout = -1;
    if ((nargs || kwnames) && parse_wait(args, nargs, kwnames, &timeout) < 0)
        return NULL;
    struct event_shm *e = EVENT(self);
    uint32_t w0 = atomic_load_explicit(&e->word, memory_order_acquire);
    if (w0 & 1)
        Py_RETURN_TRUE;
    if (timeout == 0)
        Py_RETURN_FALSE;
    double deadline = deadline_after(timeout);
    int rc, spin = 1;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        rc = event_wait_slow(e, w0, deadline, spin);
        Py_END_ALLOW_THREADS
        if (rc != WAIT_AGAIN)
            break;
        if (PyErr_CheckSignals() < 0)
            return NULL;
        spin = 0;
    }
    return PyBool_FromLong(rc == WAIT_OK);
}

/* (flag, waiters) */
static PyObject *
event_stats(SharedObject *self, PyObject *Py_UNUSED(ignored))
{
    struct event_shm *e = EVENT(self);
    return Py_BuildValue("II", atomic_load_explicit(&e->word, memory_order_relaxed) & 1,
                         atomic_load_explicit(&e->waiters, memory_order_relaxed));
}

static PyMethodDef event_methods[] = {
    {"is_set", (PyCFunction)event_is_set, METH_NOARGS, "Return whether the flag is set."},
    {"set", (PyCFunction)event_set, METH_NOARGS, "Set the flag, waking every waiter."},
    {"clear", (PyCFunction)event_clear, METH_NOARGS, "Clear the flag."},
    {"wait", (PyCFunction)(void (*)(void))event_wait, METH_FASTCALL | METH_KEYWORDS,
     "wait(timeout=None) -> bool: block until the flag is set; False on timeout."},
    {"_stats", (PyCFunction)event_stats, METH_NOARGS, "(flag, waiters)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EventType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fabric.local._sync.Event",
    .tp_basicsize = sizeof(SharedObject),
    .tp_dealloc = (destructor)shared_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Event(buffer, offset, create=False): a flag in shared memory.",
    .tp_methods = event_methods,
    .tp_new = event_new,
};

/* ---------------------------------------------------------------- Condition */

typedef struct {
    SharedObject base;
    LockObject *lock;
} CondObject;

#define COND(o) ((struct cond_shm *)((SharedObject *)(o))->shm)

static PyObject *
cond_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", "offset", "create", "lock", NULL};
    PyObject *buffer, *lock;
    Py_ssize_t offset;
    int create;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OnpO:Condition", kwlist, &buffer, &offset, &create, &lock))
        return NULL;
    if (!PyObject_TypeCheck(lock, &LockType) && !PyObject_TypeCheck(lock, &RLockType)) {
        PyErr_Format(PyExc_TypeError, "a fabric Condition needs a fabric.local Lock or RLock, not %.200s",
                     Py_TYPE(lock)->tp_name);
        return NULL;
    }
    CondObject *self = (CondObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (shared_attach(&self->base, buffer, offset, MAGIC_COND, create, "fabric Condition") < 0) {
        Py_DECREF(self);
        return NULL;
    }
    Py_INCREF(lock);
    self->lock = (LockObject *)lock;
    return (PyObject *)self;
}

static void
cond_dealloc(CondObject *self)
{
    Py_CLEAR(self->lock);
    shared_dealloc(&self->base);
}

/* Take a notify token if one is meant for ticket; 1 if taken. */
static inline int
cond_try_consume(struct cond_shm *c, uint32_t ticket)
{
    /* acquire: seeing a token implies seeing the `last` stored before it */
    uint32_t t = atomic_load_explicit(&c->tokens, memory_order_acquire);
    if (t == 0 || (int32_t)(ticket - atomic_load_explicit(&c->last, memory_order_acquire)) >= 0)
        return 0; /* nothing granted, or we began waiting after the latest notify */
    while (t > 0)
        if (atomic_compare_exchange_weak_explicit(&c->tokens, &t, t - 1, memory_order_acquire,
                                                  memory_order_acquire))
            return 1;
    return 0;
}

static int
cond_wait_slow(struct cond_shm *c, uint32_t ticket, double deadline, int spin)
{
    if (spin && spin_enabled) {
        spin_t sp;
        spin_begin(&sp, &c->spin, deadline);
        do {
            if (cond_try_consume(c, ticket)) {
                spin_end(&sp, &c->spin, 1);
                return WAIT_OK;
            }
        } while (spin_more(&sp));
        spin_end(&sp, &c->spin, 0);
    }
    /* seq_cst: Dekker with notify's seq bump then sleepers load */
    atomic_fetch_add_explicit(&c->sleepers, 1, memory_order_seq_cst);
    int rc;
    for (;;) {
        uint32_t s = atomic_load_explicit(&c->seq, memory_order_seq_cst);
        if (cond_try_consume(c, ticket)) {
            rc = WAIT_OK;
            break;
        }
        double now = fx_now();
        if (deadline >= 0 && now >= deadline) {
            rc = WAIT_TIMEOUT;
            break;
        }
        int r = fx_wait(&c->seq, s, next_sleep(now, deadline));
        if (r == -EINTR || (r == -ETIMEDOUT && (deadline < 0 || fx_now() < deadline))) {
            rc = WAIT_AGAIN;
            break;
        }
    }
    atomic_fetch_sub_explicit(&c->sleepers, 1, memory_order_seq_cst);
    if (rc != WAIT_OK && atomic_load_explicit(&c->tokens, memory_order_seq_cst) > 0 &&
        atomic_load_explicit(&c->sleepers, memory_order_seq_cst) > 0)
        fx_wake(&c->seq, 1);
    return rc;
}

static PyObject *
cond_wait(CondObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    double timeout = -1;
    if ((nargs || kwnames) && parse_wait(args, nargs, kwnames, &timeout) < 0)
        return NULL;
    struct cond_shm *c = COND(self);
    LockObject *lock = self->lock;
    struct mutex_shm *m = MUTEX(lock);
    uint32_t me = my_ident();
    uint64_t tid = PyThread_get_thread_ident();
    if (!mutex_owned(lock, me, tid)) {
        PyErr_SetString(PyExc_RuntimeError, "cannot wait on un-acquired lock");
        return NULL;
    }
    /* relaxed: these fields only change under the lock, which orders them */
    uint32_t ticket = atomic_fetch_add_explicit(&c->tickets, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&c->waiting, 1, memory_order_relaxed);
    uint32_t depth = 1;
    if (lock->recursive) {
        depth = atomic_load_explicit(&m->count, memory_order_relaxed);
        atomic_store_explicit(&m->count, 0, memory_order_relaxed);
        atomic_store_explicit(&m->thread, 0, memory_order_relaxed);
    }
    mutex_unlock_word(m);

    double deadline = deadline_after(timeout);
    int rc, spin = 1, failed = 0;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        rc = cond_wait_slow(c, ticket, deadline, spin);
        Py_END_ALLOW_THREADS
        if (rc != WAIT_AGAIN)
            break;
        if (PyErr_CheckSignals() < 0) {
            failed = 1;
            break;
        }
        spin = 0;
    }

    /* Reacquire without a timeout, as threading does; signals wait until we hold it. */
    uint32_t expected = 0, dead = 0;
    int lrc = WAIT_OK;
    if (!atomic_compare_exchange_strong_explicit(&m->word, &expected, me, memory_order_acquire,
                                                 memory_order_relaxed))
        lrc = mutex_lock_blocking(m, me, -1, &dead, 0);
    if (lock->recursive) {
        atomic_store_explicit(&m->thread, tid, memory_order_relaxed);
        atomic_store_explicit(&m->count, depth, memory_order_relaxed);
    }
    int notified = rc == WAIT_OK;
    if (!notified) {
        if (cond_try_consume(c, ticket))
            notified = 1;
        else {
            uint32_t w = atomic_load_explicit(&c->waiting, memory_order_relaxed);
            if (w > 0)
                atomic_store_explicit(&c->waiting, w - 1, memory_order_relaxed);
        }
    }
    if (lrc == WAIT_DEAD_OWNER && !failed && warn_owner_died(dead) < 0)
        failed = 1;
    if (failed)
        return NULL;
    return PyBool_FromLong(notified);
}

static PyObject *
cond_notify_n(CondObject *self, long long n)
{
    struct cond_shm *c = COND(self);
    if (!mutex_owned(self->lock, my_ident(), PyThread_get_thread_ident())) {
        PyErr_SetString(PyExc_RuntimeError, "cannot notify on un-acquired lock");
        return NULL;
    }
    uint32_t waiting = atomic_load_explicit(&c->waiting, memory_order_relaxed);
    uint32_t k = n <= 0 ? 0 : (unsigned long long)n < waiting ? (uint32_t)n : waiting;
    if (k == 0)
        Py_RETURN_NONE;
    atomic_store_explicit(&c->waiting, waiting - k, memory_order_relaxed);
    /* release: a waiter that sees the new tokens also sees the new `last` */
    atomic_store_explicit(&c->last, atomic_load_explicit(&c->tickets, memory_order_relaxed),
                          memory_order_release);
    atomic_fetch_add_explicit(&c->tokens, k, memory_order_release);
    /* seq_cst: Dekker with the waiter's sleepers increment then seq load */
    atomic_fetch_add_explicit(&c->seq, 1, memory_order_seq_cst);
    if (atomic_load_explicit(&c->sleepers, memory_order_seq_cst) > 0)
        fx_wake(&c->seq, k > INT32_MAX ? INT32_MAX : (int)k);
    Py_RETURN_NONE;
}

static PyObject *
cond_notify(CondObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    long long n;
    if (parse_count("notify", args, nargs, kwnames, 1, &n) < 0)
        return NULL;
    return cond_notify_n(self, n);
}

static PyObject *
cond_notify_all(CondObject *self, PyObject *Py_UNUSED(ignored))
{
    return cond_notify_n(self, LLONG_MAX);
}

/* (waiting, sleepers, pending tokens) */
static PyObject *
cond_stats(CondObject *self, PyObject *Py_UNUSED(ignored))
{
    struct cond_shm *c = COND(self);
    return Py_BuildValue("III", atomic_load_explicit(&c->waiting, memory_order_relaxed),
                         atomic_load_explicit(&c->sleepers, memory_order_relaxed),
                         atomic_load_explicit(&c->tokens, memory_order_relaxed));
}

static PyMethodDef cond_methods[] = {
    {"wait", (PyCFunction)(void (*)(void))cond_wait, METH_FASTCALL | METH_KEYWORDS,
     "wait(timeout=None) -> bool: release the lock, wait for a notify, reacquire."},
    {"notify", (PyCFunction)(void (*)(void))cond_notify, METH_FASTCALL | METH_KEYWORDS,
     "notify(n=1): wake up to n threads waiting now."},
    {"notify_all", (PyCFunction)cond_notify_all, METH_NOARGS, "Wake every thread waiting now."},
    {"_stats", (PyCFunction)cond_stats, METH_NOARGS, "(waiting, sleepers, tokens)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef cond_members[] = {
    {"_lock", T_OBJECT, offsetof(CondObject, lock), READONLY, "The underlying Lock or RLock."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject CondType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fabric.local._sync.Condition",
    .tp_basicsize = sizeof(CondObject),
    .tp_dealloc = (destructor)cond_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Condition(buffer, offset, create, lock): a condition variable in shared memory.",
    .tp_methods = cond_methods,
    .tp_members = cond_members,
    .tp_new = cond_new,
};

/* ------------------------------------------------------------------- module */

/* atomic_add_u32(buffer, offset, delta): add delta to the 32-bit word at offset.
 * Used for the block reference counts of _shm.py; seq_cst because it is rare
 * and orders the count against the block's reuse. */
static PyObject *
atomic_add_u32(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer view;
    Py_ssize_t offset;
    int delta;
    if (!PyArg_ParseTuple(args, "w*ni:atomic_add_u32", &view, &offset, &delta))
        return NULL;
    if (offset < 0 || offset % 4 != 0 || offset + 4 > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "offset out of range or misaligned");
        return NULL;
    }
    _Atomic uint32_t *word = (_Atomic uint32_t *)((char *)view.buf + offset);
    uint32_t now = atomic_fetch_add_explicit(word, (uint32_t)delta, memory_order_seq_cst) + (uint32_t)delta;
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(now);
}

static PyObject *
process_ident_py(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromUnsignedLong(my_ident());
}

static PyMethodDef methods[] = {
    {"atomic_add_u32", atomic_add_u32, METH_VARARGS, "Atomically add to a shared 32-bit word; return the new value."},
    {"_process_ident", process_ident_py, METH_NOARGS, "This process's ident as written in lock words."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sync", "fabric's primitives on shared memory.", -1,
                                    methods};

static int
add_float(PyObject *mod, const char *name, double value)
{
    PyObject *obj = PyFloat_FromDouble(value);
    if (obj == NULL)
        return -1;
    int rc = PyModule_AddObjectRef(mod, name, obj);
    Py_DECREF(obj);
    return rc;
}

PyMODINIT_FUNC
PyInit__sync(void)
{
    static PyTypeObject *types[] = {&LockType, &RLockType, &SemType, &EventType, &CondType};
    RLockType.tp_base = &LockType;
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
        if (PyType_Ready(types[i]) < 0)
            return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL)
        return NULL;
#ifdef Py_GIL_DISABLED
    PyUnstable_Module_SetGIL(mod, Py_MOD_GIL_NOT_USED);
#endif
    if (OwnerDiedWarning == NULL) {
        OwnerDiedWarning = PyErr_NewExceptionWithDoc(
            "fabric.local.OwnerDiedWarning",
            "A process died holding a Lock or RLock; the lock was taken over by the caller.",
            PyExc_RuntimeWarning, NULL);
        if (OwnerDiedWarning == NULL)
            goto error;
        spin_enabled = sysconf(_SC_NPROCESSORS_ONLN) > 1;
        if (pthread_atfork(NULL, NULL, reset_ident_in_child) != 0) {
            PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
            goto error;
        }
    }
    const char *names[] = {"Lock", "RLock", "Semaphore", "Event", "Condition"};
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
        if (PyModule_AddObjectRef(mod, names[i], (PyObject *)types[i]) < 0)
            goto error;
    if (PyModule_AddObjectRef(mod, "OwnerDiedWarning", OwnerDiedWarning) < 0 ||
        PyModule_AddIntConstant(mod, "SIZE", SIZE) < 0 ||
        add_float(mod, "TIMEOUT_MAX", TIMEOUT_MAX) < 0 || add_float(mod, "SLICE", SLICE_S) < 0)
        goto error;
    return mod;
error:
    Py_DECREF(mod);
    return NULL;
}
