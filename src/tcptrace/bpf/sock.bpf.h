/* sock.bpf.h: a TCP socket as every program reads it, and the one table of
 * sockets and their owners.
 *
 * Reading a socket: tt_sk_is_tcp(), tt_read_tuple() (the 4-tuple), and
 * tt_event_endpoint() / tt_event_owner() to copy what was read into an event.
 *
 * Owners: a socket's owner is the process that acts on it, learned only in that
 * process's context (tt_owner_current()): in softirq, where most transitions
 * run, the current task is whoever was on the CPU. The table `socks` holds the
 * owner of every socket seen, plus what lifecycle.bpf.c keeps per socket.
 * lifecycle.bpf.c is its one writer on sock:inet_sock_set_state (births,
 * process-context transitions, inheritance from a listener, CLOSE); owner.bpf.c
 * updates the owner where a process accepts or touches a socket. Every other
 * part reads it (tt_owner_of()). A command that needs owners but not
 * transitions (timewait) gets lifecycle.bpf.c in its owners-only mode, added by
 * the loader (kernel/loader.py SOCKET_OWNERS), so owners are learned the same
 * way, once, whatever the parts loaded.
 *
 * Knobs (-D cflags set by the loader):
 *   TT_CLOSED_OWNERS   keep a socket's owner for a while after its CLOSE
 *                      (`closed_owners`: an abortive close() sends its RST after
 *                      the transition; timewait attributes it)
 */
#ifndef TT_SOCK_BPF_H
#define TT_SOCK_BPF_H

#include "common.bpf.h"

#ifndef TT_MAX_CLOSED
#define TT_MAX_CLOSED 16384
#endif

/* ---- reading a socket -------------------------------------------------- */

/* A socket's addresses and ports as sock:inet_sock_set_state reports them.
 * Zero it before reading (its padding is part of a map key in timewait). */
struct tt_tuple {
    __u8 saddr[16]; /* local; IPv4 in the first 4 bytes */
    __u8 daddr[16]; /* remote */
    __u16 sport;    /* local, host order */
    __u16 dport;    /* remote, host order */
    __u16 family;
    __u16 pad;
    __u32 netns;    /* the socket's network namespace (inode of its net ns) */
};

/* Where tt_read_tuple() takes the local port from. */
#define TT_SPORT_INET 0 /* inet_sock.inet_sport, as the tracepoint does: full sockets
                         * only, and still set after CLOSE */
#define TT_SPORT_NUM 1  /* sock_common.skc_num: any socket (timewait and request
                         * sockets too), but 0 once a full socket is unhashed at CLOSE */

/* Whether a struct sock is TCP (sk_protocol; BTF offset). */
static __always_inline int tt_sk_is_tcp(const char *sk)
{
    __u16 protocol = 0;
    bpf_probe_read_kernel(&protocol, sizeof(protocol), sk + TT_SK_PROTOCOL_OFF);
    return protocol == TT_IPPROTO_TCP;
}

/* The inode number of a socket's network namespace (what /proc/PID/ns/net
 * links to and `ip netns identify` names): sock_common.skc_net.net->ns.inum.
 * Full, timewait and request sockets alike; 0 when it cannot be read. */
static __always_inline __u32 tt_sk_netns(const char *sk)
{
    const char *net = 0;
    __u32 inum = 0;
    bpf_probe_read_kernel(&net, sizeof(net), sk + TT_SKC_NET_OFF);
    if (net)
        bpf_probe_read_kernel(&inum, sizeof(inum), net + TT_NET_NS_INUM_OFF);
    return inum;
}

/* The 4-tuple of a socket: full, timewait or request socket (all begin with
 * struct sock_common, whose offsets the loader passes: sock_defines). */
static __always_inline void tt_read_tuple(const char *sk, struct tt_tuple *t, int sport_from)
{
    __u16 sport = 0, dport = 0;
    bpf_probe_read_kernel(&t->family, sizeof(t->family), sk + TT_SKC_FAMILY_OFF);
    bpf_probe_read_kernel(&dport, sizeof(dport), sk + TT_SKC_DPORT_OFF);
    t->dport = __builtin_bswap16(dport);
    if (sport_from == TT_SPORT_NUM) {
        bpf_probe_read_kernel(&t->sport, sizeof(t->sport), sk + TT_SKC_NUM_OFF);
    } else {
        bpf_probe_read_kernel(&sport, sizeof(sport), sk + TT_INET_SPORT_OFF);
        t->sport = __builtin_bswap16(sport);
    }
    t->netns = tt_sk_netns(sk);
    if (t->family == TT_AF_INET6) {
        bpf_probe_read_kernel(t->saddr, 16, sk + TT_SKC_V6_RCV_SADDR_OFF);
        bpf_probe_read_kernel(t->daddr, 16, sk + TT_SKC_V6_DADDR_OFF);
    } else {
        bpf_probe_read_kernel(t->saddr, 4, sk + TT_SKC_RCV_SADDR_OFF);
        bpf_probe_read_kernel(t->daddr, 4, sk + TT_SKC_DADDR_OFF);
    }
}

