/* common.bpf.h: what every tcptrace program shares: the event ring buffer,
 * the exact counters, the filters, stacks, and the fd-to-socket walk.
 * sock.bpf.h adds how a socket is read and the table of sockets and owners.
 *
 * kernel/loader.py compiles one translation unit per command: this file, then
 * sock.bpf.h, then the program parts it needs (lifecycle.bpf.c, ...), inlined
 * because bcc rewrites map calls only in the main file.
 *
 * Two map operations have one copy, bcc's own, and are used everywhere:
 *   COUNTERS.atomic_increment(IDX) a per-CPU counter array (`stats`, `tw_stats`,
 *                                  `cl_stats`, ...): lookup and an atomic add. Per CPU,
 *                                  yet atomic: a program in process context interrupted
 *                                  by a softirq whose program adds to the same counter
 *                                  would lose that add with bcc's increment(), a plain
 *                                  load-add-store
 *   MAP.lookup_or_try_init(&k, &zero)  the entry of `k`, inserted from `zero`
 *                                  with BPF_NOEXIST when missing (a racing CPU's
 *                                  insert wins); NULL only when the map is full,
 *                                  which callers count
 * (map calls cannot be wrapped in a helper or a macro: bcc rewrites them by name.)
 *
 * Knobs (-D cflags set by the loader, all optional; each filter given must pass):
 *   TT_FILTER_PIDS       keep sockets owned by a tgid in pid_filter
 *   TT_FILTER_COMM       keep sockets whose owner's comm equals comm_filter[0]
 *   TT_FILTER_PORTS=BITS keep sockets whose ports are in port_filter: for each
 *                        TT_PORT_* bit in BITS, the local or remote (EITHER), the
 *                        local (LOCAL) or the remote (REMOTE) port has that bit
 *   TT_FILTER_FAMILY=N   keep AF_INET (2) or AF_INET6 (10) only
 *   TT_FILTER_NETNS      keep sockets of a network namespace in netns_filter
 *   TT_FILTER_CGROUP     keep sockets whose owner is in a cgroup of
 *                        cgroup_filter or under one (see tt_cgroup_member())
 *   TT_WITH_STACKS       take kernel (and, in process context, user) stacks
 *   TT_SK_FLAGS_OFF=N    byte offset of sk->sk_flags (from BTF), to report it
 *   TT_FD_WALK           compile tt_fd_to_tcp_sock(); the loader then passes the
 *                        TT_*_OFF offsets it uses (from BTF)
 */
#ifndef TT_COMMON_BPF_H
#define TT_COMMON_BPF_H

#include "tcptrace.h"

/* Every event of every kind, in one ring buffer so their order is kept.
 * Reserved by tt_reserve(), submitted by tt_submit(), consumed by
 * kernel/stream.py. */
BPF_RINGBUF_OUTPUT(events, TT_RINGBUF_PAGES);

/* Never written: it exists so that bcc derives the user side's layout of
 * struct tt_event from this file (kernel/stream.py decodes with its Leaf). */
BPF_ARRAY(event_layout, struct tt_event, 1);

/* Exact per-CPU counters (TT_STAT_*), a fixed array: incremented by every
 * part, read (summed over CPUs), never reset, by the user side. */
BPF_PERCPU_ARRAY(stats, __u64, TT_STAT_MAX);

/* The filters' tables: each filled by the loader before the programs run
 * (kernel/loader.py _fill_filter_maps), never deleted from. cgroup_filter also
 * grows while tracing: a --container that starts later is added when user space
 * finds its cgroup (system/cgroups.py CgroupScope). */
#ifdef TT_FILTER_PORTS
/* Ports (host order) -> the TT_PORT_* bits of the options that named them. */
BPF_HASH(port_filter, __u16, __u8, TT_MAX_PORT_FILTERS);
#endif

#ifdef TT_FILTER_PIDS
/* Tgids to keep. */
BPF_HASH(pid_filter, __u32, __u8, TT_MAX_PID_FILTERS);
#endif

