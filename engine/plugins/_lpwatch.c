/*
 * _lpwatch: the hook watchdog of a plug-in VM (issue 13.3).  A Lua C module (loaded with package.loadlib from
 * engine/plugins/watchdog.lua; the Lua C API resolves against the process's LuaJIT, see shm/luajit.py):
 *
 *   wd.arm(seconds, message)   start the budget for the Lua code that runs next in this VM
 *   wd.disarm() -> fired       stop it; returns how many times it fired since the last disarm
 *   wd.xpcall(f, msgh, ...)    xpcall(f, msgh, ...) made by a classic C function (a "stitch point", below)
 *   wd.hcall(msgh, f, ...)     the same with the handler first (fewer stack moves; the stitched walkers)
 *
 * When the budget runs out, the timer signal's handler sets a count hook on the armed lua_State (lua_sethook is
 * async-signal-safe, Lua 5.1 manual section 3.8); at the next instruction the interpreter executes, the hook
 * re-arms the budget and raises `message` as a Lua error, which the hook's own xpcall reports and counts.  Code
 * running inside a LuaJIT trace never reaches the hook: a compiled endless loop is left to the daemon's
 * heartbeat watchdog (docs/operations.md).  One fast-path thread runs one VM at a time, so one armed state is
 * enough.  The timer is a POSIX timer of its own (timer_create, CLOCK_MONOTONIC) that signals WD_SIGNAL, a
 * real-time signal, not ITIMER_REAL / SIGALRM: arm and disarm leave the process's alarm(), setitimer timers and
 * SIGALRM handler alone (an embedding application's or pytest-timeout's).  The WD_SIGNAL handler is installed on
 * the first arm and stays (a signal generated just before disarm may still be delivered after it); a WD_SIGNAL
 * that is not the watchdog's (not its timer, no stop pending) goes to the handler installed before, if any.
 * Arm and disarm make no syscall while the timer runs (it is set again from its handler when it expires before
 * the current budget's end), so a hook call's budget costs a clock read, not two timer syscalls.
 *
 * wd.xpcall exists for the per-packet walkers (engine/plugins/host.lua).  LuaJIT inlines a plug-in hook into the
 * trace of the loop that calls it; a hook LuaJIT cannot compile (one that creates a closure per call, bytecode
 * FNEW, as `T.async:schedule{ onexecute = function ... }` does) aborts that trace every time, and after a few
 * aborts LuaJIT blacklists the loop itself: every packet then runs interpreted.  A classic C function is never
 * inlined: LuaJIT 2.1 ends the trace at the call and starts a new one after it returns (trace stitching,
 * lj_ffrecord.c recff_c), so the hook's own aborts stay with the hook and the loop keeps its traces.  Same
 * results as xpcall: true and the hook's results, or false and what msgh returned for the error.
 */
#include <Python.h>
#include <signal.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <dlfcn.h>
#include <pthread.h>
#include <unistd.h>

#define WD_SIGNAL (SIGRTMIN + 3)        /* the watchdog's timer signal (SIGRTMIN: glibc's first free one) */

typedef struct lua_State lua_State;
typedef struct lua_Debug {             /* LuaJIT's lua.h (Lua 5.1 layout) */
  int event;
  const char *name, *namewhat, *what, *source;
  int currentline, nups, linedefined, lastlinedefined;
  char short_src[60];
  int i_ci;
} lua_Debug;
typedef void (*lua_Hook)(lua_State *L, lua_Debug *ar);
typedef int (*lua_CFunction)(lua_State *L);
extern int lua_sethook(lua_State *L, lua_Hook f, int mask, int count);
extern int luaL_error(lua_State *L, const char *fmt, ...);
extern double lua_tonumber(lua_State *L, int idx);
extern const char *lua_tolstring(lua_State *L, int idx, size_t *len);
extern void lua_pushnumber(lua_State *L, double n);
extern void lua_createtable(lua_State *L, int narr, int nrec);
extern void lua_pushcclosure(lua_State *L, lua_CFunction fn, int n);
extern void lua_setfield(lua_State *L, int idx, const char *k);
extern int lua_gettop(lua_State *L);
extern void lua_pushvalue(lua_State *L, int idx);
extern void lua_replace(lua_State *L, int idx);
extern void lua_pushboolean(lua_State *L, int b);
extern int lua_pcall(lua_State *L, int nargs, int nresults, int errfunc);
typedef void *(*lua_Alloc)(void *ud, void *ptr, size_t osize, size_t nsize);
extern lua_Alloc lua_getallocf(lua_State *L, void **ud);
extern void lua_setallocf(lua_State *L, lua_Alloc f, void *ud);
extern int lua_gc(lua_State *L, int what, int data);
#define LUA_GCCOUNT 3
#define LUA_GCCOUNTB 4
#include <stdlib.h>
extern void *lua_newuserdata(lua_State *L, size_t sz);
extern int lua_setmetatable(lua_State *L, int objindex);
#define LUA_REGISTRYINDEX (-10000)
extern int lua_getstack(lua_State *L, int level, lua_Debug *ar);
extern int lua_getinfo(lua_State *L, const char *what, lua_Debug *ar);
#define LUA_MULTRET (-1)

