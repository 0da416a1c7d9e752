/* lifecycle.bpf.c: every TCP state transition, from sock:inet_sock_set_state.
 *
 * Keeps the per-socket table `socks` (state, since when, owner) and emits one
 * TT_KIND_TRANSITION event per transition that passes the filters.
 *
 * Raw tracepoint, in two programs. A classic tracepoint program is not run
 * when any other classic tracepoint or kprobe program is running on the CPU
 * (the kernel's bpf_prog_active guard): a softirq that changes a TCP state
 * while, say, a syscall hook runs in process context would go unseen, and
 * here it did (delayed ACKs handled in one timer softirq). A raw tracepoint
 * program is skipped only when it interrupts itself, so the transitions made
 * in process context and all the others run in separate programs: a softirq
 * arriving while the process-context one runs is handled by the other. What
 * is still skipped is counted by the kernel (recursion_misses, reported).
 * The fields are read from the socket as the tracepoint's TP_fast_assign
 * reads them, at offsets from BTF (TT_SKC_*, TT_INET_SPORT_OFF, ...).
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

/* The tracepoint's fields, read from the socket (include/trace/events/sock.h). */
struct tt_lc_fields {
    __u16 family, protocol, sport, dport;
    __u8 saddr[16], daddr[16];
};

static __always_inline void tt_lc_read(const char *sk, struct tt_lc_fields *f)
{
    __u16 sport = 0, dport = 0;
    bpf_probe_read_kernel(&f->family, sizeof(f->family), sk + TT_SKC_FAMILY_OFF);
    bpf_probe_read_kernel(&f->protocol, sizeof(f->protocol), sk + TT_SK_PROTOCOL_OFF);
    bpf_probe_read_kernel(&sport, sizeof(sport), sk + TT_INET_SPORT_OFF);
    bpf_probe_read_kernel(&dport, sizeof(dport), sk + TT_SKC_DPORT_OFF);
    f->sport = __builtin_bswap16(sport);
    f->dport = __builtin_bswap16(dport);
    tt_read_addrs(sk, f->family, f->saddr, f->daddr);
}

static __always_inline int tt_lifecycle(struct bpf_raw_tracepoint_args *ctx, const char *skp, int o, int n,
                                        int proc)
{
    struct tt_lc_fields f = {};
    tt_lc_read(skp, &f);
    if (f.protocol != TT_IPPROTO_TCP)
        return 0;

    __u64 sk = (__u64)skp;
    __u64 now = bpf_ktime_get_ns();
    __u32 lkey = ((__u32)f.family << 16) | f.sport;

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
        cur.family = f.family;
        cur.sport = f.sport;
        cur.dport = f.dport;
        if (socks.update(&sk, &cur))
            tt_stat(TT_STAT_SOCK_UPDATE_FAIL);
        if (n == TT_TCP_LISTEN && listeners.update(&lkey, &cur))
            tt_stat(TT_STAT_SOCK_UPDATE_FAIL);
    }

    if (!tt_keep(f.family, f.sport, f.dport, cur.owner_tgid, cur.owner_comm))
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
    struct tt_event *e = tt_reserve_stacks(ctx, TT_KIND_TRANSITION, proc, proc);
#else
    struct tt_event *e = tt_reserve(ctx, TT_KIND_TRANSITION, proc);
#endif
    if (!e)
        return 0;
    e->skaddr = sk;
    e->value_ns = prev_ns;
    e->sk_flags = tt_sk_flags(skp);
    e->owner_tgid = cur.owner_tgid;
    __builtin_memcpy(e->owner_comm, cur.owner_comm, TT_COMM_LEN);
    e->owner_cgroup = cur.owner_cgroup;
    e->oldstate = o;
    e->newstate = n;
    e->family = f.family;
    e->sport = f.sport;
    e->dport = f.dport;
    __builtin_memcpy(e->saddr, f.saddr, 16);
    __builtin_memcpy(e->daddr, f.daddr, 16);
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
    return tt_lifecycle(ctx, (const char *)ctx->args[0], o, n, 1);
}

/* ... and all the others (mostly softirq). */
int tt_lc_other(struct bpf_raw_tracepoint_args *ctx)
{
    int o = (int)ctx->args[1], n = (int)ctx->args[2];
    if (tt_process_transition(o, n))
        return 0;
    return tt_lifecycle(ctx, (const char *)ctx->args[0], o, n, 0);
}
