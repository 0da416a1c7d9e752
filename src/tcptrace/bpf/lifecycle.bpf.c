/* lifecycle.bpf.c: every TCP state transition, from sock:inet_sock_set_state,
 * and the one writer of the socket table (sock.bpf.h) on that tracepoint.
 *
 * Keeps each socket's entry in `socks` (owner, state, since when, origin), counts
 * every transition that passes the filters by (old, new) state in `state_moves`, and
 * emits one TT_KIND_TRANSITION event per such transition (TT_NO_TRANSITION_EVENTS: the
 * table only; TT_CW_AGG: CLOSE_WAIT aggregated in the kernel, closewait.bpf.h, and no
 * event either).
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
 * in process context (tt_lc_process: they never nest in one another) and all the
 * others run in separate programs. The others run in two copies, tt_lc_other and
 * tt_lc_other_backup, attached one after the other: a transition is lost only
 * when both were skipped (the loader reports min of their skips). Both copies do
 * the same work, and the one that moves the socket's state wins:
 *  - a known socket: the copy whose compare-and-swap of `state` from what it was
 *    to the new state succeeds; the other finds the new state and stops;
 *  - a socket `socks` does not hold: the copy whose BPF_NOEXIST insert succeeds;
 *  - at X -> CLOSE the winner leaves the entry in state CLOSE, and the other copy,
 *    finding it so, deletes it (when the other copy was skipped, the LRU takes it);
 *  - a birth in softirq (LISTEN -> SYN_RECV) writes a fresh entry over whatever
 *    the address held; the other copy finds that fresh entry (born now, in
 *    SYN_RECV, never moved) and stops.
 * Only the winner counts, updates the CLOSE_WAIT tables and emits an event, so no
 * event is sent twice. What the kernel still skips is counted (recursion_misses,
 * reported). The fields are read from the socket as the tracepoint's
 * TP_fast_assign reads them, at offsets from BTF.
 *
 * Owner: only tt_process_transition()s are made by the socket's own process, so
 * only they set the owner; every other transition keeps the owner learned
 * before. A passively opened child inherits its listener's owner. A socket met
 * for the first time (older than tracing, or evicted) takes its seed's owner
 * (sock.bpf.h tt_sock_meet).
 */
#include "sock.bpf.h"

/* A birth's entry found in SYN_RECV, born this recently and never moved since, was
 * written by the other copy of the program for the same transition. */
#ifndef TT_BIRTH_WINDOW_NS
#define TT_BIRTH_WINDOW_NS 1000000
#endif

#ifndef TT_LC_OWNERS_ONLY
/* Transitions that passed the filters, by (old << 4) | new state, per CPU: the
 * per-state rates and, with a snapshot at start, the live counts per state. A fixed
 * array, incremented by the winning copy only, summed and never reset by the user
 * side. */
BPF_PERCPU_ARRAY(state_moves, __u64, 256);
#endif

/* One transition of socket `skp`. `proc`: made in the owner's process context (the
 * program without a second copy). `backup`: the second copy of the softirq side.
 * `depth`: this run's scratch depth (tt_lifecycle), -1 when none was free. */
