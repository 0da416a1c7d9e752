/* timewait.bpf.c: every timewait socket's life, counted exactly in the kernel.
 *
 * What the kernel does (6.x, verified on 6.18; see docs/timewait.md):
 *  - tcp_time_wait(sk, substate, timeo) replaces a full socket with a small
 *    timewait socket (tw) and arms tw->tw_timer (handler tw_timer_handler),
 *    then tcp_done(sk) moves the full socket to CLOSE. So timer:timer_start
 *    for the tw comes first, then sock:inet_sock_set_state X->CLOSE of the
 *    full socket, with the same 4-tuple and the same snd_nxt.
 *  - substate TIME_WAIT: the peer's FIN had arrived (a real TIME_WAIT entry).
 *    substate FIN_WAIT2: an orphaned FIN_WAIT2 socket "parked" as a tw. It
 *    becomes TIME_WAIT silently when the peer's FIN arrives
 *    (tcp_timewait_state_process), or dies after tcp_fin_timeout without
 *    ever being TIME_WAIT.
 *  - The FIN reaching a parked tw is freed by kfree_skb with rx_sk == tw
 *    (after the substate changed), and the conversion re-arms the timer:
 *    timer_cancel + timer_start when the expiry moves to another wheel
 *    bucket, nothing at all otherwise.
 *  - timer_cancel fires for every removal of a pending tw timer: before a
 *    re-arm, before the expiry (timer_expire_entry follows), and when the tw
 *    is killed early (a SYN reusing the 4-tuple, an RST).
 *
 * A counted tw whose timer is cancelled and neither re-armed nor expired at
 * once was killed early (tcp_tw_reuse, a SYN reusing its 4-tuple, an RST,
 * ss -K): counted as such when the next tw timer event on that CPU shows it.
 *
 * Counting: a tw counts as a TIME_WAIT creation once, the first time its
 * substate is seen to be TIME_WAIT: at once when it was created so, else when
 * the FIN reaches it (kfree_skb, or the re-arm), else, as a fallback, at its
 * timer's next cancel or expiry. A parked tw that dies in FIN_WAIT2 is counted
 * as such, never as TIME_WAIT.
 *
 * Attribution: the owner comes from the socket table (sock.bpf.h), learned where
 * the process itself acts (connect, listen, close/shutdown; accepted children
 * inherit the listener's). At X->CLOSE of a full socket this part finds the tw
 * announced by timer_start (`tw_pending`, by 4-tuple, confirmed by snd_nxt) and
 * gives it the socket's owner: for a tw, the process that made
 * ESTABLISHED->FIN_WAIT1 (its close()/shutdown()). It needs `closed_owners`
 * (TT_CLOSED_OWNERS, set by the loader): lifecycle may have ended the socket's
 * entry in `socks` before this part's programs run on the same CLOSE.
 *
 * Raw tracepoints only: a classic (perf) tracepoint program is skipped by the
 * kernel whenever any other BPF program is running on that CPU (the global
 * bpf_prog_active guard), e.g. when a softirq delivering a FIN interrupts one:
 * creations were lost that way. A raw tracepoint program is only skipped when it
 * would nest in itself: the timer hooks cannot (the timer code runs them with
 * interrupts off, or in softirq for the expiry), and inet_sock_set_state's work
 * runs in two copies (see below). Raw programs also leave the classic
 * tracepoints to other parts.
 *
 * Offsets (TT_SKC_*, TT_TW_*, TT_TIMER_FUNCTION_OFF, TT_TCP_SND_NXT_OFF,
 * TT_INET_SPORT_OFF, TT_SK_PROTOCOL_OFF) come from BTF and TT_TW_TIMER_FN from
 * /proc/kallsyms, all via the loader (kernel/loader.py timewait_defines).
 */
#include "sock.bpf.h"

#ifndef TT_MAX_TW
#define TT_MAX_TW 262144
#endif
#define TT_MAX_TW_PENDING 16384
#define TT_MAX_TW_PROCS 16384
#define TT_MAX_TW_DESTS 65536

