/* loadgen: loopback TCP connection churn for scripts/bench.
 *
 *   loadgen --mode client-first|server-first [--rate N] [--duration S]
 *           [--max-conns N] [--clients K] [--port P] [--src 127.0.0.X]
 *
 * A server process (accept, then close) and K client processes (connect, then
 * close) on 127.0.0.1. --rate 0 (the default) churns as fast as it can; --rate N
 * paces N connections per second in total, open loop: each client sleeps until
 * its next connection is due and never tries to catch up more than it lost.
 *
 *   client-first  the client closes first: TIME_WAIT on the client side;
 *                 the server reads EOF, then closes (CLOSE_WAIT -> LAST_ACK).
 *   server-first  the server closes right after accept(): TIME_WAIT on the
 *                 server side; the client reads EOF, then closes.
 *
 * Either way every connection makes 10 TCP state transitions (5 per side).
 * --src binds clients to that loopback address (IP_BIND_ADDRESS_NO_PORT keeps the
 * port choice at connect()), so successive runs do not collide with the
 * TIME_WAIT sockets of earlier ones.
 *
 * Bounded: stops after --duration seconds (or --max-conns), waits at most 10 s
 * for the server to close its side, then prints one JSON object:
 *   {"mode":…, "rate":…, "clients":…, "port":…, "connections":…, "failed":…,
 *    "server_closed":…, "elapsed_s":…, "conn_per_s":…, "first_error":…}
 * Exit 0 when it ran (even with some failed connects), 2 on bad arguments, 1
 * when it could not set up.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define MAX_CLIENTS 16

struct shared {
    _Atomic uint64_t connected[MAX_CLIENTS]; /* per client: connections completed */
    _Atomic uint64_t failed[MAX_CLIENTS];
    _Atomic int first_errno;
    _Atomic uint64_t server_closed;          /* server: connections closed */
    _Atomic int stop_server;
    double client_elapsed[MAX_CLIENTS];
};

static struct shared *sh;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_until(double t)
{
    struct timespec ts;
    ts.tv_sec = (time_t)t;
    ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static void usage(void)
{
    fprintf(stderr, "usage: loadgen --mode client-first|server-first [--rate N] [--duration S] "
                    "[--max-conns N] [--clients K] [--port P] [--src 127.0.0.X]\n");
    exit(2);
}

static int server_first;

static void serve(int lfd)
{
    char buf[256];
    struct timeval tv = {.tv_sec = 0, .tv_usec = 100000};
    /* accept() wakes up every 100 ms to look at stop_server. */
    setsockopt(lfd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (atomic_load(&sh->stop_server))
                break;
            continue;
        }
        if (!server_first) {
            /* Client closes first: wait for its FIN (EOF), at most 2 s. */
            struct timeval rtv = {.tv_sec = 2, .tv_usec = 0};
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &rtv, sizeof(rtv));
            while (read(fd, buf, sizeof(buf)) > 0)
                ;
        }
        close(fd);
        atomic_fetch_add(&sh->server_closed, 1);
    }
    _exit(0);
}

static void client(int idx, struct sockaddr_in *dst, struct sockaddr_in *src, double rate,
                   double duration, uint64_t max_conns, double start)
{
    char buf[256];
    double interval = rate > 0 ? 1.0 / rate : 0;
    double next = start, deadline = start + duration, last = start;
    uint64_t done = 0;

    while (done + atomic_load(&sh->failed[idx]) < max_conns) {
        double t = now_s();
        if (t >= deadline)
            break;
        if (interval > 0) {
            if (next > t) {
                if (next >= deadline)
                    break;
                sleep_until(next);
            } else if (t - next > 1.0) {
                next = t; /* more than a second behind: drop the backlog, stay open loop */
            }
            next += interval;
        }
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            goto fail;
        if (src) {
            int one = 1;
            setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
            if (bind(fd, (struct sockaddr *)src, sizeof(*src)) < 0) {
                close(fd);
                goto fail;
            }
        }
        if (connect(fd, (struct sockaddr *)dst, sizeof(*dst)) < 0) {
            close(fd);
            goto fail;
        }
        if (server_first) {
            struct timeval rtv = {.tv_sec = 2, .tv_usec = 0};
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &rtv, sizeof(rtv));
            while (read(fd, buf, sizeof(buf)) > 0)
                ;
        }
        close(fd);
        done++;
        atomic_store(&sh->connected[idx], done);
        last = now_s();
        continue;
    fail: {
        int expected = 0;
        atomic_compare_exchange_strong(&sh->first_errno, &expected, errno ? errno : -1);
        atomic_fetch_add(&sh->failed[idx], 1);
        usleep(1000); /* e.g. no ephemeral port left: do not spin */
    }
    }
    sh->client_elapsed[idx] = last - start;
    _exit(0);
}

