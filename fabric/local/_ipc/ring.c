/*
 * _ring: a crash-consistent multi-producer multi-consumer message ring in
 * shared memory, the core of fabric.local's Queue, SimpleQueue and Pipe.
 *
 * Theory of operation
 * -------------------
 * A ring lives in one shared block: a 1 KiB header, then `cap` bytes of data
 * (a power of two). Positions are 64-bit byte counters that only grow; the
 * byte at position p lives at data[p & (cap - 1)]. Three cursors, each on its
 * own cache line, satisfy head <= rclaim <= tail:
 *
 *   tail    next free position. 128 bits {pos; pid, size, flags} changed only
 *           by a double-width CAS, so a reservation also records who made it
 *           and how big it is (see "unstamped reservations" below).
 *   cin     128 bits {pos; in}: `in` counts the messages reserved below pos;
 *           pos trails tail by at most the newest reservation (see
 *           "counting" below).
 *   rclaim  first record no consumer has claimed yet (a hint anyone may push
 *           forward past a claimed record). 128 bits {pos; out}: `out`
 *           counts the messages rclaim has passed (see "counting" below).
 *   head    first byte still in use; space before it may be reused.
 *
 * A record is a 16-byte header {seq, state, info} and its payload, padded to
 * 16 bytes, so a header never straddles the end of the data area (a payload
 * may: it is copied in two pieces). `seq` is stamp(p) = (p + 1) ^ secret, the
 * record's own position keyed with a per-ring random secret: a header is
 * valid only if its seq matches the position being looked at, so stale bytes
 * from an earlier lap (old headers or old payload) are never mistaken for a
 * record. `state` is (pid << 4) | code: every transitional state names the
 * process responsible for it, which is what makes crash recovery possible.
 *
 *   producer:  CAS tail (reserve) -> state WRITING|me, seq stamp (release)
 *              -> copy payload -> state READY|me (release)
 *   consumer:  at rclaim, CAS state READY|w -> CLAIMED|me (this is the claim)
 *              -> push rclaim on (counting the message out) -> copy out
 *              -> state DONE|me (release)
 *              -> push head over every DONE/ABANDONED record at head
 *
 * Crash recovery. A record stuck in WRITING or CLAIMED whose pid is dead is
 * CAS-ed to ABANDONED by whoever is blocked behind it (a consumer at rclaim,
 * a producer waiting for head), so a kill -9 loses at most the one message
 * that process had in hand. A process can also die between its tail CAS and
 * stamping the header; that is why tail records the last reservation: a
 * producer only reserves after checking that the previous reservation is
 * stamped (waiting a few instructions for a live owner, taking it over with a
 * tail CAS when the owner is dead), so at most the newest reservation can be
 * unstamped and its owner is always known.
 *
 * Counting. qsize is `in - out`. A message is counted out by the very CAS
 * that moves rclaim past its first record, whoever makes it (its claimer, a
 * helper, a reaper) and whatever the record became (claimed, abandoned). It
 * is counted in by its tail CAS: a producer reserves only once cin has caught
 * up with tail, so while cin lags tail cannot move, and the one record cin
 * has not passed is the newest reservation, whose size and fragment role
 * tail itself records; anyone may push cin past it without reading the
 * record. The maxsize check reads `in` at the tail position the CAS expects,
 * so a successful CAS proves no other message was admitted meanwhile. A
 * process killed at any point has thus counted a message both in and out,
 * or neither. Counting at the claim (a decrement after the state CAS), or
 * before the reservation (an increment before the tail CAS), left windows
 * in which a kill left qsize one too high forever. JoinableQueue's unfinished
 * tasks are likewise `in - finished` (task_done calls and lost messages).
 *
 * Messages bigger than a quarter of the ring are streamed as FIRST, MID...,
 * LAST fragments. A streaming producer owns `wstream` and sets a STREAM flag
 * in tail so no other reservation can interleave with its fragments; the
 * consumer that claims FIRST owns `rstream` and only it claims the following
 * fragments. A dead stream owner is detected like any other dead owner: its
 * orphaned fragments are discarded and the partial message is the one lost.
 *
 * Waking. Each wait has a 32-bit sequence word whose low bit means "someone
 * may sleep here". A sleeper sets the bit, re-checks its condition, then
 * FUTEX_WAITs on the word; a waker that finds the bit set bumps the word
 * (clearing the bit) and calls FUTEX_WAKE, so the fast path makes no system
 * call when nobody sleeps (seq_cst on both sides orders "publish, then read
 * the word" against "set the bit, then re-check"). A sleeper killed in its
 * sleep leaves the bit set, which costs one spurious wake and then heals
 * (a waiter *count* would stay wrong forever). Before sleeping a waiter
 * spins for an adaptive, bounded time, with the GIL released.
 *
 * The tail is accessed with GCC's __sync double-width CAS (cmpxchg16b, built
 * with -mcx16) and read as two 64-bit halves; a torn read only makes the
 * following CAS fail and retry.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <fcntl.h>
#include <stddef.h>
#include <sys/random.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include "bufferproxy.h"
#include "codec.h"
#include "futex.h"

#define RING_MAGIC 0x21474e4952424146ULL /* "FABRING!" */
#define HDR_SIZE 1024
#define REC_HDR 16
#define MIN_CAP 4096
#define MAX_CAP (1ULL << 30)
#define SLOTS 6

/* record states (low 4 bits of the state word) */
enum { S_FREE = 0, S_WRITING = 1, S_READY = 2, S_CLAIMED = 3, S_DONE = 4, S_ABANDONED = 5 };
/* payload kinds and fragment roles, packed into info with the length */
enum { K_PICKLE = 0, K_RAW = 1, K_OOB = 2 };
enum { F_WHOLE = 0, F_FIRST = 1, F_MID = 2, F_LAST = 3 };
#define INFO(len, kind, frag) ((uint32_t)(len) | ((uint32_t)(kind) << 28) | ((uint32_t)(frag) << 30))
#define INFO_LEN(i) ((i) & 0x0fffffffu)
#define INFO_KIND(i) (((i) >> 28) & 3u)
#define INFO_FRAG(i) ((i) >> 30)
#define STATE(pid, code) (((uint32_t)(pid) << 4) | (code))
#define ST_PID(s) ((s) >> 4)
#define ST_CODE(s) ((s) & 15u)
/* tail high word: pid (32) | stream flag (1) | frag (2) | size (29) */
#define TAIL_HI(pid, stream, frag, size) \
    (((uint64_t)(pid) << 32) | ((uint64_t)(stream) << 31) | ((uint64_t)(frag) << 29) | (uint64_t)(size))
#define HI_PID(h) ((uint32_t)((h) >> 32))
#define HI_STREAM(h) ((unsigned)(((h) >> 31) & 1u))
#define HI_FRAG(h) ((unsigned)(((h) >> 29) & 3u))
#define HI_SIZE(h) ((uint32_t)((h) & 0x1fffffffu))

typedef struct {
    _Atomic uint64_t seq;
    _Atomic uint32_t state;
    _Atomic uint32_t info;
} rec_t;

/* The shared header. Constant fields are written once by the creator before
 * the block is shared; every other field is only touched atomically. */
typedef struct {
    uint64_t magic, cap, secret;
    int64_t maxsize;
    uint32_t max_frag, joinable;
    char _p0[64 - 40];
    _Alignas(16) uint64_t tail[2]; /* [0] pos, [1] hi; 16-aligned for cmpxchg16b */
    _Alignas(16) uint64_t cin[2];  /* [0] pos, [1] messages counted in: tail's line, as every put uses both */
    char _p1[64 - 32];
    _Alignas(16) uint64_t rclaim[2]; /* [0] pos, [1] messages counted out */
    char _p2[64 - 16];
    _Atomic uint64_t head;
    char _p3[64 - 8];
    _Atomic int64_t finished; /* JoinableQueue: task_done calls and lost messages */
    _Atomic uint64_t abandoned, puts, gets;
    char _p4[64 - 32];
    _Atomic uint32_t data_seq;
    char _p5[64 - 4];
    _Atomic uint32_t space_seq;
    char _p6[64 - 4];
    _Atomic uint32_t join_seq;
    _Atomic uint64_t wstream, rstream; /* {pid << 32 | tid} of the stream owners */
    char _p7[64 - 24 + 4];
    /* Pipe ends: per side, SLOTS words of {pid << 32 | handle count}, a count
     * of forks in flight and a closed-for-good flag. */
    _Atomic uint64_t slots[2][SLOTS];
    _Atomic uint32_t pending[2], closed[2];
} hdr_t;

_Static_assert(sizeof(hdr_t) <= HDR_SIZE, "ring header too large");
_Static_assert(offsetof(hdr_t, tail) % 64 == 0, "tail not on its own line");
_Static_assert(offsetof(hdr_t, rclaim) % 64 == 0, "rclaim not on its own line");
_Static_assert(offsetof(hdr_t, head) % 64 == 0, "head not on its own line");

/* The calling process's pid, refreshed in fork children: getpid() is a real
 * system call and sits on every put. */
static _Atomic uint32_t my_pid;
/* The calling thread's id, likewise cached (gettid() is a system call too;
 * 0: not looked up yet in this thread). */