/* A tw announced by timer_start, waiting for its full socket's X->CLOSE. */
struct tt_tw_pending {
    __u64 tw;
    __u32 snd_nxt;
    __u8 substate;
    __u8 pad[3];
};

/* A tw socket we saw being created (and so count). */
struct tt_tw {
    __u64 created_ns;
    __u64 counted;      /* counted as a TIME_WAIT creation; set by compare-and-swap only */
    __u32 snd_nxt;      /* identity: a re-armed tw keeps it, a new tw at this address has another */
    __u8 substate;      /* at creation */
    __u8 pad[3];
    struct tt_owner owner;
    struct tt_tuple t;
};

/* The TIME_WAIT tw whose timer was cancelled last on this CPU, until the next tw
 * timer event there says why: a re-arm (timer_start of the same tw) and an
 * expiry (timer_expire_entry) follow the cancel at once, inside the same timer
 * code with the base locked; anything else means it was killed early.
 * It holds a copy of the tw's record: a killed tw is freed at once, and under
 * tcp_tw_reuse its memory often holds the next tw of the same port (a new entry
 * in `tws` at the same address) within a millisecond, before the kill is
 * settled; the copy still says whose it was and how old. One slot per CPU: set
 * at a counted tw's timer_cancel, cleared (valid = 0) by the next tw timer event
 * on that CPU (tt_tw_settle), read by the user side for kills still unsettled. */
struct tt_tw_cancel {
    __u64 tw;
    __u64 ts_ns;
    __u32 valid;
    __u32 pad;
    struct tt_tw w;
};
BPF_PERCPU_ARRAY(tw_cancelled, struct tt_tw_cancel, 1);

/* Port-exhaustion key: one local port per (local ip, remote ip, remote port). */
struct tt_tw_dest {
    __u8 laddr[16];
    __u8 raddr[16];
    __u16 rport;
    __u16 family;
    __u32 pad;
};

struct tt_tw_proc {
    __u64 created;          /* TIME_WAIT creations */
    __u64 parked;           /* orphaned FIN_WAIT2 sockets parked as tw */
    __u64 resets_sent;
    __u64 resets_received;
    char comm[TT_COMM_LEN];
};

/* Exact per-CPU counters (TT_TW_STAT_*), a fixed array: incremented here,
 * summed over CPUs and never reset by the user side. */
BPF_PERCPU_ARRAY(tw_stats, __u64, TT_TW_STAT_MAX);

/* Announced tws by 4-tuple: inserted at timer_start of a new tw, deleted at the
 * X->CLOSE of its full socket (microseconds later). LRU: an announcement whose
 * CLOSE we never see cannot pin an entry. */
BPF_TABLE("lru_hash", struct tt_tuple, struct tt_tw_pending, tw_pending, TT_MAX_TW_PENDING);

/* Our tws by address: inserted when a creation is confirmed at X->CLOSE,
 * deleted at the timer's expiry, or at its cancel when it died in FIN_WAIT2; a
 * TIME_WAIT tw killed early stays until evicted or overwritten (a cancel can
 * also be a re-arm). LRU, sized above tcp_max_tw_buckets' default. */
BPF_TABLE("lru_hash", __u64, struct tt_tw, tws, TT_MAX_TW);

/* Per owner (tgid) counts: inserted at an owner's first count
 * (lookup_or_try_init), never deleted (cumulative for the run). */
BPF_HASH(tw_procs, __u32, struct tt_tw_proc, TT_MAX_TW_PROCS);

/* TIME_WAIT creations per (local ip, remote ip, remote port): inserted at a
 * destination's first creation, never deleted (cumulative for the run). */
BPF_HASH(tw_dests, struct tt_tw_dest, __u64, TT_MAX_TW_DESTS);

static __always_inline __u8 tt_tw_substate(const char *tw)
{
    __u8 s = 0;
    bpf_probe_read_kernel(&s, sizeof(s), tw + TT_TW_SUBSTATE_OFF);
    return s;
}

static __always_inline __u32 tt_tw_snd_nxt(const char *tw)
{
    __u32 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), tw + TT_TW_SND_NXT_OFF);
    return v;
}

