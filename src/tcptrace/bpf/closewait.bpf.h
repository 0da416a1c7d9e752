/* closewait.bpf.h: CLOSE_WAIT aggregated in the kernel (TT_CW_AGG), for `closewait`
 * and the agent: no event crosses the ring buffer for a healthy connection.
 *
 * lifecycle.bpf.c calls tt_cw_enter() at -> CLOSE_WAIT, tt_cw_leave() at CLOSE_WAIT ->
 * LAST_ACK (closed by the app) or -> CLOSE (reset), and tt_cw_reborn() when a socket is
 * born at an address `cw_open` still holds (its exit was never seen); owner.bpf.c calls
 * tt_cw_touch() at a send/recv of a socket in CLOSE_WAIT and tt_cw_accepted() when one
 * is accepted. The user side reads `cw_stats`, `cw_hist`, `cw_owners`, `cw_open` and
 * `cw_seeds` once per interval with batch lookups (kernel/cwreader.py); model/cwagg.py
 * emulates all of this for recordings.
 *
 * Exactness when a run is skipped: the softirq-side transition program runs in two
 * copies (lifecycle.bpf.c). Only the copy that moved the socket's state in `socks`
 * calls in here, and even so an entry counts only when this call's BPF_NOEXIST insert
 * into `cw_open` succeeded, an exit only when this call's delete of the entry did.
 * Every count is of a socket that passed the filters at its entry: an exit is counted
 * for any socket `cw_open` holds, whoever owns it by then.
 */
#ifndef TT_CW_BPF_H
#define TT_CW_BPF_H

#include "sock.bpf.h"

#ifdef TT_CW_AGG

#define TT_CW_PREEXISTING 1 /* tt_cw.flags: in CLOSE_WAIT before tracing started (seeded) */

/* One socket in CLOSE_WAIT now. */
struct tt_cw {
    __u64 entered_ns;       /* -> CLOSE_WAIT; for a pre-existing one, the snapshot's time */
    __u64 born_ns;          /* 0: born before tracing */
    __u64 eof_ns;           /* the first recv that returned 0 (the app saw EOF); 0: none */
    struct tt_owner owner;  /* at entry, then whoever touches it */
    struct tt_tuple t;      /* with its addresses and network namespace */
    __u32 touches;          /* send/recv/accept since the FIN */
    __u32 flags;            /* TT_CW_PREEXISTING */
    struct tt_code origin;  /* accept or connect */
    struct tt_code pre_fin; /* the last send/recv before the FIN (TT_TOUCH_STACKS) */
    struct tt_code post_fin;/* the EOF read, else the first touch after the FIN; user stack */
    struct tt_code last;    /* the last touch (no stack) */
};

/* Sockets in CLOSE_WAIT, by skaddr: inserted at -> CLOSE_WAIT (BPF_NOEXIST), and for a
 * pre-existing socket when its seed is taken; deleted when it leaves CLOSE_WAIT, or when
 * a new socket is born at its address (forgotten). Bounded: a failed insert is counted
 * (TT_CW_STAT_OPEN_FAIL) and the socket still counts as entered. */
BPF_F_TABLE("hash", __u64, struct tt_cw, cw_open, TT_MAX_CW_OPEN, BPF_F_NO_PREALLOC);

/* Pre-existing sockets in CLOSE_WAIT whose seed was not taken yet, by tuple: inserted
 * by the user side with the seeds, deleted when the seed is taken. The user side reads
 * it to know which sockets found at start are still untouched there. */
BPF_F_TABLE("hash", struct tt_tuple, __u64, cw_seeds, TT_MAX_CW_OPEN, BPF_F_NO_PREALLOC);

struct tt_cw_owner_key {
    __u32 tgid;             /* 0: unknown owner */
    __u32 pad;
    __u64 start_ns;
};