static _Thread_local uint32_t my_tid;
static void refresh_pid(void)
{
    atomic_store_explicit(&my_pid, (uint32_t)getpid(), memory_order_relaxed);
    my_tid = 0; /* the fork child's only thread has a new id */
}
static inline uint32_t me(void) { return atomic_load_explicit(&my_pid, memory_order_relaxed); }
static inline uint64_t my_token(void)
{
    if (my_tid == 0)
        my_tid = (uint32_t)gettid();
    return ((uint64_t)me() << 32) | my_tid;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Test hook: the point at which this process kills itself with SIGKILL (0:
 * none), so a test can stand for a kill -9 landing at that exact instruction
 * without racing a real one. One relaxed load per use. */
enum { DIE_NEVER = 0, DIE_CLAIMED, DIE_ADMITTED, DIE_RESERVED };
static _Atomic int die_at;
static inline void die_here(int point)
{
    if (__builtin_expect(atomic_load_explicit(&die_at, memory_order_relaxed) == point, 0))
        raise(SIGKILL);
}

/* Whether pid is alive; a zombie (killed, not yet reaped) counts as dead. */
static int pid_alive(uint32_t pid)
{
    if (pid == 0)
        return 0;
    if (pid == me())
        return 1;
    if (kill((pid_t)pid, 0) != 0 && errno == ESRCH)
        return 0;
    char path[48], buf[256];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno != ENOENT;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 1;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    return !(p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X'));
}

/* ------------------------------------------------------------------ */
/* The Python handle                                                    */

typedef struct {
    PyObject_HEAD
    Py_buffer view;   /* keeps the shared mapping exported while we live */
    hdr_t *h;
    uint8_t *data;
    uint64_t cap, mask, secret;
    uint32_t spin_ns; /* adaptive spin budget before sleeping */
    uint32_t sends;   /* pipe sends since the last liveness check */
    uint32_t waits;   /* blocking waits, to probe the spin budget now and then */
    PyObject *dumps, *loads, *empty_exc, *full_exc;
} Ring;

static inline uint64_t stamp(Ring *r, uint64_t pos) { return (pos + 1) ^ r->secret; }
static inline rec_t *rec_at(Ring *r, uint64_t pos) { return (rec_t *)(r->data + (pos & r->mask)); }
static inline uint32_t rec_size(uint32_t len) { return REC_HDR + ((len + 15u) & ~15u); }

static void ring_write(Ring *r, uint64_t pos, const void *src, size_t n)
{
    size_t off = pos & r->mask, first = r->cap - off;
    if (first >= n) {
        memcpy(r->data + off, src, n);
    } else {
        memcpy(r->data + off, src, first);
        memcpy(r->data, (const char *)src + first, n - first);
    }
}

static void ring_read(Ring *r, uint64_t pos, void *dst, size_t n)
{
    size_t off = pos & r->mask, first = r->cap - off;
    if (first >= n) {
        memcpy(dst, r->data + off, n);
    } else {
        memcpy(dst, r->data + off, first);
        memcpy((char *)dst + first, r->data, n - first);
    }
}

/* 128-bit {pos, hi} words (tail, rclaim): two acquire halves, re-read until
 * pos is stable. For tail, every CAS that keeps pos only hands the same
 * reservation to a new owner, so a torn read only makes the following CAS
 * fail; rclaim's pos grows with every CAS, so its pairs are never torn. */
static inline void pair_load(uint64_t *w, uint64_t *lo, uint64_t *hi)
{
    for (;;) {
        *lo = __atomic_load_n(&w[0], __ATOMIC_ACQUIRE);
        *hi = __atomic_load_n(&w[1], __ATOMIC_ACQUIRE);
        if (__atomic_load_n(&w[0], __ATOMIC_ACQUIRE) == *lo)
            return;
    }
}

static inline int pair_cas(uint64_t *w, uint64_t lo, uint64_t hi, uint64_t nlo, uint64_t nhi)
{
    unsigned __int128 expect = ((unsigned __int128)hi << 64) | lo;
    unsigned __int128 want = ((unsigned __int128)nhi << 64) | nlo;
    /* Full barrier (lock cmpxchg16b): for tail, it orders the space check
     * before it and the header stores after it. */
    return __sync_bool_compare_and_swap((unsigned __int128 *)w, expect, want);
}

static inline void tail_load(Ring *r, uint64_t *lo, uint64_t *hi) { pair_load(r->h->tail, lo, hi); }

static inline int tail_cas(Ring *r, uint64_t lo, uint64_t hi, uint64_t nlo, uint64_t nhi)
{
    return pair_cas(r->h->tail, lo, hi, nlo, nhi);
}

static inline uint64_t rclaim_pos(Ring *r) { return __atomic_load_n(&r->h->rclaim[0], __ATOMIC_ACQUIRE); }

static inline int is_start(unsigned frag) { return frag == F_WHOLE || frag == F_FIRST; }

/* Count in the newest reservation {lo, hi} (a tail snapshot) if cin has not
 * passed it yet, and return `in` as of tail position lo, or -1 if tail has
 * moved past lo since the snapshot. Every reserving tail CAS expects cin.pos
 * == its old pos (try_reserve), so cin.pos is lo or lo - HI_SIZE(hi) while
 * tail is at lo, and HI_FRAG(hi) is that record's role: no record is read,
 * so it does not matter whether its producer lived to stamp it. cin's pos
 * grows with every CAS, so its pairs are never torn (pair_load). */
static int64_t count_in(Ring *r, uint64_t lo, uint64_t hi)
{
    for (;;) {
        uint64_t pos, in;
        pair_load(r->h->cin, &pos, &in);
        if (pos == lo)
            return (int64_t)in;
        if (pos != lo - HI_SIZE(hi))
            return -1; /* cin (hence tail) moved past lo */
        uint64_t add = is_start(HI_FRAG(hi));
        if (pair_cas(r->h->cin, pos, in, lo, in + add))
            return (int64_t)(in + add);
    }
}

/* The messages reserved so far, counting in the newest reservation. */
static int64_t settle_in(Ring *r)
{
    for (;;) {
        uint64_t lo, hi;
        tail_load(r, &lo, &hi);
        int64_t in = count_in(r, lo, hi);
        if (in >= 0)
            return in;
    }
}

/* Messages in the ring: `out` first, then `in` up to a later tail, which is
 * past every record rclaim had passed, so the difference is never negative. */
static inline int64_t ring_depth(Ring *r)
{
    uint64_t out = __atomic_load_n(&r->h->rclaim[1], __ATOMIC_ACQUIRE);
    return settle_in(r) - (int64_t)out;
}

/* Move rclaim from pos past the record there, whose info was read while
 * rclaim was at pos (so the record could not be reused meanwhile), and count
 * its message out if the record starts one: in the same CAS, so a process
 * killed at any point has either done both or neither. */
static void push_rclaim(Ring *r, uint64_t pos, uint32_t info)
{
    uint64_t next = pos + rec_size(INFO_LEN(info)), add = is_start(INFO_FRAG(info));
    for (;;) {
        uint64_t lo, out;
        pair_load(r->h->rclaim, &lo, &out);
        if (lo != pos || pair_cas(r->h->rclaim, lo, out, next, out + add))
            return; /* someone else moved it past, or we did */
    }
}

/* Push rclaim past the records at it that are taken already (claimed, done,
 * abandoned), counting them out: a consumer killed right after its claim
 * leaves its message counted in until someone does. No system call. */
static void settle_rclaim(Ring *r)
{
    for (;;) {
        uint64_t pos = rclaim_pos(r), lo, hi;
        tail_load(r, &lo, &hi);
        rec_t *rec = rec_at(r, pos);
        if (pos == lo || atomic_load_explicit(&rec->seq, memory_order_acquire) != stamp(r, pos))
            return;
        uint32_t st = atomic_load_explicit(&rec->state, memory_order_acquire);
        if (ST_CODE(st) == S_WRITING || ST_CODE(st) == S_READY)
            return;
        push_rclaim(r, pos, atomic_load_explicit(&rec->info, memory_order_relaxed));
    }
}

/* Wake everyone sleeping on seq if its sleeper bit is set. The fence pairs
 * with the one in sleep_on(): either the sleeper's re-check sees what we
 * published, or we see its bit. */
static inline void wake_if_waiting(_Atomic uint32_t *seq)
{
    atomic_thread_fence(memory_order_seq_cst);
    uint32_t s = atomic_load_explicit(seq, memory_order_relaxed);
    while (s & 1u) {
        if (atomic_compare_exchange_weak_explicit(seq, &s, s + 1, memory_order_release, memory_order_relaxed)) {
            fx_wake(seq, INT32_MAX);
            return;
        }
    }
}

/* Announce a sleeper on seq; return the value to FUTEX_WAIT on. The caller
 * re-checks its condition after this and before waiting. */
static inline uint32_t announce_sleeper(_Atomic uint32_t *seq)
{
    uint32_t s = atomic_fetch_or_explicit(seq, 1u, memory_order_seq_cst) | 1u;
    atomic_thread_fence(memory_order_seq_cst);
    return s;
}

static inline void wake_data(Ring *r) { wake_if_waiting(&r->h->data_seq); }
static inline void wake_space(Ring *r) { wake_if_waiting(&r->h->space_seq); }

/* ------------------------------------------------------------------ */
/* Reservation (producers)                                              */

enum { RC_OK = 0, RC_SPACE, RC_FULL, RC_STREAM, RC_PREV, RC_EMPTY, RC_BUSY, RC_EOF };

/* A JoinableQueue message lost with a killed process: nobody will call
 * task_done for it, so count it finished now. */
static void lose_task(Ring *r)
{
    if (!r->h->joinable)
        return;
    atomic_fetch_add_explicit(&r->h->finished, 1, memory_order_relaxed);
    wake_if_waiting(&r->h->join_seq);
}

/* Stamp the newest reservation {lo, hi} as ABANDONED on behalf of its dead
 * owner: take it over with a tail CAS first so exactly one process writes. */
static void rescue_newest(Ring *r, uint64_t lo, uint64_t hi)
{
    uint32_t size = HI_SIZE(hi);
    /* A stream flag is the dead owner's (only the streamer reserves while it
     * is set): drop it, or it would name us, alive, and block producers. */
    if (!tail_cas(r, lo, hi, lo, TAIL_HI(me(), 0, HI_FRAG(hi), size)))
        return;
    uint64_t pos = lo - size;
    rec_t *rec = rec_at(r, pos);
    atomic_store_explicit(&rec->info, INFO(size - REC_HDR, K_PICKLE, HI_FRAG(hi)), memory_order_relaxed);
    atomic_store_explicit(&rec->state, STATE(me(), S_ABANDONED), memory_order_relaxed);
    atomic_store_explicit(&rec->seq, stamp(r, pos), memory_order_release);
    atomic_fetch_add_explicit(&r->h->abandoned, 1, memory_order_relaxed);
    /* the dead producer's message was counted in by its tail CAS; it is
     * counted out when rclaim passes it */
    if (is_start(HI_FRAG(hi)))
        lose_task(r);
    wake_data(r);
}

/* If the newest reservation is unstamped: RC_PREV while its owner lives (it
 * is a few instructions from stamping), else rescue it. Without `live` the
 * owner is assumed alive (no system call: the common, fast case). */
static int check_newest(Ring *r, uint64_t lo, uint64_t hi, int live)
{
    uint32_t size = HI_SIZE(hi);
    if (size == 0)
        return RC_OK;
    uint64_t pos = lo - size;
    if (atomic_load_explicit(&rec_at(r, pos)->seq, memory_order_acquire) == stamp(r, pos))
        return RC_OK;
    if (!live || pid_alive(HI_PID(hi)))
        return RC_PREV;
    rescue_newest(r, lo, hi);
    return RC_PREV; /* re-read the tail */
}

/* A stream flag left in tail by a dead streamer: release wstream and clear
 * the flag so ordinary producers can go on. */
static void break_dead_stream(Ring *r, uint64_t lo, uint64_t hi)
{
    uint64_t owner = atomic_load_explicit(&r->h->wstream, memory_order_acquire);
    if (owner && pid_alive((uint32_t)(owner >> 32)))
        return;
    if (owner)
        atomic_compare_exchange_strong(&r->h->wstream, &owner, 0);
    if (!pid_alive(HI_PID(hi)))
        tail_cas(r, lo, hi, lo, hi & ~(1ULL << 31));
}

/* Stamp a record we just reserved: it now names us as its writer. */
static inline void stamp_writing(Ring *r, uint64_t pos, uint32_t info)
{
    rec_t *rec = rec_at(r, pos);
    atomic_store_explicit(&rec->info, info, memory_order_relaxed);
    atomic_store_explicit(&rec->state, STATE(me(), S_WRITING), memory_order_relaxed);
    atomic_store_explicit(&rec->seq, stamp(r, pos), memory_order_release);
}

/* Whether a new message would exceed maxsize, given `in` as of the tail
 * position its CAS will expect. `out` only grows, so a stale one errs on the
 * side of full; a dead consumer's claim may not be counted out yet, hence
 * one settle before saying so. */
static int at_maxsize(Ring *r, int64_t in)
{
    for (int settled = 0;; settled = 1) {
        int64_t out = (int64_t)__atomic_load_n(&r->h->rclaim[1], __ATOMIC_ACQUIRE);
        if (in - out < r->h->maxsize)
            return 0;
        if (settled)
            return 1;
        settle_rclaim(r);
    }
}

/* Try to reserve a record for a payload described by `info` and stamp it.
 * stream_owner: the caller holds wstream; stream_flag: the stream stays open
 * after this fragment; need: free bytes required (at least the record's;
 * more to make room for a whole stream at once). A record that starts a
 * message is admitted against maxsize, and counted in, by the tail CAS
 * itself (see "counting"). Stamping right after the CAS, in the same call,
 * keeps the unstamped window a few instructions long (never across a GIL
 * wait). */
static int try_reserve(Ring *r, uint32_t info, int stream_owner, int stream_flag, uint64_t need, uint64_t *pos)
{
    uint32_t size = rec_size(INFO_LEN(info));
    if (need < size)
        need = size;
    for (unsigned spins = 0;; spins++) {
        uint64_t lo, hi;
        tail_load(r, &lo, &hi);
        if (check_newest(r, lo, hi, spins >= 1000) == RC_PREV) {
            if (spins >= 1000)
                return RC_PREV; /* owner preempted: let the caller wait */
            cpu_relax();
            continue;
        }
        if (HI_STREAM(hi) && !stream_owner)
            return RC_STREAM;
        /* cin must reach lo before tail may leave it; `in` is then exact for
         * as long as tail stays at {lo, hi}, which our CAS checks */
        int64_t in = count_in(r, lo, hi);
        if (in < 0)
            continue;
        if (r->h->maxsize > 0 && is_start(INFO_FRAG(info)) && at_maxsize(r, in))
            return RC_FULL;
        uint64_t head = atomic_load_explicit(&r->h->head, memory_order_acquire);
        if (lo + need - head > r->cap)
            return RC_SPACE;
        die_here(DIE_ADMITTED);
        /* Full barrier: the loads of cin, out and head above happen before
         * it, and the header stores in stamp_writing after it. */
        if (tail_cas(r, lo, hi, lo + size, TAIL_HI(me(), stream_flag, INFO_FRAG(info), size))) {
            die_here(DIE_RESERVED);
            stamp_writing(r, lo, info);
            *pos = lo;
            return RC_OK;
        }
    }
}

/* ------------------------------------------------------------------ */
/* Claiming and releasing (consumers)                                   */

/* The exact number of messages in the ring, for qsize. */
static int64_t settled_depth(Ring *r)
{
    int64_t c = ring_depth(r);
    if (c > 0) {
        settle_rclaim(r);
        c = ring_depth(r);
    }
    return c < 0 ? 0 : c;
}

/* Abandon a record held by a dead process if `state` is still current. */
static int abandon(Ring *r, rec_t *rec, uint32_t state, uint32_t info)
{
    if (!atomic_compare_exchange_strong(&rec->state, &state, STATE(me(), S_ABANDONED)))
        return 0;
    atomic_fetch_add_explicit(&r->h->abandoned, 1, memory_order_relaxed);
    if (is_start(INFO_FRAG(info)))
        lose_task(r);
    return 1;
}

/* Push head over finished records; `reap` also abandons records claimed by
 * dead consumers (a syscall, so only on the slow path). */
static void advance_head(Ring *r, int reap)
{
    int moved = 0;
    for (;;) {
        uint64_t head = atomic_load_explicit(&r->h->head, memory_order_acquire);
        if (head == rclaim_pos(r))
            break;
        rec_t *rec = rec_at(r, head);
        if (atomic_load_explicit(&rec->seq, memory_order_acquire) != stamp(r, head))
            break; /* head moved under us */
        uint32_t st = atomic_load_explicit(&rec->state, memory_order_acquire);
        uint32_t info = atomic_load_explicit(&rec->info, memory_order_relaxed);
        if (ST_CODE(st) == S_CLAIMED && reap && !pid_alive(ST_PID(st))) {
            abandon(r, rec, st, info);
            continue;
        }
        if (ST_CODE(st) != S_DONE && ST_CODE(st) != S_ABANDONED)
            break;
        /* Everything in this record has been read (acquire above), so the
         * space may be handed to producers: release. */
        if (atomic_compare_exchange_strong_explicit(&r->h->head, &head, head + rec_size(INFO_LEN(info)),
                                                    memory_order_release, memory_order_relaxed))
            moved = 1;
    }
    if (moved)
        wake_space(r);
}

typedef struct {
    uint64_t pos;
    uint32_t info, writer;
    rec_t *rec;
} claim_t;

/* Whether the stream whose FIRST was written by `writer` can still go on. */
static int stream_alive(Ring *r, uint32_t writer)
{
    uint64_t w = atomic_load_explicit(&r->h->wstream, memory_order_acquire);
    return (uint32_t)(w >> 32) == writer && pid_alive(writer);
}

/* Try to claim the record at rclaim. in_stream: the caller owns rstream and
 * wants the next fragment of its message. live: check whether the process
 * holding us up is alive (system calls); otherwise assume it is. */
static int try_claim(Ring *r, int in_stream, int live, claim_t *c)
{
    for (;;) {
        uint64_t pos = rclaim_pos(r);
        uint64_t lo, hi;
        tail_load(r, &lo, &hi);
        if (pos == lo)
            return RC_EMPTY;
        rec_t *rec = rec_at(r, pos);
        if (atomic_load_explicit(&rec->seq, memory_order_acquire) != stamp(r, pos)) {
            /* only the newest reservation can be unstamped */
            if (!live)
                return RC_BUSY;
            if (check_newest(r, lo, hi, 1) == RC_PREV && pos == lo - HI_SIZE(hi) &&
                pid_alive(HI_PID(hi)))
                return RC_BUSY;
            continue;
        }
        uint32_t st = atomic_load_explicit(&rec->state, memory_order_acquire);
        uint32_t info = atomic_load_explicit(&rec->info, memory_order_relaxed);
        switch (ST_CODE(st)) {
        case S_WRITING:
            if (!live || pid_alive(ST_PID(st)))
                return RC_BUSY;
            abandon(r, rec, st, info);
            continue;
        case S_READY:
            break;
        default: /* claimed, done or abandoned: help rclaim past it */
            push_rclaim(r, pos, info);
            continue;
        }
        unsigned frag = INFO_FRAG(info);
        uint64_t mine = my_token(), rs = atomic_load_explicit(&r->h->rstream, memory_order_acquire);
        if (frag == F_MID || frag == F_LAST) {
            if (!in_stream || rs != mine) {
                if (rs && rs != mine && (!live || pid_alive((uint32_t)(rs >> 32))))
                    return RC_BUSY; /* another consumer's stream */
                /* an orphan fragment: its reader died (or never was) */
                if (abandon(r, rec, st, info))
                    push_rclaim(r, pos, info);
                continue;
            }
        } else if (in_stream) {
            return RC_EOF; /* a new message where our next fragment should be */
        } else if (frag == F_FIRST) {
            if (rs && rs != mine && (!live || pid_alive((uint32_t)(rs >> 32))))
                return RC_BUSY;
            if (!atomic_compare_exchange_strong(&r->h->rstream, &rs, mine))
                continue;
        }
        if (!atomic_compare_exchange_strong_explicit(&rec->state, &st, STATE(me(), S_CLAIMED),
                                                     memory_order_acquire, memory_order_relaxed)) {
            if (frag == F_FIRST) {
                uint64_t expect = mine;
                atomic_compare_exchange_strong(&r->h->rstream, &expect, rs);
            }
            continue;
        }
        die_here(DIE_CLAIMED);
        /* The claim may, after a whole lap, have hit a newer record at the
         * same place: read position and info again from what we now own. */
        c->pos = (atomic_load_explicit(&rec->seq, memory_order_acquire) ^ r->secret) - 1;
        c->info = atomic_load_explicit(&rec->info, memory_order_relaxed);
        c->rec = rec;
        c->writer = ST_PID(st);
        /* A kill from here on loses this message; pushing rclaim counts it
         * out, and anyone at rclaim does that for us if we die first. */
        push_rclaim(r, c->pos, c->info);
        if (is_start(frag))
            atomic_fetch_add_explicit(&r->h->gets, 1, memory_order_relaxed);
        return RC_OK;
    }
}

static void release(Ring *r, claim_t *c)
{
    atomic_store_explicit(&c->rec->state, STATE(me(), S_DONE), memory_order_release);
    advance_head(r, 0);
}

/* ------------------------------------------------------------------ */
/* Waiting                                                              */

#define SPIN_MIN_NS 2000u
#define SPIN_MAX_NS 100000u
#define SLICE_S 0.05 /* liveness re-check period while blocked on a live peer */

/* slow: set once spinning is over, so checks that cost system calls
 * (is the process holding us up alive?) run on every attempt */
typedef int (*attempt_fn)(Ring *r, void *arg, int slow);

/* Call attempt until it returns something other than `again` codes, with
 * GIL released: spin adaptively, then sleep on seq. Returns the last code,
 * or RC_FULL/RC_EMPTY style "again" code on timeout, or -1 on a signal
 * (Python error set, GIL held). `again` is a bitmask of codes to retry. */
static int wait_for(Ring *r, attempt_fn attempt, void *arg, unsigned again, _Atomic uint32_t *seq,
                    double timeout, double slice)
{
    double deadline = timeout < 0 ? -1 : fx_now() + timeout;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    /* spin: the budget adapts (growing on success, halving on failure,
     * down to no spin at all); every 16th wait probes with the full budget
     * so a machine that got less busy is noticed */
    uint32_t budget = (++r->waits & 15) == 0 ? SPIN_MAX_NS : r->spin_ns;
    double spin_start = fx_now(), spin_end = spin_start + budget * 1e-9;
    unsigned i = 0;
    for (;;) {
        rc = attempt(r, arg, 0);
        if (!((1u << rc) & again) || budget == 0)
            break;
        if ((++i & 1) == 0) {
            if (fx_now() >= spin_end)
                break;
            /* On a busy machine the peer may share our CPU, and spinning
             * only delays it: so every other attempt hand the CPU over (a
             * cheap system call when nobody else wants it). A same-CPU
             * ping-pong measured ~50 us yielding after 1000 attempts, ~4 us
             * every 32, ~2.7 us every 2 (os.pipe there: ~3.6 us); on two
             * CPUs it stays ~1.3 us. */
            sched_yield();
        }
        cpu_relax();
    }
    if (!((1u << rc) & again)) {
        /* Spinning paid off: double the budget, and make it at least twice
         * what this wait took, so a budget that collapsed to nothing grows
         * back at the first probe that shows a wait of a few microseconds
         * (doubling from the minimum would never reach a longer one). */
        double want = 2.0 * r->spin_ns, took = 2e9 * (fx_now() - spin_start);
        want = want > took ? want : took;
        r->spin_ns = want < SPIN_MIN_NS ? SPIN_MIN_NS : (want > SPIN_MAX_NS ? SPIN_MAX_NS : (uint32_t)want);
    } else {
        r->spin_ns = r->spin_ns > SPIN_MIN_NS ? r->spin_ns / 2 : 0;
    }
    /* sleep */
    while ((1u << rc) & again) {
        double left = -1;
        if (deadline >= 0) {
            left = deadline - fx_now();
            if (left <= 0)
                break;
        }
        /* blocked on a live process (not on emptiness): re-check it in slices */
        double sl = (rc == RC_BUSY || rc == RC_SPACE || rc == RC_STREAM || rc == RC_PREV) ? SLICE_S : slice;
        if (sl > 0 && (left < 0 || left > sl))
            left = sl;
        uint32_t s = announce_sleeper(seq);
        rc = attempt(r, arg, 1);
        if ((1u << rc) & again) {
            int w = fx_wait(seq, s, left);
            if (w == -EINTR) {
                Py_BLOCK_THREADS
                int sig = PyErr_CheckSignals();
                Py_UNBLOCK_THREADS
                if (sig < 0) {
                    rc = -1;
                    break;
                }
                continue;
            }
            rc = attempt(r, arg, 1);
        }
    }
    Py_END_ALLOW_THREADS
    return rc;
}

/* ------------------------------------------------------------------ */
/* Putting a message                                                    */

typedef struct {
    const uint8_t *ptr;
    size_t len;
} seg_t;

/* A cursor over the pieces of one message's payload. */
typedef struct {
    seg_t *segs;
    int n, i;
    size_t off;
} cursor_t;

static void copy_from(Ring *r, uint64_t pos, cursor_t *cur, size_t n)
{
    while (n) {
        seg_t *s = &cur->segs[cur->i];
        size_t take = s->len - cur->off < n ? s->len - cur->off : n;
        ring_write(r, pos, s->ptr + cur->off, take);
        pos += take;
        n -= take;
        cur->off += take;
        if (cur->off == s->len) {
            cur->i++;
            cur->off = 0;
        }
    }
}

typedef struct {
    uint32_t info;
    int stream_owner, stream_flag;
    unsigned tries;
    uint64_t need, pos;
} put_arg;

static int attempt_put(Ring *r, void *a, int slow)
{
    put_arg *p = a;
    int rc = try_reserve(r, p->info, p->stream_owner, p->stream_flag, p->need, &p->pos);
    if (rc == RC_OK || rc == RC_FULL)
        return rc;
    /* the slow checks (system calls) only every so often */
    if ((++p->tries & 63) == 0 || slow) {
        if (rc == RC_SPACE)
            advance_head(r, 1);
        else if (rc == RC_STREAM) {
            uint64_t lo, hi;
            tail_load(r, &lo, &hi);
            break_dead_stream(r, lo, hi);
        }
    }
    return rc;
}

#define AGAIN_PUT ((1u << RC_SPACE) | (1u << RC_FULL) | (1u << RC_STREAM) | (1u << RC_PREV))
#define AGAIN_GET ((1u << RC_EMPTY) | (1u << RC_BUSY))

/* Reserve one record (waiting as allowed); RC_OK with p->pos set, else the
 * blocking code (timeout) or -1 (Python error). */
static int reserve(Ring *r, put_arg *p, double timeout)
{
    int rc = attempt_put(r, p, 0);
    if (rc == RC_OK || timeout == 0)
        return rc;
    return wait_for(r, attempt_put, p, AGAIN_PUT, &r->h->space_seq, timeout, -1);
}

static void publish(Ring *r, uint64_t pos, uint32_t info, cursor_t *cur, int nogil)
{
    rec_t *rec = rec_at(r, pos);
    if (nogil) {
        Py_BEGIN_ALLOW_THREADS
        copy_from(r, pos + REC_HDR, cur, INFO_LEN(info));
        Py_END_ALLOW_THREADS
    } else {
        copy_from(r, pos + REC_HDR, cur, INFO_LEN(info));
    }
    /* the payload must be visible before READY: release */
    atomic_store_explicit(&rec->state, STATE(me(), S_READY), memory_order_release);
    wake_data(r);
}

#define NOGIL_COPY (1u << 16)

static int acquire_wstream(Ring *r, void *a, int slow)
{
    (void)a;
    (void)slow;
    uint64_t mine = my_token(), cur = 0;
    if (atomic_compare_exchange_strong(&r->h->wstream, &cur, mine))
        return RC_OK;
    if (!pid_alive((uint32_t)(cur >> 32)) && atomic_compare_exchange_strong(&r->h->wstream, &cur, mine))
        return RC_OK;
    return RC_STREAM;
}

/* End our stream early (error or timeout): clear the flag if the newest
 * reservation is still ours, then release wstream. */
static void abort_stream(Ring *r)
{
    uint64_t lo, hi;
    tail_load(r, &lo, &hi);
    if (HI_STREAM(hi) && HI_PID(hi) == me())
        tail_cas(r, lo, hi, lo, hi & ~(1ULL << 31));
    atomic_store_explicit(&r->h->wstream, 0, memory_order_release);
    wake_space(r);
    wake_data(r);
}

/* Write a message made of segments (total `len` bytes). Returns RC_OK, a
 * blocking code on timeout, or -1 with a Python error set. */
static int put_message(Ring *r, seg_t *segs, int nseg, size_t len, unsigned kind, double timeout)
{
    cursor_t cur = {segs, nseg, 0, 0};
    int nogil = len >= NOGIL_COPY;
    if (len <= r->h->max_frag) {
        put_arg p = {INFO(len, kind, F_WHOLE), 0, 0, 0, 0, 0};
        int rc = reserve(r, &p, timeout);
        if (rc != RC_OK)
            return rc;
        publish(r, p.pos, INFO(len, kind, F_WHOLE), &cur, nogil);
        atomic_fetch_add_explicit(&r->h->puts, 1, memory_order_relaxed);
        return RC_OK;
    }
    /* Streamed: FIRST carries the total length ahead of its data. A put
     * that may give up (block=False, a timeout) must never do so half way,
     * which would lose the message. If the whole stream fits the ring, its
     * FIRST waits for room for all of it (no other producer can reserve
     * while our stream flag is in tail, and room only grows), so the later
     * fragments never wait. If it does not fit, block=False fails at once
     * and a timeout bounds only the wait for the start. */
    size_t max_frag = r->h->max_frag, first = max_frag - 8, rest = len - first;
    uint64_t whole = rec_size((uint32_t)max_frag) * (uint64_t)(rest / max_frag);
    whole += rec_size((uint32_t)max_frag) + (rest % max_frag ? rec_size((uint32_t)(rest % max_frag)) : 0);
    if (timeout == 0 && whole > r->cap)
        return RC_FULL;
    double deadline = timeout < 0 ? -1 : fx_now() + timeout;
    int rc = acquire_wstream(r, NULL, 0);
    if (rc != RC_OK && timeout != 0)
        rc = wait_for(r, acquire_wstream, NULL, 1u << RC_STREAM, &r->h->space_seq,
                      timeout, SLICE_S);
    if (rc != RC_OK)
        return rc;
    uint64_t total = len;
    seg_t pre[1] = {{(const uint8_t *)&total, 8}};
    cursor_t head = {pre, 1, 0, 0};
    size_t left = len;
    unsigned frag = F_FIRST;
    while (left || frag == F_FIRST) {
        size_t extra = frag == F_FIRST ? 8 : 0;
        size_t chunk = max_frag - extra;
        if (chunk >= left)
            chunk = left;
        unsigned role = frag == F_FIRST ? F_FIRST : (chunk == left ? F_LAST : F_MID);
        put_arg p = {INFO(chunk + extra, kind, role), 1, role != F_LAST, 0,
                     role == F_FIRST && timeout >= 0 && whole <= r->cap ? whole : 0, 0};
        double t = deadline < 0 ? -1 : deadline - fx_now();
        rc = reserve(r, &p, t < 0 && deadline >= 0 ? 0 : t);
        if (rc != RC_OK) { /* nothing written yet, or a Python error */
            abort_stream(r);
            return rc;
        }
        deadline = -1; /* started: finish the message */
        rec_t *rec = rec_at(r, p.pos);
        Py_BEGIN_ALLOW_THREADS
        uint64_t at = p.pos + REC_HDR;
        if (extra) {
            copy_from(r, at, &head, extra);
            at += extra;
        }
        copy_from(r, at, &cur, chunk);
        Py_END_ALLOW_THREADS
        atomic_store_explicit(&rec->state, STATE(me(), S_READY), memory_order_release);
        wake_data(r);
        left -= chunk;
        frag = F_MID;
    }
    atomic_store_explicit(&r->h->wstream, 0, memory_order_release);
    wake_space(r);
    atomic_fetch_add_explicit(&r->h->puts, 1, memory_order_relaxed);
    return RC_OK;
}

/* ------------------------------------------------------------------ */
/* Getting a message                                                    */

typedef struct {
    int in_stream, check_peer, side;
    unsigned tries;
    claim_t c;
} get_arg;

static int peer_gone(Ring *r, int side, int thorough);

static int attempt_get(Ring *r, void *a, int slow)
{
    get_arg *g = a;
    int live = slow || (++g->tries & 63) == 0;
    int rc = try_claim(r, g->in_stream, live, &g->c);
    /* while spinning only the checks that cost no system call */
    if (rc == RC_EMPTY && g->check_peer && peer_gone(r, g->side, slow))
        rc = try_claim(r, g->in_stream, 1, &g->c) == RC_OK ? RC_OK : RC_EOF;
    return rc;
}

/* Claim the next record, waiting as allowed. */
#define BUSY_GRACE_S 1.0

static int claim(Ring *r, get_arg *g, double timeout)
{
    int rc = attempt_get(r, g, 0);
    unsigned again = AGAIN_GET;
    if (rc == RC_OK || rc == RC_EOF)
        return rc;
    if (timeout == 0) {
        if (rc == RC_EMPTY && g->check_peer && peer_gone(r, g->side, 1))
            return try_claim(r, g->in_stream, 1, &g->c) == RC_OK ? RC_OK : RC_EOF;
        if (rc != RC_BUSY)
            return rc;
        /* A live writer is mid-copy ahead of us: wait for it (briefly) even
         * when not blocking, so that a put that has returned is visible. */
        again = 1u << RC_BUSY;
        timeout = BUSY_GRACE_S;
    }
    rc = wait_for(r, attempt_get, g, again, &r->h->data_seq, timeout,
                  g->check_peer ? SLICE_S : -1);
    return rc == RC_BUSY ? RC_EMPTY : rc;
}

static inline const uint8_t *contiguous(Ring *r, uint64_t pos, size_t n)
{
    size_t off = pos & r->mask;
    return off + n <= r->cap ? r->data + off : NULL;
}

/* Read a claimed WHOLE record's payload into a new bytes (kind != OOB) or
 * bytearray (OOB), then release the record. */
static PyObject *take_payload(Ring *r, claim_t *c, int as_bytearray)
{
    size_t len = INFO_LEN(c->info);
    PyObject *out = as_bytearray ? PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)len)
                                 : PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len);
    if (out != NULL) {
        char *dst = as_bytearray ? PyByteArray_AS_STRING(out) : PyBytes_AS_STRING(out);
        if (len >= NOGIL_COPY) {
            Py_BEGIN_ALLOW_THREADS
            ring_read(r, c->pos + REC_HDR, dst, len);
            Py_END_ALLOW_THREADS
        } else {
            ring_read(r, c->pos + REC_HDR, dst, len);
        }
    }
    release(r, c);
    return out;
}