static __always_inline struct tt_tw_proc *tt_tw_proc_of(const struct tt_owner *owner)
{
    struct tt_tw_proc fresh = {};
    __builtin_memcpy(fresh.comm, owner->comm, TT_COMM_LEN);
    __u32 tgid = owner->tgid;
    struct tt_tw_proc *p = tw_procs.lookup_or_try_init(&tgid, &fresh);
    if (!p)
        tw_stats.increment(TT_TW_STAT_MAP_FAIL);
    return p;
}

static __always_inline void tt_tw_emit(void *ctx, __u8 op, __u64 tw, const struct tt_tw *w,
                                       __u8 substate, __u64 value_ns, __s32 how)
{
#ifdef TT_TW_NO_EVENTS
    return; /* the command reads the counters only (the agent): no event per tw */
#endif
    struct tt_event *e = tt_reserve(ctx, TT_KIND_TIMEWAIT, 0);
    if (!e)
        return;
    e->skaddr = tw;
    e->op = op;
    e->newstate = substate;
    e->oldstate = w->substate;
    e->value_ns = value_ns;
    e->ret = how;
    /* the owner without its cgroup: timewait events have never carried one */
    e->owner_tgid = w->owner.tgid;
    __builtin_memcpy(e->owner_comm, w->owner.comm, TT_COMM_LEN);
    e->owner_start_ns = w->owner.start_ns;
    tt_event_endpoint(e, &w->t);
    tt_submit(e);
}

/* Count one TIME_WAIT creation of tw `w`: globally, for its owner, for its destination. */
static __always_inline void tt_tw_count(const struct tt_tw *w)
{
    tw_stats.increment(TT_TW_STAT_CREATED);
    if (w->owner.tgid) {
        struct tt_tw_proc *p = tt_tw_proc_of(&w->owner);
        if (p)
            __sync_fetch_and_add(&p->created, 1);
    }
    struct tt_tw_dest d = {};
    __builtin_memcpy(d.laddr, w->t.saddr, 16);
    __builtin_memcpy(d.raddr, w->t.daddr, 16);
    d.rport = w->t.dport;
    d.family = w->t.family;
    __u64 zero = 0;
    __u64 *c = tw_dests.lookup_or_try_init(&d, &zero);
    if (c)
        __sync_fetch_and_add(c, 1);
    else
        tw_stats.increment(TT_TW_STAT_MAP_FAIL);
}

/* A parked tw is seen in TIME_WAIT: count it once. `how`: TT_TW_HOW_*. Two CPUs can
 * see it at once (the FIN's kfree_skb on one, the check after the insert in
 * tt_tw_confirm on the other), so the first to swap `counted` from 0 counts it. */
static __always_inline void tt_tw_converted(void *ctx, __u64 tw, struct tt_tw *w, __s32 how)
{
    if (w->counted || __sync_val_compare_and_swap(&w->counted, 0, 1) != 0)
        return;
    tw_stats.increment(how == TT_TW_HOW_FIN ? TT_TW_STAT_CONVERTED_FIN : TT_TW_STAT_CONVERTED_TIMER);
    tt_tw_count(w);
    __u64 now = bpf_ktime_get_ns();
    tt_tw_emit(ctx, TT_TW_CONVERTED, tw, w, TT_TCP_TIME_WAIT, now - w->created_ns, how);
}

/* A full socket reaches CLOSE: if timer_start announced a tw for its 4-tuple and
 * snd_nxt, that tw replaced it (tcp_time_wait calls tcp_done right after). */