#define LUA_MASKCALL 1
#define LUA_MASKRET 2
#define LUA_MASKCOUNT 8

static lua_State *volatile armed_L = NULL;
static volatile sig_atomic_t fired = 0;
static double budget = 0;
static char message[512];
static int installed = 0;
static struct sigaction previous;      /* WD_SIGNAL's disposition before the watchdog took it (chained to) */
static timer_t timer;
static int timer_pid = 0;              /* `timer` exists in this process (reset in a forked child) */
static int timer_tag;                  /* sival_ptr of the watchdog's timer signals: &timer_tag */
static char pkgroot[1024];             /* "@<luaprobe package dir>/": frames of luaprobe's own Lua modules */
static size_t pkgroot_len = 0;
static volatile double alarm_at = 0;
static volatile sig_atomic_t stopping = 0;  /* a stop signal: interrupt every hook until the walk is disarmed */   /* CLOCK_MONOTONIC s when the budget ran out and no interrupt landed yet */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);  /* async-signal-safe */
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Is a plug-in's own Lua function on the stack?  Plug-in code runs only inside the protected call of a hook
 * (Host:call's xpcall, the walker's xpcall or wd.xpcall), so an error raised there is caught and counted; the
 * luaprobe code around it (the walker between two hooks, arm/disarm, the Python-called wrappers) is not
 * protected: an interrupt there would end the whole batch as an internal error. */
static const char *hit_source = NULL;  /* in_plugin_code: the plug-in frame found ("@file"; valid in the hook) */
static int hit_line = 0;               /* ... and its current line */
static int in_plugin_code(lua_State *L) {
  lua_Debug ar;
  for (int level = 0; lua_getstack(L, level, &ar); level++) {
    if (!lua_getinfo(L, "Sl", &ar) || ar.source == NULL) continue;
    if (ar.source[0] != '@') continue;                       /* C, loadstring'ed chunks (walker copies) */
    if (pkgroot_len && strncmp(ar.source, pkgroot, pkgroot_len) == 0
        && strncmp(ar.source + pkgroot_len, "engine/examples/", 16) != 0) continue;
    hit_source = ar.source;
    hit_line = ar.currentline;
    return 1;
  }
  return 0;
}

/* The timer is not stopped at disarm nor re-set at every arm (a syscall each, per hook call and per batch): arm
 * moves `deadline`, and starts the timer only when it is not running; when it fires before the deadline of the
 * budget armed now (or with nothing armed) the handler sets it again for the rest (or lets it stop). */
static volatile double deadline = 0;   /* CLOCK_MONOTONIC s when the armed budget runs out */
static volatile sig_atomic_t timer_running = 0;
static volatile double timer_at = 0;   /* CLOCK_MONOTONIC s when the running timer expires */

static void start_timer(double s) {    /* also from the signal handler: timer_settime is async-signal-safe */
  struct itimerspec it;
  memset(&it, 0, sizeof it);
  it.it_value.tv_sec = (time_t)s;
  it.it_value.tv_nsec = (long)((s - (double)(time_t)s) * 1e9);
  if (it.it_value.tv_sec == 0 && it.it_value.tv_nsec < 1000) it.it_value.tv_nsec = 1000;
  timer_at = now_s() + s;
  timer_running = 1;
  timer_settime(timer, 0, &it, NULL);
}