/* Collect a streamed message whose FIRST record is claimed. Returns a new
 * buffer object, or NULL with *broken set when the stream broke (the
 * partial message is dropped) or with a Python error set. */
static PyObject *take_stream(Ring *r, get_arg *g, int as_bytearray, double deadline, int *broken)
{
    uint64_t total;
    uint32_t first_writer = g->c.writer;
    size_t chunk = INFO_LEN(g->c.info) - 8;
    ring_read(r, g->c.pos + REC_HDR, &total, 8);
    PyObject *out = as_bytearray ? PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)total)
                                 : PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (out == NULL) {
        release(r, &g->c);
        atomic_store_explicit(&r->h->rstream, 0, memory_order_release);
        return NULL;
    }
    char *dst = as_bytearray ? PyByteArray_AS_STRING(out) : PyBytes_AS_STRING(out);
    size_t got = 0;
    uint64_t at = g->c.pos + REC_HDR + 8;
    for (;;) {
        if (chunk > total - got) { /* corrupt: never read past the buffer */
            release(r, &g->c);
            *broken = 1;
            break;
        }
        Py_BEGIN_ALLOW_THREADS
        ring_read(r, at, dst + got, chunk);
        Py_END_ALLOW_THREADS
        got += chunk;
        unsigned role = INFO_FRAG(g->c.info);
        release(r, &g->c);
        if (role == F_LAST) {
            if (got != total)
                *broken = 1;
            break;
        }
        g->in_stream = 1;
        int rc;
        for (;;) {
            double t = deadline < 0 ? -1 : deadline - fx_now();
            /* the sender is mid-message: keep waiting while it is alive */
            rc = claim(r, g, t < 0 ? SLICE_S : (t < SLICE_S ? t : SLICE_S));
            if (rc == -1)
                break;
            if (rc != RC_EMPTY)
                break;
            if (!stream_alive(r, first_writer)) {
                /* one last look: the final fragment may have landed */
                rc = claim(r, g, 0);
                if (rc != RC_OK)
                    rc = RC_EOF;
                break;
            }
            if (deadline >= 0 && fx_now() >= deadline) {
                /* a message is half here: finishing it beats losing it */
                deadline = -1;
            }
        }
        g->in_stream = 0;
        if (rc == -1) {
            atomic_store_explicit(&r->h->rstream, 0, memory_order_release);
            Py_DECREF(out);
            return NULL;
        }
        if (rc != RC_OK) {
            *broken = 1;
            break;
        }
        chunk = INFO_LEN(g->c.info);
        at = g->c.pos + REC_HDR;
    }
    atomic_store_explicit(&r->h->rstream, 0, memory_order_release);
    wake_data(r);
    if (*broken) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* ------------------------------------------------------------------ */
