/* tcptrace.h: the one definition of what crosses from the kernel to user space.
 *
 * Every program in bpf/ includes this file. The user side never restates these
 * layouts: kernel/stream.py takes them from bcc (table.event()), and
 * model/events.py names the raw numbers (kinds, states, ops); the kernel/
 * modules name the counters. tests/unit/test_constants.py checks every Python
 * copy of these #defines.
 *
 * Only tracepoint fields and BTF-derived offsets (passed as -D cflags by
 * kernel/loader.py) are read from the kernel: the installed headers may be of
 * another kernel version, so no kernel struct layout is taken from them.
 */
#ifndef TCPTRACE_H
#define TCPTRACE_H

/* Event kinds (tt_event.kind). */
#define TT_KIND_TRANSITION 1 /* sock:inet_sock_set_state on a TCP socket */
#define TT_KIND_TOUCH 2      /* a process-context operation on a TCP socket */
#define TT_KIND_TIMEWAIT 3   /* a timewait socket's life (see timewait programs) */
#define TT_KIND_CLOSE 4      /* one close()/shutdown() call on a TCP socket */

/* Operations of TT_KIND_TOUCH events (tt_event.op). */
#define TT_OP_NONE 0
#define TT_OP_CONNECT 1
#define TT_OP_ACCEPT 2
#define TT_OP_SEND 3
#define TT_OP_RECV 4
#define TT_OP_CLOSE 5
#define TT_OP_SHUTDOWN 6
#define TT_OP_LISTEN 7
#define TT_OP_CLOSE_RANGE 8 /* TT_KIND_CLOSE only: close_range(2) */

/* Bits of tt_event.flags of TT_KIND_CLOSE events (closelat.bpf.c). */
#define TT_CLOSE_RESET 1          /* the call sent a reset (unread data, linger 0): data-loss risk */
#define TT_CLOSE_LINGERED 2       /* SO_LINGER was on and the call blocked */
#define TT_CLOSE_LATE_CLOSE_WAIT 4 /* the socket had sat in CLOSE_WAIT long before the call */

/* Operations of TT_KIND_TIMEWAIT events (timewait.bpf.c). skaddr is the tw
 * socket (the socket itself for resets); oldstate the tw's substate at
 * creation, newstate its substate now; value_ns the time since creation. */
#define TT_TW_CREATED 1        /* a tw replaced a full socket; newstate TIME_WAIT or FIN_WAIT2 (parked) */
#define TT_TW_CONVERTED 2      /* a parked tw got its FIN and is TIME_WAIT now; ret: TT_TW_HOW_* */
#define TT_TW_PARKED_ENDED 3   /* a parked tw died in FIN_WAIT2 (fin timeout, kill): never TIME_WAIT */
#define TT_TW_RESET_SENT 4     /* an RST sent on a socket; newstate its state */
#define TT_TW_RESET_RECEIVED 5 /* an RST received on a socket; newstate its state */
#define TT_TW_KILLED 6         /* a counted TIME_WAIT tw ended early (port reuse, SYN, RST, ss -K) */
#define TT_TWF_BOUND 1         /* flags of TIMEWAIT events: the local port was bound (a server's), not chosen by connect() */
#define TT_TW_HOW_FIN 1        /* seen as the FIN arrived (the FIN freed at the tw, or the re-arm) */
#define TT_TW_HOW_TIMER 2      /* seen at a later cancel or expiry of the tw's timer */

