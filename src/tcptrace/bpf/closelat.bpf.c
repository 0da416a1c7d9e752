/* closelat.bpf.c: how long close(), shutdown() and close_range() take on TCP sockets.
 *
 * sys_enter_*: tt_fd_to_tcp_sock(fd) tells whether the fd is a TCP socket (files,
 * pipes, UDP and Unix sockets give 0 and are never counted); the call's start, the
 * socket and what it looked like (state, flags, endpoints, time in its state from
 * lifecycle's `socks`) are kept per thread in `cl_calls`.
 * tcp:tcp_send_reset during the call, by the same thread on the same socket: the call
 * sent a reset.
 * sys_exit_*: the duration goes into an exact log2 histogram per (process, syscall,
 * user stack when TT_WITH_STACKS) in `cl_hists`; only a call a human must see (reset,
 * blocked on SO_LINGER, late close of a CLOSE_WAIT socket) becomes a TT_KIND_CLOSE event.
 * TT_CL_NO_EVENTS (the agent): histograms per (process, syscall) only, no stack taken and
 * no event sent, so the table grows with the processes, not with their code paths.
 *
 * Filters (--pid, --comm, --port, -4/-6) apply to the calling process and the socket
 * closed, at entry.
 *
 * close_range(first, last, flags): a call with CLOSE_RANGE_CLOEXEC closes nothing and
 * is ignored; otherwise the call counts when one of the first TT_CL_RANGE_SCAN fds of
 * the range is a TCP socket (its first such socket describes the call).
 */
#include "sock.bpf.h"

#ifndef TT_CL_MAX_KEYS
#define TT_CL_MAX_KEYS 16384     /* (process, syscall, stack) histograms */
#endif
#ifndef TT_CL_MAX_THREADS
#define TT_CL_MAX_THREADS 16384  /* calls in flight */
#endif
#ifndef TT_CL_LINGER_NS
#define TT_CL_LINGER_NS 1000000  /* SO_LINGER on and the call took this long: it blocked */
#endif
#ifndef TT_CL_CLOSE_WAIT_NS
#define TT_CL_CLOSE_WAIT_NS 1000000000ULL /* CLOSE_WAIT this long before close(): late */
#endif
#ifndef TT_CL_RANGE_SCAN
#define TT_CL_RANGE_SCAN 16
#endif

#define TT_CL_CLOSE_RANGE_CLOEXEC 4 /* include/uapi/linux/close_range.h */

struct tt_cl_key {
    __u32 tgid;
    __u32 op;                     /* TT_OP_CLOSE, TT_OP_SHUTDOWN, TT_OP_CLOSE_RANGE */
    __s32 ustack;                 /* user stack id at entry; -1 without TT_WITH_STACKS */
    __u32 pad;
    __u64 start_ns;               /* the process's start: a reused pid is another key */
};

struct tt_cl_hist {
    __u64 count;
    __u64 sum_ns;
    __u64 max_ns;                 /* updated without a lock: a race between CPUs may keep the lower */
    __u64 resets;                 /* calls flagged TT_CLOSE_RESET */
    __u64 lingered;               /* TT_CLOSE_LINGERED */
    __u64 late_close_wait;        /* TT_CLOSE_LATE_CLOSE_WAIT */
    char comm[TT_COMM_LEN];       /* of the thread that made the first call */
    __u64 slots[TT_CL_SLOTS];
};

struct tt_cl_call {
    __u64 start_ns;
    __u64 sk;
    __u64 sk_flags;
    __u64 in_state_ns;            /* time the socket had been in `state` at entry, 0 unknown */
    __s32 ustack;
    __u8 op;
    __u8 state;
    __u8 reset;
    __u8 pad;
    struct tt_tuple t;            /* local port: skc_num (0 for a socket already in CLOSE) */
};

/* Histograms, cumulative since the program was loaded: inserted at the first call of a
 * key, never deleted by the kernel (the user side reads them and takes differences). */
BPF_HASH(cl_hists, struct tt_cl_key, struct tt_cl_hist, TT_CL_MAX_KEYS);