/* Pipe ends: who holds each side                                      */

/* Whether no process holds `side` any more. Without `thorough` only what
 * costs no system call (closed for good, or no holder registered); with it,
 * also whether the registered holders are alive. */
static int peer_gone(Ring *r, int side, int thorough)
{
    if (atomic_load_explicit(&r->h->closed[side], memory_order_acquire))
        return 1;
    if (atomic_load_explicit(&r->h->pending[side], memory_order_acquire))
        return 0;
    for (int i = 0; i < SLOTS; i++) {
        uint64_t w = atomic_load_explicit(&r->h->slots[side][i], memory_order_acquire);
        if (w && (!thorough || pid_alive((uint32_t)(w >> 32))))
            return 0;
    }
    return 1;
}

static int attach_side(Ring *r, int side)
{
    _Atomic uint64_t *slots = r->h->slots[side];
    uint64_t mine = (uint64_t)me() << 32;
    for (int i = 0; i < SLOTS; i++) {
        uint64_t w = atomic_load_explicit(&slots[i], memory_order_acquire);
        while ((w >> 32) == me()) {
            if (atomic_compare_exchange_weak(&slots[i], &w, w + 1))
                return 0;
        }
    }
    for (int i = 0; i < SLOTS; i++) {
        uint64_t w = atomic_load_explicit(&slots[i], memory_order_acquire);
        if ((w == 0 || !pid_alive((uint32_t)(w >> 32))) &&
            atomic_compare_exchange_strong(&slots[i], &w, mine | 1))
            return 0;
    }
    return -1;
}