static __always_inline int tt_lifecycle_at(struct bpf_raw_tracepoint_args *ctx, int o, int n, int proc,
                                           int backup, int depth)
{
    const char *skp = (const char *)ctx->args[0];
    __u64 sk = (__u64)skp;
    /* Only TCP sockets are ever inserted: a socket the table holds is TCP. */
    struct tt_sock *s = socks.lookup(&sk);
    if (!s && !tt_sk_is_tcp(skp))
        return 0;
    __u64 now = bpf_ktime_get_ns();
    struct tt_tuple t = {};
    int have_t = 0;
    __u64 prev_ns = 0;

    if (o == TT_TCP_CLOSE || n == TT_TCP_SYN_RECV) {
        /* Born now: whatever the table holds at this address belongs to a freed socket,
         * unless the other copy wrote it for this very birth. */
        if (!proc && s && s->state == (__u64)n && s->born_ns == s->since_ns && now - s->born_ns < TT_BIRTH_WINDOW_NS)
            return 0;
        /* Every TCP socket passes X -> CLOSE before it is freed, and that transition leaves
         * its entry in CLOSE or deletes it: an entry in another state belongs to a socket
         * whose last transitions the programs never saw (counted, so no loss is silent). */
        if (s && s->state != TT_TCP_CLOSE)
            stats.atomic_increment(TT_STAT_UNSEEN_END);
        struct tt_sock *fresh = sock_scratch.lookup(&depth);
        if (!fresh) {
            stats.atomic_increment(TT_STAT_SOCK_UPDATE_FAIL);
            return 0;
        }
        __builtin_memset(fresh, 0, sizeof(*fresh));
        tt_read_tuple(skp, &t, TT_SPORT_INET);
        have_t = 1;
        struct tt_listener_key lk = {};
        tt_listener_key_of(&lk, &t);
        if (n == TT_TCP_SYN_RECV) {
            struct tt_owner *l = listeners.lookup(&lk);
            if (l)
                fresh->owner = *l;
        }
        if (proc)
            tt_owner_current(&fresh->owner);
        fresh->since_ns = now;
        fresh->born_ns = now;
        fresh->state = n;
        fresh->family = t.family;
        fresh->sport = t.sport;
        fresh->dport = t.dport;
        fresh->netns = t.netns;
        fresh->origin.ustack = -1;
        fresh->pre_fin.ustack = -1;
#ifdef TT_CW_AGG
        if (n == TT_TCP_SYN_SENT)
            tt_code_take(ctx, &fresh->origin, TT_OP_CONNECT, 0, 1);
        tt_cw_reborn(sk, depth);
#endif
        if (n == TT_TCP_LISTEN && listeners.update(&lk, &fresh->owner))
            stats.atomic_increment(TT_STAT_SOCK_UPDATE_FAIL);
        if (socks.update(&sk, fresh))
            stats.atomic_increment(TT_STAT_SOCK_UPDATE_FAIL);
        s = fresh;
    } else if (s) {
        __u64 cur = s->state;
        if (cur == (__u64)n) {
            /* The other copy did it; at CLOSE it left the entry for this one to delete. */
            if (backup && n == TT_TCP_CLOSE)
                socks.delete(&sk);
            return 0;
        }
        if (__sync_val_compare_and_swap(&s->state, cur, (__u64)n) != cur)
            return 0;
        if (s->since_ns && now > s->since_ns)
            prev_ns = now - s->since_ns;
        s->since_ns = now;
        if (proc && tt_owner_moved(&s->owner))
            tt_owner_current(&s->owner);
        if (!s->sport) {
            /* connect() binds the local port after CLOSE -> SYN_SENT */
            __u16 sport = 0;
            bpf_probe_read_kernel(&sport, sizeof(sport), skp + TT_INET_SPORT_OFF);
            s->sport = __builtin_bswap16(sport);
        }
    } else {
        /* Met for the first time: older than tracing, or its entry was evicted. */
        struct tt_sock *met = sock_scratch.lookup(&depth);
        if (!met) {
            stats.atomic_increment(TT_STAT_SOCK_UPDATE_FAIL);
            return 0;
        }
        __builtin_memset(met, 0, sizeof(*met));
        tt_read_tuple(skp, &t, TT_SPORT_INET);
        have_t = 1;
        if (!tt_sock_meet(sk, &t, n, o, now, proc, 0, met, depth))
            return 0; /* the other copy inserted it */
        s = met;
    }

    /* This copy made the transition. */
    struct tt_owner owner = s->owner;
    int keep = tt_keep(s->family, s->sport, s->dport, s->netns, &owner);
    if (n == TT_TCP_CLOSE) {
#ifdef TT_CLOSED_OWNERS
        closed_owners.update(&sk, &owner);
#endif
        if (o == TT_TCP_LISTEN) {
            struct tt_listener_key lk = {.netns = s->netns, .family = s->family, .port = s->sport};
            listeners.delete(&lk);
        }
        /* No other copy runs for a process-context transition, and the backup is the
         * last: the entry goes now. The main copy leaves it for the backup. */
        if (proc || backup)
            socks.delete(&sk);
    }

#ifndef TT_LC_OWNERS_ONLY
    if (!keep && o != TT_TCP_CLOSE_WAIT)
        return 0;
#ifdef TT_CW_AGG
    if (o == TT_TCP_CLOSE_WAIT)
        tt_cw_leave(sk, n, now, depth); /* any socket cw_open holds: it passed at its entry */
    if (n == TT_TCP_CLOSE_WAIT && keep) {
        if (!have_t)
            tt_read_tuple(skp, &t, TT_SPORT_INET);
        tt_cw_enter(sk, s, &t, now, depth);
    }
#endif
    if (!keep)
        return 0;
    stats.atomic_increment(TT_STAT_TRANSITIONS);
    state_moves.atomic_increment((o << 4) | n);
#if defined(TT_NO_TRANSITION_EVENTS) || defined(TT_CW_AGG)
    /* The command reads the kernel's tables only: no event to decode. */
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
    if (!have_t)
        tt_read_tuple(skp, &t, TT_SPORT_INET);
    e->skaddr = sk;
    e->value_ns = prev_ns;
    e->sk_flags = tt_sk_flags(skp);
    tt_event_owner(e, &owner);
    e->oldstate = o;
    e->newstate = n;
    tt_event_endpoint(e, &t);
    tt_submit(e);
#endif /* !TT_LC_OWNERS_ONLY */
    return 0;
}

/* tt_lifecycle_at() with a scratch depth of this CPU, taken for the whole run (the entry
 * it builds is read until the end) and always given back. */
static __always_inline int tt_lifecycle(struct bpf_raw_tracepoint_args *ctx, int o, int n, int proc,
                                        int backup)
{
    int depth = tt_scratch_take();
    int ret = tt_lifecycle_at(ctx, o, n, proc, backup, depth);
    tt_scratch_give(depth);
    return ret;
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

/* ... and all the others (mostly softirq), in two copies (Part.backups). */
int tt_lc_other(struct bpf_raw_tracepoint_args *ctx)
{
    int o = (int)ctx->args[1], n = (int)ctx->args[2];
    if (!tt_lc_other_wants(o, n))
        return 0;
    return tt_lifecycle(ctx, o, n, 0, 0);
}

int tt_lc_other_backup(struct bpf_raw_tracepoint_args *ctx)
{
    int o = (int)ctx->args[1], n = (int)ctx->args[2];
    if (!tt_lc_other_wants(o, n))
        return 0;
    return tt_lifecycle(ctx, o, n, 0, 1);
}
