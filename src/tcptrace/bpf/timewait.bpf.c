/* timewait.bpf.c: every timewait socket's life, counted exactly in the kernel.
 *
 * What the kernel does (6.x, verified on 6.18; see docs/timewait.md):
 *  - tcp_time_wait(sk, substate, timeo) replaces a full socket with a small
 *    timewait socket (tw) and arms tw->tw_timer (handler tw_timer_handler),
 *    then tcp_done(sk) moves the full socket to CLOSE. So timer:timer_start
 *    for the tw comes first, then sock:inet_sock_set_state X->CLOSE of the
 *    full socket (X is FIN_WAIT2 or CLOSING), with the same 4-tuple and the
 *    same snd_nxt.
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
 * as such, never as TIME_WAIT. Counts go to `tw_stats` (all), `tw_procs` (by
 * owning process: tgid and start time, so a reused pid is another process)
 * and `tw_dests` (by destination, network namespace included); the user side
 * reads them per interval. A command that only counts compiles the events out
 * (TT_TW_NO_EVENTS: `timewait` without --events, the agent): then nothing of a
 * tw crosses the ring buffer.
 *
 * Which timers are tws': timer->function is tw_timer_handler, whose address is
 * learned here rather than read from /proc/kallsyms (which needs more than the
 * documented capabilities). Until it is known, a timer whose container looks
 * like a timewait socket (its sock_common says TIME_WAIT, an inet family, a
 * tw substate and a network namespace) is announced with its function; the
 * first announcement that the X->CLOSE of its full socket confirms (same
 * 4-tuple and snd_nxt: so a look-alike can never be confirmed) gives the
 * address. From then on one read and one comparison tell a tw's timer.
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
 * No table here evicts: each is a hash whose failed inserts are counted
 * (TT_TW_STAT_*_FAIL), so nothing is lost silently. Every tw confirmed since
 * the start is tracked in `tws` until its end, whatever the filters (a tw of
 * another owner is kept with `kept` 0), so that a re-armed timer is never
 * taken for a new tw; an announcement left unconfirmed is removed at its tw's
 * end. An entry whose end went unseen is replaced when its address is reused,
 * or swept by the user side once older than any tw lives.
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
 * TT_INET_SPORT_OFF, TT_SK_PROTOCOL_OFF, TT_SK_USERLOCKS_*) come from BTF via the
 * loader (kernel/loader.py timewait_defines).
 */
#include "sock.bpf.h"

#ifndef TT_MAX_TW
#define TT_MAX_TW 262144
#endif
#define TT_MAX_TW_PENDING 16384
#define TT_MAX_TW_PROCS 16384
#define TT_MAX_TW_DESTS 65536
/* Namespace inode numbers are handed out from 0xF0000000 up; the initial
 * namespaces' are just below (PROC_NET_INIT_INO 0xEFFFFFF9). */
#define TT_MIN_NS_INUM 0xEFFFFF00U
/* sk_userlocks' SOCK_BINDPORT_LOCK: the socket's local port was bound by the
 * application (a server's listener, inherited by its accepted sockets), not
 * chosen by connect(). */
#define TT_SOCK_BINDPORT_LOCK 8

/* A tw announced by timer_start, waiting for its full socket's X->CLOSE. */
struct tt_tw_pending {
    __u64 tw;
    __u64 fn;           /* its timer's function: tw_timer_handler, learned at confirmation */
    __u32 snd_nxt;
    __u8 substate;
    __u8 pad[3];
};