/* One owner's CLOSE_WAIT counts, cumulative since load, and its time to close. */
struct tt_cw_owner {
    __u64 entered;
    __u64 closed;           /* pre-existing ones included */
    __u64 reset;            /* pre-existing ones included */
    __u64 forgotten;
    __u64 closed_pre;
    __u64 reset_pre;
    __u64 sum_ns;           /* time to close of the ones closed (not pre-existing) */
    __u64 min_ns_plus1;     /* exact; 0: none */
    __u64 max_ns;           /* exact */
    __u64 cgroup;
    char comm[TT_COMM_LEN];
    __u64 slots[TT_HIST_SLOTS];
};

/* Per owner: inserted at an owner's first entry or exit (from `cw_owner_zero`), never
 * deleted by the kernel; the agent deletes entries idle for a while (their counts stay
 * in the global ones). Bounded: a full map is counted (TT_CW_STAT_OWNER_FAIL). */
BPF_F_TABLE("hash", struct tt_cw_owner_key, struct tt_cw_owner, cw_owners, TT_MAX_CW_OWNERS,
            BPF_F_NO_PREALLOC);

/* Time to close of every socket closed by its app (pre-existing ones left out), per CPU:
 * the user side adds the slots and sums and takes the smallest and largest extremes,
 * so they are exact with no atomic operation. */
struct tt_cw_hist {
    __u64 slots[TT_HIST_SLOTS];
    __u64 sum_ns;
    __u64 min_ns_plus1;
    __u64 max_ns;
};
BPF_PERCPU_ARRAY(cw_hist, struct tt_cw_hist, 1);

/* Exact per-CPU counters (TT_CW_STAT_*): incremented here, summed over CPUs and never
 * reset by the user side. */
BPF_PERCPU_ARRAY(cw_stats, __u64, TT_CW_STAT_MAX);

/* Scratch values too large for the BPF stack: one per CPU and nesting depth (common.bpf.h
 * tt_scratch_take), never inserted or deleted. */
BPF_PERCPU_ARRAY(cw_scratch, struct tt_cw, TT_SCRATCH_DEPTH);
BPF_PERCPU_ARRAY(cw_owner_zero, struct tt_cw_owner, TT_SCRATCH_DEPTH);

/* *p = max(*p, v), atomically against other CPUs (a few tries: a loser of every one
 * lost to larger values). */
static __always_inline void tt_atomic_max(__u64 *p, __u64 v)
{
#pragma unroll
    for (int i = 0; i < 4; i++) {
        __u64 cur = *p;
        if (v <= cur || __sync_val_compare_and_swap(p, cur, v) == cur)
            return;
    }
}

/* *p = min(*p, v + 1) where 0 stands for none, atomically. */
static __always_inline void tt_atomic_min_plus1(__u64 *p, __u64 v)
{
#pragma unroll
    for (int i = 0; i < 4; i++) {
        __u64 cur = *p;
        if ((cur && v + 1 >= cur) || __sync_val_compare_and_swap(p, cur, v + 1) == cur)
            return;
    }
}

/* The counts of `owner`, inserted zeroed (named after it) at its first use; NULL when
 * the map is full (counted). `depth`: the caller's scratch depth. */
static __always_inline struct tt_cw_owner *tt_cw_owner_of(const struct tt_owner *owner, int depth)
{
    struct tt_cw_owner_key key = {};
    key.tgid = owner->tgid;
    key.start_ns = owner->start_ns;
    struct tt_cw_owner *c = cw_owners.lookup(&key);
    if (c)
        return c;
    struct tt_cw_owner *z = cw_owner_zero.lookup(&depth);
    if (!z) {
        cw_stats.atomic_increment(TT_CW_STAT_OWNER_FAIL);
        return 0;
    }
    __builtin_memcpy(z->comm, owner->comm, TT_COMM_LEN);
    z->cgroup = owner->cgroup;
    c = cw_owners.lookup_or_try_init(&key, z);
    if (!c)
        cw_stats.atomic_increment(TT_CW_STAT_OWNER_FAIL);
    return c;
}

