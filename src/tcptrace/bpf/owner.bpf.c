/* owner.bpf.c: process-context hooks that bind a TCP socket to its owner and
 * code path (closewait, and the commands built on it).
 *
 * Hooks (all in the calling process's context):
 *   syscalls:sys_exit_accept4, sys_exit_accept  the accepted child: its owner is
 *       the caller (not only the listener's owner); TOUCH op ACCEPT with the
 *       origin stacks.
 *   sock:sock_recv_length, sock:sock_send_length (raw tracepoints, see below)
 *       every recv/send on every socket of the host: protocol is checked first,
 *       then `socks`. Only a socket in CLOSE_WAIT is touched: the toucher becomes
 *       its owner, and it emits a TOUCH (with stacks): a recv returning 0 there
 *       is the app seeing EOF, the moment it should close. At most
 *       TT_MAX_CW_TOUCHES such events per socket, so an app spinning on a dead
 *       socket cannot flood the ring buffer.
 * connect (CLOSE->SYN_SENT) and close (CLOSE_WAIT->LAST_ACK) are transitions
 * lifecycle.bpf.c already sees in process context.
 *
 * Map use: `socks` (sock.bpf.h), whose owners it updates. A touch never
 * inserts an entry: an skaddr lifecycle has not seen born (or seen at all) is
 * skipped, so a freed and reused address cannot be given an old socket's owner
 * from here. lifecycle resets an entry when its socket is born (CLOSE->*,
 * LISTEN->SYN_RECV), which also zeroes cw_touches.
 */
#include "sock.bpf.h"

#ifndef TT_MAX_CW_TOUCHES
#define TT_MAX_CW_TOUCHES 8
#endif

#if defined(TT_TOUCH_STACKS) && defined(TT_WITH_STACKS)
/* The last send/recv of each socket before it entered CLOSE_WAIT, with its
 * stacks (`closewait --touch-stacks`: two stack walks on every send/recv of
 * every socket that passes the filters; docs/closewait.md has the cost).
 * Written on every such touch; never deleted here (LRU):
 * the user side reads it for sockets in CLOSE_WAIT and keeps an entry only
 * when it is older than the socket's CLOSE_WAIT entry and newer than its birth,
 * so an entry left by a freed socket at the same address is never used. */
struct tt_last_touch {
    __u64 ts_ns;
    __s32 kstack;
    __s32 ustack;
    __s32 ret;
    __u32 tgid;
    __u8 op;
    __u8 pad[7];
};
BPF_TABLE("lru_hash", __u64, struct tt_last_touch, last_touch, TT_MAX_SOCKS);
#endif

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

/* The caller of accept()/accept4() now holds the child: it is the owner. */
static __always_inline int tt_on_accept(void *ctx, long ret)
{
    if (ret < 0)
        return 0;
    __u64 sk = tt_fd_to_tcp_sock((int)ret);
    if (!sk)
        return 0;
    struct tt_sock *s = socks.lookup(&sk);
    if (!s)
        return 0; /* born before tracing started: /proc tells its owner */
    tt_owner_current(&s->owner);
    if (!tt_keep(s->family, s->sport, s->dport, s->netns, &s->owner))
        return 0;
    struct tt_event *e = tt_reserve(ctx, TT_KIND_TOUCH, 1);
    if (!e)
        return 0;
    tt_touch_fill(e, sk, s, TT_OP_ACCEPT, (int)ret);
    tt_submit(e);
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
    struct tt_sock *s = socks.lookup(&sk);
    if (!s)
        return 0;
    if (s->state != TT_TCP_CLOSE_WAIT) {
#if defined(TT_TOUCH_STACKS) && defined(TT_WITH_STACKS)
        if (tt_keep(s->family, s->sport, s->dport, s->netns, &s->owner)) {
            struct tt_last_touch t = {};
            t.ts_ns = bpf_ktime_get_ns();
            t.kstack = stacks.get_stackid(ctx, 0);
            t.ustack = stacks.get_stackid(ctx, BPF_F_USER_STACK);
            if (t.kstack < 0 || t.ustack < 0)
                stats.increment(TT_STAT_STACK_FAIL);
            t.ret = ret;
            t.tgid = bpf_get_current_pid_tgid() >> 32;
            t.op = op;
            if (last_touch.update(&sk, &t))
                stats.increment(TT_STAT_SOCK_UPDATE_FAIL);
        }
#endif
        return 0;
    }
    /* Whoever reads or writes the socket holds an fd on it and is the one that
     * should close it: the owner from now on. This also learns the owner of a
     * socket established before tracing started, and follows a socket handed
     * to another process (accept then fork, SCM_RIGHTS). */
    if (s->owner.tgid != bpf_get_current_pid_tgid() >> 32)
        tt_owner_current(&s->owner);
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