#ifdef TT_FILTER_NETNS
/* Network namespace inodes to keep. */
BPF_HASH(netns_filter, __u32, __u8, TT_MAX_NETNS_FILTERS);
#endif

#ifdef TT_FILTER_CGROUP
/* cgroup v2 ids (a directory's inode) to keep, with everything under them. */
BPF_HASH(cgroup_filter, __u64, __u8, TT_MAX_CGROUP_FILTERS);
#endif

#ifdef TT_FILTER_COMM
struct tt_comm { char c[TT_COMM_LEN]; };
/* One entry: the comm to keep; filled by the loader before attaching. */
BPF_ARRAY(comm_filter, struct tt_comm, 1);
#endif

/* Scratch space (an entry built before it is inserted: sock.bpf.h, closewait.bpf.h) is
 * per CPU and per nesting depth. A raw tracepoint program holds no bpf_prog_active, so
 * one running in process context (connect, close, a send) can be interrupted on its CPU
 * by a softirq whose programs build entries too: with one slot per CPU, the softirq
 * would write over the entry being built (during a stack walk, for microseconds), and
 * the interrupted program would insert another socket's fields. So each program run
 * takes the next depth of its CPU and gives it back before it returns; interrupts nest,
 * so the depth taken last is the first given back. */
#define TT_SCRATCH_DEPTH 8
BPF_PERCPU_ARRAY(scratch_depth, __u64, 1); /* 64 bits: 32-bit atomics with a result do not compile */

/* The next free depth of this CPU (an index into the scratch arrays), or -1 when all are
 * taken: the caller counts the entry it cannot build. Give it back on every path. */
static __always_inline int tt_scratch_take(void)
{
    int zero = 0;
    __u64 *d = scratch_depth.lookup(&zero);
    if (!d)
        return -1;
    __u64 depth = __sync_fetch_and_add(d, 1); /* one instruction: no nested run between */
    if (depth < TT_SCRATCH_DEPTH)
        return (int)depth;
    __sync_fetch_and_sub(d, 1);
    return -1;
}

static __always_inline void tt_scratch_give(int depth)
{
    if (depth < 0)
        return;
    int zero = 0;
    __u64 *d = scratch_depth.lookup(&zero);
    if (d)
        __sync_fetch_and_sub(d, 1);
}

#ifdef TT_WITH_STACKS
/* Stack traces by id. Ids are referenced from events; entries are never
 * deleted by the kernel side, so the size bounds a run's distinct stacks
 * (failures are counted in TT_STAT_STACK_FAIL). */
BPF_STACK_TRACE(stacks, TT_STACK_ENTRIES);
#endif

#ifdef TT_WITH_STACKS
/* The stack map's generation: one entry, set by the user side when it empties `stacks`
 * (a full map refuses new stacks), so that an id taken before cannot be mistaken for the
 * stack that reuses it after. Stored with every stack id the tables keep (tt_code.gen). */
BPF_ARRAY(stack_gen, __u32, 1);
#endif

/* Number of significant bits of v: 0 for 0, k for v in [2^(k-1), 2^k): the slot of a
 * log2 histogram (TT_HIST_SLOTS). */
static __always_inline __u32 tt_log2_slot(__u64 v)
{
    __u32 r = 0;
    if (v >> 32) { v >>= 32; r += 32; }
    if (v >> 16) { v >>= 16; r += 16; }
    if (v >> 8) { v >>= 8; r += 8; }
    if (v >> 4) { v >>= 4; r += 4; }
    if (v >> 2) { v >>= 2; r += 2; }
    if (v >> 1) { v >>= 1; r += 1; }
    return r + (__u32)v;
}

/* Whether a socket with these ports, family and network namespace passes the
 * address filters. */