/* Socket `sk` (its table entry `s`, tuple `t`) enters CLOSE_WAIT now. */
static __always_inline void tt_cw_enter(__u64 sk, const struct tt_sock *s, const struct tt_tuple *t, __u64 now,
                                        int depth)
{
    struct tt_cw *c = cw_scratch.lookup(&depth);
    if (!c) {
        cw_stats.atomic_increment(TT_CW_STAT_ENTERED);
        cw_stats.atomic_increment(TT_CW_STAT_OPEN_FAIL);
        return;
    }
    __builtin_memset(c, 0, sizeof(*c));
    c->entered_ns = now;
    c->born_ns = s->born_ns;
    c->owner = s->owner;
    c->t = *t;
    c->origin = s->origin;
    c->pre_fin = s->pre_fin;
    c->post_fin.ustack = -1;
    c->last.ustack = -1;
    cw_stats.atomic_increment(TT_CW_STAT_ENTERED);
    struct tt_cw_owner *o = tt_cw_owner_of(&c->owner, depth);
    if (o)
        __sync_fetch_and_add(&o->entered, 1);
    if (cw_open.insert(&sk, c) == 0)
        return;
    /* An entry at this address belongs to an older socket whose exit and rebirth were
     * never seen: forgotten, and replaced. */
    struct tt_cw *old = cw_open.lookup(&sk);
    if (old) {
        struct tt_owner was = old->owner;
        if (cw_open.delete(&sk) == 0) {
            cw_stats.atomic_increment(TT_CW_STAT_FORGOTTEN);
            struct tt_cw_owner *w = tt_cw_owner_of(&was, depth);
            if (w)
                __sync_fetch_and_add(&w->forgotten, 1);
        }
    }
    if (cw_open.insert(&sk, c))
        cw_stats.atomic_increment(TT_CW_STAT_OPEN_FAIL);
}

/* Socket `sk` leaves CLOSE_WAIT for `n` now: closed by its app (LAST_ACK) or reset. */
static __always_inline void tt_cw_leave(__u64 sk, int n, __u64 now, int depth)
{
    struct tt_cw *c = cw_open.lookup(&sk);
    if (!c)
        return;
    __u64 entered = c->entered_ns;
    __u32 pre = c->flags & TT_CW_PREEXISTING;
    struct tt_owner owner = c->owner;
    if (cw_open.delete(&sk))
        return; /* the other copy counted it */
    int closed = n == TT_TCP_LAST_ACK;
    cw_stats.atomic_increment(closed ? TT_CW_STAT_CLOSED : TT_CW_STAT_RESET);
    if (pre)
        cw_stats.atomic_increment(closed ? TT_CW_STAT_CLOSED_PREEXISTING : TT_CW_STAT_RESET_PREEXISTING);
    struct tt_cw_owner *o = tt_cw_owner_of(&owner, depth);
    if (o) {
        __sync_fetch_and_add(closed ? &o->closed : &o->reset, 1);
        if (pre)
            __sync_fetch_and_add(closed ? &o->closed_pre : &o->reset_pre, 1);
    }
    if (!closed || pre)
        return;
    __u64 d = now > entered ? now - entered : 0;
    __u32 slot = tt_log2_slot(d);
    if (slot >= TT_HIST_SLOTS)
        slot = TT_HIST_SLOTS - 1;
    int zero = 0;
    struct tt_cw_hist *h = cw_hist.lookup(&zero);
    if (h) {
        h->slots[slot]++;
        h->sum_ns += d;
        if (!h->min_ns_plus1 || d + 1 < h->min_ns_plus1)
            h->min_ns_plus1 = d + 1;
        if (d > h->max_ns)
            h->max_ns = d;
    }
    if (o) {
        __sync_fetch_and_add(&o->slots[slot], 1);
        __sync_fetch_and_add(&o->sum_ns, d);
        tt_atomic_min_plus1(&o->min_ns_plus1, d);
        tt_atomic_max(&o->max_ns, d);
    }
}