/* An event's endpoint fields from a tuple. */
static __always_inline void tt_event_endpoint(struct tt_event *e, const struct tt_tuple *t)
{
    e->family = t->family;
    e->netns = t->netns;
    e->sport = t->sport;
    e->dport = t->dport;
    __builtin_memcpy(e->saddr, t->saddr, 16);
    __builtin_memcpy(e->daddr, t->daddr, 16);
}

/* ---- owners ------------------------------------------------------------ */

/* Who owns a socket. Fields added here (the process's start time, ...) travel
 * with the owner through every table that keeps one. */
struct tt_owner {
    __u32 tgid;             /* 0: not learned */
    __u32 flags;            /* TT_OWNER_* (the filters' answers where it was learned) */
    __u64 cgroup;           /* cgroup v2 id where it was learned */
    __u64 start_ns;         /* the process's start (its leader's start_boottime): a
                             * pid is reused, (tgid, start_ns) is not */
    char comm[TT_COMM_LEN];
};

/* The calling process as an owner: only meaningful in process context. */
/* The calling process's start (its leader's start_boottime; 0 when unreadable): with the
 * tgid, what tells a process from a later one that reuses its pid. */
static __always_inline __u64 tt_current_start_ns(void)
{
    const char *task = (const char *)bpf_get_current_task();
    const char *leader = 0;
    __u64 start_ns = 0;
    bpf_probe_read_kernel(&leader, sizeof(leader), task + TT_TASK_GROUP_LEADER_OFF);
    if (leader)
        bpf_probe_read_kernel(&start_ns, sizeof(start_ns), leader + TT_TASK_START_BOOTTIME_OFF);
    return start_ns;
}

static __always_inline void tt_owner_current(struct tt_owner *o)
{
    o->tgid = bpf_get_current_pid_tgid() >> 32;
    bpf_get_current_comm(&o->comm, sizeof(o->comm));
    o->cgroup = bpf_get_current_cgroup_id();
    o->flags = tt_cgroup_member() ? TT_OWNER_IN_CGROUP : 0;
    o->start_ns = tt_current_start_ns();
}

/* Whether the calling process is not `o` as it was learned: another process, or the
 * same one moved to another cgroup since (its owner record is then learned again). */
static __always_inline int tt_owner_moved(const struct tt_owner *o)
{
    return o->tgid != (__u32)(bpf_get_current_pid_tgid() >> 32) || o->cgroup != bpf_get_current_cgroup_id();
}

/* Whether a socket with these ports, family and network namespace, owned by `o`,
 * passes the filters (common.bpf.h). */
static __always_inline int tt_keep(__u16 family, __u16 sport, __u16 dport, __u32 netns,
                                   const struct tt_owner *o)
{
    return tt_keep_endpoint(family, sport, dport, netns)
        && tt_keep_owner(o->tgid, o->comm, o->cgroup, o->flags);
}

static __always_inline void tt_event_owner(struct tt_event *e, const struct tt_owner *o)
{
    e->owner_tgid = o->tgid;
    __builtin_memcpy(e->owner_comm, o->comm, TT_COMM_LEN);
    e->owner_cgroup = o->cgroup;
    e->owner_start_ns = o->start_ns;
}

/* Transitions the kernel always makes in the context of the process acting on
 * the socket, so they name its owner: connect(), listen(), and close() or
 * shutdown() of a listener or a connection. A listener's close is one of them:
 * it runs in the closing process (tcp_close), so its event names who closed it,
 * and leaving it to the softirq-side program would keep that program busy in
 * process context, where a softirq transition arriving meanwhile is skipped.
 * Transitions that are only sometimes made by the process (ESTABLISHED -> CLOSE
 * is an abortive close() or a received RST) are not: they cannot name an owner. */
static __always_inline int tt_process_transition(int o, int n)
{
    return (o == TT_TCP_CLOSE && n == TT_TCP_SYN_SENT)        /* connect() */
        || (o == TT_TCP_CLOSE && n == TT_TCP_LISTEN)          /* listen() */
        || (o == TT_TCP_LISTEN && n == TT_TCP_CLOSE)          /* close() of a listener */
        || (o == TT_TCP_ESTABLISHED && n == TT_TCP_FIN_WAIT1) /* close()/shutdown() */
        || (o == TT_TCP_CLOSE_WAIT && n == TT_TCP_LAST_ACK);  /* close()/shutdown() */
}