static __always_inline int tt_keep_endpoint(__u16 family, __u16 sport, __u16 dport, __u32 netns)
{
#ifdef TT_FILTER_FAMILY
    if (family != TT_FILTER_FAMILY)
        return 0;
#endif
#ifdef TT_FILTER_NETNS
    if (!netns_filter.lookup(&netns))
        return 0;
#endif
#ifdef TT_FILTER_PORTS
    {
        __u8 *l = port_filter.lookup(&sport);
        __u8 *r = port_filter.lookup(&dport);
        __u8 lbits = l ? *l : 0, rbits = r ? *r : 0;
        if ((TT_FILTER_PORTS & TT_PORT_EITHER) && !((lbits | rbits) & TT_PORT_EITHER))
            return 0;
        if ((TT_FILTER_PORTS & TT_PORT_LOCAL) && !(lbits & TT_PORT_LOCAL))
            return 0;
        if ((TT_FILTER_PORTS & TT_PORT_REMOTE) && !(rbits & TT_PORT_REMOTE))
            return 0;
    }
#endif
    return 1;
}

/* Whether the calling task is in a cgroup of cgroup_filter or under one: its
 * ancestors' ids, from the root down (an id is a directory's inode, so a --cgroup
 * names its whole subtree, created later or not). Process context only: the
 * answer is kept in the owner record (TT_OWNER_IN_CGROUP, sock.bpf.h), so the
 * softirq transitions of its sockets are judged by where their owner was. */
static __always_inline int tt_cgroup_member(void)
{
#ifdef TT_FILTER_CGROUP
    for (int level = 0; level < TT_MAX_CGROUP_DEPTH; level++) {
        __u64 id = bpf_get_current_ancestor_cgroup_id(level);
        if (!id)
            break;
        if (cgroup_filter.lookup(&id))
            return 1;
    }
#endif
    return 0;
}

/* Whether a socket of this owner passes the owner filters. Owner filters need a
 * known owner: a socket whose owner was never learned (tgid 0) does not match
 * --pid, --comm, --cgroup or --container. `flags`: the owner record's
 * TT_OWNER_* bits; `cgroup`: its cgroup id, looked up too, so that a container
 * found after its processes were learned (cgroup_filter grows) passes from then on. */
static __always_inline int tt_keep_owner(__u32 tgid, const char *comm, __u64 cgroup, __u32 flags)
{
#if defined(TT_FILTER_PIDS) || defined(TT_FILTER_COMM) || defined(TT_FILTER_CGROUP)
    if (!tgid)
        return 0;
#endif
#ifdef TT_FILTER_PIDS
    if (!pid_filter.lookup(&tgid))
        return 0;
#endif
#ifdef TT_FILTER_COMM
    {
        int zero = 0;
        struct tt_comm *want = comm_filter.lookup(&zero);
        if (!want)
            return 0;
#pragma unroll
        for (int i = 0; i < TT_COMM_LEN; i++) {
            if (want->c[i] != comm[i])
                return 0;
            if (want->c[i] == 0)
                break;
        }
    }
#endif
#ifdef TT_FILTER_CGROUP
    if (!(flags & TT_OWNER_IN_CGROUP) && !cgroup_filter.lookup(&cgroup))
        return 0;
#endif
    return 1;
}

/* Reserve an event, fill the fields every kind shares, or count a loss.
 * Stacks (when TT_WITH_STACKS) are taken only when `want_stacks` is set. */
static __always_inline struct tt_event *tt_reserve_stacks(void *ctx, __u8 kind, int process_ctx,
                                                          int want_stacks)
{
    struct tt_event *e = events.ringbuf_reserve(sizeof(struct tt_event));
    if (!e) {
        stats.atomic_increment(TT_STAT_LOST);
        return 0;
    }
    __builtin_memset(e, 0, sizeof(*e));
    __u64 id = bpf_get_current_pid_tgid();
    e->ts_ns = bpf_ktime_get_ns();
    e->task_tgid = id >> 32;
    e->task_pid = (__u32)id;
    e->kind = kind;
    bpf_get_current_comm(&e->task_comm, sizeof(e->task_comm));
    e->kstack = -1;
    e->ustack = -1;
#ifdef TT_WITH_STACKS
    if (want_stacks) {
        e->kstack = stacks.get_stackid(ctx, 0);
        if (e->kstack < 0)
            stats.atomic_increment(TT_STAT_STACK_FAIL);
        if (process_ctx) {
            e->ustack = stacks.get_stackid(ctx, BPF_F_USER_STACK);
            if (e->ustack < 0)
                stats.atomic_increment(TT_STAT_STACK_FAIL);
        }
    }
#endif
    return e;
}