static __always_inline void tt_tw_confirm(void *ctx, __u64 sk, const struct tt_owner *owner)
{
    struct tt_tuple t = {};
    tt_read_tuple((const char *)sk, &t, TT_SPORT_INET);
    struct tt_tw_pending *p = tw_pending.lookup(&t);
    if (!p)
        return;
    __u32 snd_nxt = 0;
    bpf_probe_read_kernel(&snd_nxt, sizeof(snd_nxt), (const char *)sk + TT_TCP_SND_NXT_OFF);
    if (p->snd_nxt != snd_nxt)
        return; /* a stale announcement for an older socket of this 4-tuple */
    struct tt_tw_pending ann = *p;
    tw_pending.delete(&t);
    tw_stats.increment(TT_TW_STAT_CONFIRMED);

    if (!tt_keep(t.family, t.sport, t.dport, t.netns, owner))
        return;
    if (!owner->tgid)
        tw_stats.increment(TT_TW_STAT_NO_OWNER);
    struct tt_tw w = {};
    w.created_ns = bpf_ktime_get_ns();
    w.snd_nxt = ann.snd_nxt;
    w.owner = *owner;
    w.substate = ann.substate;
    w.t = t;
    if (ann.substate == TT_TCP_TIME_WAIT) {
        w.counted = 1;
        tw_stats.increment(TT_TW_STAT_IMMEDIATE);
        tt_tw_count(&w);
    } else {
        tw_stats.increment(TT_TW_STAT_PARKED);
        if (w.owner.tgid) {
            struct tt_tw_proc *pp = tt_tw_proc_of(&w.owner);
            if (pp)
                __sync_fetch_and_add(&pp->parked, 1);
        }
    }
    if (tws.update(&ann.tw, &w))
        tw_stats.increment(TT_TW_STAT_MAP_FAIL);
    tt_tw_emit(ctx, TT_TW_CREATED, ann.tw, &w, ann.substate, 0, 0);

    /* The tw is in the hash since before its timer_start: the peer's FIN may have
     * reached it on another CPU before it was in `tws`. */
    if (ann.substate != TT_TCP_TIME_WAIT
        && tt_tw_substate((const char *)ann.tw) == TT_TCP_TIME_WAIT
        && tt_tw_snd_nxt((const char *)ann.tw) == ann.snd_nxt) {
        struct tt_tw *in = tws.lookup(&ann.tw);
        if (in)
            tt_tw_converted(ctx, ann.tw, in, TT_TW_HOW_FIN);
    }
}

/* X -> CLOSE of a full socket, in two copies attached by the loader
 * (tt_tw_other_main, tt_tw_other_backup; Part.backups): a tw announced for it is
 * confirmed, with the socket's owner. Each copy runs for every state change of the
 * host (returning at once for all but a TCP socket's CLOSE), so one running in
 * process context (close(), connect()) can be interrupted by the softirq that
 * replaces a socket by a tw, and that run of it is skipped: then the other copy
 * handles it. When both run, the second finds the announcement consumed by the
 * first. The loader reports min(skips of the two) as the bound on what was lost.
 * Owners are learned by lifecycle.bpf.c (the socket table's one writer), never
 * here. */
static __always_inline int tt_tw_other(struct bpf_raw_tracepoint_args *ctx)
{
    if ((int)ctx->args[2] != TT_TCP_CLOSE)
        return 0;
    const char *skp = (const char *)ctx->args[0];
    if (!tt_sk_is_tcp(skp))
        return 0;
    struct tt_owner owner = {};
    tt_owner_of((__u64)skp, &owner);
    tt_tw_confirm(ctx, (__u64)skp, &owner);
    return 0;
}

int tt_tw_other_main(struct bpf_raw_tracepoint_args *ctx)
{
    return tt_tw_other(ctx);
}

int tt_tw_other_backup(struct bpf_raw_tracepoint_args *ctx)
{
    return tt_tw_other(ctx);
}

/* A tw timer event on this CPU: settles the cancel before it (see tw_cancelled). */
static __always_inline void tt_tw_settle(void *ctx, __u64 twaddr, __u32 snd_nxt)
{
    int zero = 0;
    struct tt_tw_cancel *c = tw_cancelled.lookup(&zero);
    if (!c || !c->valid)
        return;
    c->valid = 0;
    if (c->tw == twaddr && c->w.snd_nxt == snd_nxt)
        return; /* its re-arm or expiry */
    __u64 prev = c->tw;
    tw_stats.increment(TT_TW_STAT_KILLED);
    tt_tw_emit(ctx, TT_TW_KILLED, prev, &c->w, TT_TCP_TIME_WAIT, c->ts_ns - c->w.created_ns, 0);
    /* Unless a new tw at that address has replaced it there already. */
    struct tt_tw *w = tws.lookup(&prev);
    if (w && w->snd_nxt == c->w.snd_nxt)
        tws.delete(&prev);
}