static void forked_child(void) { timer_pid = 0; timer_running = 0; }   /* POSIX timers are not inherited */

static void ensure_timer(double s) {   /* the timer runs (it expires by the budget's end at the latest) */
  if (s <= 0 || (timer_running && timer_at <= deadline + 0.0005)) return;   /* a shorter budget than the
                                                 running timer's (another run's --hook-budget): set it again */
  if (timer_pid == 0) {
    struct sigevent ev;
    memset(&ev, 0, sizeof ev);
    ev.sigev_notify = SIGEV_SIGNAL;
    ev.sigev_signo = WD_SIGNAL;
    ev.sigev_value.sival_ptr = &timer_tag;
    if (timer_create(CLOCK_MONOTONIC, &ev, &timer) != 0) return;   /* no timer: the budget is not enforced */
    timer_pid = 1;
  }
  start_timer(s);
}

static void set_timer(double s) {      /* the armed budget: s seconds from now (0: none) */
  deadline = s > 0 ? now_s() + s : 0;
  ensure_timer(s);
}

static void budget_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  if (!in_plugin_code(L)) return;    /* the hook stays set: it lands at the next instruction of plug-in code */
  alarm_at = 0;
  fired++;
  if (stopping) luaL_error(L, "%s", "hook interrupted by the stop signal (the batch under way ends now)");
  lua_sethook(L, NULL, 0, 0);
  set_timer(budget);                 /* the rest of the batch keeps a budget */
  /* "file:line: message": where the plug-in's code was cut (luaL_error's own position is empty in a hook) */
  if (hit_source != NULL && hit_line > 0) luaL_error(L, "%s:%d: %s", hit_source + 1, hit_line, message);
  luaL_error(L, "%s", message);
}