/* Indexes of timewait.bpf.c's per-CPU array `tw_stats` (exact, like `stats`). */
#define TT_TW_STAT_CREATED 0        /* TIME_WAIT creations: IMMEDIATE + CONVERTED_* */
#define TT_TW_STAT_IMMEDIATE 1      /* tws created in TIME_WAIT */
#define TT_TW_STAT_PARKED 2         /* tws created in FIN_WAIT2 (orphan parked) */
#define TT_TW_STAT_CONVERTED_FIN 3  /* parked -> TIME_WAIT, seen when the FIN arrived */
#define TT_TW_STAT_CONVERTED_TIMER 4 /* parked -> TIME_WAIT, seen later at the timer */
#define TT_TW_STAT_PARKED_ENDED 5   /* parked tws that died in FIN_WAIT2 */
#define TT_TW_STAT_EXPIRED 6        /* counted tws whose 60 s ran out */
#define TT_TW_STAT_RESETS_SENT 7
#define TT_TW_STAT_RESETS_RECEIVED 8
#define TT_TW_STAT_ANNOUNCED 9      /* timer_start of a new tw (any filter) */
#define TT_TW_STAT_CONFIRMED 10     /* ... matched with its full socket's CLOSE */
#define TT_TW_STAT_TWS_FAIL 11      /* `tws` full: a tw not tracked (uncounted if parked; its end unseen) */
#define TT_TW_STAT_NO_OWNER 12      /* tws of a socket whose owner was never learned (unattributed) */
#define TT_TW_STAT_KILLED 13        /* counted tws that ended before their 60 s */
#define TT_TW_STAT_TIMER_STARTS 14  /* timer_start runs on a tw's timer (new or re-armed), any filter */
#define TT_TW_STAT_PENDING_FAIL 15  /* `tw_pending` full: a new tw not announced, so not counted */
#define TT_TW_STAT_PROCS_FAIL 16    /* `tw_procs` full: a count missing from the by-process table */
#define TT_TW_STAT_DESTS_FAIL 17    /* `tw_dests` full: a creation missing from the by-destination table */
#define TT_TW_STAT_PENDING_STALE 18 /* announcements never confirmed, removed at their tw's end */
#define TT_TW_STAT_HANDLER_LEARNED 19 /* tw_timer_handler's address learned from a confirmed tw (1, or 0 before the first) */
#define TT_TW_STAT_CLOSED_NO_TW 20  /* FIN_WAIT2/CLOSING -> CLOSE with no tw announced (none made, or one unseen) */
#define TT_TW_STAT_MAX 24

/* TCP states as the kernel numbers them (include/net/tcp_states.h). */
#define TT_TCP_ESTABLISHED 1
#define TT_TCP_SYN_SENT 2
#define TT_TCP_SYN_RECV 3
#define TT_TCP_FIN_WAIT1 4
#define TT_TCP_FIN_WAIT2 5
#define TT_TCP_TIME_WAIT 6
#define TT_TCP_CLOSE 7
#define TT_TCP_CLOSE_WAIT 8
#define TT_TCP_LAST_ACK 9
#define TT_TCP_LISTEN 10
#define TT_TCP_CLOSING 11
#define TT_TCP_NEW_SYN_RECV 12

#define TT_AF_INET 2
#define TT_AF_INET6 10
#define TT_IPPROTO_TCP 6
#define TT_COMM_LEN 16

/* Indexes of the per-CPU counter array `stats`. The user side sums them over
 * CPUs; they are exact even when the event stream overflows. */
#define TT_STAT_TRANSITIONS 0   /* TCP transitions that passed the filters */
#define TT_STAT_EMITTED 1       /* events submitted to the ring buffer */
#define TT_STAT_LOST 2          /* ring buffer reservations that failed */
#define TT_STAT_SOCK_UPDATE_FAIL 3 /* socket table updates that failed */
#define TT_STAT_STACK_FAIL 4    /* bpf_get_stackid failures (map full, fault) */
#define TT_STAT_OWNER_FORGOTTEN 5 /* a live socket missing from `socks` with no seed: its entry
                                   * was evicted (LRU) or it is older than tracing, unseeded */
#define TT_STAT_SEEDS_USED 6    /* seeds (pre-existing sockets' owners) taken into `socks` */
#define TT_STAT_ADOPTED 7       /* sockets first seen at a send/recv/accept, taken into `socks` */
#define TT_STAT_UNSEEN_END 8    /* a socket born where `socks` still held a socket not in CLOSE:
                                 * the old socket's last transitions were never seen */
#define TT_STAT_MAX 16

/* Indexes of closelat.bpf.c's per-CPU array `cl_stats`. */
#define TT_CL_STAT_CALLS 0      /* calls on TCP sockets that passed the filters */
#define TT_CL_STAT_CALL_FAIL 1  /* cl_calls full: a call not timed */
#define TT_CL_STAT_HIST_FAIL 2  /* cl_hists full: a call timed but not counted */
#define TT_CL_STAT_FLAGGED 3    /* calls that set a TT_CLOSE_* flag */
#define TT_CL_STAT_MAX 4

/* Indexes of closewait.bpf.h's per-CPU array `cw_stats` (exact, like `stats`). Every
 * count is of sockets that passed the filters when they entered CLOSE_WAIT. */
#define TT_CW_STAT_ENTERED 0      /* sockets that entered CLOSE_WAIT */
#define TT_CW_STAT_CLOSED 1       /* ... left it for LAST_ACK: closed by their app (pre-existing ones too) */
#define TT_CW_STAT_RESET 2        /* ... left it for CLOSE: a reset (pre-existing ones too) */
#define TT_CW_STAT_FORGOTTEN 3    /* ... whose address was reborn: their exit was never seen */
#define TT_CW_STAT_CLOSED_PREEXISTING 4   /* of CLOSED, sockets in CLOSE_WAIT before tracing started (seeded) */
#define TT_CW_STAT_RESET_PREEXISTING 5    /* of RESET, the same */
#define TT_CW_STAT_OPEN_FAIL 6    /* cw_open full: a socket counted but not kept */
#define TT_CW_STAT_OWNER_FAIL 7   /* cw_owners full: a count kept globally only */
#define TT_CW_STAT_TOUCHES 8      /* send/recv/accept on sockets in CLOSE_WAIT */
#define TT_CW_STAT_MAX 16