/* What every tw timer event starts with: whether `timer` is a tw's (else 0),
 * which tw and which incarnation of it (snd_nxt), and the settling of this CPU's
 * pending cancel (see tw_cancelled). */
static __always_inline const char *tt_tw_timer_event(void *ctx, const char *timer, __u32 *snd_nxt)
{
    __u64 fn = 0;
    bpf_probe_read_kernel(&fn, sizeof(fn), timer + TT_TIMER_FUNCTION_OFF);
    if (fn != TT_TW_TIMER_FN)
        return 0;
    const char *tw = timer - TT_TW_TIMER_OFF;
    *snd_nxt = tt_tw_snd_nxt(tw);
    tt_tw_settle(ctx, (__u64)tw, *snd_nxt);
    return tw;
}

/* timer_start(timer, bucket_expiry): a new tw is announced; a known one re-armed. */
RAW_TRACEPOINT_PROBE(timer_start)
{
    __u32 snd_nxt = 0;
    const char *tw = tt_tw_timer_event(ctx, (const char *)ctx->args[0], &snd_nxt);
    if (!tw)
        return 0;
    tw_stats.increment(TT_TW_STAT_TIMER_STARTS);
    __u64 twaddr = (__u64)tw;
    __u8 sub = tt_tw_substate(tw);

    struct tt_tw *w = tws.lookup(&twaddr);
    if (w && w->snd_nxt == snd_nxt) {
        /* A re-arm of a tw we know: the FIN reached it (or a retransmitted FIN). */
        if (sub == TT_TCP_TIME_WAIT)
            tt_tw_converted(ctx, twaddr, w, TT_TW_HOW_FIN);
        return 0;
    }
    /* A new tw: announce it to its full socket's X->CLOSE, which follows. */
    struct tt_tuple t = {};
    tt_read_tuple(tw, &t, TT_SPORT_NUM);
    struct tt_tw_pending ann = {.tw = twaddr, .snd_nxt = snd_nxt, .substate = sub};
    tw_pending.update(&t, &ann);
    tw_stats.increment(TT_TW_STAT_ANNOUNCED);
    return 0;
}

/* timer_cancel(timer): a re-arm, the expiry (timer_expire_entry follows), or a kill. */
RAW_TRACEPOINT_PROBE(timer_cancel)
{
    __u32 snd_nxt = 0;
    const char *tw = tt_tw_timer_event(ctx, (const char *)ctx->args[0], &snd_nxt);
    if (!tw)
        return 0;
    __u64 twaddr = (__u64)tw;
    struct tt_tw *w = tws.lookup(&twaddr);
    if (!w || w->snd_nxt != snd_nxt)
        return 0;
    __u8 sub = tt_tw_substate(tw);
    if (sub == TT_TCP_TIME_WAIT) {
        /* Whichever of the three, it was TIME_WAIT. */
        tt_tw_converted(ctx, twaddr, w, TT_TW_HOW_TIMER);
        int zero = 0;
        struct tt_tw_cancel *c = tw_cancelled.lookup(&zero);
        if (c) {
            c->tw = twaddr;
            c->ts_ns = bpf_ktime_get_ns();
            c->w = *w;
            c->valid = 1;
        }
        return 0;
    }
    /* Still FIN_WAIT2: a parked tw dies (timeout or kill), never TIME_WAIT (a
     * re-arm only follows the change to TIME_WAIT). */
    tw_stats.increment(TT_TW_STAT_PARKED_ENDED);
    tt_tw_emit(ctx, TT_TW_PARKED_ENDED, twaddr, w, sub, bpf_ktime_get_ns() - w->created_ns, 0);
    tws.delete(&twaddr);
    return 0;
}