static void on_alarm(int sig, siginfo_t *info, void *ctx) {
  int timer = info != NULL && info->si_code == SI_TIMER && info->si_value.sival_ptr == &timer_tag;
  if (!timer && !stopping) {                       /* somebody else's WD_SIGNAL: their handler, as if the watchdog were not here */
    if (previous.sa_flags & SA_SIGINFO) {
      if (previous.sa_sigaction != NULL) previous.sa_sigaction(sig, info, ctx);
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN && previous.sa_handler != NULL) {
      previous.sa_handler(sig);
    }
    return;
  }
  lua_State *L = armed_L;
  if (timer) {                       /* the timer: the armed budget's end, or an earlier one's */
    timer_running = 0;
    if (L == NULL || deadline == 0) return;               /* nothing armed: the timer stops */
    double left = deadline - now_s();
    if (left > 0.0005 && !stopping) { start_timer(left); return; }   /* armed again since: not over yet */
    if (alarm_at == 0 && !stopping) alarm_at = now_s();   /* a stop is not a budget overrun */
  }
  if (L != NULL) lua_sethook(L, budget_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

static int wd_arm(lua_State *L) {
  if (!installed) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_alarm;
    sa.sa_flags = SA_RESTART | SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(WD_SIGNAL, &sa, &previous);
    pthread_atfork(NULL, NULL, forked_child);
    Dl_info self;                    /* the handler stays installed and the timer may still run: this library
                                      * must stay mapped when its Lua state closes (package.loadlib unloads) */
    if (dladdr((void *)on_alarm, &self) && self.dli_fname) dlopen(self.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
    installed = 1;
  }
  budget = lua_tonumber(L, 1);
  const char *m = lua_tolstring(L, 2, NULL);
  const char *root = lua_tolstring(L, 3, NULL);
  if (root && !pkgroot_len) {
    snprintf(pkgroot, sizeof pkgroot, "@%s", root);
    pkgroot_len = strlen(pkgroot);
  }
  alarm_at = 0;
  snprintf(message, sizeof message, "%s", m ? m : "hook budget exceeded");
  fired = 0;
  deadline = budget > 0 ? now_s() + budget : 0;   /* before armed_L: an expiry between them sees this budget */
  armed_L = L;
  ensure_timer(budget);
  return 0;
}

static int wd_disarm(lua_State *L) {
  armed_L = NULL;                    /* the timer runs on: it stops at its next expiry (on_alarm) */
  stopping = 0;
  alarm_at = 0;
  lua_sethook(L, NULL, 0, 0);        /* a hook set after the code returned must not fire later */
  lua_pushnumber(L, (double)fired);
  fired = 0;
  return 1;
}

static int wd_xpcall(lua_State *L) {
  int n = lua_gettop(L);
  if (n < 2) return luaL_error(L, "xpcall: function and message handler expected");
  lua_pushvalue(L, 1);               /* f, msgh, args -> msgh, f, args */
  lua_pushvalue(L, 2);
  lua_replace(L, 1);
  lua_replace(L, 2);
  int status = lua_pcall(L, n - 2, LUA_MULTRET, 1);
  lua_pushboolean(L, status == 0);   /* msgh's slot takes the status: true, results / false, handled error */
  lua_replace(L, 1);
  return lua_gettop(L);
}

/* wd.hcall(msgh, f, ...): xpcall(f, msgh, ...) with the handler first, for the stitched walkers' direct calls
 * (host.lua walk_direct): f and its arguments are already where lua_pcall wants them and msgh is at index 1, so
 * the only stack move is the status into msgh's slot (wd.xpcall's four, ~60 of its ~200 instructions per call
 * under callgrind).  Same results as xpcall: true and f's results, or false and what msgh returned. */
static int wd_hcall(lua_State *L) {
  int n = lua_gettop(L);
  if (n < 2) return luaL_error(L, "hcall: message handler and function expected");
  int status = lua_pcall(L, n - 2, LUA_MULTRET, 1);
  lua_pushboolean(L, status == 0);
  lua_replace(L, 1);
  return lua_gettop(L);
}
/* The memory limit of a plug-in VM (--plugin-memory-mb): LuaJIT's own allocator (fast) wrapped with a byte count;
 * an allocation that would go above the limit returns NULL and LuaJIT raises "not enough memory" (LUA_ERRMEM)
 * in the code that allocated.  wd.limit_memory(bytes) wraps on the first call and sets the limit on later ones.
 *
 * The reserve: the allocation that crosses the limit fails, and from then on the VM may use MEM_RESERVE bytes above
 * the limit, so that what runs after the error (the hook's xpcall message handler and its traceback, the error's
 * report and the line that disables the instance, lupa's own calls; a T.async worker's onerror) has room, however
 * close to the limit the failed allocation left the VM.  Without it a plug-in that filled its VM with small objects
 * (a table per flow) failed again in luaprobe's own error path, outside any xpcall: `internal error: LuaMemoryError`
 * (exit 1), or LuaJIT's PANIC (an unprotected error in a C function) that aborted the whole run
 * [tests/test_memlimit_reserve.py].  The reserve is given again once the VM is back under limit - MEM_RESERVE (a
 * worker that freed its task's garbage), or when the limit is set again. */
#define MEM_RESERVE (1LL << 20)
typedef struct { lua_Alloc f; void *ud; long long used, limit; int over; } memlimit;

static void *limited_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  memlimit *m = (memlimit *)ud;
  long long old = ptr ? (long long)osize : 0;
  long long grow = (long long)nsize - old;
  if (nsize > 0 && grow > 0 && m->used + grow > m->limit) {
    if (!m->over) { m->over = 1; return NULL; }                 /* the error, in the code that allocated */
    if (m->used + grow > m->limit + MEM_RESERVE) return NULL;   /* the reserve is spent too */
  }
  void *q = m->f(m->ud, ptr, osize, nsize);
  if (q != NULL || nsize == 0) m->used += grow;
  if (m->over && m->used < m->limit - MEM_RESERVE) m->over = 0;
  return q;
}

/* Finalizer of the registry anchor: lua_close runs finalizers before it frees the state, and close_state only
 * destroys LuaJIT's allocator arena when g->allocf is still LuaJIT's own, so the original is put back here, and the
 * memlimit, which nothing reads once it is, freed (it leaked 48 bytes of malloc per VM before: a daemon reloading
 * its plug-ins for months; tests/test_memlimit_close.py). */
static int memlimit_gc(lua_State *L) {
  void *ud;
  if (lua_getallocf(L, &ud) == limited_alloc) {
    memlimit *m = (memlimit *)ud;
    lua_setallocf(L, m->f, m->ud);
    free(m);
  }
  return 0;
}

static int wd_limit_memory(lua_State *L) {
  void *ud;
  lua_Alloc f = lua_getallocf(L, &ud);
  memlimit *m;
  if (f == limited_alloc) {
    m = (memlimit *)ud;
  } else {
    m = (memlimit *)calloc(1, sizeof *m);        /* lives as long as the VM: freed by memlimit_gc at lua_close */
    if (m == NULL) return luaL_error(L, "limit_memory: out of memory");
    m->f = f;
    m->ud = ud;
    m->used = (long long)lua_gc(L, LUA_GCCOUNT, 0) * 1024 + lua_gc(L, LUA_GCCOUNTB, 0);
    m->limit = (long long)lua_tonumber(L, 1);
    lua_newuserdata(L, 1);                       /* anchor: its __gc gives the allocator back at lua_close */
    lua_createtable(L, 0, 1);
    lua_pushcclosure(L, memlimit_gc, 0);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    lua_setfield(L, LUA_REGISTRYINDEX, "luaprobe.memlimit");
    m->used = (long long)lua_gc(L, LUA_GCCOUNT, 0) * 1024 + lua_gc(L, LUA_GCCOUNTB, 0);
    lua_setallocf(L, limited_alloc, m);
  }
  m->limit = (long long)lua_tonumber(L, 1);
  m->over = 0;                                   /* a new limit: the next crossing fails first, then the reserve */
  lua_pushnumber(L, (double)m->used);
  return 1;
}

/* The crash line (docs/operations.md "Exit codes", 139 / 135 / 132 / 136): a plug-in's FFI code that faults
 * (`ffi.cast("int*", 0)[0]`, a call into bad machine code, a division by zero in C) kills the fast path, which runs in
 * the `luaprobe run` process, with SIGSEGV, SIGBUS, SIGILL or SIGFPE.  A full recovery is not possible in-process
 * (the VM's state is unknown after the fault), but the user gets one line naming the plug-in, and the run's shared
 * memory is unlinked before the process dies:
 *
 *   wd.crash_enter(line) -> entered   the text after "SIGSEGV" for a fault from now on (" in plug-in F (hook H) ..."),
 *                                      when none is set (false: an outer walk or call holds it; leave it alone)
 *   wd.crash_leave()                   no plug-in code runs now: a fault is not named
 *   _lpwatch.crash_paths(text)         (Python) the /dev/shm paths this process owns now: "f<path>\0" a segment,
 *                                      "d<path>\0" a flat directory (extracted files); replaces the list
 *
 * engine/plugins/host.lua sets the line per batch walk (Host:walk_batch) and per single hook call (Host:call), never
 * per packet; shm/segment.py keeps the path list (every segment this process created and has not unlinked, and the
 * default extraction directory), given here by engine/fastpath/run.py.  The handler (installed on the first
 * crash_enter, in the process that walks: not in a forked child such as the capture process, whose own SIGBUS
 * guard, shm/_lpsync.c, is chained to as any earlier handler) acts only in that process:
 *   1. when the fault came from the kernel (si_code > 0: not a kill) while a line is set, it writes
 *      "luaprobe run: crashed: SIGSEGV in plug-in ... — ..." with write(2) alone (async-signal safe);
 *   2. it unlinks the listed paths (unlink(2); a directory's entries with getdents64 and unlinkat, then rmdir(2):
 *      system calls only), so the dead run leaves no /dev/shm segment (the capture process, the store writer and
 *      the workers keep their mappings until they exit) -- except for a SIGBUS with an earlier handler of its own,
 *      which may be a guard that recovers (the cut guard): the process may live on, its segments are left alone;
 *   3. it puts back the disposition found before it (SIG_DFL normally) and returns: the faulting instruction runs
 *      again and the process dies of the same signal (exit status 128 + signal in a shell, -signal for subprocess),
 *      or the earlier handler (Python's faulthandler) acts.  A signal sent by kill is raised again the same way.
 * A fault outside plug-in walks and calls (no line set) is never named nor swallowed; its paths are unlinked too. */
#include <fcntl.h>
#include <sys/syscall.h>
#include <sys/stat.h>

#define CRASH_NSIG 4
static const int crash_sigs[CRASH_NSIG] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE};
static const char *const crash_names[CRASH_NSIG] = {"SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE"};
static struct sigaction crash_prev[CRASH_NSIG];
static char crash_text[1024];
static volatile sig_atomic_t crash_len = 0;
static pid_t crash_pid = 0;
static int crash_installed = 0;