/* Calls in flight by thread id: inserted at sys_enter, deleted at sys_exit. */
BPF_HASH(cl_calls, __u32, struct tt_cl_call, TT_CL_MAX_THREADS);

/* A zeroed histogram to insert from (too large for the BPF stack): one slot per CPU,
 * never inserted or deleted. Only comm is ever written, and it is rewritten before
 * each use. */
BPF_PERCPU_ARRAY(cl_zero, struct tt_cl_hist, 1);

/* Exact per-CPU counters (TT_CL_STAT_*), a fixed array: incremented here, summed
 * over CPUs and never reset by the user side. */
BPF_PERCPU_ARRAY(cl_stats, __u64, TT_CL_STAT_MAX);

/* Fill `c` from the TCP socket `sk`, closed by `me`; 0 when the filters reject it. */
static __always_inline int tt_cl_describe(struct tt_cl_call *c, __u64 sk, const struct tt_owner *me)
{
    const char *p = (const char *)sk;
    __u8 state = 0;

    tt_read_tuple(p, &c->t, TT_SPORT_NUM);
    if (!tt_keep(c->t.family, c->t.sport, c->t.dport, c->t.netns, me))
        return 0;
    bpf_probe_read_kernel(&state, sizeof(state), p + TT_SKC_STATE_OFF);
    c->state = state;
    c->sk = sk;
    c->sk_flags = tt_sk_flags(p);
    struct tt_sock *s = socks.lookup(&sk);
    if (s && s->state == state && s->since_ns)
        c->in_state_ns = bpf_ktime_get_ns() - s->since_ns;
    return 1;
}

static __always_inline int tt_cl_begin(void *ctx, struct tt_cl_call *c, __u8 op)
{
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    c->op = op;
    c->ustack = -1;
#if defined(TT_WITH_STACKS) && !defined(TT_CL_NO_EVENTS)
    c->ustack = stacks.get_stackid(ctx, BPF_F_USER_STACK);
    if (c->ustack < 0)
        stats.atomic_increment(TT_STAT_STACK_FAIL);
#endif
    c->start_ns = bpf_ktime_get_ns();
    if (cl_calls.update(&tid, c))
        cl_stats.atomic_increment(TT_CL_STAT_CALL_FAIL);
    return 0;
}

static __always_inline int tt_cl_enter_fd(void *ctx, int fd, __u8 op)
{
    __u64 sk = tt_fd_to_tcp_sock(fd);
    if (!sk)
        return 0;
    struct tt_cl_call c = {};
    struct tt_owner me = {};
    tt_owner_current(&me);
    if (!tt_cl_describe(&c, sk, &me))
        return 0;
    return tt_cl_begin(ctx, &c, op);
}

static __always_inline void tt_cl_count(struct tt_cl_key *key, __u64 d, __u32 flags)
{
    struct tt_cl_hist *h = cl_hists.lookup(key);
    if (!h) {
        /* The key's first call: a zeroed histogram named after the caller. */
        int zero = 0;
        struct tt_cl_hist *z = cl_zero.lookup(&zero);
        if (!z)
            return;
        bpf_get_current_comm(&z->comm, sizeof(z->comm));
        h = cl_hists.lookup_or_try_init(key, z);
        if (!h) {
            cl_stats.atomic_increment(TT_CL_STAT_HIST_FAIL);
            return;
        }
    }
    __u32 slot = tt_log2_slot(d);
    if (slot >= TT_CL_SLOTS)
        slot = TT_CL_SLOTS - 1;
    __sync_fetch_and_add(&h->slots[slot], 1);
    __sync_fetch_and_add(&h->count, 1);
    __sync_fetch_and_add(&h->sum_ns, d);
    if (d > h->max_ns)
        h->max_ns = d;
    if (flags & TT_CLOSE_RESET)
        __sync_fetch_and_add(&h->resets, 1);
    if (flags & TT_CLOSE_LINGERED)
        __sync_fetch_and_add(&h->lingered, 1);
    if (flags & TT_CLOSE_LATE_CLOSE_WAIT)
        __sync_fetch_and_add(&h->late_close_wait, 1);
}