static void detach_side(Ring *r, int side)
{
    _Atomic uint64_t *slots = r->h->slots[side];
    for (int i = 0; i < SLOTS; i++) {
        uint64_t w = atomic_load_explicit(&slots[i], memory_order_acquire);
        while ((w >> 32) == me()) {
            uint64_t n = (w & 0xffffffffu) <= 1 ? 0 : w - 1;
            if (atomic_compare_exchange_weak(&slots[i], &w, n)) {
                wake_if_waiting(&r->h->data_seq);
                wake_space(r);
                return;
            }
        }
    }
}

/* ------------------------------------------------------------------ */
/* Python methods                                                       */

static double parse_timeout(int block, PyObject *timeout, int *err)
{
    *err = 0;
    if (!block)
        return 0;
    if (timeout == NULL || timeout == Py_None)
        return -1;
    double t = PyFloat_AsDouble(timeout);
    if (t == -1 && PyErr_Occurred()) {
        *err = 1;
        return 0;
    }
    if (t < 0) {
        PyErr_SetString(PyExc_ValueError, "'timeout' must be a non-negative number");
        *err = 1;
        return 0;
    }
    return t;
}

static int Ring_init(Ring *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"buffer", "create", "maxsize", "joinable", NULL};
    PyObject *buf;
    int create = 0, joinable = 0;
    long long maxsize = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|pLp:Ring", kwlist, &buf, &create, &maxsize, &joinable))
        return -1;
    if (self->h != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Ring already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE) < 0)
        return -1;
    if (((uintptr_t)self->view.buf & 63) != 0 || self->view.len < HDR_SIZE + MIN_CAP) {
        PyErr_SetString(PyExc_ValueError, "ring buffer must be 64-byte aligned and hold at least 5 KiB");
        goto fail;
    }
    hdr_t *h = self->view.buf;
    if (create) {
        uint64_t cap = MIN_CAP;
        while (cap * 2 <= (uint64_t)(self->view.len - HDR_SIZE) && cap * 2 <= MAX_CAP)
            cap *= 2;
        uint64_t secret;
        if (getrandom(&secret, sizeof secret, 0) != sizeof secret)
            secret = (uint64_t)fx_now() * 0x9e3779b97f4a7c15ULL ^ (uint64_t)getpid();
        h->cap = cap;
        h->secret = secret;
        h->maxsize = maxsize;
        h->joinable = (uint32_t)joinable;
        /* a record's payload, 16-aligned, fits in a quarter of the ring, so
         * a streamed message keeps several fragments in flight */
        h->max_frag = (uint32_t)(cap / 4 - REC_HDR);
        /* the block is not shared yet; release anyway for the readers that
         * will check magic first */
        __atomic_store_n(&h->magic, RING_MAGIC, __ATOMIC_RELEASE);
    } else if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != RING_MAGIC) {
        PyErr_SetString(PyExc_ValueError, "buffer does not hold a fabric ring");
        goto fail;
    }
    self->h = h;
    self->data = (uint8_t *)self->view.buf + HDR_SIZE;
    self->cap = h->cap;
    self->mask = h->cap - 1;
    self->secret = h->secret;
    self->spin_ns = 20000;
    PyObject *pickle = PyImport_ImportModule("pickle");
    PyObject *queue = pickle ? PyImport_ImportModule("queue") : NULL;
    if (queue) {
        self->dumps = PyObject_GetAttrString(pickle, "dumps");
        self->loads = PyObject_GetAttrString(pickle, "loads");
        self->empty_exc = PyObject_GetAttrString(queue, "Empty");
        self->full_exc = PyObject_GetAttrString(queue, "Full");
    }
    Py_XDECREF(pickle);
    Py_XDECREF(queue);
    if (!self->dumps || !self->loads || !self->empty_exc || !self->full_exc)
        return -1; /* dealloc frees what was taken */
    return 0;
fail:
    PyBuffer_Release(&self->view);
    self->view.obj = NULL;
    return -1;
}