/* A tw socket we saw being created. */
struct tt_tw {
    __u64 created_ns;
    __u64 armed_ns;     /* its timer's last start seen: it ends at most a minute after (the sweep's clock) */
    __u64 counted;      /* counted as a TIME_WAIT creation; set by compare-and-swap only */
    __u32 snd_nxt;      /* identity: a re-armed tw keeps it, a new tw at this address has another */
    __u8 substate;      /* at creation */
    __u8 kept;          /* passed the filters: counted and reported (0: tracked only) */
    __u8 bound;         /* its local port was bound (a server's), not chosen by connect() */
    __u8 pad;
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
 * on that CPU (tt_tw_settle), read by the user side for kills still unsettled.
 * A tw outside the filters (`kept` 0) goes through it too, so that its entry
 * in `tws` ends when it is killed, but is not counted. */
struct tt_tw_cancel {
    __u64 tw;
    __u64 ts_ns;
    __u32 valid;
    __u32 pad;
    struct tt_tw w;
};
BPF_PERCPU_ARRAY(tw_cancelled, struct tt_tw_cancel, 1);

/* Port-exhaustion key. A socket whose local port connect() chose holds one
 * port of (local ip, remote ip, remote port): lport 0, rport set. A socket
 * with a bound local port (a server's) is counted by (local ip, local port,
 * remote ip): rport 0, since its remote ports are the clients' ephemeral
 * ones and would make one key per connection. */
struct tt_tw_dest {
    __u8 laddr[16];
    __u8 raddr[16];
    __u16 lport;
    __u16 rport;
    __u16 family;
    __u16 pad;
    __u32 netns;
    __u32 pad2;
};

/* A process: its tgid and its start time (a reused pid is another process). */
struct tt_tw_proc_key {
    __u32 tgid;
    __u32 pad;
    __u64 start_ns;
};

struct tt_tw_proc {
    __u64 created;          /* TIME_WAIT creations */
    __u64 parked;           /* orphaned FIN_WAIT2 sockets parked as tw */
    __u64 resets_sent;
    __u64 resets_received;
    char comm[TT_COMM_LEN]; /* at its first count */
};

/* Exact per-CPU counters (TT_TW_STAT_*), a fixed array: incremented here,
 * summed over CPUs and never reset by the user side. */
BPF_PERCPU_ARRAY(tw_stats, __u64, TT_TW_STAT_MAX);

/* The socket whose FIN_WAIT2/CLOSING -> CLOSE the main copy of tt_tw_other ran for
 * last on this CPU; the backup, which runs right after it on the same transition,
 * clears it. A backup that finds another socket here runs for a transition the
 * main copy was skipped on (it was busy on this CPU), and counts its close with
 * no tw itself. (A transition interrupting the pair between its two copies can
 * make the backup count a close with no tw the main copy counted too: an
 * overcount, never a miss.) */
BPF_PERCPU_ARRAY(tw_close_main, __u64, 1);

/* tw_timer_handler's address (0 until learned, see tt_tw_timer): written once,
 * at the first confirmation. */
BPF_ARRAY(tw_fn, __u64, 1);

/* Announced tws by 4-tuple: inserted at timer_start of a tw not in `tws`,
 * deleted at the X->CLOSE of its full socket (microseconds later), or at the
 * tw's end when that CLOSE never confirmed it (a tw that existed before the
 * start, re-armed). */
BPF_HASH(tw_pending, struct tt_tuple, struct tt_tw_pending, TT_MAX_TW_PENDING);

/* Our tws by address: inserted when a creation is confirmed at X->CLOSE,
 * deleted at the timer's expiry, at its cancel when it died in FIN_WAIT2, or
 * when its kill is settled; replaced when a new tw is confirmed at the same
 * address (its end went unseen); swept by the user side past the longest life
 * a tw can have. Allocated as used (a tw lives 60 s: rate x 60 entries). */
BPF_F_TABLE("hash", __u64, struct tt_tw, tws, TT_MAX_TW, BPF_F_NO_PREALLOC);

/* Per owner counts: inserted at an owner's first count (lookup_or_try_init);
 * cumulative, deleted only by the agent once idle (commands/agent.py). */
BPF_HASH(tw_procs, struct tt_tw_proc_key, struct tt_tw_proc, TT_MAX_TW_PROCS);

/* TIME_WAIT creations per destination (struct tt_tw_dest): inserted at a
 * destination's first creation; cumulative, deleted only by the agent once idle. */
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
    struct tt_tw_proc_key key = {.tgid = owner->tgid, .start_ns = owner->start_ns};
    struct tt_tw_proc *p = tw_procs.lookup_or_try_init(&key, &fresh);
    if (!p)
        tw_stats.atomic_increment(TT_TW_STAT_PROCS_FAIL);
    return p;
}