#define CRASH_PATHS_MAX 65536          /* bytes of "f<path>\0" / "d<path>\0" entries; what does not fit is left to
                                        * the sweep (`luaprobe shm clean`, the next run's start) */
static char crash_paths_buf[2][CRASH_PATHS_MAX];
static size_t crash_paths_len[2];
static volatile sig_atomic_t crash_paths_at = -1;   /* the buffer the handler reads (-1: none) */

static void crash_write(const char *s, size_t n) {
  while (n > 0) {
    ssize_t w = write(2, s, n);
    if (w <= 0) return;
    s += w;
    n -= (size_t)w;
  }
}

struct lp_dirent64 { unsigned long long d_ino; long long d_off; unsigned short d_reclen; unsigned char d_type;
                     char d_name[]; };

static void crash_rmdir(const char *path) {   /* a flat directory: its entries, then itself (system calls only) */
  int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd >= 0) {
    char buf[4096];
    for (;;) {
      long n = syscall(SYS_getdents64, fd, buf, sizeof buf);
      if (n <= 0) break;
      for (long off = 0; off < n;) {
        struct lp_dirent64 *d = (struct lp_dirent64 *)(buf + off);
        off += d->d_reclen;
        if (d->d_name[0] == '.' && (d->d_name[1] == 0 || (d->d_name[1] == '.' && d->d_name[2] == 0))) continue;
        unlinkat(fd, d->d_name, 0);
      }
    }
    close(fd);
  }
  rmdir(path);
}