/* Slots of the log2 histograms (closelat's cl_hists, closewait's time to close): slot 0
 * counts 0 ns, slot k [2^(k-1), 2^k) ns (model/histogram.py reads the same). */
#define TT_HIST_SLOTS 65

/* Slots of closelat's log2 histograms (cl_hists): slot 0 counts 0 ns, slot k
 * [2^(k-1), 2^k) ns (model/histogram.py reads the same). */
#define TT_CL_SLOTS 65

/* One record for every kind, so that a single ring buffer keeps the global
 * order of events (a socket's owner is always learned before it is used).
 * Fields a kind does not use are zero. */
struct tt_event {
    __u64 ts_ns;        /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    __u64 skaddr;       /* struct sock * (kernel address; reused after free) */
    __u64 value_ns;     /* TRANSITION: ns spent in oldstate, 0 when unknown */
    __u64 sk_flags;     /* raw sk->sk_flags when the loader knows its offset */
    __u32 task_tgid;    /* the task the kernel ran this in (softirq: anyone) */
    __u32 task_pid;
    __u32 owner_tgid;   /* the socket's owner as learned in process context, 0 unknown */
    __s32 kstack;       /* stack ids in `stacks`, negative when not taken */
    __s32 ustack;
    __s32 ret;          /* TOUCH: syscall or operation result */
    __u8 saddr[16];     /* IPv4 in the first 4 bytes */
    __u8 daddr[16];
    __u16 sport;        /* host order */
    __u16 dport;        /* host order */
    __u16 family;
    __u8 kind;
    __u8 oldstate;
    __u8 newstate;
    __u8 op;
    __u8 pad[2];
    char task_comm[TT_COMM_LEN];
    char owner_comm[TT_COMM_LEN];
    __u64 aux_ns;       /* CLOSE: ns the socket had been in oldstate when the call began, 0 unknown */
    __u32 flags;        /* CLOSE: TT_CLOSE_* bits; TIMEWAIT: TT_TWF_* bits */
    __u32 netns;        /* the socket's network namespace inode, 0 unknown */
    __u64 owner_cgroup; /* the owner's cgroup v2 id when learned with it, 0 unknown */
    __u64 owner_start_ns; /* the owner's start time (boot-based ns), 0 unknown */
};

/* Sizes; every one can be overridden with -D by the loader. */
#ifndef TT_MAX_SOCKS
#define TT_MAX_SOCKS 262144
#endif
#ifndef TT_MAX_LISTENERS
#define TT_MAX_LISTENERS 4096
#endif
#ifndef TT_RINGBUF_PAGES
#define TT_RINGBUF_PAGES 1024
#endif
#ifndef TT_STACK_ENTRIES
#define TT_STACK_ENTRIES 16384
#endif
#ifndef TT_MAX_SEEDS
#define TT_MAX_SEEDS 262144
#endif
#ifndef TT_MAX_CW_OPEN
#define TT_MAX_CW_OPEN 65536
#endif
#ifndef TT_MAX_CW_OWNERS
#define TT_MAX_CW_OWNERS 16384
#endif
#ifndef TT_MAX_PORT_FILTERS
#define TT_MAX_PORT_FILTERS 64
#endif
#ifndef TT_MAX_PID_FILTERS
#define TT_MAX_PID_FILTERS 1024
#endif
#ifndef TT_MAX_NETNS_FILTERS
#define TT_MAX_NETNS_FILTERS 64
#endif
#ifndef TT_MAX_CGROUP_FILTERS
#define TT_MAX_CGROUP_FILTERS 4096
#endif
#ifndef TT_MAX_CGROUP_DEPTH
#define TT_MAX_CGROUP_DEPTH 32 /* levels of the cgroup tree a --cgroup is looked for in */
#endif

/* Bits of a port_filter entry: which option named the port (common.bpf.h). */
#define TT_PORT_EITHER 1 /* --port: the local or the remote port */
#define TT_PORT_LOCAL 2  /* --local-port (-L) */
#define TT_PORT_REMOTE 4 /* --remote-port (-D) */

/* Bits of tt_owner.flags (sock.bpf.h). */
#define TT_OWNER_IN_CGROUP 1 /* in, or under, a cgroup of cgroup_filter when it was learned */

#endif /* TCPTRACE_H */