static void Ring_dealloc(Ring *self)
{
    if (self->view.obj)
        PyBuffer_Release(&self->view);
    Py_XDECREF(self->dumps);
    Py_XDECREF(self->loads);
    Py_XDECREF(self->empty_exc);
    Py_XDECREF(self->full_exc);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *put_result(Ring *self, int rc)
{
    if (rc == RC_OK)
        Py_RETURN_NONE;
    if (rc == -1)
        return NULL;
    PyErr_SetNone(self->full_exc);
    return NULL;
}

/* put_bytes(data, block=True, timeout=None): put a bytes-like as a raw message. */
static PyObject *Ring_put_bytes(Ring *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"data", "block", "timeout", NULL};
    Py_buffer b;
    int block = 1, err;
    PyObject *timeout = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*|pO:put_bytes", kwlist, &b, &block, &timeout))
        return NULL;
    double t = parse_timeout(block, timeout, &err);
    int rc = -1;
    if (!err) {
        seg_t seg = {b.buf, (size_t)b.len};
        rc = put_message(self, &seg, 1, (size_t)b.len, K_RAW, t);
    }
    PyBuffer_Release(&b);
    return put_result(self, rc);
}

/* Whether obj is a scalar of a builtin type, or (depth > 0) a short tuple
 * of them: such objects never yield out-of-band pickle buffers. */
static int plain(PyObject *obj, int depth)
{
    if (obj == Py_None || PyLong_CheckExact(obj) || PyFloat_CheckExact(obj) || PyUnicode_CheckExact(obj) ||
        PyBool_Check(obj) || PyBytes_CheckExact(obj))
        return 1;
    if (depth > 0 && PyTuple_CheckExact(obj) && PyTuple_GET_SIZE(obj) <= 16) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(obj); i++)
            if (!plain(PyTuple_GET_ITEM(obj, i), depth - 1))
                return 0;
        return 1;
    }
    return 0;
}

/* Unpack vectorcall arguments for the parameters `names` (the first
 * `required` of them mandatory) into out[] as borrowed references, NULL for
 * an absent one: put/get are called per message, so no tuple, no dict. */
static int unpack_args(const char *fn, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                       const char *const *names, int n, int required, PyObject **out)
{
    if (nargs > n) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", fn, n, nargs);
        return -1;
    }
    for (int i = 0; i < n; i++)
        out[i] = i < nargs ? args[i] : NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int i = 0;
        while (i < n && PyUnicode_CompareWithASCIIString(key, names[i]) != 0)
            i++;
        if (i == n) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", fn, key);
            return -1;
        }
        if (out[i] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fn, names[i]);
            return -1;
        }
        out[i] = args[nargs + k];
    }
    for (int i = 0; i < required; i++) {
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fn, names[i]);
            return -1;
        }
    }
    return 0;
}

/* block and timeout arguments (either may be NULL: absent) -> seconds to
 * wait (0: don't, < 0: forever); -1 with *err set on a bad argument. */
static double block_timeout(PyObject *block, PyObject *timeout, int *err)
{
    int b = block == NULL ? 1 : PyObject_IsTrue(block);
    if (b < 0) {
        *err = 1;
        return -1;
    }
    return parse_timeout(b, timeout, err);
}

#define CODEC_BUF 1024 /* encoded on the stack up to this size; bigger goes to pickle */

static PyObject *put_object(Ring *self, PyObject *obj, double t);

/* put(obj, block=True, timeout=None): put obj (see put_object). */
static PyObject *Ring_put(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"obj", "block", "timeout"};
    PyObject *a[3];
    int err;
    if (unpack_args("put", args, nargs, kwnames, names, 3, 1, a) < 0)
        return NULL;
    double t = block_timeout(a[1], a[2], &err);
    if (err)
        return NULL;
    return put_object(self, a[0], t);
}

/* Pickle obj (protocol 5, out-of-band buffers copied straight into the
 * ring) and put it; bytes go raw, small plain objects through the codec. */
static PyObject *put_object(Ring *self, PyObject *obj, double t)
{
    if (PyBytes_CheckExact(obj)) {
        seg_t seg = {(const uint8_t *)PyBytes_AS_STRING(obj), (size_t)PyBytes_GET_SIZE(obj)};
        return put_result(self, put_message(self, &seg, 1, seg.len, K_RAW, t));
    }
    char buf[CODEC_BUF];
    Py_ssize_t len = codec_encode(obj, buf, sizeof buf);
    if (len >= 0) {
        seg_t seg = {(const uint8_t *)buf, (size_t)len};
        return put_result(self, put_message(self, &seg, 1, seg.len, K_PICKLE, t));
    }
    if (plain(obj, 1)) {
        /* nothing here can produce an out-of-band buffer: skip the callback */
        PyObject *proto = PyLong_FromLong(5);
        PyObject *cargs[3] = {NULL, obj, proto};
        PyObject *data = proto ? PyObject_Vectorcall(self->dumps, cargs + 1, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL)
                               : NULL;
        Py_XDECREF(proto);
        if (data == NULL)
            return NULL;
        seg_t seg = {(const uint8_t *)PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data)};
        PyObject *result = put_result(self, put_message(self, &seg, 1, seg.len, K_PICKLE, t));
        Py_DECREF(data);
        return result;
    }
    PyObject *bufs = PyList_New(0);
    if (bufs == NULL)
        return NULL;
    PyObject *append = PyObject_GetAttrString(bufs, "append");
    PyObject *data = NULL, *result = NULL;
    if (append == NULL)
        goto done;
    {
        PyObject *proto = PyLong_FromLong(5);
        PyObject *kwnames = Py_BuildValue("(s)", "buffer_callback");
        if (proto && kwnames) {
            PyObject *cargs[4] = {NULL, obj, proto, append};
            data = PyObject_Vectorcall(self->dumps, cargs + 1, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, kwnames);
        }
        Py_XDECREF(proto);
        Py_XDECREF(kwnames);
    }
    if (data == NULL)
        goto done;
    Py_ssize_t n = PyList_GET_SIZE(bufs);
    if (n == 0) {
        seg_t seg = {(const uint8_t *)PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data)};
        result = put_result(self, put_message(self, &seg, 1, seg.len, K_PICKLE, t));
        goto done;
    }
    /* out-of-band: [u32 n][u32 0][u64 len]*n [pickle] [buffers...] */
    {
        Py_buffer *views = PyMem_Calloc((size_t)n, sizeof(Py_buffer));
        uint64_t *table = PyMem_Malloc(8 * (size_t)(n + 1));
        seg_t *segs = PyMem_Malloc(sizeof(seg_t) * (size_t)(n + 2));
        Py_ssize_t got = 0;
        if (!views || !table || !segs) {
            PyErr_NoMemory();
            goto oob_done;
        }
        size_t total = 8 * (size_t)(n + 1) + (size_t)PyBytes_GET_SIZE(data);
        for (; got < n; got++) {
            if (PyObject_GetBuffer(PyList_GET_ITEM(bufs, got), &views[got], PyBUF_C_CONTIGUOUS) < 0)
                goto oob_done;
            table[got + 1] = (uint64_t)views[got].len;
            segs[got + 2] = (seg_t){views[got].buf, (size_t)views[got].len};
            total += (size_t)views[got].len;
        }
        table[0] = (uint64_t)n;
        segs[0] = (seg_t){(const uint8_t *)table, 8 * (size_t)(n + 1)};
        segs[1] = (seg_t){(const uint8_t *)PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data)};
        result = put_result(self, put_message(self, segs, (int)n + 2, total, K_OOB, t));
    oob_done:
        for (Py_ssize_t i = 0; i < got; i++)
            PyBuffer_Release(&views[i]);
        PyMem_Free(views);
        PyMem_Free(table);
        PyMem_Free(segs);
    }
done:
    Py_XDECREF(data);
    Py_XDECREF(append);
    Py_DECREF(bufs);
    return result;
}

/* Turn a payload of the given kind into the message object. */
static PyObject *decode(Ring *self, unsigned kind, PyObject *payload)
{
    if (kind == K_RAW)
        return Py_NewRef(payload);
    if (kind == K_PICKLE) {
        PyObject *obj = codec_decode(PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload));
        if (obj != NULL || PyErr_Occurred())
            return obj;
        return PyObject_CallOneArg(self->loads, payload);
    }
    /* OOB: payload is a bytearray; buffers are writable views into it */
    char *p = PyByteArray_AS_STRING(payload);
    size_t len = (size_t)PyByteArray_GET_SIZE(payload);
    uint64_t n;
    if (len < 8 || (memcpy(&n, p, 8), n > (len - 8) / 8)) {
        PyErr_SetString(PyExc_ValueError, "corrupt out-of-band message");
        return NULL;
    }
    PyObject *mv = PyMemoryView_FromObject(payload), *bufs = PyList_New((Py_ssize_t)n), *result = NULL;
    PyObject *head = NULL;
    if (!mv || !bufs)
        goto out;
    size_t off = 8 * (size_t)(n + 1), sum = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t l;
        memcpy(&l, p + 8 * (i + 1), 8);
        sum += l;
    }
    if (sum > len - off) {
        PyErr_SetString(PyExc_ValueError, "corrupt out-of-band message");
        goto out;
    }
    size_t head_len = len - off - sum;
    head = PySequence_GetSlice(mv, (Py_ssize_t)off, (Py_ssize_t)(off + head_len));
    if (!head)
        goto out;
    off += head_len;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t l;
        memcpy(&l, p + 8 * (i + 1), 8);
        PyObject *s = PySequence_GetSlice(mv, (Py_ssize_t)off, (Py_ssize_t)(off + l));
        if (!s)
            goto out;
        PyList_SET_ITEM(bufs, (Py_ssize_t)i, s);
        off += l;
    }
    {
        PyObject *kwargs = Py_BuildValue("{sO}", "buffers", bufs);
        PyObject *cargs = kwargs ? PyTuple_Pack(1, head) : NULL;
        if (cargs)
            result = PyObject_Call(self->loads, cargs, kwargs);
        Py_XDECREF(cargs);
        Py_XDECREF(kwargs);
    }
out:
    Py_XDECREF(head);
    Py_XDECREF(bufs);
    Py_XDECREF(mv);
    return result;
}

enum { MODE_OBJ, MODE_BYTES };