static void crash_unlink_paths(void) {
  int at = crash_paths_at;
  if (at < 0) return;
  const char *p = crash_paths_buf[at], *end = p + crash_paths_len[at];
  while (p < end) {
    size_t n = strnlen(p, (size_t)(end - p));
    if (n > 1) {
      if (p[0] == 'd') crash_rmdir(p + 1);
      else unlink(p + 1);
    }
    p += n + 1;
  }
}

static void on_crash(int sig, siginfo_t *si, void *ctx) {
  (void)ctx;
  int i = 0;
  while (i < CRASH_NSIG - 1 && crash_sigs[i] != sig) i++;
  if (getpid() == crash_pid) {
    int n = crash_len;
    if (n > 0 && si != NULL && si->si_code > 0) {
      static const char head[] = "luaprobe run: crashed: ";
      crash_write(head, sizeof head - 1);
      crash_write(crash_names[i], strlen(crash_names[i]));
      crash_write(crash_text, (size_t)n);
      crash_len = 0;
    }
    int prev_handles = (crash_prev[i].sa_flags & SA_SIGINFO) ? crash_prev[i].sa_sigaction != NULL
        : (crash_prev[i].sa_handler != SIG_DFL && crash_prev[i].sa_handler != SIG_IGN);
    if (!(sig == SIGBUS && prev_handles)) {
      crash_unlink_paths();
      crash_paths_at = -1;
    }
  }
  sigaction(sig, &crash_prev[i], NULL);
  if (si == NULL || si->si_code <= 0) raise(sig);   /* sent, not a fault: returning would not raise it again */
}

static int wd_crash_enter(lua_State *L) {
  size_t len = 0;
  const char *t = lua_tolstring(L, 1, &len);
  if (crash_len > 0 || t == NULL) {
    lua_pushboolean(L, 0);
    return 1;
  }
  if (!crash_installed) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_crash;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < CRASH_NSIG; i++) sigaction(crash_sigs[i], &sa, &crash_prev[i]);
    crash_pid = getpid();
    crash_installed = 1;
  }
  if (len > sizeof crash_text - 1) len = sizeof crash_text - 1;
  memcpy(crash_text, t, len);
  crash_len = (sig_atomic_t)len;
  lua_pushboolean(L, 1);
  return 1;
}

static int wd_crash_leave(lua_State *L) {
  (void)L;
  crash_len = 0;
  return 0;
}