/* tt_reserve_stacks() with stacks whenever TT_WITH_STACKS is defined. */
static __always_inline struct tt_event *tt_reserve(void *ctx, __u8 kind, int process_ctx)
{
    return tt_reserve_stacks(ctx, kind, process_ctx, 1);
}

static __always_inline void tt_submit(struct tt_event *e)
{
    events.ringbuf_submit(e, 0);
    stats.atomic_increment(TT_STAT_EMITTED);
}

/* sk->sk_flags, raw, when the loader passed its BTF offset; else 0. */
static __always_inline __u64 tt_sk_flags(const void *sk)
{
    __u64 flags = 0;
#ifdef TT_SK_FLAGS_OFF
    bpf_probe_read_kernel(&flags, sizeof(flags), (const char *)sk + TT_SK_FLAGS_OFF);
#endif
    return flags;
}

#ifdef TT_FD_WALK
/* The struct sock * behind file descriptor `fd` of the current task when it is an
 * IPv4/IPv6 TCP stream socket, else 0: current->files->fdt->fd[fd] is a socket
 * file (S_ISSOCK(f_inode->i_mode)) whose private_data is the struct socket.
 * Every offset comes from BTF (kernel/loader.py); reads are
 * bpf_probe_read_kernel, so a racing close() yields 0 or a stale pointer,
 * never a fault. */
static __always_inline __u64 tt_fd_to_tcp_sock(int fd)
{
    const char *task = (const char *)bpf_get_current_task();
    const char *files = 0, *fdt = 0, *fds = 0, *file = 0, *inode = 0, *sock = 0, *sk = 0;
    unsigned int max_fds = 0;
    __u16 mode = 0, protocol = 0, type = 0, family = 0;

    if (fd < 0)
        return 0;
    bpf_probe_read_kernel(&files, sizeof(files), task + TT_TASK_FILES_OFF);
    if (!files)
        return 0;
    bpf_probe_read_kernel(&fdt, sizeof(fdt), files + TT_FILES_FDT_OFF);
    if (!fdt)
        return 0;
    bpf_probe_read_kernel(&max_fds, sizeof(max_fds), fdt + TT_FDTABLE_MAX_FDS_OFF);
    if ((unsigned int)fd >= max_fds)
        return 0;
    bpf_probe_read_kernel(&fds, sizeof(fds), fdt + TT_FDTABLE_FD_OFF);
    if (!fds)
        return 0;
    bpf_probe_read_kernel(&file, sizeof(file), fds + (__u64)fd * sizeof(void *));
    if (!file)
        return 0;
    bpf_probe_read_kernel(&inode, sizeof(inode), file + TT_FILE_F_INODE_OFF);
    if (!inode)
        return 0;
    bpf_probe_read_kernel(&mode, sizeof(mode), inode + TT_INODE_I_MODE_OFF);
    if ((mode & 0170000) != 0140000 /* S_IFSOCK */)
        return 0;
    bpf_probe_read_kernel(&sock, sizeof(sock), file + TT_FILE_PRIVATE_DATA_OFF);
    if (!sock)
        return 0;
    bpf_probe_read_kernel(&sk, sizeof(sk), sock + TT_SOCKET_SK_OFF);
    if (!sk)
        return 0;
    bpf_probe_read_kernel(&protocol, sizeof(protocol), sk + TT_SK_PROTOCOL_OFF);
    bpf_probe_read_kernel(&type, sizeof(type), sk + TT_SK_TYPE_OFF);
    bpf_probe_read_kernel(&family, sizeof(family), sk + TT_SKC_FAMILY_OFF);
    if (protocol != TT_IPPROTO_TCP || type != 1 /* SOCK_STREAM */
        || (family != TT_AF_INET && family != TT_AF_INET6))
        return 0;
    return (__u64)sk;
}
#endif

#endif /* TT_COMMON_BPF_H */