static __always_inline void tt_tw_emit(void *ctx, __u8 op, __u64 tw, const struct tt_tw *w,
                                       __u8 substate, __u64 value_ns, __s32 how)
{
#ifndef TT_TW_NO_EVENTS
    struct tt_event *e = tt_reserve(ctx, TT_KIND_TIMEWAIT, 0);
    if (!e)
        return;
    e->skaddr = tw;
    e->op = op;
    e->newstate = substate;
    e->oldstate = w->substate;
    e->value_ns = value_ns;
    e->ret = how;
    e->flags = w->bound ? TT_TWF_BOUND : 0;
    /* the owner without its cgroup: timewait events have never carried one */
    e->owner_tgid = w->owner.tgid;
    __builtin_memcpy(e->owner_comm, w->owner.comm, TT_COMM_LEN);
    e->owner_start_ns = w->owner.start_ns;
    tt_event_endpoint(e, &w->t);
    tt_submit(e);
#endif
}

/* Count one TIME_WAIT creation of tw `w`: globally, for its owner, for its destination. */
static __always_inline void tt_tw_count(const struct tt_tw *w)
{
    tw_stats.atomic_increment(TT_TW_STAT_CREATED);
    if (w->owner.tgid) {
        struct tt_tw_proc *p = tt_tw_proc_of(&w->owner);
        if (p)
            __sync_fetch_and_add(&p->created, 1);
    }
    struct tt_tw_dest d = {};
    __builtin_memcpy(d.laddr, w->t.saddr, 16);
    __builtin_memcpy(d.raddr, w->t.daddr, 16);
    if (w->bound)
        d.lport = w->t.sport;
    else
        d.rport = w->t.dport;
    d.family = w->t.family;
    d.netns = w->t.netns;
    __u64 zero = 0;
    __u64 *c = tw_dests.lookup_or_try_init(&d, &zero);
    if (c)
        __sync_fetch_and_add(c, 1);
    else
        tw_stats.atomic_increment(TT_TW_STAT_DESTS_FAIL);
}

/* A parked tw is seen in TIME_WAIT: count it once. `how`: TT_TW_HOW_*. Two CPUs can
 * see it at once (the FIN's kfree_skb on one, the check after the insert in
 * tt_tw_confirm on the other), so the first to swap `counted` from 0 counts it. */
static __always_inline void tt_tw_converted(void *ctx, __u64 tw, struct tt_tw *w, __s32 how)
{
    if (!w->kept || w->counted || __sync_val_compare_and_swap(&w->counted, 0, 1) != 0)
        return;
    tw_stats.atomic_increment(how == TT_TW_HOW_FIN ? TT_TW_STAT_CONVERTED_FIN : TT_TW_STAT_CONVERTED_TIMER);
    tt_tw_count(w);
    tt_tw_emit(ctx, TT_TW_CONVERTED, tw, w, TT_TCP_TIME_WAIT, bpf_ktime_get_ns() - w->created_ns, how);
}

/* Whether a socket's local port is a server's rather than one connect() chose:
 * bound by its application (sk_userlocks has SOCK_BINDPORT_LOCK, which accepted
 * sockets inherit from their listener; a bitfield in older kernels, hence a
 * 16-bit read), or a listener's port (one that listen() picked itself). */
static __always_inline __u8 tt_sk_port_bound(const char *sk, const struct tt_tuple *t)
{
    __u16 locks = 0;
    bpf_probe_read_kernel(&locks, sizeof(locks), sk + TT_SK_USERLOCKS_OFF);
    if ((locks >> TT_SK_USERLOCKS_SHIFT) & TT_SOCK_BINDPORT_LOCK)
        return 1;
    struct tt_listener_key lkey = {};
    tt_listener_key_of(&lkey, t);
    return listeners.lookup(&lkey) ? 1 : 0;
}

/* The first confirmation gives tw_timer_handler's address (see tt_tw_timer). */
static __always_inline void tt_tw_learn(__u64 fn)
{
    int zero = 0;
    __u64 *known = tw_fn.lookup(&zero);
    if (known && *known == 0 && fn && __sync_val_compare_and_swap(known, 0, fn) == 0)
        tw_stats.atomic_increment(TT_TW_STAT_HANDLER_LEARNED);
}