int luaopen_lpwatch(lua_State *L) {
  lua_createtable(L, 0, 7);
  lua_pushcclosure(L, wd_crash_enter, 0);
  lua_setfield(L, -2, "crash_enter");
  lua_pushcclosure(L, wd_crash_leave, 0);
  lua_setfield(L, -2, "crash_leave");
  lua_pushcclosure(L, wd_limit_memory, 0);
  lua_setfield(L, -2, "limit_memory");
  lua_pushcclosure(L, wd_xpcall, 0);
  lua_setfield(L, -2, "xpcall");
  lua_pushcclosure(L, wd_hcall, 0);
  lua_setfield(L, -2, "hcall");
  lua_pushcclosure(L, wd_arm, 0);
  lua_setfield(L, -2, "arm");
  lua_pushcclosure(L, wd_disarm, 0);
  lua_setfield(L, -2, "disarm");
  return 1;
}

/* Python side (the fast path's watch thread, engine/fastpath/run.py): seconds since the budget ran out while
 * the interrupt has not landed (0.0: none pending).  The hook cannot land while the VM runs a compiled LuaJIT
 * trace or a C function; the same .so is loaded by Python and by package.loadlib, so the state is shared. */
static PyObject *py_stuck_for(PyObject *self, PyObject *args) {
  (void)self; (void)args;
  double at = alarm_at;
  return PyFloat_FromDouble(at > 0 && armed_L != NULL ? now_s() - at : 0.0);
}

static PyObject *py_message(PyObject *self, PyObject *args) {
  (void)self; (void)args;
  return PyUnicode_DecodeUTF8(message, strlen(message), "replace");
}

/* Python side: a stop signal arrived (the run's signal watch thread).  The hook running now and every hook of the
 * walk under way are interrupted at their next plug-in instruction, so the stop takes effect within ~one hook
 * call instead of a batch of hooks each running up to the budget; disarm ends it (onunload runs normally). */
static PyObject *py_stop_now(PyObject *self, PyObject *args) {
  (void)self; (void)args;
  if (installed && armed_L != NULL) {
    stopping = 1;
    raise(WD_SIGNAL);
  }
  Py_RETURN_NONE;
}

/* Python side (shm/segment.py's list, given by engine/fastpath/run.py): the paths the crash handler unlinks, as
 * bytes of "f<path>\0" (a segment) and "d<path>\0" (a flat directory) entries; replaces the list.  Written into the
 * buffer the handler does not read, then switched to (one int store): a fault during the call sees the old list
 * or the new one whole.  Entries past CRASH_PATHS_MAX bytes are dropped (left to the sweep).  Returns how many
 * bytes were kept. */
static PyObject *py_crash_paths(PyObject *self, PyObject *arg) {
  (void)self;
  char *data;
  Py_ssize_t n;
  if (PyBytes_AsStringAndSize(arg, &data, &n) < 0) return NULL;
  int at = crash_paths_at == 0 ? 1 : 0;
  size_t keep = 0;
  while (keep < (size_t)n) {                       /* whole entries only, each ending with its NUL */
    size_t e = strnlen(data + keep, (size_t)n - keep);
    if (keep + e >= (size_t)n || keep + e + 1 > CRASH_PATHS_MAX) break;
    keep += e + 1;
  }
  memcpy(crash_paths_buf[at], data, keep);
  crash_paths_len[at] = keep;
  __atomic_store_n(&crash_paths_at, at, __ATOMIC_RELEASE);
  return PyLong_FromSize_t(keep);
}

static PyMethodDef lpwatch_methods[] = {
  {"crash_paths", py_crash_paths, METH_O, "the /dev/shm paths a crash unlinks (bytes: f<path>\\0 / d<path>\\0 entries)"},
  {"stop_now", py_stop_now, METH_NOARGS, "interrupt the armed walk's hooks now (a stop signal)"},
  {"stuck_for", py_stuck_for, METH_NOARGS, "seconds the armed hook has run past its budget uninterrupted (0.0: none)"},
  {"message", py_message, METH_NOARGS, "the armed budget's message (plug-in, instance, budget)"},
  {NULL, NULL, 0, NULL}
};

static struct PyModuleDef lpwatch_module = {
  PyModuleDef_HEAD_INIT, "_lpwatch", "Hook watchdog for LuaJIT plug-in VMs (a Lua C module).", -1,
  lpwatch_methods, NULL, NULL, NULL, NULL
};
PyMODINIT_FUNC PyInit__lpwatch(void) { return PyModule_Create(&lpwatch_module); }