/* Claim and read one message: the payload (and its kind) or NULL. */
static PyObject *get_payload(Ring *self, double timeout, int check_peer, int side, int mode, unsigned *kind)
{
    double deadline = timeout < 0 ? -1 : fx_now() + timeout;
    for (;;) {
        get_arg g = {0, check_peer, side, 0, {0}};
        double t = deadline < 0 ? -1 : (timeout == 0 ? 0 : deadline - fx_now());
        if (t < 0 && deadline >= 0)
            t = 0;
        int rc = claim(self, &g, t);
        if (rc == -1)
            return NULL;
        if (rc == RC_EOF) {
            PyErr_SetNone(PyExc_EOFError);
            return NULL;
        }
        if (rc != RC_OK) {
            PyErr_SetNone(self->empty_exc);
            return NULL;
        }
        *kind = INFO_KIND(g.c.info);
        int as_bytearray = mode == MODE_OBJ && *kind == K_OOB;
        if (INFO_FRAG(g.c.info) == F_WHOLE) {
            if (mode == MODE_OBJ && *kind == K_PICKLE) {
                /* unpickle straight from the ring when the record is contiguous */
                size_t len = INFO_LEN(g.c.info);
                const uint8_t *p = contiguous(self, g.c.pos + REC_HDR, len);
                if (p != NULL) {
                    PyObject *obj = codec_decode((const char *)p, (Py_ssize_t)len);
                    if (obj == NULL && !PyErr_Occurred()) {
                        PyObject *mv = PyMemoryView_FromMemory((char *)p, (Py_ssize_t)len, PyBUF_READ);
                        obj = mv ? PyObject_CallOneArg(self->loads, mv) : NULL;
                        Py_XDECREF(mv);
                    }
                    release(self, &g.c);
                    *kind = K_RAW; /* already decoded */
                    return obj;
                }
            }
            return take_payload(self, &g.c, as_bytearray);
        }
        int broken = 0;
        PyObject *out = take_stream(self, &g, as_bytearray, deadline, &broken);
        if (out != NULL || !broken)
            return out;
        /* the sender or an earlier reader died mid-message: that message is
         * lost, and nobody will call task_done for it */
        lose_task(self);
    }
}

static PyObject *Ring_get(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"block", "timeout"};
    PyObject *a[2];
    int err;
    if (unpack_args("get", args, nargs, kwnames, names, 2, 0, a) < 0)
        return NULL;
    double t = block_timeout(a[0], a[1], &err);
    if (err)
        return NULL;
    unsigned kind;
    PyObject *payload = get_payload(self, t, 0, 0, MODE_OBJ, &kind);
    if (payload == NULL || kind == K_RAW)
        return payload;
    PyObject *obj = decode(self, kind, payload);
    Py_DECREF(payload);
    return obj;
}

/* Pipe receive: recv(timeout=None, side) -> object; EOFError when the
 * writers of this ring are gone and it is empty. */
static PyObject *Ring_recv(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"timeout", "side", "bytes_only"};
    PyObject *a[3];
    int err, side = 1, bytes_only = 0;
    if (unpack_args("recv", args, nargs, kwnames, names, 3, 0, a) < 0)
        return NULL;
    double t = parse_timeout(1, a[0], &err);
    if (err || (a[1] && (side = PyLong_AsLong(a[1])) == -1 && PyErr_Occurred()) ||
        (a[2] && (bytes_only = PyObject_IsTrue(a[2])) < 0))
        return NULL;
    unsigned kind;
    PyObject *payload = get_payload(self, t, 1, side & 1, bytes_only ? MODE_BYTES : MODE_OBJ, &kind);
    if (payload == NULL && PyErr_ExceptionMatches(self->empty_exc)) {
        PyErr_Format(PyExc_TimeoutError, "nothing received within %R s", a[0] ? a[0] : Py_None);
        return NULL;
    }
    if (payload == NULL || kind == K_RAW || bytes_only)
        return payload;
    PyObject *obj = decode(self, kind, payload);
    Py_DECREF(payload);
    return obj;
}

/* recv_bytes(maxlength=None): the pipe's receive of the next message as
 * bytes, as Connection.recv_bytes (bound to it while nothing else is due). */
static PyObject *Ring_recv_bytes(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"maxlength"};
    PyObject *a[1];
    Py_ssize_t maxlength = -1;
    if (unpack_args("recv_bytes", args, nargs, kwnames, names, 1, 0, a) < 0)
        return NULL;
    if (a[0] != NULL && a[0] != Py_None) {
        maxlength = PyLong_AsSsize_t(a[0]);
        if (maxlength == -1 && PyErr_Occurred())
            return NULL;
        if (maxlength < 0) {
            PyErr_SetString(PyExc_ValueError, "negative maxlength");
            return NULL;
        }
    }
    unsigned kind;
    PyObject *data = get_payload(self, -1, 1, 1, MODE_BYTES, &kind);
    if (data != NULL && maxlength >= 0 && PyBytes_GET_SIZE(data) > maxlength) {
        Py_DECREF(data);
        PyErr_SetString(PyExc_OSError, "bad message length");
        return NULL;
    }
    return data;
}

typedef struct {
    int check_peer, side;
    unsigned tries;
} peek_arg;

/* RC_OK when a ready message waits at rclaim (claims nothing). */
static int attempt_peek(Ring *r, void *a, int slow)
{
    peek_arg *p = a;
    for (;;) {
        uint64_t pos = rclaim_pos(r);
        uint64_t lo, hi;
        tail_load(r, &lo, &hi);
        if (pos == lo) {
            if (p->check_peer && peer_gone(r, p->side, slow || (++p->tries & 63) == 1))
                return RC_EOF;
            return RC_EMPTY;
        }
        rec_t *rec = rec_at(r, pos);
        if (atomic_load_explicit(&rec->seq, memory_order_acquire) != stamp(r, pos))
            return RC_BUSY;
        uint32_t st = atomic_load_explicit(&rec->state, memory_order_acquire);
        uint32_t info = atomic_load_explicit(&rec->info, memory_order_relaxed);
        switch (ST_CODE(st)) {
        case S_READY:
            return INFO_FRAG(info) == F_MID || INFO_FRAG(info) == F_LAST ? RC_BUSY : RC_OK;
        case S_WRITING:
            return RC_BUSY;
        default:
            push_rclaim(r, pos, info);
        }
    }
}

/* poll(timeout=0.0, side=-1) -> bool: whether a message (or, for a pipe
 * side, end of file) is ready, waiting up to timeout (None: forever). */
static PyObject *Ring_poll(Ring *self, PyObject *args)
{
    PyObject *timeout = NULL;
    int side = -1, err;
    if (!PyArg_ParseTuple(args, "|Oi:poll", &timeout, &side))
        return NULL;
    double t = timeout == NULL ? 0 : parse_timeout(1, timeout, &err);
    if (timeout != NULL && err)
        return NULL;
    peek_arg p = {side >= 0, side & 1, 0};
    int rc = attempt_peek(self, &p, 0);
    if (rc != RC_OK && rc != RC_EOF && t != 0) {
        p.tries = 0;
        rc = wait_for(self, attempt_peek, &p, AGAIN_GET, &self->h->data_seq, t,
                      side >= 0 ? SLICE_S : -1);
    }
    if (rc == -1)
        return NULL;
    return PyBool_FromLong(rc == RC_OK || rc == RC_EOF);
}

static PyObject *Ring_qsize(Ring *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLongLong(settled_depth(self));
}

/* JoinableQueue's unfinished tasks: `finished` first, then `in`, which only
 * grows, so the snapshot never understates what is left. */
static int64_t unfinished(Ring *r)
{
    int64_t f = atomic_load_explicit(&r->h->finished, memory_order_acquire);
    return settle_in(r) - f;
}

static PyObject *Ring_task_done(Ring *self, PyObject *Py_UNUSED(ignored))
{
    int64_t f = atomic_load_explicit(&self->h->finished, memory_order_acquire);
    int64_t left;
    do {
        /* `in` read after f and only growing: if a task was left at f, one
         * still is when the CAS proves f current */
        left = settle_in(self) - f;
        if (left <= 0) {
            PyErr_SetString(PyExc_ValueError, "task_done() called too many times");
            return NULL;
        }
    } while (!atomic_compare_exchange_weak(&self->h->finished, &f, f + 1));
    if (left == 1)
        wake_if_waiting(&self->h->join_seq);
    Py_RETURN_NONE;
}

static int attempt_join(Ring *r, void *a, int slow)
{
    (void)a;
    (void)slow;
    return unfinished(r) <= 0 ? RC_OK : RC_BUSY;
}

/* join(timeout=None) -> bool: wait until every put item is task_done(). */
static PyObject *Ring_join(Ring *self, PyObject *args)
{
    PyObject *timeout = Py_None;
    int err;
    if (!PyArg_ParseTuple(args, "|O:join", &timeout))
        return NULL;
    double t = parse_timeout(1, timeout, &err);
    if (err)
        return NULL;
    int rc = attempt_join(self, NULL, 0);
    if (rc != RC_OK && t != 0)
        rc = wait_for(self, attempt_join, NULL, 1u << RC_BUSY, &self->h->join_seq,
                      t, 1.0);
    if (rc == -1)
        return NULL;
    return PyBool_FromLong(rc == RC_OK);
}

static PyObject *Ring_statistics(Ring *self, PyObject *Py_UNUSED(ignored))
{
    hdr_t *h = self->h;
    uint64_t lo, hi;
    tail_load(self, &lo, &hi);
    uint64_t head = atomic_load_explicit(&h->head, memory_order_acquire);
    int64_t c = settled_depth(self);
    return Py_BuildValue("{sLsKsKsLsOsOsKsKsKsL}", "depth", (long long)c, "bytes_used",
                         (unsigned long long)(lo - head), "capacity", (unsigned long long)h->cap, "maxsize",
                         (long long)h->maxsize, "getters_sleeping",
                         (atomic_load_explicit(&h->data_seq, memory_order_relaxed) & 1u) ? Py_True : Py_False,
                         "putters_sleeping",
                         (atomic_load_explicit(&h->space_seq, memory_order_relaxed) & 1u) ? Py_True : Py_False,
                         "puts",
                         (unsigned long long)atomic_load_explicit(&h->puts, memory_order_relaxed), "gets",
                         (unsigned long long)atomic_load_explicit(&h->gets, memory_order_relaxed), "abandoned",
                         (unsigned long long)atomic_load_explicit(&h->abandoned, memory_order_relaxed),
                         "unfinished", (long long)(h->joinable ? unfinished(self) : 0));
}