/* ---- code paths -------------------------------------------------------- */

/* One process-context operation on a socket, where the tables keep one (its origin,
 * its last send/recv before the FIN, its first touch after it): what, when, its
 * result, and the user stack of the process that made it. No kernel stack: at
 * accept, connect, send and recv it is always the syscall path, which attributes
 * nothing. ts_ns 0: none. */
struct tt_code {
    __u64 ts_ns;
    __s32 ustack;   /* id in `stacks`, -1 when not taken */
    __s32 ret;      /* the operation's result (accept: the fd; send/recv: bytes) */
    __u32 tgid;     /* whose user stack it is */
    __u8 op;        /* TT_OP_* */
    __u8 gen;       /* stack_gen when the stack was taken */
    __u8 pad[2];
};

/* `c` for operation `op` of the calling process, now; with its user stack when
 * `with_stack` (and the program has stacks). Process context only. The code path is
 * built whole and stored at once: `c` lives in a map value that a softirq on another
 * CPU copies (the peer's FIN copies `pre_fin` into cw_open), and written in place it
 * would be seen with its time set and its stack not yet taken (a touch with no stack)
 * for as long as the stack walk takes. Stored at once, a reader gets the old code path
 * or the new one, at worst the new time with the old stack for the few stores it takes. */
static __always_inline void tt_code_take(void *ctx, struct tt_code *c, __u8 op, int ret, int with_stack)
{
    struct tt_code now = {};
    now.ustack = -1;
#ifdef TT_WITH_STACKS
    if (with_stack) {
        int zero = 0;
        __u32 *gen = stack_gen.lookup(&zero);
        now.gen = gen ? (__u8)*gen : 0;
        now.ustack = stacks.get_stackid(ctx, BPF_F_USER_STACK);
        if (now.ustack < 0)
            stats.atomic_increment(TT_STAT_STACK_FAIL);
    }
#endif
    now.ret = ret;
    now.tgid = bpf_get_current_pid_tgid() >> 32;
    now.op = op;
    now.ts_ns = bpf_ktime_get_ns();
    *c = now;
}

/* ---- the socket table -------------------------------------------------- */

/* One socket. Nothing outside the kernel reads this layout: add fields at
 * will (zero means unknown), they are kept across transitions. */
struct tt_sock {
    struct tt_owner owner;
    __u64 since_ns;     /* when it entered `state` (lifecycle's full mode only) */
    __u64 born_ns;      /* when it was born (CLOSE -> *, LISTEN -> SYN_RECV); 0: before tracing */
    __u16 family;       /* set at every transition, so process-context hooks */
    __u16 sport;        /* that only know skaddr (owner.bpf.c) can apply the */
    __u16 dport;        /* port and family filters (host order) */
    __u16 cw_touches;   /* owner.bpf.c: touches emitted while in CLOSE_WAIT */
    __u64 state;        /* 64 bits: the copy of lifecycle that moves it wins a cmpxchg */
    __u32 netns;        /* its network namespace inode, set with the ports */
    __u32 pad;
    struct tt_code origin;  /* accept or connect (TT_CW_AGG) */
    struct tt_code pre_fin; /* its last send/recv before the peer's FIN (TT_TOUCH_STACKS) */
};

/* Sockets by skaddr. Inserted when a socket is born (CLOSE -> *, LISTEN -> SYN_RECV: a
 * fresh entry, even over a stale one at a reused address), or first met live: at a
 * transition (from its seed, if any), a send/recv or an accept (with BPF_NOEXIST:
 * whichever program inserts first wins). Updated at its transitions (lifecycle) and
 * where a process accepts or touches it (owner.bpf.c). At its CLOSE the entry stays,
 * in state CLOSE, until the second copy of the softirq-side program has run, which
 * deletes it (lifecycle.bpf.c). LRU, so a socket whose CLOSE is never seen cannot pin
 * an entry; an evicted live socket is counted when it is met again
 * (TT_STAT_OWNER_FORGOTTEN). */
BPF_TABLE("lru_hash", __u64, struct tt_sock, socks, TT_MAX_SOCKS);

/* Key of `listeners`: a listener's network namespace, family and local port (host
 * order); a child in SYN_RECV has its listener's. */
struct tt_listener_key {
    __u32 netns;
    __u16 family;
    __u16 port;
};

/* Listeners' owners: a passively opened child is born in softirq (LISTEN -> SYN_RECV)
 * and inherits its listener's owner from here. Inserted at CLOSE -> LISTEN, and by the
 * user side at start for the listeners that existed before (kernel/seeds.py); deleted
 * at LISTEN -> CLOSE (lifecycle). */