static __always_inline int tt_cl_exit(void *ctx, long ret)
{
    __u64 now = bpf_ktime_get_ns();
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)id;
    struct tt_cl_call *cp = cl_calls.lookup(&tid);
    if (!cp)
        return 0;
    struct tt_cl_call c = *cp;
    cl_calls.delete(&tid);
    __u64 d = now > c.start_ns ? now - c.start_ns : 0;

    __u32 flags = 0;
    if (c.reset)
        flags |= TT_CLOSE_RESET;
    if (((c.sk_flags >> TT_SOCK_LINGER_BIT) & 1) && d >= TT_CL_LINGER_NS)
        flags |= TT_CLOSE_LINGERED;
    if (c.state == TT_TCP_CLOSE_WAIT && c.in_state_ns >= TT_CL_CLOSE_WAIT_NS)
        flags |= TT_CLOSE_LATE_CLOSE_WAIT;

    struct tt_cl_key key = {};
    key.tgid = id >> 32;
    key.op = c.op;
    key.ustack = c.ustack;
    key.start_ns = tt_current_start_ns();
    tt_cl_count(&key, d, flags);
    cl_stats.atomic_increment(TT_CL_STAT_CALLS);
    if (!flags)
        return 0;
    cl_stats.atomic_increment(TT_CL_STAT_FLAGGED);
#ifdef TT_CL_NO_EVENTS
    return 0;
#endif

    /* Stacks of the event: the user stack is the call's; a kernel stack at syscall
     * exit says nothing. */
    struct tt_event *e = tt_reserve_stacks(ctx, TT_KIND_CLOSE, 1, 0);
    if (!e)
        return 0;
    e->ustack = c.ustack;
    e->skaddr = c.sk;
    e->value_ns = d;
    e->aux_ns = c.in_state_ns;
    e->flags = flags;
    e->sk_flags = c.sk_flags;
    e->owner_tgid = key.tgid; /* the caller, as in the histogram's key */
    __builtin_memcpy(e->owner_comm, e->task_comm, TT_COMM_LEN);
    e->ret = (__s32)ret;
    e->op = c.op;
    e->oldstate = c.state;
    tt_event_endpoint(e, &c.t);
    tt_submit(e);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
    return tt_cl_enter_fd(args, (int)args->fd, TT_OP_CLOSE);
}

TRACEPOINT_PROBE(syscalls, sys_exit_close)
{
    return tt_cl_exit(args, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_shutdown)
{
    return tt_cl_enter_fd(args, (int)args->fd, TT_OP_SHUTDOWN);
}

TRACEPOINT_PROBE(syscalls, sys_exit_shutdown)
{
    return tt_cl_exit(args, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_close_range)
{
    if (args->flags & TT_CL_CLOSE_RANGE_CLOEXEC)
        return 0;
    unsigned int first = args->fd, last = args->max_fd;
    struct tt_owner me = {};
    tt_owner_current(&me);
    for (int i = 0; i < TT_CL_RANGE_SCAN; i++) {
        unsigned int fd = first + i;
        if (fd > last || fd > 0x7fffffff)
            break;
        __u64 sk = tt_fd_to_tcp_sock((int)fd);
        if (!sk)
            continue;
        struct tt_cl_call c = {};
        if (!tt_cl_describe(&c, sk, &me))
            continue;
        return tt_cl_begin(args, &c, TT_OP_CLOSE_RANGE);
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_close_range)
{
    return tt_cl_exit(args, args->ret);
}

/* bcc declares this tracepoint's `reason` field with the kernel's enum type, which the
 * (older) installed headers may lack; the field is not read. */
enum sk_rst_reason { TT_SK_RST_REASON_UNREAD };

/* A reset sent by the thread in a call, on the socket it closes (close_range: on any). */
TRACEPOINT_PROBE(tcp, tcp_send_reset)
{
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    struct tt_cl_call *c = cl_calls.lookup(&tid);
    if (!c)
        return 0;
    if (c->sk == (__u64)args->skaddr || c->op == TT_OP_CLOSE_RANGE)
        c->reset = 1;
    return 0;
}
