/*
 * _lpsync: the few memory-ordering and futex primitives that LuaJIT cannot
 * express itself.  LuaJIT's FFI has no atomics and its optimiser may hoist a
 * plain load of shared memory out of a polling loop; a call into this library
 * is opaque to the JIT, so every index load below really reads memory, with
 * acquire/release semantics guaranteed by the C11/GCC __atomic builtins on
 * every architecture (not just x86 TSO).
 *
 * The file is built as a (trivial) CPython extension so that pip builds and
 * installs it; LuaJIT loads the same .so with ffi.load and Python with ctypes.
 */
#include <Python.h>
#include <stdint.h>
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <string.h>

/* Ring positions are byte counts kept as uint64 in shared memory and handled as
 * doubles in Lua (exact below 2^53 bytes), so no 64-bit cdata boxing is needed. */
double lp_load(const uint64_t *p) { return (double)__atomic_load_n(p, __ATOMIC_ACQUIRE); }
double lp_load_sc(const uint64_t *p) { return (double)__atomic_load_n(p, __ATOMIC_SEQ_CST); }
void lp_store(uint64_t *p, double v) { __atomic_store_n(p, (uint64_t)v, __ATOMIC_RELEASE); }
uint32_t lp_load32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
void lp_store32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
void lp_store_d(double *p, double v) { __atomic_store(p, &v, __ATOMIC_RELEASE); }
void lp_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* Monotonic clock in nanoseconds (CLOCK_MONOTONIC is shared by all processes). */
double lp_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* A doorbell is two uint32 words in shared memory: bell[0] counts sleepers,
 * bell[1] is the futex sequence.  Not FUTEX_PRIVATE: it is shared by processes.
 *
 * Publisher:  seq_cst store of the position, then seq_cst load of bell[0];
 *             if someone sleeps, bump bell[1] and FUTEX_WAKE.
 * Sleeper:    lp_bell_arm (seq_cst RMW on bell[0], returns bell[1]), re-check
 *             the ring with lp_load_sc, then lp_bell_sleep.
 * In the single total order of seq_cst operations either the publisher's store
 * precedes the arm (the re-check sees the record) or the arm precedes the
 * publisher's load of bell[0] (the publisher wakes the sleeper, and the
 * sequence change makes FUTEX_WAIT return at once).  No wakeup is lost. */
int lp_publish(uint64_t *pos, double v, uint32_t *bell) {
    __atomic_store_n(pos, (uint64_t)v, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&bell[0], __ATOMIC_SEQ_CST) == 0) return 0;
    __atomic_fetch_add(&bell[1], 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &bell[1], FUTEX_WAKE, 0x7fffffff, NULL, NULL, 0);
    return 1;
}

/* The consumer's release with refill slack (shm/ring.lua, "Refill slack"): publish the consumer position `v` like
 * lp_publish, but wake the producer sleeping on `bell` only once v >= *want, the position it asked for (stored
 * seq_cst by Ring:wait_space before it armed the bell).  The waker claims that wake by swapping *want to
 * UINT64_MAX (compare-and-swap from the value it read): later releases of the same sleep see UINT64_MAX and make
 * no second FUTEX_WAKE, so there is at most one wake per sleep.  No wakeup is lost, by the same seq_cst argument
 * as lp_publish: either this store of the position precedes the sleeper's re-check (which then sees v >= want and
 * does not sleep), or the sleeper's arm precedes the load of bell[0] here, and then want (stored before the arm)
 * is the value read here.  A claim by an earlier release bumped bell[1] after the position that satisfied want
 * was stored: the sleeper's FUTEX_WAIT returns at once (sequence changed) or its re-check sees that position.
 * With want 0 (a fresh ring) every release wakes a sleeper, as lp_publish does. */