int main(int argc, char **argv)
{
    const char *mode = NULL, *src_addr = NULL;
    double rate = 0, duration = 5;
    uint64_t max_conns = UINT64_MAX;
    int clients = 1, port = 0;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            usage();
        char *end = NULL;
        if (!strcmp(a, "--mode"))
            mode = v;
        else if (!strcmp(a, "--rate"))
            rate = strtod(v, &end);
        else if (!strcmp(a, "--duration"))
            duration = strtod(v, &end);
        else if (!strcmp(a, "--max-conns"))
            max_conns = strtoull(v, &end, 10);
        else if (!strcmp(a, "--clients"))
            clients = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--port"))
            port = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--src"))
            src_addr = v;
        else
            usage();
        if (end && *end)
            usage();
        i++;
    }
    if (!mode || (strcmp(mode, "client-first") && strcmp(mode, "server-first")))
        usage();
    if (rate < 0 || duration <= 0 || duration > 3600 || clients < 1 || clients > MAX_CLIENTS ||
        port < 0 || port > 65535 || max_conns == 0)
        usage();
    server_first = !strcmp(mode, "server-first");

    struct sockaddr_in src = {.sin_family = AF_INET};
    if (src_addr && inet_pton(AF_INET, src_addr, &src.sin_addr) != 1)
        usage();

    sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED) {
        perror("loadgen: mmap");
        return 1;
    }
    memset(sh, 0, sizeof(*sh));

    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&dst, sizeof(dst)) < 0 || listen(lfd, 4096) < 0) {
        perror("loadgen: bind/listen");
        return 1;
    }
    socklen_t len = sizeof(dst);
    getsockname(lfd, (struct sockaddr *)&dst, &len);

    pid_t server = fork();
    if (server < 0) {
        perror("loadgen: fork");
        return 1;
    }
    if (server == 0)
        serve(lfd);

    double start = now_s();
    pid_t pids[MAX_CLIENTS];
    uint64_t per_client = max_conns == UINT64_MAX ? UINT64_MAX : (max_conns + clients - 1) / clients;
    for (int c = 0; c < clients; c++) {
        pids[c] = fork();
        if (pids[c] < 0) {
            perror("loadgen: fork");
            kill(server, SIGKILL);
            return 1;
        }
        if (pids[c] == 0)
            client(c, &dst, src_addr ? &src : NULL, rate / clients, duration, per_client, start);
    }
    for (int c = 0; c < clients; c++)
        waitpid(pids[c], NULL, 0);

    uint64_t connected = 0, failed = 0;
    double elapsed = 0;
    for (int c = 0; c < clients; c++) {
        connected += atomic_load(&sh->connected[c]);
        failed += atomic_load(&sh->failed[c]);
        if (sh->client_elapsed[c] > elapsed)
            elapsed = sh->client_elapsed[c];
    }
    /* Let the server close its side of every connection (bounded), then stop it. */
    double wait_until = now_s() + 10;
    while (atomic_load(&sh->server_closed) < connected && now_s() < wait_until)
        usleep(1000);
    double server_done = now_s() - start;
    atomic_store(&sh->stop_server, 1);
    close(lfd);
    waitpid(server, NULL, 0);

    int err = atomic_load(&sh->first_errno);
    printf("{\"mode\": \"%s\", \"rate\": %.0f, \"clients\": %d, \"port\": %d, \"connections\": %llu, "
           "\"failed\": %llu, \"server_closed\": %llu, \"elapsed_s\": %.6f, \"server_done_s\": %.6f, "
           "\"conn_per_s\": %.1f, \"first_error\": \"%s\"}\n",
           mode, rate, clients, ntohs(dst.sin_port), (unsigned long long)connected,
           (unsigned long long)failed, (unsigned long long)atomic_load(&sh->server_closed), elapsed,
           server_done, elapsed > 0 ? connected / elapsed : 0.0, err ? strerror(err > 0 ? err : EIO) : "");
    return 0;
}