BPF_HASH(listeners, struct tt_listener_key, struct tt_owner, TT_MAX_LISTENERS);

/* The owner of a socket that existed before tracing started, and what it was then. */
struct tt_seed {
    struct tt_owner owner;
    __u64 at_ns;        /* CLOCK_MONOTONIC of the host snapshot it comes from */
    __u32 state;        /* its state in that snapshot */
    __u32 pad;
};

/* Seeds by the socket's tuple (network namespace, family, addresses, ports): inserted
 * by the user side once the programs are attached, from a snapshot of every network
 * namespace and the holders of each socket's fd (kernel/seeds.py); consulted only
 * for a socket `socks` does not hold, and deleted once taken into `socks`. A seed
 * never taken is one of a socket that neither changed state nor was touched. */
BPF_F_TABLE("hash", struct tt_tuple, struct tt_seed, seeds, TT_MAX_SEEDS, BPF_F_NO_PREALLOC);

#ifdef TT_CLOSED_OWNERS
/* Owners of sockets that reached CLOSE, by skaddr. Inserted (or overwritten,
 * with an unknown owner too, so an older socket's never shows) at every X ->
 * CLOSE by lifecycle; never deleted: LRU. */
BPF_TABLE("lru_hash", __u64, struct tt_owner, closed_owners, TT_MAX_CLOSED);
#endif

/* Scratch for a socket's entry being built (lifecycle.bpf.c, owner.bpf.c): one per CPU
 * and nesting depth (common.bpf.h tt_scratch_take), never inserted or deleted. */
BPF_PERCPU_ARRAY(sock_scratch, struct tt_sock, TT_SCRATCH_DEPTH);

static __always_inline void tt_listener_key_of(struct tt_listener_key *k, const struct tt_tuple *t)
{
    k->netns = t->netns;
    k->family = t->family;
    k->port = t->sport;
}

/* The owner of socket `sk` into `out`: from `socks`, else, once the socket has
 * reached CLOSE, from `closed_owners` (whichever program runs first on the
 * CLOSE transition, the owner is in one of the two). 0 when neither has an
 * entry for it (`out` left as it is), 1 when one has, even with an unknown
 * owner. */
static __always_inline int tt_owner_of(__u64 sk, struct tt_owner *out)
{
    struct tt_sock *s = socks.lookup(&sk);
    if (s) {
        *out = s->owner;
        return 1;
    }
#ifdef TT_CLOSED_OWNERS
    struct tt_owner *o = closed_owners.lookup(&sk);
    if (o) {
        *out = *o;
        return 1;
    }
#endif
    return 0;
}

#ifdef TT_CW_AGG
/* closewait.bpf.h: a seed of a socket that was in CLOSE_WAIT was taken. */
static __always_inline void tt_cw_seed_taken(__u64 sk, struct tt_tuple *t, const struct tt_seed *seed,
                                             __u32 state_before, int depth);
#endif

/* A socket `socks` does not hold, met live in state `state` (at a transition into it,
 * or at a touch when `touch`): its entry, inserted with BPF_NOEXIST, from its seed when
 * the user side planted one, with the calling process as owner when `proc`.
 * `state_before`: the state it left (a transition) or is in (a touch). 1 when this call
 * inserted it (a racing program or CPU may have: then 0, and the entry is theirs).
 * Without a seed, a socket met at a transition lost its entry (LRU eviction) or is
 * older than tracing and was not seeded: counted, its owner is unknown from now on. */
static __always_inline int tt_sock_meet(__u64 sk, struct tt_tuple *t, __u32 state, __u32 state_before,
                                        __u64 since_ns, int proc, int touch, struct tt_sock *out, int depth)
{
    struct tt_seed seed = {};
    struct tt_seed *planted = seeds.lookup(t);
    if (planted)
        seed = *planted;
    out->owner = seed.owner;
    if (proc)
        tt_owner_current(&out->owner);
    out->since_ns = since_ns;
    out->born_ns = 0;
    out->state = state;
    out->family = t->family;
    out->sport = t->sport;
    out->dport = t->dport;
    out->netns = t->netns;
    out->origin.ustack = -1;
    out->pre_fin.ustack = -1;
    if (socks.insert(&sk, out))
        return 0;
    if (planted) {
        stats.atomic_increment(TT_STAT_SEEDS_USED);
        seeds.delete(t);
#ifdef TT_CW_AGG
        if (seed.state == TT_TCP_CLOSE_WAIT)
            tt_cw_seed_taken(sk, t, &seed, state_before, depth);
#endif
    } else {
        stats.atomic_increment(touch ? TT_STAT_ADOPTED : TT_STAT_OWNER_FORGOTTEN);
    }
    return 1;
}

#endif /* TT_SOCK_BPF_H */