/* A full socket of the filter reaches CLOSE from FIN_WAIT2 or CLOSING with no tw
 * announced for it: either no tw replaced it (a reset, an orphan's FIN_WAIT2
 * timeout, past tcp_max_tw_buckets, an abort) or one did whose timer_start never
 * reached timer_start's program (docs/timewait.md, "Still open"). Counted as
 * `closed_no_tw`: the bound of what created_total may lack where no such close was
 * expected. (At this tracepoint every closing socket is already out of the hash,
 * tw or not: tcp_set_state unhashes before it stores the state.) Counted once: by
 * the main copy, or by the backup when the main copy did not run for this socket
 * (see tw_close_main). */
static __always_inline void tt_tw_closed_no_tw(const char *sk, const struct tt_tuple *t)
{
    struct tt_owner owner = {};
    tt_owner_of((__u64)sk, &owner);
    if (tt_keep(t->family, t->sport, t->dport, t->netns, &owner))
        tw_stats.atomic_increment(TT_TW_STAT_CLOSED_NO_TW);
}

/* A full socket reaches CLOSE from FIN_WAIT2 or CLOSING: if timer_start announced
 * a tw for its 4-tuple and snd_nxt, that tw replaced it (tcp_time_wait calls
 * tcp_done right after). */
static __always_inline void tt_tw_confirm(void *ctx, const char *sk, int count_no_tw)
{
    struct tt_tuple t = {};
    tt_read_tuple(sk, &t, TT_SPORT_INET);
    struct tt_tw_pending *p = tw_pending.lookup(&t);
    __u32 snd_nxt = 0;
    if (p)
        bpf_probe_read_kernel(&snd_nxt, sizeof(snd_nxt), sk + TT_TCP_SND_NXT_OFF);
    if (!p || p->snd_nxt != snd_nxt) {
        /* none, or a stale announcement for an older socket of this 4-tuple */
        if (count_no_tw)
            tt_tw_closed_no_tw(sk, &t);
        return;
    }
    struct tt_tw_pending ann = *p;
    if (tw_pending.delete(&t))
        return; /* the other copy of this program confirmed it meanwhile */
    tw_stats.atomic_increment(TT_TW_STAT_CONFIRMED);
    tt_tw_learn(ann.fn);

    struct tt_tw w = {};
    tt_owner_of((__u64)sk, &w.owner);
    w.created_ns = bpf_ktime_get_ns();
    w.armed_ns = w.created_ns;
    w.snd_nxt = ann.snd_nxt;
    w.substate = ann.substate;
    w.bound = tt_sk_port_bound(sk, &t);
    w.t = t;
    w.kept = tt_keep(t.family, t.sport, t.dport, t.netns, &w.owner);
    if (w.kept) {
        if (!w.owner.tgid)
            tw_stats.atomic_increment(TT_TW_STAT_NO_OWNER);
        if (ann.substate == TT_TCP_TIME_WAIT) {
            w.counted = 1;
            tw_stats.atomic_increment(TT_TW_STAT_IMMEDIATE);
            tt_tw_count(&w);
        } else {
            tw_stats.atomic_increment(TT_TW_STAT_PARKED);
            if (w.owner.tgid) {
                struct tt_tw_proc *pp = tt_tw_proc_of(&w.owner);
                if (pp)
                    __sync_fetch_and_add(&pp->parked, 1);
            }
        }
    }
    if (tws.update(&ann.tw, &w))
        tw_stats.atomic_increment(TT_TW_STAT_TWS_FAIL);
    if (!w.kept)
        return;
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

/* FIN_WAIT2 -> CLOSE or CLOSING -> CLOSE of a full socket (the only transitions
 * tcp_time_wait makes), in two copies attached by the loader (tt_tw_other_main,
 * tt_tw_other_backup; Part.backups): a tw announced for it is confirmed, with the
 * socket's owner. Each copy runs for every state change of the host (returning
 * at once for all others), so one running in process context (close(),
 * connect()) can be interrupted by the softirq that replaces a socket by a tw,
 * and that run of it is skipped: then the other copy handles it. When both run,
 * the second finds the announcement consumed by the first. The loader reports
 * min(skips of the two) as the bound on what was lost. Owners are learned by
 * lifecycle.bpf.c (the socket table's one writer), never here. */
static __always_inline int tt_tw_other(struct bpf_raw_tracepoint_args *ctx, int main_copy)
{
    int o = (int)ctx->args[1];
    if ((int)ctx->args[2] != TT_TCP_CLOSE || (o != TT_TCP_FIN_WAIT2 && o != TT_TCP_CLOSING))
        return 0;
    const char *skp = (const char *)ctx->args[0];
    if (!tt_sk_is_tcp(skp))
        return 0;
    int zero = 0, count_no_tw = 1;
    __u64 *handled = tw_close_main.lookup(&zero);
    if (handled) {
        if (main_copy) {
            *handled = (__u64)skp;
        } else if (*handled == (__u64)skp) {
            *handled = 0;
            count_no_tw = 0; /* the main copy ran for it (and counted) */
        }
    }
    tt_tw_confirm(ctx, skp, count_no_tw);
    return 0;
}

int tt_tw_other_main(struct bpf_raw_tracepoint_args *ctx)
{
    return tt_tw_other(ctx, 1);
}

int tt_tw_other_backup(struct bpf_raw_tracepoint_args *ctx)
{
    return tt_tw_other(ctx, 0);
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
    if (c->w.kept) {
        tw_stats.atomic_increment(TT_TW_STAT_KILLED);
        tt_tw_emit(ctx, TT_TW_KILLED, prev, &c->w, TT_TCP_TIME_WAIT, c->ts_ns - c->w.created_ns, 0);
    }
    /* Unless a new tw at that address has replaced it there already. */
    struct tt_tw *w = tws.lookup(&prev);
    if (w && w->snd_nxt == c->w.snd_nxt)
        tws.delete(&prev);
}

/* Whether the memory around a timer is a timewait socket: its sock_common says
 * TIME_WAIT and an inet family, its substate is a tw's, and it belongs to a
 * network namespace. Only used until tw_timer_handler's address is known, and
 * what it lets through is counted only once a full socket's CLOSE confirms it. */
static __always_inline int tt_tw_looks_like_tw(const char *tw)
{
    __u8 state = 0;
    bpf_probe_read_kernel(&state, sizeof(state), tw + TT_SKC_STATE_OFF);
    if (state != TT_TCP_TIME_WAIT)
        return 0;
    __u16 family = 0;
    bpf_probe_read_kernel(&family, sizeof(family), tw + TT_SKC_FAMILY_OFF);
    if (family != TT_AF_INET && family != TT_AF_INET6)
        return 0;
    __u8 sub = tt_tw_substate(tw);
    if (sub != TT_TCP_TIME_WAIT && sub != TT_TCP_FIN_WAIT2)
        return 0;
    return tt_sk_netns(tw) >= TT_MIN_NS_INUM;
}

/* The function of `timer` when it is a tw's timer (tw_timer_handler), else 0.
 * `learning`: before the handler is known, take a timer whose container looks
 * like a tw (timer_start announces it; the other hooks track no tw yet). */
static __always_inline __u64 tt_tw_timer(const char *timer, int learning)
{
    __u64 fn = 0;
    bpf_probe_read_kernel(&fn, sizeof(fn), timer + TT_TIMER_FUNCTION_OFF);
    int zero = 0;
    __u64 *known = tw_fn.lookup(&zero);
    if (known && *known)
        return fn == *known ? fn : 0;
    if (learning && fn && tt_tw_looks_like_tw(timer - TT_TW_TIMER_OFF))
        return fn;
    return 0;
}

/* What every tw timer event starts with: whether `timer` is a tw's (else 0),
 * which tw and which incarnation of it (snd_nxt), and the settling of this CPU's
 * pending cancel (see tw_cancelled). */
static __always_inline const char *tt_tw_timer_event(void *ctx, const char *timer, __u32 *snd_nxt,
                                                     __u64 *fn, int learning)
{
    *fn = tt_tw_timer(timer, learning);
    if (!*fn)
        return 0;
    const char *tw = timer - TT_TW_TIMER_OFF;
    *snd_nxt = tt_tw_snd_nxt(tw);
    tt_tw_settle(ctx, (__u64)tw, *snd_nxt);
    return tw;
}

/* The end of a tw that is not in `tws` (it existed before the start, or its
 * creation was not confirmed): an announcement its re-arm left is removed. */
static __always_inline void tt_tw_unknown_ends(const char *tw, __u32 snd_nxt)
{
    struct tt_tuple t = {};
    tt_read_tuple(tw, &t, TT_SPORT_NUM);
    struct tt_tw_pending *p = tw_pending.lookup(&t);
    if (p && p->tw == (__u64)tw && p->snd_nxt == snd_nxt && tw_pending.delete(&t) == 0)
        tw_stats.atomic_increment(TT_TW_STAT_PENDING_STALE);
}

/* timer_start(timer, bucket_expiry): a new tw is announced; a known one re-armed. */
RAW_TRACEPOINT_PROBE(timer_start)
{
    __u32 snd_nxt = 0;
    __u64 fn = 0;
    const char *tw = tt_tw_timer_event(ctx, (const char *)ctx->args[0], &snd_nxt, &fn, 1);
    if (!tw)
        return 0;
    tw_stats.atomic_increment(TT_TW_STAT_TIMER_STARTS);
    __u64 twaddr = (__u64)tw;
    __u8 sub = tt_tw_substate(tw);

    struct tt_tw *w = tws.lookup(&twaddr);
    if (w && w->snd_nxt == snd_nxt) {
        /* A re-arm of a tw we know: the FIN reached it (or a retransmitted FIN). */
        w->armed_ns = bpf_ktime_get_ns();
        if (sub == TT_TCP_TIME_WAIT)
            tt_tw_converted(ctx, twaddr, w, TT_TW_HOW_FIN);
        return 0;
    }
    /* A new tw: announce it to its full socket's X->CLOSE, which follows. */
    struct tt_tuple t = {};
    tt_read_tuple(tw, &t, TT_SPORT_NUM);
    struct tt_tw_pending ann = {.tw = twaddr, .fn = fn, .snd_nxt = snd_nxt, .substate = sub};
    if (tw_pending.update(&t, &ann))
        tw_stats.atomic_increment(TT_TW_STAT_PENDING_FAIL);
    else
        tw_stats.atomic_increment(TT_TW_STAT_ANNOUNCED);
    return 0;
}

/* timer_cancel(timer): a re-arm, the expiry (timer_expire_entry follows), or a kill. */
RAW_TRACEPOINT_PROBE(timer_cancel)
{
    __u32 snd_nxt = 0;
    __u64 fn = 0;
    const char *tw = tt_tw_timer_event(ctx, (const char *)ctx->args[0], &snd_nxt, &fn, 0);
    if (!tw)
        return 0;
    __u64 twaddr = (__u64)tw;
    struct tt_tw *w = tws.lookup(&twaddr);
    if (!w || w->snd_nxt != snd_nxt) {
        tt_tw_unknown_ends(tw, snd_nxt);
        return 0;
    }
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
    if (w->kept) {
        tw_stats.atomic_increment(TT_TW_STAT_PARKED_ENDED);
        tt_tw_emit(ctx, TT_TW_PARKED_ENDED, twaddr, w, sub, bpf_ktime_get_ns() - w->created_ns, 0);
    }
    tws.delete(&twaddr);
    return 0;
}

/* timer_expire_entry(timer, baseclk): a tw's time is up. */
RAW_TRACEPOINT_PROBE(timer_expire_entry)
{
    __u32 snd_nxt = 0;
    __u64 fn = 0;
    const char *tw = tt_tw_timer_event(ctx, (const char *)ctx->args[0], &snd_nxt, &fn, 0);
    if (!tw)
        return 0;
    __u64 twaddr = (__u64)tw;
    struct tt_tw *w = tws.lookup(&twaddr);
    if (!w || w->snd_nxt != snd_nxt) {
        tt_tw_unknown_ends(tw, snd_nxt);
        return 0;
    }
    if (w->counted && w->kept)
        tw_stats.atomic_increment(TT_TW_STAT_EXPIRED);
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
    if (!w || w->counted || !w->kept || w->snd_nxt != tt_tw_snd_nxt(sk))
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
    tw_stats.atomic_increment(stat);
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