int lp_release(uint64_t *pos, double v, uint32_t *bell, uint64_t *want) {
    uint64_t p = (uint64_t)v;
    __atomic_store_n(pos, p, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&bell[0], __ATOMIC_SEQ_CST) == 0) return 0;
    uint64_t w = __atomic_load_n(want, __ATOMIC_SEQ_CST);
    if (p < w) return 0;
    if (!__atomic_compare_exchange_n(want, &w, UINT64_MAX, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return 0;
    __atomic_fetch_add(&bell[1], 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &bell[1], FUTEX_WAKE, 0x7fffffff, NULL, NULL, 0);
    return 1;
}

/* A seq_cst store of a position (Ring:wait_space's `want`, before it arms the bell). */
void lp_store_sc(uint64_t *p, double v) { __atomic_store_n(p, (uint64_t)v, __ATOMIC_SEQ_CST); }

/* Ring a doorbell unconditionally (used to interrupt a sleeper, e.g. at stop). */
void lp_bell_ring(uint32_t *bell) {
    __atomic_fetch_add(&bell[1], 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &bell[1], FUTEX_WAKE, 0x7fffffff, NULL, NULL, 0);
}

uint32_t lp_bell_arm(uint32_t *bell) {
    uint32_t seq = __atomic_load_n(&bell[1], __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&bell[0], 1, __ATOMIC_SEQ_CST);
    return seq;
}

void lp_bell_disarm(uint32_t *bell) { __atomic_fetch_sub(&bell[0], 1, __ATOMIC_SEQ_CST); }

/* Sleep until the doorbell rings or timeout_ns passes (0 = no limit), then
 * disarm.  Returns 0 when woken, 1 on timeout. */
int lp_bell_sleep(uint32_t *bell, uint32_t seq, double timeout_ns) {
    struct timespec ts, *tp = NULL;
    int rc = 0;
    if (timeout_ns > 0) {
        uint64_t t = (uint64_t)timeout_ns;
        ts.tv_sec = (time_t)(t / 1000000000ull);
        ts.tv_nsec = (long)(t % 1000000000ull);
        tp = &ts;
    }
    if (syscall(SYS_futex, &bell[1], FUTEX_WAIT, seq, tp, NULL, 0) != 0 && errno == ETIMEDOUT)
        rc = 1;
    __atomic_fetch_sub(&bell[0], 1, __ATOMIC_SEQ_CST);
    return rc;
}

/* ------------------------------------------------------------------------
 * lp_fninfo(fn) -> key, nups, up1 .. up8      (a lua_CFunction for LuaJIT)
 *
 * T.async needs, for every onexecute closure, the identity of its prototype
 * (closures created from one `function ... end` expression share their
 * bytecode) and the values of its upvalues.  Lua can only get these through
 * string.dump and debug.getupvalue, which cost ~120 ns and ~50 ns per call
 * and are not compiled.  This function reads them from the closure:
 *   key   the address of the prototype's bytecode (GCfuncL.pc), as a number:
 *         equal for closures of one prototype, different otherwise, as long
 *         as one closure of the prototype is kept alive (async.lua keeps one);
 *   nups  the number of upvalues;
 *   then the first min(nups, LP_FNINFO_UPS) upvalue values.
 * A C function, or anything else, gives nil.
 *
 * It is loaded with package.loadlib (LuaJIT passes it its lua_State) and it
 * reads LuaJIT 2.1's GC64 object layout (lj_obj.h: lua_State, GCfuncL,
 * GCupval, TValue) without calling the Lua C API, whose symbols live in
 * lupa's extension and are not visible to this library.  engine/lua/async.lua
 * checks the layout on known closures before it trusts this function and
 * falls back to string.dump / debug.getupvalue otherwise.
 * ------------------------------------------------------------------------ */
#define LP_FNINFO_UPS 8
typedef uint64_t lj_tv;                       /* TValue in GC64 mode */
typedef struct { uint64_t nextgc; uint8_t marked, gct, dummy_ffid, status;
                 uint64_t glref, gclist; lj_tv *base, *top; } lj_state;
typedef struct { uint64_t nextgc; uint8_t marked, gct, ffid, nupvalues;
                 uint64_t env, gclist, pc; uint64_t uvptr[1]; } lj_funcL;
typedef struct { uint64_t nextgc; uint8_t marked, gct, closed, immutable;
                 uint64_t tv_or_prev, next; lj_tv *v; } lj_upval;
#define LJ_GCVMASK ((((uint64_t)1) << 47) - 1)
#define LJ_ITYPE(tv) ((int32_t)((int64_t)(tv) >> 47))
#define LJ_TFUNC_ITYPE (-9)                   /* ~8u */
#define LJ_NIL ((lj_tv)-1)

static lj_tv lj_num(double d) { lj_tv t; memcpy(&t, &d, sizeof t); return t; }

int lp_fninfo(void *Lv) {
    lj_state *L = (lj_state *)Lv;
    lj_tv *base = L->base, *top = L->top;
    if (top <= base || LJ_ITYPE(base[0]) != LJ_TFUNC_ITYPE) { top[0] = LJ_NIL; L->top = top + 1; return 1; }
    lj_funcL *fn = (lj_funcL *)(uintptr_t)(base[0] & LJ_GCVMASK);
    if (fn->ffid != 0) { top[0] = LJ_NIL; L->top = top + 1; return 1; }     /* not a Lua function */
    int n = fn->nupvalues, m = n < LP_FNINFO_UPS ? n : LP_FNINFO_UPS;
    top[0] = lj_num((double)(fn->pc & LJ_GCVMASK));
    top[1] = lj_num((double)n);
    for (int i = 0; i < m; i++) {
        lj_upval *uv = (lj_upval *)(uintptr_t)(fn->uvptr[i] & LJ_GCVMASK);
        top[2 + i] = *uv->v;
    }
    L->top = top + 2 + m;
    return 2 + m;
}

/* ------------------------------------------------------------------------
 * lp_fnaddr(fn) -> the address of closure fn (a lua_CFunction, like lp_fninfo;
 * nil for anything but a Lua function), and the upvalue check of one closure:
 *
 * T.async (engine/plugins/async.lua) snapshots onexecute's upvalues at every
 * schedule call.  A task table written once (one closure, called again and
 * again) mostly has the same upvalue values as last time; lp_uvc_same() says
 * so without a lua_CFunction call (which ends the caller's LuaJIT trace):
 *   fn    the closure's address (async.lua keeps the closure alive: GC objects
 *         do not move, and the closure keeps its upvalue objects alive);
 *   n     its number of upvalues (at most LP_UVC_UPS);
 *   bits  the raw TValues of those upvalues when lp_uvc_take() last ran.
 * Equal bits are the same value: the same number (bit for bit), boolean or
 * nil, or the same object (strings are interned: an equal string is the same
 * object).  Unequal bits only cost the full snapshot.  Called through the FFI:
 * the call is opaque to the JIT, so the loads are never hoisted out of a loop
 * that assigns the upvalue.  Same GC64 layout as lp_fninfo (async.lua checks
 * both on known closures before it uses them).
 * ------------------------------------------------------------------------ */
#define LP_UVC_UPS 4
typedef struct { uint64_t fn; uint64_t bits[LP_UVC_UPS]; int32_t n; } lp_uvc;

static lj_tv *lp_uv_slot(const lj_funcL *fn, int i) {
    lj_upval *uv = (lj_upval *)(uintptr_t)(fn->uvptr[i] & LJ_GCVMASK);
    return uv->v;
}

int lp_uvc_same(const lp_uvc *c) {
    const lj_funcL *fn = (const lj_funcL *)(uintptr_t)c->fn;
    if (fn == NULL) return 0;
    for (int i = 0; i < c->n; i++)
        if (*lp_uv_slot(fn, i) != c->bits[i]) return 0;
    return 1;
}

void lp_uvc_take(lp_uvc *c) {
    const lj_funcL *fn = (const lj_funcL *)(uintptr_t)c->fn;
    if (fn == NULL) return;
    for (int i = 0; i < c->n; i++) c->bits[i] = *lp_uv_slot(fn, i);
}

int lp_fnaddr(void *Lv) {
    lj_state *L = (lj_state *)Lv;
    lj_tv *base = L->base, *top = L->top;
    if (top <= base || LJ_ITYPE(base[0]) != LJ_TFUNC_ITYPE) { top[0] = LJ_NIL; L->top = top + 1; return 1; }
    lj_funcL *fn = (lj_funcL *)(uintptr_t)(base[0] & LJ_GCVMASK);
    if (fn->ffid != 0) { top[0] = LJ_NIL; L->top = top + 1; return 1; }
    top[0] = lj_num((double)(uintptr_t)fn);
    L->top = top + 1;
    return 1;
}

/* ------------------------------------------------------------------------
 * The flow table's prefault helper (engine/fastpath/flowtable.lua, FT:prefault / start_prefaulter).
 *
 * A thread that maps the pages of never-used flow records ahead of the fast path: madvise(MADV_POPULATE_WRITE)
 * (Linux 5.14), the kernel zero-filling them, on this thread's CPU instead of the packet loop's (a fresh 4 KiB page
 * costs ~1.5 us on the benchmark VM: docs/benchmarks.md "The flow table's fresh pages").  A C thread, not a Python
 * one: it never takes the GIL that the fast path's thread holds between its Lua calls.
 *
 * Protocol: the fast path (one thread) stores a higher `goal` (records [0, goal) wanted mapped) and calls
 * lp_prefault_kick (an eventfd write); the thread, woken, maps records [max(done, self), goal) of each array in one
 * madvise call each and stores `done = goal` (release).  `self`: records the fast path mapped itself (when the
 * helper was behind: it never waits for it).  Mapping a page twice is harmless (a present page is left as it is).
 * A second job of the same kind: bytes [ix_done, ix_goal) of the index's mapping at ix_addr (the slots its next
 * doubling will use, flowtable.lua FT:reserve), stored by the fast path before a kick like `goal`.
 * A refusal (EINVAL on a kernel before 5.14) ends the thread with `err` = errno (release); the fast path then maps
 * as before and wakes it no more (flowtable.lua reads `err`); lp_prefault_stop joins the ended thread as any other.
 *
 * fork: the eventfd is made EFD_CLOEXEC (an exec'd child never holds it), and a pthread_atfork child handler
 * closes a forked child's copy of every live helper's eventfd at once (lp_pf_child): the child has no helper
 * thread, and its copy would otherwise stay open for the child's life and let its kicks wake the parent's thread.
 * The child's copy reads err = ECHILD, so its fast path (flowtable.lua reads `err`) wakes no helper and maps by
 * itself; its lp_prefault_stop only frees the copy.
 * ------------------------------------------------------------------------ */
#include <pthread.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/mman.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#define LP_PF_ARRAYS 4

typedef struct {
    int64_t goal, done, self, stop;       /* shared words (see above); goal / self / stop written by the fast path */
    int64_t pages, calls, err;            /* the helper's work: 4 KiB pages mapped, madvise calls, errno of a refusal */
    double cpu_ns;                        /* the helper thread's CPU time (CLOCK_THREAD_CPUTIME_ID) after its last wake */
    int64_t cap;                          /* records per array */
    uint64_t addr[LP_PF_ARRAYS], size[LP_PF_ARRAYS];
    int32_t narrays, efd;
    /* a second job, the flow table's index: bytes [ix_done, ix_goal) of the mapping at ix_addr (its next doubling) */
    uint64_t ix_addr;
    int64_t ix_goal, ix_done;
    pthread_t thread;
    pid_t pid;                            /* the process that started the thread (a forked child has no such thread) */
    /* not in flowtable.lua's cdef (a prefix of this struct): the list of live helpers, for the fork handler */
    void *next;
} lp_prefaulter;

static pthread_mutex_t lp_pf_lock = PTHREAD_MUTEX_INITIALIZER;
static lp_prefaulter *lp_pf_live;         /* the helpers this process started and has not stopped (under lp_pf_lock) */
static pthread_once_t lp_pf_once = PTHREAD_ONCE_INIT;

static void lp_pf_prepare(void) { pthread_mutex_lock(&lp_pf_lock); }
static void lp_pf_parent(void) { pthread_mutex_unlock(&lp_pf_lock); }

/* In a forked child (async-signal-safe: close and plain stores): every live helper's eventfd copy closed, its err
 * ECHILD; the list emptied (the copies are the child's to free, in lp_prefault_stop). */
static void lp_pf_child(void) {
    for (lp_prefaulter *p = lp_pf_live; p != NULL; p = p->next) {
        if (p->efd >= 0) close(p->efd);
        p->efd = -1;
        if (__atomic_load_n(&p->err, __ATOMIC_RELAXED) == 0) __atomic_store_n(&p->err, (int64_t)ECHILD, __ATOMIC_RELEASE);
    }
    lp_pf_live = NULL;
    pthread_mutex_unlock(&lp_pf_lock);
}

static void lp_pf_atfork(void) { pthread_atfork(lp_pf_prepare, lp_pf_parent, lp_pf_child); }

static void *lp_prefault_main(void *arg) {
    lp_prefaulter *p = arg;
    uint64_t v;
    struct timespec ts;
    for (;;) {
        if (read(p->efd, &v, sizeof v) != sizeof v) {
            if (errno == EINTR) continue;
            break;                            /* the eventfd is gone: nothing will wake this thread again */
        }
        if (__atomic_load_n(&p->stop, __ATOMIC_ACQUIRE)) break;
        int64_t goal = __atomic_load_n(&p->goal, __ATOMIC_ACQUIRE);
        int64_t first = __atomic_load_n(&p->done, __ATOMIC_RELAXED);
        int64_t own = __atomic_load_n(&p->self, __ATOMIC_ACQUIRE);
        if (own > first) first = own;
        if (goal > p->cap) goal = p->cap;
        if (goal > first && p->err == 0) {
            for (int i = 0; i < p->narrays; i++) {
                uint64_t a = p->addr[i] + (uint64_t)first * p->size[i];
                uint64_t start = a & ~(uint64_t)4095;
                uint64_t len = a - start + (uint64_t)(goal - first) * p->size[i];
                if (madvise((void *)(uintptr_t)start, len, MADV_POPULATE_WRITE) != 0) {
                    __atomic_store_n(&p->err, (int64_t)errno, __ATOMIC_RELEASE);
                    break;
                }
                p->calls++;
                p->pages += (int64_t)((len + 4095) / 4096);
            }
            if (p->err == 0) __atomic_store_n(&p->done, goal, __ATOMIC_RELEASE);
        }
        int64_t ig = __atomic_load_n(&p->ix_goal, __ATOMIC_ACQUIRE);
        int64_t id = __atomic_load_n(&p->ix_done, __ATOMIC_RELAXED);
        if (ig > id && p->err == 0 && p->ix_addr != 0) {
            uint64_t a = p->ix_addr + (uint64_t)id, start = a & ~(uint64_t)4095;
            uint64_t len = a - start + (uint64_t)(ig - id);
            if (madvise((void *)(uintptr_t)start, len, MADV_POPULATE_WRITE) != 0) {
                __atomic_store_n(&p->err, (int64_t)errno, __ATOMIC_RELEASE);
            } else {
                p->calls++;
                p->pages += (int64_t)((len + 4095) / 4096);
                __atomic_store_n(&p->ix_done, ig, __ATOMIC_RELEASE);
            }
        }
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
        p->cpu_ns = (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
        if (p->err != 0) break;               /* refused: every later call would be refused too */
    }
    return NULL;
}

/* Start a helper for `narrays` arrays of `cap` records (addr[i], size[i] bytes a record); done = self = goal =
 * `from` (records already mapped).  NULL when no thread or eventfd could be made (the fast path maps by itself). */
lp_prefaulter *lp_prefault_start(int64_t cap, int64_t from, int32_t narrays, const double *addr, const double *size) {
    if (narrays < 1 || narrays > LP_PF_ARRAYS) return NULL;
    lp_prefaulter *p = calloc(1, sizeof *p);
    if (p == NULL) return NULL;
    p->cap = cap;
    p->goal = p->done = p->self = from;
    p->narrays = narrays;
    for (int i = 0; i < narrays; i++) { p->addr[i] = (uint64_t)addr[i]; p->size[i] = (uint64_t)size[i]; }
    pthread_once(&lp_pf_once, lp_pf_atfork);
    pthread_mutex_lock(&lp_pf_lock);          /* no fork between the eventfd and its entry in the list */
    p->efd = eventfd(0, EFD_CLOEXEC);
    if (p->efd < 0) { pthread_mutex_unlock(&lp_pf_lock); free(p); return NULL; }
    p->pid = getpid();
    if (pthread_create(&p->thread, NULL, lp_prefault_main, p) != 0) {
        pthread_mutex_unlock(&lp_pf_lock);
        close(p->efd);
        free(p);
        return NULL;
    }
    pthread_setname_np(p->thread, "lp-prefault");   /* its name in /proc/PID/task/TID/comm, top -H, the tests */
    p->next = lp_pf_live;
    lp_pf_live = p;
    pthread_mutex_unlock(&lp_pf_lock);
    return p;
}

/* The layout of lp_prefaulter that flowtable.lua's cdef must match: 2 since the index job (ix_addr, ix_goal, ix_done).
 * A library without this function has layout 1 (flowtable.lua then starts no helper: its cdef would write ix_addr
 * over `thread`). */
int lp_prefault_abi(void) { return 2; }

/* Wake the helper after raising p->goal (one eventfd write: the wakes coalesce until it reads). */
void lp_prefault_kick(lp_prefaulter *p) {
    uint64_t one = 1;
    if (p->efd < 0) return;                   /* a forked child's copy (lp_pf_child): no helper to wake */
    if (write(p->efd, &one, sizeof one) < 0) { /* the counter cannot overflow at one write per wake */ }
}

/* Stop and join the helper, then free it (p is invalid afterwards).  Before the arrays it maps are unmapped. */
void lp_prefault_stop(lp_prefaulter *p) {
    if (p == NULL) return;
    if (getpid() != p->pid) {                 /* a forked child's copy: the thread and its wake are the parent's */
        if (p->efd >= 0) close(p->efd);       /* (already closed by lp_pf_child, unless forked without handlers) */
        free(p);
        return;
    }
    pthread_mutex_lock(&lp_pf_lock);
    for (lp_prefaulter **q = &lp_pf_live; *q != NULL; q = (lp_prefaulter **)&(*q)->next)
        if (*q == p) { *q = p->next; break; }
    pthread_mutex_unlock(&lp_pf_lock);
    __atomic_store_n(&p->stop, 1, __ATOMIC_RELEASE);
    lp_prefault_kick(p);
    pthread_join(p->thread, NULL);
    close(p->efd);
    free(p);
}

/* ---------------------------------------------------------------- cut guard
 * A capture file is read through a read-only MAP_SHARED mapping (engine/capture/capture.lua M.file).  When another
 * process cuts the file (truncate) while it is read, a load from a page wholly past the new end raises SIGBUS, which
 * killed the capture process with the records it had read but not yet published.  lp_cutguard_arm(addr, len, fd)
 * makes such a fault harmless: a SIGBUS whose address lies in [addr, addr + len), the mapping of the open file `fd`,
 * on a page that starts at or past the file's size now (fstat: the page is gone because the file was cut) maps a
 * private zero page over the faulting page (MAP_FIXED; the rest of the mapping is untouched, the file itself never)
 * and returns, so the load is retried and reads zeros, as the tail of the page holding the new end does.  Zeros are
 * never taken for data: the caller compares every record it read with the file's size (lp_fsize) before it publishes
 * it (capture.lua settle).  Any other SIGBUS (elsewhere, or a page the file still holds: an I/O error, a memory
 * error, or one that cannot be mapped over) restores the previous disposition and returns: the load faults again and
 * the process dies of it as before.  One range per process (the capture process reads one file at a time);
 * lp_cutguard_arm(NULL, 0, -1) disarms.  Returns 0 or -errno (sigaction).  lp_cutguard_end(): where the first page
 * mapped over starts.  A SIGBUS sent by a process (kill, sigqueue, tgkill: si_code <= 0) is never taken for a fault:
 * the previous disposition is restored and the signal raised again (before, it was lost and the process ran on).
 * Async-signal safety: the handler calls only fstat, mmap, sigaction and raise (system calls), reads atomics, and
 * gives errno back. */
#include <signal.h>
#include <sys/stat.h>
static uintptr_t lp_cg_lo, lp_cg_hi, lp_cg_page, lp_cg_low;     /* lp_cg_low: lowest page mapped over (or hi) */
static int lp_cg_fd = -1;
static struct sigaction lp_cg_prev;
static int lp_cg_installed;

static void lp_cg_handler(int sig, siginfo_t *si, void *ctx) {
    (void)ctx;
    int saved = errno;                   /* fstat / mmap may set it: the interrupted code's errno is given back */
    uintptr_t a = (uintptr_t)si->si_addr;
    uintptr_t lo = __atomic_load_n(&lp_cg_lo, __ATOMIC_ACQUIRE), hi = __atomic_load_n(&lp_cg_hi, __ATOMIC_ACQUIRE);
    struct stat st;
    /* si_code > 0: raised by the kernel for a fault (BUS_ADRERR, ...); <= 0 (SI_USER, SI_QUEUE, SI_TKILL): sent by a
     * process, with no fault address (si_addr overlays the sender's pid and uid) */
    if (sig == SIGBUS && si->si_code > 0 && a >= lo && a < hi &&
        fstat(__atomic_load_n(&lp_cg_fd, __ATOMIC_ACQUIRE), &st) == 0) {
        uintptr_t page = lp_cg_page, pg = a & ~(page - 1);
        if (pg >= lo && pg - lo >= (uintptr_t)st.st_size &&
            mmap((void *)pg, page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED) {
            if (pg < __atomic_load_n(&lp_cg_low, __ATOMIC_RELAXED)) __atomic_store_n(&lp_cg_low, pg, __ATOMIC_RELEASE);
            errno = saved;
            return;
        }
    }
    sigaction(SIGBUS, &lp_cg_prev, NULL);
    lp_cg_installed = 0;
    /* A fault comes again when the load is retried, now to the previous disposition; a sent signal would not: it is
     * raised again (SA_NODEFER: delivered at once; the default action ends the process, as without the guard). */
    if (si->si_code <= 0) raise(SIGBUS);
    errno = saved;
}

int lp_cutguard_arm(const void *addr, uint64_t len, int fd) {
    if (addr != NULL && !lp_cg_installed) {
        struct sigaction sa;
        lp_cg_page = (uintptr_t)sysconf(_SC_PAGESIZE);
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = lp_cg_handler;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, &lp_cg_prev) != 0) return -errno;
        lp_cg_installed = 1;
    }
    __atomic_store_n(&lp_cg_fd, fd, __ATOMIC_RELEASE);
    __atomic_store_n(&lp_cg_low, addr != NULL ? (uintptr_t)addr + len : 0, __ATOMIC_RELEASE);
    __atomic_store_n(&lp_cg_lo, (uintptr_t)addr, __ATOMIC_RELEASE);
    __atomic_store_n(&lp_cg_hi, addr != NULL ? (uintptr_t)addr + len : 0, __ATOMIC_RELEASE);
    return 0;
}

/* Offset in the guarded mapping of the first page the guard has mapped over since lp_cutguard_arm (the mapping's length
 * when none): those pages read as zeros for good, even if the file grows again (written after a cut). */
double lp_cutguard_end(void) {
    return (double)(__atomic_load_n(&lp_cg_low, __ATOMIC_ACQUIRE) - __atomic_load_n(&lp_cg_lo, __ATOMIC_ACQUIRE));
}

/* Size in bytes of the open file `fd` now (fstat), or -errno. */
double lp_fsize(int fd) {
    struct stat st;
    if (fstat(fd, &st) != 0) return -errno;
    return (double)st.st_size;
}

static struct PyModuleDef lpsync_module = {
    PyModuleDef_HEAD_INIT, "_lpsync",
    "Atomic loads/stores, fences and futex calls for LuaJIT FFI (use via ffi.load).",
    -1, NULL,
};

PyMODINIT_FUNC PyInit__lpsync(void) { return PyModule_Create(&lpsync_module); }