/* timer_expire_entry(timer, baseclk): a tw's time is up. */
RAW_TRACEPOINT_PROBE(timer_expire_entry)
{
    __u32 snd_nxt = 0;
    const char *tw = tt_tw_timer_event(ctx, (const char *)ctx->args[0], &snd_nxt);
    if (!tw)
        return 0;
    __u64 twaddr = (__u64)tw;
    struct tt_tw *w = tws.lookup(&twaddr);
    if (!w || w->snd_nxt != snd_nxt)
        return 0;
    if (w->counted)
        tw_stats.increment(TT_TW_STAT_EXPIRED);
    tws.delete(&twaddr);
    return 0;
}

/* kfree_skb(skb, location, reason, rx_sk): the FIN that reached a parked tw is
 * freed here with rx_sk == tw, after the tw turned TIME_WAIT. */
RAW_TRACEPOINT_PROBE(kfree_skb)
{
    const char *sk = (const char *)ctx->args[3];
    if (!sk)
        return 0;
    __u8 state = 0;
    bpf_probe_read_kernel(&state, sizeof(state), sk + TT_SKC_STATE_OFF);
    if (state != TT_TCP_TIME_WAIT)
        return 0;
    __u64 twaddr = (__u64)sk;
    struct tt_tw *w = tws.lookup(&twaddr);
    if (!w || w->counted || w->snd_nxt != tt_tw_snd_nxt(sk))
        return 0;
    if (tt_tw_substate(sk) == TT_TCP_TIME_WAIT)
        tt_tw_converted(ctx, twaddr, w, TT_TW_HOW_FIN);
    return 0;
}

/* Who owns the socket an RST is sent or received on: the socket table (with the
 * owners of sockets that just reached CLOSE: an abortive close() sends its RST
 * after the transition), else a tw of ours. */
static __always_inline void tt_tw_reset_owner(__u64 sk, int state, struct tt_owner *out)
{
    if (tt_owner_of(sk, out) || state != TT_TCP_TIME_WAIT)
        return;
    struct tt_tw *w = tws.lookup(&sk);
    if (w)
        *out = w->owner;
}

static __always_inline void tt_tw_reset(void *ctx, __u64 sk, __u8 op, __u32 stat)
{
    __u8 state = 0;
    bpf_probe_read_kernel(&state, sizeof(state), (const char *)sk + TT_SKC_STATE_OFF);
    struct tt_owner owner = {};
    tt_tw_reset_owner(sk, state, &owner);
    struct tt_tw w = {};
    tt_read_tuple((const char *)sk, &w.t,
                  state != TT_TCP_TIME_WAIT && state != TT_TCP_NEW_SYN_RECV ? TT_SPORT_INET : TT_SPORT_NUM);
    if (!tt_keep(w.t.family, w.t.sport, w.t.dport, w.t.netns, &owner))
        return;
    tw_stats.increment(stat);
    if (owner.tgid) {
        struct tt_tw_proc *p = tt_tw_proc_of(&owner);
        if (p) {
            if (op == TT_TW_RESET_SENT)
                __sync_fetch_and_add(&p->resets_sent, 1);
            else
                __sync_fetch_and_add(&p->resets_received, 1);
        }
    }
    w.owner = owner;
    w.substate = state;
    tt_tw_emit(ctx, op, sk, &w, state, 0, 0);
}

/* tcp_send_reset(sk, skb, reason): an RST sent on a socket (an abortive close, a
 * reply from a tw). Replies to segments that found no socket (sk NULL) belong to
 * no process: skipped. */
RAW_TRACEPOINT_PROBE(tcp_send_reset)
{
    __u64 sk = (__u64)ctx->args[0];
    if (sk)
        tt_tw_reset(ctx, sk, TT_TW_RESET_SENT, TT_TW_STAT_RESETS_SENT);
    return 0;
}

/* tcp_receive_reset(sk): an RST received on a socket. */
RAW_TRACEPOINT_PROBE(tcp_receive_reset)
{
    __u64 sk = (__u64)ctx->args[0];
    if (sk)
        tt_tw_reset(ctx, sk, TT_TW_RESET_RECEIVED, TT_TW_STAT_RESETS_RECEIVED);
    return 0;
}
