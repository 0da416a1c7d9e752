/* lifecycle.bpf.c: every TCP state transition, from sock:inet_sock_set_state,
 * and the one writer of the socket table (sock.bpf.h) on that tracepoint.
 *
 * Keeps each socket's entry in `socks` (owner, state, since when) and emits one
 * TT_KIND_TRANSITION event per transition that passes the filters
 * (TT_NO_TRANSITION_EVENTS: the table only; TT_CLOSEWAIT_EVENTS: only the
 * transitions closewait reads).
 *
 * TT_LC_OWNERS_ONLY: the socket table's owners and nothing else, for a command
 * that reads owners without tracing transitions (timewait; the loader adds this
 * mode as the part SOCKET_OWNERS). Only the transitions that bind, inherit or
 * end an owner are handled, and no event is sent.
 *
 * Raw tracepoint, in programs split by context. A classic tracepoint program is
 * not run while any other classic tracepoint or kprobe program runs on the CPU
 * (the kernel's bpf_prog_active guard), so a softirq changing a TCP state while
 * a syscall hook runs in process context would go unseen. A raw tracepoint
 * program is skipped only when it would nest in itself, so the transitions made
 * in process context and all the others run in separate programs: a softirq
 * arriving while the process-context one runs is handled by the other. What is
 * still skipped is counted by the kernel (recursion_misses, reported). In the
 * owners-only mode the other program has a backup copy (see tt_lifecycle()), so
 * an owner is lost only when both copies were skipped. The fields are read from
 * the socket as the tracepoint's TP_fast_assign reads them, at offsets from BTF.
 *
 * Owner: only tt_process_transition()s are made by the socket's own process, so
 * only they set the owner; every other transition keeps the owner learned
 * before. A passively opened child inherits its listener's owner.
 */
#include "sock.bpf.h"

/* One transition of socket `skp`. `proc`: made in the owner's process context.
 * `backup`: the owners-only backup copy, run right after the main one on the
 * same CPU (or alone when the main one was skipped): its writes repeat the main
 * one's, except that it never records an unknown owner in `closed_owners`,
 * which would hide the one the main copy moved there. */
static __always_inline int tt_lifecycle(struct bpf_raw_tracepoint_args *ctx, int o, int n, int proc,
                                        int backup)
{
    const char *skp = (const char *)ctx->args[0];
    if (!tt_sk_is_tcp(skp))
        return 0;
    struct tt_tuple t = {};
    tt_read_tuple(skp, &t, TT_SPORT_INET);
    __u64 sk = (__u64)skp;
    __u64 now = bpf_ktime_get_ns();
    __u64 lkey = tt_listener_key(t.netns, t.family, t.sport);

    struct tt_sock cur = {};
    __u64 prev_ns = 0;
    int known = 0;
    if (o == TT_TCP_CLOSE || n == TT_TCP_SYN_RECV) {
        /* Born now: whatever the table holds at this address belongs to a
         * freed socket, so start afresh. */
        if (n == TT_TCP_SYN_RECV) {
            struct tt_owner *l = listeners.lookup(&lkey);
            if (l)
                cur.owner = *l;
        }
    } else {
        struct tt_sock *s = socks.lookup(&sk);
        if (s) {
            cur = *s;
            known = 1;
            if (cur.since_ns && now > cur.since_ns)
                prev_ns = now - cur.since_ns;
        }
    }
    if (proc)
        tt_owner_current(&cur.owner);

    if (n == TT_TCP_CLOSE) {
#ifdef TT_CLOSED_OWNERS
        if (!backup || known)
            closed_owners.update(&sk, &cur.owner);
#endif
        socks.delete(&sk);
        if (o == TT_TCP_LISTEN)
            listeners.delete(&lkey);
    } else {
        cur.since_ns = now;
        cur.state = n;
        cur.family = t.family;
        cur.sport = t.sport;
        cur.dport = t.dport;
        cur.netns = t.netns;
        if (socks.update(&sk, &cur))
            stats.increment(TT_STAT_SOCK_UPDATE_FAIL);
        if (n == TT_TCP_LISTEN && listeners.update(&lkey, &cur.owner))
            stats.increment(TT_STAT_SOCK_UPDATE_FAIL);
    }

#ifdef TT_LC_OWNERS_ONLY
    return 0;
#endif
    if (!tt_keep(t.family, t.sport, t.dport, t.netns, &cur.owner))
        return 0;
    stats.increment(TT_STAT_TRANSITIONS);
#ifdef TT_NO_TRANSITION_EVENTS
    /* The command only needs the socket table (closelat): no event to decode. */
    return 0;
#endif
#ifdef TT_CLOSEWAIT_EVENTS
    /* closewait needs births (a reused skaddr starts afresh), deaths, CLOSE_WAIT's
     * entry and exits, and connect (owner and origin stack): the other
     * transitions of a connection are not sent, which halves the stream of a
     * busy host. */
    if (!(o == TT_TCP_CLOSE || n == TT_TCP_SYN_RECV || n == TT_TCP_CLOSE
          || o == TT_TCP_CLOSE_WAIT || n == TT_TCP_CLOSE_WAIT))
        return 0;
#endif

#ifdef TT_PROC_STACKS_ONLY
    /* Stacks only where they attribute (connect, listen, close): softirq
     * transitions of healthy sockets pay nothing. */
    struct tt_event *e = tt_reserve_stacks(ctx, TT_KIND_TRANSITION, proc, proc);
#else
    struct tt_event *e = tt_reserve(ctx, TT_KIND_TRANSITION, proc);
#endif
    if (!e)
        return 0;
    e->skaddr = sk;
    e->value_ns = prev_ns;
    e->sk_flags = tt_sk_flags(skp);
    tt_event_owner(e, &cur.owner);
    e->oldstate = o;
    e->newstate = n;
    tt_event_endpoint(e, &t);
    tt_submit(e);
    return 0;
}

/* inet_sock_set_state(sk, oldstate, newstate): the transitions made in the
 * calling process's context. Attached by the loader (Part.raw_attach). */
int tt_lc_process(struct bpf_raw_tracepoint_args *ctx)
{
    int o = (int)ctx->args[1], n = (int)ctx->args[2];
    if (!tt_process_transition(o, n))
        return 0;
    return tt_lifecycle(ctx, o, n, 1, 0);
}

/* Whether the other programs handle transition o -> n: all of them, or in the
 * owners-only mode, a child's birth (inherits an owner) and CLOSE (ends one). */
static __always_inline int tt_lc_other_wants(int o, int n)
{
    if (tt_process_transition(o, n))
        return 0;
#ifdef TT_LC_OWNERS_ONLY
    return n == TT_TCP_SYN_RECV || n == TT_TCP_CLOSE;
#else
    return 1;
#endif
}

/* ... and all the others (mostly softirq). */
int tt_lc_other(struct bpf_raw_tracepoint_args *ctx)
{
    int o = (int)ctx->args[1], n = (int)ctx->args[2];
    if (!tt_lc_other_wants(o, n))
        return 0;
    return tt_lifecycle(ctx, o, n, 0, 0);
}

#ifdef TT_LC_OWNERS_ONLY
/* The owners-only mode's backup copy of tt_lc_other (Part.backups). */
int tt_lc_other_backup(struct bpf_raw_tracepoint_args *ctx)
{
    int o = (int)ctx->args[1], n = (int)ctx->args[2];
    if (!tt_lc_other_wants(o, n))
        return 0;
    return tt_lifecycle(ctx, o, n, 0, 1);
}
#endif