static PyObject *Ring_attach(Ring *self, PyObject *args)
{
    int side;
    if (!PyArg_ParseTuple(args, "i:attach", &side))
        return NULL;
    if (attach_side(self, side & 1) < 0) {
        PyErr_Format(PyExc_OSError, "more than %d processes hold one end of this pipe", SLOTS);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Ring_detach(Ring *self, PyObject *args)
{
    int side;
    if (!PyArg_ParseTuple(args, "i:detach", &side))
        return NULL;
    detach_side(self, side & 1);
    Py_RETURN_NONE;
}

/* pending(side, delta): count a fork in flight that will attach in the child. */
static PyObject *Ring_pending(Ring *self, PyObject *args)
{
    int side, delta;
    if (!PyArg_ParseTuple(args, "ii:pending", &side, &delta))
        return NULL;
    atomic_fetch_add_explicit(&self->h->pending[side & 1], (uint32_t)delta, memory_order_acq_rel);
    Py_RETURN_NONE;
}

static PyObject *Ring_peer_gone(Ring *self, PyObject *args)
{
    int side;
    if (!PyArg_ParseTuple(args, "i:peer_gone", &side))
        return NULL;
    return PyBool_FromLong(peer_gone(self, side & 1, 1));
}

#define PEER_CHECK_EVERY 1024

/* Pipe send: BrokenPipeError when every reader is gone. An explicit close
 * is seen at once; a reader's death (a system call per holder to detect) is
 * checked every PEER_CHECK_EVERY sends and before blocking on a full ring. */
static int pipe_broken(Ring *self)
{
    if (!peer_gone(self, 0, ++self->sends % PEER_CHECK_EVERY == 0))
        return 0;
    PyErr_SetString(PyExc_BrokenPipeError, "the other end of the pipe is closed");
    return 1;
}

/* Send len bytes at buf as a raw message; full: wait in slices, watching
 * the reader (a streamed message cannot be retried piecewise, so it waits). */
static PyObject *send_raw(Ring *self, const void *buf, size_t len)
{
    seg_t seg = {buf, len};
    int rc = put_message(self, &seg, 1, len, K_RAW, 0);
    while (rc != RC_OK && rc != -1) {
        if (peer_gone(self, 0, 1)) {
            PyErr_SetString(PyExc_BrokenPipeError, "the other end of the pipe is closed");
            return NULL;
        }
        rc = put_message(self, &seg, 1, len, K_RAW, len <= self->h->max_frag ? SLICE_S : -1);
    }
    return put_result(self, rc);
}

static PyObject *Ring_send(Ring *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "send(obj, raw=False) takes 1 or 2 arguments");
        return NULL;
    }
    int raw = nargs == 2 ? PyObject_IsTrue(args[1]) : 0;
    if (raw < 0 || pipe_broken(self))
        return NULL;
    if (!raw)
        return put_object(self, args[0], -1);
    Py_buffer b;
    if (PyObject_GetBuffer(args[0], &b, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *res = send_raw(self, b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    return res;
}

/* Py_ssize_t argument or a default; -1 with an exception set on error. */
static int ssize_arg(PyObject *o, Py_ssize_t dflt, Py_ssize_t *out)
{
    *out = o == NULL || o == Py_None ? dflt : PyLong_AsSsize_t(o);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

/* send_bytes(buf, offset=0, size=None): the pipe's send of buf[offset:
 * offset + size] (in bytes), as Connection.send_bytes (bound to it). */
static PyObject *Ring_send_bytes(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"buf", "offset", "size"};
    PyObject *a[3];
    Py_ssize_t offset, size;
    if (unpack_args("send_bytes", args, nargs, kwnames, names, 3, 1, a) < 0 || ssize_arg(a[1], 0, &offset) < 0 ||
        ssize_arg(a[2], -1, &size) < 0)
        return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(a[0], &b, PyBUF_SIMPLE) < 0)
        return NULL;
    int sized = a[2] != NULL && a[2] != Py_None;
    const char *err = NULL;
    if (offset < 0)
        err = "offset is negative";
    else if (b.len < offset)
        err = "buffer length < offset";
    else if (sized && size < 0)
        err = "size is negative";
    else if (size > b.len - offset)
        err = "buffer length < offset + size";
    PyObject *res = NULL;
    if (err != NULL)
        PyErr_SetString(PyExc_ValueError, err);
    else if (!pipe_broken(self))
        res = send_raw(self, (const char *)b.buf + offset, (size_t)(size >= 0 ? size : b.len - offset));
    PyBuffer_Release(&b);
    return res;
}

static PyObject *Ring_futex_word(Ring *Py_UNUSED(self), PyObject *Py_UNUSED(ignored))
{
    /* offset of the data sequence word within the buffer, for multi-waits */
    return PyLong_FromSsize_t((Py_ssize_t)offsetof(hdr_t, data_seq));
}

static PyMethodDef Ring_methods[] = {
    {"put", (PyCFunction)(void (*)(void))Ring_put, METH_FASTCALL | METH_KEYWORDS,
     "Pickle obj and put it; bytes go as they are."},
    {"put_bytes", (PyCFunction)(void (*)(void))Ring_put_bytes, METH_VARARGS | METH_KEYWORDS,
     "Put a bytes-like object as a raw message."},
    {"get", (PyCFunction)(void (*)(void))Ring_get, METH_FASTCALL | METH_KEYWORDS, "Remove and return a message."},
    {"recv", (PyCFunction)(void (*)(void))Ring_recv, METH_FASTCALL | METH_KEYWORDS,
     "Pipe receive; EOFError when the writers are gone, TimeoutError after timeout."},
    {"recv_bytes", (PyCFunction)(void (*)(void))Ring_recv_bytes, METH_FASTCALL | METH_KEYWORDS,
     "Pipe receive of the next message as bytes."},
    {"send", (PyCFunction)(void (*)(void))Ring_send, METH_FASTCALL,
     "Pipe send; BrokenPipeError when the readers are gone."},
    {"send_bytes", (PyCFunction)(void (*)(void))Ring_send_bytes, METH_FASTCALL | METH_KEYWORDS,
     "Pipe send of (part of) a bytes-like object."},
    {"poll", (PyCFunction)Ring_poll, METH_VARARGS, "Whether a message is ready, waiting up to timeout."},
    {"qsize", (PyCFunction)Ring_qsize, METH_NOARGS, "Number of messages in the ring."},
    {"task_done", (PyCFunction)Ring_task_done, METH_NOARGS, "Mark one task done."},
    {"join", (PyCFunction)Ring_join, METH_VARARGS, "Wait until all tasks are done."},
    {"statistics", (PyCFunction)Ring_statistics, METH_NOARGS, "Counters as a dict."},
    {"attach", (PyCFunction)Ring_attach, METH_VARARGS, "Register this process on a pipe side."},
    {"detach", (PyCFunction)Ring_detach, METH_VARARGS, "Unregister this process from a pipe side."},
    {"pending", (PyCFunction)Ring_pending, METH_VARARGS, "Count forks in flight on a pipe side."},
    {"peer_gone", (PyCFunction)Ring_peer_gone, METH_VARARGS, "Whether no live process holds a side."},
    {"futex_offset", (PyCFunction)Ring_futex_word, METH_NOARGS, "Offset of the data futex word."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fabric.local._ring.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A message ring in a shared buffer (see the module's theory of operation).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
};

/* wait_any(buffers_offsets, timeout) -> bool: sleep until the data word of
 * any ring changes (futex_waitv), so wait() needs no thread per ring. */
static PyObject *wait_any(PyObject *Py_UNUSED(mod), PyObject *args)
{
    PyObject *rings, *timeout;
    if (!PyArg_ParseTuple(args, "OO:wait_any", &rings, &timeout))
        return NULL;
    int err;
    double t = parse_timeout(1, timeout, &err);
    if (err)
        return NULL;
    PyObject *seq = PySequence_Fast(rings, "rings must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > 128) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "at most 128 rings per wait");
        return NULL;
    }
    struct futex_waitv waiters[128];
    Ring *objs[128];
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyObject_TypeCheck(o, &RingType) || ((Ring *)o)->h == NULL) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_TypeError, "wait_any takes initialised Ring objects");
            return NULL;
        }
        objs[i] = (Ring *)o;
    }
    /* register as a sleeper on each, then check each is still empty */
    int ready = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        hdr_t *h = objs[i]->h;
        waiters[i] = (struct futex_waitv){.val = announce_sleeper(&h->data_seq),
                                          .uaddr = (uintptr_t)&h->data_seq,
                                          .flags = FUTEX_32};
    }
    for (Py_ssize_t i = 0; i < n && !ready; i++) {
        peek_arg p = {0, 0, 0};
        ready = attempt_peek(objs[i], &p, 0) == RC_OK;
    }
    if (!ready) {
        struct timespec ts, *tsp = NULL;
        if (t >= 0) {
            clock_gettime(CLOCK_MONOTONIC, &ts);
            double end = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9 + t;
            ts.tv_sec = (time_t)end;
            ts.tv_nsec = (long)((end - (double)ts.tv_sec) * 1e9);
            tsp = &ts;
        }
        Py_BEGIN_ALLOW_THREADS
        syscall(SYS_futex_waitv, waiters, (unsigned)n, 0, tsp, CLOCK_MONOTONIC);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

/* _die_at(point): the test hook above; point is "claimed" (right after a
 * consumer's claim CAS), "admitted" (a producer past the maxsize check, right
 * before its tail CAS), "reserved" (right after the tail CAS, before the
 * record is stamped) or None. */
static PyObject *set_die_at(PyObject *Py_UNUSED(mod), PyObject *point)
{
    static const char *const names[] = {"claimed", "admitted", "reserved"};
    int p = DIE_NEVER;
    for (int i = 0; point != Py_None && p == DIE_NEVER && i < 3; i++)
        if (PyUnicode_Check(point) && PyUnicode_CompareWithASCIIString(point, names[i]) == 0)
            p = DIE_CLAIMED + i;
    if (point != Py_None && p == DIE_NEVER) {
        PyErr_Format(PyExc_ValueError, "unknown point %R (known: 'claimed', 'admitted', 'reserved', None)",
                     point);
        return NULL;
    }
    atomic_store_explicit(&die_at, p, memory_order_relaxed);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"wait_any", wait_any, METH_VARARGS, "Sleep until any of the rings may have a message."},
    {"_die_at", set_die_at, METH_O, "Test hook: SIGKILL this process on reaching the point."},
    {NULL, NULL, 0, NULL},
};

static int ring_exec(PyObject *m)
{
    refresh_pid();
    if (PyType_Ready(&RingType) < 0)
        return -1;
    if (PyModule_AddObjectRef(m, "Ring", (PyObject *)&RingType) < 0)
        return -1;
    if (bufferproxy_add(m) < 0)
        return -1;
    if (PyModule_AddIntConstant(m, "HEADER_SIZE", HDR_SIZE) < 0)
        return -1;
    return PyModule_AddIntConstant(m, "MAX_CAPACITY", (long)MAX_CAP);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, ring_exec},
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ring", "Crash-consistent MPMC message rings in shared memory.", 0,
    module_methods, slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__ring(void)
{
    /* fork children must not keep the parent's cached pid */
    static _Atomic int registered;
    if (!atomic_exchange(&registered, 1))
        pthread_atfork(NULL, NULL, refresh_pid);
    return PyModuleDef_Init(&module);
}