/* A socket is born at `sk`: an entry there is an older socket's, whose exit was never
 * seen (both copies of the transition program skipped, or it was filtered out). */
static __always_inline void tt_cw_reborn(__u64 sk, int depth)
{
    struct tt_cw *c = cw_open.lookup(&sk);
    if (!c)
        return;
    struct tt_owner owner = c->owner;
    if (cw_open.delete(&sk))
        return;
    cw_stats.atomic_increment(TT_CW_STAT_FORGOTTEN);
    struct tt_cw_owner *o = tt_cw_owner_of(&owner, depth);
    if (o)
        __sync_fetch_and_add(&o->forgotten, 1);
}

/* The seed of a socket that was in CLOSE_WAIT at the snapshot was taken (sock.bpf.h
 * tt_sock_meet): while it is still there (`state_before`, the state it left or is in),
 * it is kept as a pre-existing one, its age counted from the snapshot. Not an entry. */
static __always_inline void tt_cw_seed_taken(__u64 sk, struct tt_tuple *t, const struct tt_seed *seed,
                                             __u32 state_before, int depth)
{
    cw_seeds.delete(t);
    if (state_before != TT_TCP_CLOSE_WAIT)
        return; /* it left CLOSE_WAIT before the seed was planted */
    struct tt_cw *c = cw_scratch.lookup(&depth);
    if (!c) {
        cw_stats.atomic_increment(TT_CW_STAT_OPEN_FAIL);
        return;
    }
    __builtin_memset(c, 0, sizeof(*c));
    c->entered_ns = seed->at_ns;
    c->owner = seed->owner;
    c->t = *t;
    c->flags = TT_CW_PREEXISTING;
    c->origin.ustack = -1;
    c->pre_fin.ustack = -1;
    c->post_fin.ustack = -1;
    c->last.ustack = -1;
    if (cw_open.insert(&sk, c) && !cw_open.lookup(&sk))
        cw_stats.atomic_increment(TT_CW_STAT_OPEN_FAIL);
}

/* A send or recv (`op`, result `ret`) by the calling process on `sk`, in CLOSE_WAIT. */
static __always_inline void tt_cw_touch(void *ctx, __u64 sk, __u8 op, int ret)
{
    struct tt_cw *c = cw_open.lookup(&sk);
    if (!c)
        return;
    cw_stats.atomic_increment(TT_CW_STAT_TOUCHES);
    __sync_fetch_and_add(&c->touches, 1);
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (c->owner.tgid != tgid)
        tt_owner_current(&c->owner);
    /* The touch after the FIN that tells where the app went wrong: its EOF read (the recv
     * that returned 0: the app learned the peer closed, and did not close) when there is
     * one, else the first touch after the FIN. */
    int eof = op == TT_OP_RECV && ret == 0 && !c->eof_ns;
    if (!c->post_fin.ts_ns) {
        tt_code_take(ctx, &c->post_fin, op, ret, 1);
    } else if (eof) {
        /* Replace the first touch only with a stack to show for it: a failed take (the
         * stack map full or a bucket taken) would leave the touch with none. */
        struct tt_code now = {};
        tt_code_take(ctx, &now, op, ret, 1);
        if (now.ustack >= 0)
            c->post_fin = now;
    }
    tt_code_take(ctx, &c->last, op, ret, 0);
    if (eof)
        c->eof_ns = c->last.ts_ns;
}

/* `sk`, in CLOSE_WAIT, was just accepted by the calling process (the peer sent its FIN
 * before accept()): its owner and origin, from its table entry `s`. */
static __always_inline void tt_cw_accepted(__u64 sk, const struct tt_sock *s)
{
    struct tt_cw *c = cw_open.lookup(&sk);
    if (!c)
        return;
    cw_stats.atomic_increment(TT_CW_STAT_TOUCHES);
    __sync_fetch_and_add(&c->touches, 1);
    c->owner = s->owner;
    c->origin = s->origin;
}

#endif /* TT_CW_AGG */
#endif /* TT_CW_BPF_H */
