/* owner.bpf.c: process-context hooks that bind a TCP socket to its owner and
 * code path (closewait, the agent, and the commands built on them).
 *
 * Hooks (all in the calling process's context):
 *   syscalls:sys_exit_accept4, sys_exit_accept  the accepted child: its owner is
 *       the caller (not only the listener's owner), and its origin (TT_CW_AGG: kept in
 *       `socks` with the caller's user stack; else a TOUCH event, op ACCEPT, with the
 *       origin stacks).
 *   sock:sock_recv_length, sock:sock_send_length (raw tracepoints, see below)
 *       every recv/send on every socket of the host: protocol is checked first,
 *       then `socks`. A socket not in CLOSE_WAIT: with TT_TOUCH_STACKS (and when it
 *       passes the filters), the operation and its user stack are kept in its entry
 *       (`pre_fin`: what the app last did with the connection before the peer's FIN).
 *       A socket in CLOSE_WAIT: the toucher becomes its owner, and (TT_CW_AGG) its
 *       entry in `cw_open` keeps the first touch after the FIN with its user stack, the
 *       last one, and when the app read EOF (a recv returning 0: the moment it should
 *       close); without TT_CW_AGG a TOUCH event (with stacks) is sent, at most
 *       TT_MAX_CW_TOUCHES per socket, so an app spinning on a dead socket cannot flood
 *       the ring buffer.
 * connect (CLOSE->SYN_SENT) and close (CLOSE_WAIT->LAST_ACK) are transitions
 * lifecycle.bpf.c already sees in process context.
 *
 * Map use: `socks` (sock.bpf.h), whose owners and code paths it updates. A socket
 * `socks` does not hold is met live here (the caller holds it: its address is its own),
 * so it is inserted with BPF_NOEXIST from its seed, or with the caller as owner
 * (tt_sock_meet). lifecycle resets an entry when its socket is born (CLOSE->*,
 * LISTEN->SYN_RECV), which also zeroes cw_touches and the code paths.
 */
#include "sock.bpf.h"

#ifndef TT_MAX_CW_TOUCHES
#define TT_MAX_CW_TOUCHES 8
#endif

/* The entry of socket `sk`, which the calling process holds (it accepts, sends or
 * receives on it): met now when `socks` did not hold it. */
static __always_inline struct tt_sock *tt_sock_held(__u64 sk)
{
    struct tt_sock *s = socks.lookup(&sk);
    if (s)
        return s;
    int depth = tt_scratch_take();
    struct tt_sock *met = sock_scratch.lookup(&depth);
    if (met) {
        __builtin_memset(met, 0, sizeof(*met));
        const char *p = (const char *)sk;
        __u8 state = 0;
        bpf_probe_read_kernel(&state, sizeof(state), p + TT_SKC_STATE_OFF);
        struct tt_tuple t = {};
        tt_read_tuple(p, &t, TT_SPORT_INET);
        tt_sock_meet(sk, &t, state, state, 0, 1, 1, met, depth);
    } else {
        stats.atomic_increment(TT_STAT_SOCK_UPDATE_FAIL);
    }
    tt_scratch_give(depth);
    return socks.lookup(&sk);
}

#ifndef TT_CW_AGG
static __always_inline void tt_touch_fill(struct tt_event *e, __u64 sk, struct tt_sock *s,
                                          __u8 op, int ret)
{
    e->skaddr = sk;
    e->op = op;
    e->ret = ret;
    tt_event_owner(e, &s->owner);
    /* the table keeps the ports and family, not the addresses */
    e->family = s->family;
    e->sport = s->sport;
    e->dport = s->dport;
    e->netns = s->netns;
    e->newstate = s->state; /* the state the socket was in when touched */
}
#endif

/* The caller of accept()/accept4() now holds the child: it is the owner. */
static __always_inline int tt_on_accept(void *ctx, long ret)
{
    if (ret < 0)
        return 0;
    __u64 sk = tt_fd_to_tcp_sock((int)ret);
    if (!sk)
        return 0;
    struct tt_sock *s = tt_sock_held(sk);
    if (!s)
        return 0;
    if (tt_owner_moved(&s->owner))
        tt_owner_current(&s->owner); /* else it inherited its listener's: the caller's */
    if (!tt_keep(s->family, s->sport, s->dport, s->netns, &s->owner))
        return 0;
#ifdef TT_CW_AGG
    tt_code_take(ctx, &s->origin, TT_OP_ACCEPT, (int)ret, 1);
    if (s->state == TT_TCP_CLOSE_WAIT)
        tt_cw_accepted(sk, s);
#else
    struct tt_event *e = tt_reserve(ctx, TT_KIND_TOUCH, 1);
    if (!e)
        return 0;
    tt_touch_fill(e, sk, s, TT_OP_ACCEPT, (int)ret);
    tt_submit(e);
#endif
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept4)
{
    return tt_on_accept(args, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept)
{
    return tt_on_accept(args, args->ret);
}

static __always_inline int tt_on_io(void *ctx, __u64 sk, __u8 op, int ret)
{
    struct tt_sock *s = tt_sock_held(sk);
    if (!s)
        return 0;
    if (s->state != TT_TCP_CLOSE_WAIT) {
#if defined(TT_TOUCH_STACKS) && defined(TT_WITH_STACKS)
        /* Before the FIN: what the app last did with the connection. */
        if (tt_keep(s->family, s->sport, s->dport, s->netns, &s->owner))
            tt_code_take(ctx, &s->pre_fin, op, ret, 1);
#endif
        return 0;
    }
    /* Whoever reads or writes the socket holds an fd on it and is the one that
     * should close it: the owner from now on. This also learns the owner of a
     * socket established before tracing started, and follows a socket handed
     * to another process (accept then fork, SCM_RIGHTS). */
    if (tt_owner_moved(&s->owner))
        tt_owner_current(&s->owner);
#ifdef TT_CW_AGG
    tt_cw_touch(ctx, sk, op, ret);
#else
    if (s->cw_touches >= TT_MAX_CW_TOUCHES)
        return 0;
    s->cw_touches++;
    if (!tt_keep(s->family, s->sport, s->dport, s->netns, &s->owner))
        return 0;
    struct tt_event *e = tt_reserve(ctx, TT_KIND_TOUCH, 1);
    if (!e)
        return 0;
    tt_touch_fill(e, sk, s, op, ret);
    tt_submit(e);
#endif
    return 0;
}

/* sock_recv_length/sock_send_length as raw tracepoints (TP_PROTO(struct sock
 * *sk, int ret, int flags)): they run on every send and recv of the host, in
 * process context, and a classic tracepoint program holds the kernel's
 * bpf_prog_active guard while it runs, so a softirq interrupting it would have
 * its own TCP transitions skipped by lifecycle. A raw tracepoint program only
 * guards against itself. */
static __always_inline int tt_on_io_raw(struct bpf_raw_tracepoint_args *ctx, __u8 op)
{
    const char *sk = (const char *)ctx->args[0];
    if (!tt_sk_is_tcp(sk))
        return 0;
    return tt_on_io(ctx, (__u64)sk, op, (int)ctx->args[1]);
}

RAW_TRACEPOINT_PROBE(sock_recv_length)
{
    return tt_on_io_raw(ctx, TT_OP_RECV);
}

RAW_TRACEPOINT_PROBE(sock_send_length)
{
    return tt_on_io_raw(ctx, TT_OP_SEND);
}
