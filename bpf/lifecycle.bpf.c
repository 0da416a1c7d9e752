/* lifecycle.bpf.c: every TCP state transition, from sock:inet_sock_set_state.
 *
 * Keeps the per-socket table `socks` (state, since when, owner) and emits one
 * TT_KIND_TRANSITION event per transition that passes the filters.
 *
 * Owner: the tracepoint runs in softirq for most transitions (->CLOSE_WAIT,
 * the TIME_WAIT entry, ...), where the current task is whoever was on the
 * CPU. Only the transitions below are made by the socket's own process, so
 * only they set the owner; every other transition keeps the owner learned
 * before. Passively opened children inherit their listener's owner.
 */
#include "common.bpf.h"

/* Transitions the kernel makes in the calling process's context. */
static __always_inline int tt_process_transition(int o, int n)
{
    return (o == TT_TCP_CLOSE && n == TT_TCP_SYN_SENT)       /* connect() */
        || (o == TT_TCP_CLOSE && n == TT_TCP_LISTEN)         /* listen() */
        || (o == TT_TCP_LISTEN && n == TT_TCP_CLOSE)         /* close() of a listener */
        || (o == TT_TCP_ESTABLISHED && n == TT_TCP_FIN_WAIT1) /* close()/shutdown() */
        || (o == TT_TCP_CLOSE_WAIT && n == TT_TCP_LAST_ACK);  /* close()/shutdown() */
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != TT_IPPROTO_TCP)
        return 0;

    __u64 sk = (__u64)args->skaddr;
    __u64 now = bpf_ktime_get_ns();
    int o = args->oldstate, n = args->newstate;
    int proc = tt_process_transition(o, n);
    __u32 lkey = ((__u32)args->family << 16) | args->sport;

    struct tt_sock cur = {};
    __u64 prev_ns = 0;
    if (o == TT_TCP_CLOSE || n == TT_TCP_SYN_RECV) {
        /* Born now: whatever the table holds at this address belongs to a
         * freed socket, so start afresh. */
        if (n == TT_TCP_SYN_RECV) {
            struct tt_sock *l = listeners.lookup(&lkey);
            if (l) {
                cur.owner_tgid = l->owner_tgid;
                __builtin_memcpy(cur.owner_comm, l->owner_comm, TT_COMM_LEN);
                cur.owner_cgroup = l->owner_cgroup;
            }
        }
    } else {
        struct tt_sock *s = socks.lookup(&sk);
        if (s) {
            cur = *s;
            if (cur.since_ns && now > cur.since_ns)
                prev_ns = now - cur.since_ns;
        }
    }
    if (proc) {
        cur.owner_tgid = bpf_get_current_pid_tgid() >> 32;
        bpf_get_current_comm(&cur.owner_comm, sizeof(cur.owner_comm));
        cur.owner_cgroup = bpf_get_current_cgroup_id();
    }

    if (n == TT_TCP_CLOSE) {
        socks.delete(&sk);
        if (o == TT_TCP_LISTEN)
            listeners.delete(&lkey);
    } else {
        cur.since_ns = now;
        cur.state = n;
        cur.family = args->family;
        cur.sport = args->sport;
        cur.dport = args->dport;
        if (socks.update(&sk, &cur))
            tt_stat(TT_STAT_SOCK_UPDATE_FAIL);
        if (n == TT_TCP_LISTEN && listeners.update(&lkey, &cur))
            tt_stat(TT_STAT_SOCK_UPDATE_FAIL);
    }

    if (!tt_keep(args->family, args->sport, args->dport, cur.owner_tgid, cur.owner_comm))
        return 0;
    tt_stat(TT_STAT_TRANSITIONS);
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
    struct tt_event *e = tt_reserve_stacks(args, TT_KIND_TRANSITION, proc, proc);
#else
    struct tt_event *e = tt_reserve(args, TT_KIND_TRANSITION, proc);
#endif
    if (!e)
        return 0;
    e->skaddr = sk;
    e->value_ns = prev_ns;
    e->sk_flags = tt_sk_flags(args->skaddr);
    e->owner_tgid = cur.owner_tgid;
    __builtin_memcpy(e->owner_comm, cur.owner_comm, TT_COMM_LEN);
    e->owner_cgroup = cur.owner_cgroup;
    e->oldstate = o;
    e->newstate = n;
    e->family = args->family;
    e->sport = args->sport;
    e->dport = args->dport;
    if (args->family == TT_AF_INET) {
        __builtin_memcpy(e->saddr, args->saddr, 4);
        __builtin_memcpy(e->daddr, args->daddr, 4);
    } else {
        __builtin_memcpy(e->saddr, args->saddr_v6, 16);
        __builtin_memcpy(e->daddr, args->daddr_v6, 16);
    }
    tt_submit(e);
    return 0;
}
