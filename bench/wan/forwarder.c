/*
 * A packet-level WAN path between two network namespaces.
 *
 *   forwarder --ns-a /run/netns/A --ns-b /run/netns/B --dev wan0 \
 *             [--a2b-delay-us N] [--a2b-rate-bps N] [--a2b-loss P] [--a2b-queue-bytes N]
 *             [--b2a-...the same...] [--burst-bytes N] [--seed N]
 *
 * Creates a TUN device named --dev inside each namespace (the devices live as long as this
 * process), prints "ready" on stdout, then moves every IP packet read from one device to the
 * other, per direction:
 *
 *   1. random loss: the packet is dropped with probability P (xorshift64*, seeded; each
 *      direction has its own generator);
 *   2. the bottleneck: a token bucket at the rate, --burst-bytes deep (one MTU by default:
 *      a serialising link), in front of a drop-tail queue of --queue-bytes. The packet's
 *      departure time is max(now - burst time, previous departure) + size / rate; when the
 *      bytes still waiting to depart exceed the queue, the packet is dropped;
 *   3. propagation delay: the packet is released to the other device at departure + delay.
 *
 * Release times only grow, so each direction is one FIFO delay line: a byte ring of
 * variable-length records (timestamp, length, packet), released in order when they are due.
 * One thread: epoll on both TUN fds, a signalfd and a timerfd armed at the earliest release
 * (CLOCK_MONOTONIC, absolute, 1 ns timer slack). Packets are read straight into the ring.
 *
 * SIGUSR1 prints the counters as one JSON line on stdout; SIGTERM/SIGINT print them and exit.
 * The process ends itself when its parent dies (PR_SET_PDEATHSIG).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_PACKET 65536u          /* a TUN read never returns more than the device MTU */
#define READ_BATCH 64              /* packets read from one device before serving the other */
#define REC_SKIP UINT32_MAX        /* record length marking the unused end of the ring */

struct rec {                       /* one packet in a delay line; the packet bytes follow */
    uint64_t release_ns;
    uint32_t len;
    uint32_t pad;
};

struct stats {
    uint64_t rx_packets, rx_bytes, tx_packets, tx_bytes;
    uint64_t lost, queue_drops, ring_drops, write_errors, max_backlog_bytes;
};

struct dir {
    const char *name;
    int in_fd, out_fd;
    /* configuration */
    uint64_t delay_ns;
    uint64_t rate_bps;             /* 0: no rate limit */
    double loss;
    uint64_t queue_bytes;
    uint64_t burst_credit_ns;      /* how far an idle bucket lets departures run behind now */
    /* state */
    uint64_t rng;
    uint64_t busy_until_ns;        /* departure time of the last packet accepted */
    uint8_t *buf;
    uint64_t cap, head, tail;      /* head and tail are running byte offsets, taken mod cap */
    struct stats st;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "forwarder: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t rng_next(uint64_t *s)   /* xorshift64* */
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static uint64_t splitmix(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return (x ^ (x >> 31)) | 1;         /* never 0: xorshift would stay at 0 */
}

static uint64_t tx_ns(const struct dir *d, uint64_t bytes)
{
    return d->rate_bps ? bytes * 8u * 1000000000u / d->rate_bps : 0;
}

static uint64_t align8(uint64_t n) { return (n + 7u) & ~(uint64_t)7u; }

/* Room for one record with up to MAX_PACKET bytes, contiguous; NULL when the ring is full.
 * *at receives the running offset where it starts (past the unused end when it wraps). */
static struct rec *ring_reserve(struct dir *d, uint64_t *at)
{
    uint64_t need = align8(sizeof(struct rec) + MAX_PACKET);
    uint64_t tail = d->tail, pos = tail % d->cap;
    if (pos + need > d->cap)
        tail += d->cap - pos;
    if (tail + need - d->head > d->cap)
        return NULL;
    *at = tail;
    return (struct rec *)(d->buf + tail % d->cap);
}

static void ring_commit(struct dir *d, uint64_t at, uint32_t len)
{
    if (at != d->tail) {               /* wrapped: mark the skipped end for the reader */
        uint64_t pos = d->tail % d->cap;
        if (d->cap - pos >= sizeof(struct rec))
            ((struct rec *)(d->buf + pos))->len = REC_SKIP;
    }
    d->tail = at + align8(sizeof(struct rec) + len);
}

static struct rec *ring_peek(struct dir *d)
{
    while (d->head != d->tail) {
        uint64_t pos = d->head % d->cap;
        struct rec *r = (struct rec *)(d->buf + pos);
        if (d->cap - pos < sizeof(struct rec) || r->len == REC_SKIP) {
            d->head += d->cap - pos;
            continue;
        }
        return r;
    }
    return NULL;
}

static void ring_pop(struct dir *d, struct rec *r)
{
    d->head += align8(sizeof(struct rec) + r->len);
}

/* Read up to READ_BATCH packets from d->in_fd into the delay line; returns packets read. */
static int read_batch(struct dir *d)
{
    int n;
    for (n = 0; n < READ_BATCH; n++) {
        uint64_t at;
        struct rec *r = ring_reserve(d, &at);
        static uint8_t scratch[MAX_PACKET];
        uint8_t *dst = r ? (uint8_t *)(r + 1) : scratch;
        ssize_t got = read(d->in_fd, dst, MAX_PACKET);
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR)
                break;
            die("read");
        }
        uint64_t now = now_ns();
        d->st.rx_packets++;
        d->st.rx_bytes += (uint64_t)got;
        if (!r) {
            d->st.ring_drops++;
            continue;
        }
        if (d->loss > 0 && (double)(rng_next(&d->rng) >> 11) * 0x1.0p-53 < d->loss) {
            d->st.lost++;
            continue;
        }
        uint64_t depart = now;
        if (d->rate_bps) {
            uint64_t backlog = d->busy_until_ns > now ? d->busy_until_ns - now : 0;
            uint64_t backlog_bytes = backlog * d->rate_bps / 8u / 1000000000u;
            if (backlog_bytes + (uint64_t)got > d->queue_bytes) {
                d->st.queue_drops++;
                continue;
            }
            if (backlog_bytes > d->st.max_backlog_bytes)
                d->st.max_backlog_bytes = backlog_bytes;
            uint64_t start = d->busy_until_ns;
            uint64_t earliest = now > d->burst_credit_ns ? now - d->burst_credit_ns : 0;
            if (start < earliest)
                start = earliest;
            depart = start + tx_ns(d, (uint64_t)got);
            d->busy_until_ns = depart;
            if (depart < now)
                depart = now;
        }
        r->release_ns = depart + d->delay_ns;
        r->len = (uint32_t)got;
        ring_commit(d, at, (uint32_t)got);
    }
    return n;
}

/* Write every packet due by `now` to the other device. */
static void release_due(struct dir *d, uint64_t now)
{
    struct rec *r;
    while ((r = ring_peek(d)) && r->release_ns <= now) {
        ssize_t put = write(d->out_fd, r + 1, r->len);
        if (put == (ssize_t)r->len) {
            d->st.tx_packets++;
            d->st.tx_bytes += r->len;
        } else {
            d->st.write_errors++;
        }
        ring_pop(d, r);
    }
}

static void print_stats(const struct dir *dirs)
{
    printf("{");
    for (int i = 0; i < 2; i++) {
        const struct stats *s = &dirs[i].st;
        printf("%s\"%s\": {\"rx_packets\": %" PRIu64 ", \"rx_bytes\": %" PRIu64
               ", \"tx_packets\": %" PRIu64 ", \"tx_bytes\": %" PRIu64 ", \"lost\": %" PRIu64
               ", \"queue_drops\": %" PRIu64 ", \"ring_drops\": %" PRIu64
               ", \"write_errors\": %" PRIu64 ", \"max_backlog_bytes\": %" PRIu64 "}",
               i ? ", " : "", dirs[i].name, s->rx_packets, s->rx_bytes, s->tx_packets,
               s->tx_bytes, s->lost, s->queue_drops, s->ring_drops, s->write_errors,
               s->max_backlog_bytes);
    }
    printf("}\n");
    fflush(stdout);
}

static int tun_open_in(const char *ns_path, const char *dev)
{
    int ns = open(ns_path, O_RDONLY | O_CLOEXEC);
    if (ns < 0)
        die(ns_path);
    if (setns(ns, CLONE_NEWNET) < 0)
        die("setns");
    close(ns);
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        die("/dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    strncpy(ifr.ifr_name, dev, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0)
        die("TUNSETIFF");
    return fd;
}

static void epoll_add(int ep, int fd)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
        die("epoll_ctl");
}

static uint64_t ring_size(const struct dir *d)
{
    /* What the wire holds (rate x delay; without a rate limit, 10 Gbit/s x delay) plus the
     * queue, twice over for record headers of small packets, plus room for the largest
     * record: the ring is never the bottleneck (ring_drops counts it if it ever is). */
    uint64_t rate = d->rate_bps ? d->rate_bps : 10000000000u;
    uint64_t wire = rate / 8u * d->delay_ns / 1000000000u;
    uint64_t queue = d->rate_bps ? d->queue_bytes : 0;
    return 2 * (wire + queue) + ((uint64_t)4 << 20);
}

enum { O_NS_A = 1, O_NS_B, O_DEV, O_SEED, O_BURST, O_DIR_BASE = 100 };
enum { F_DELAY, F_RATE, F_LOSS, F_QUEUE, F_COUNT };

int main(int argc, char **argv)
{
    const char *ns_a = NULL, *ns_b = NULL, *dev = "wan0";
    uint64_t seed = 1, burst_bytes = 1500;
    struct dir dirs[2] = {{.name = "a2b", .queue_bytes = (uint64_t)1 << 20},
                          {.name = "b2a", .queue_bytes = (uint64_t)1 << 20}};
    static const char *fields[F_COUNT] = {"delay-us", "rate-bps", "loss", "queue-bytes"};
    struct option opts[5 + 2 * F_COUNT + 1];
    static char names[2 * F_COUNT][32];
    int k = 0;
    opts[k++] = (struct option){"ns-a", required_argument, 0, O_NS_A};
    opts[k++] = (struct option){"ns-b", required_argument, 0, O_NS_B};
    opts[k++] = (struct option){"dev", required_argument, 0, O_DEV};
    opts[k++] = (struct option){"seed", required_argument, 0, O_SEED};
    opts[k++] = (struct option){"burst-bytes", required_argument, 0, O_BURST};
    for (int i = 0; i < 2; i++)
        for (int f = 0; f < F_COUNT; f++) {
            char *name = names[i * F_COUNT + f];
            snprintf(name, 32, "%s-%s", dirs[i].name, fields[f]);
            opts[k++] = (struct option){name, required_argument, 0, O_DIR_BASE + i * F_COUNT + f};
        }
    opts[k] = (struct option){0, 0, 0, 0};
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == O_NS_A) ns_a = optarg;
        else if (c == O_NS_B) ns_b = optarg;
        else if (c == O_DEV) dev = optarg;
        else if (c == O_SEED) seed = strtoull(optarg, NULL, 10);
        else if (c == O_BURST) burst_bytes = strtoull(optarg, NULL, 10);
        else if (c >= O_DIR_BASE && c < O_DIR_BASE + 2 * F_COUNT) {
            struct dir *d = &dirs[(c - O_DIR_BASE) / F_COUNT];
            switch ((c - O_DIR_BASE) % F_COUNT) {
            case F_DELAY: d->delay_ns = strtoull(optarg, NULL, 10) * 1000u; break;
            case F_RATE: d->rate_bps = strtoull(optarg, NULL, 10); break;
            case F_LOSS: d->loss = strtod(optarg, NULL); break;
            case F_QUEUE: d->queue_bytes = strtoull(optarg, NULL, 10); break;
            }
        } else {
            fprintf(stderr, "usage: see the comment at the top of forwarder.c\n");
            return 2;
        }
    }
    if (!ns_a || !ns_b) {
        fprintf(stderr, "forwarder: --ns-a and --ns-b are required\n");
        return 2;
    }
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    prctl(PR_SET_TIMERSLACK, 1UL);

    int home = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    if (home < 0)
        die("/proc/self/ns/net");
    int fd_a = tun_open_in(ns_a, dev);
    int fd_b = tun_open_in(ns_b, dev);
    if (setns(home, CLONE_NEWNET) < 0)
        die("setns home");
    close(home);

    dirs[0].in_fd = fd_a, dirs[0].out_fd = fd_b;
    dirs[1].in_fd = fd_b, dirs[1].out_fd = fd_a;
    for (int i = 0; i < 2; i++) {
        struct dir *d = &dirs[i];
        d->rng = splitmix(seed * 2 + (uint64_t)i);
        d->burst_credit_ns = tx_ns(d, burst_bytes);
        d->cap = ring_size(d);
        d->buf = malloc(d->cap);
        if (!d->buf)
            die("malloc");
    }

    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGUSR1);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (sfd < 0 || tfd < 0 || ep < 0)
        die("signalfd/timerfd/epoll");
    epoll_add(ep, fd_a);
    epoll_add(ep, fd_b);
    epoll_add(ep, sfd);
    epoll_add(ep, tfd);

    printf("ready\n");
    fflush(stdout);

    uint64_t armed = 0;
    for (;;) {
        /* Drain both devices and release what is due until there is nothing to do now. */
        int busy;
        do {
            busy = read_batch(&dirs[0]);
            busy += read_batch(&dirs[1]);
            uint64_t now = now_ns();
            release_due(&dirs[0], now);
            release_due(&dirs[1], now);
        } while (busy);

        uint64_t next = 0;
        for (int i = 0; i < 2; i++) {
            struct rec *r = ring_peek(&dirs[i]);
            if (r && (!next || r->release_ns < next))
                next = r->release_ns;
        }
        if (next && next != armed) {
            struct itimerspec its = {.it_value = {(time_t)(next / 1000000000u),
                                                  (long)(next % 1000000000u)}};
            if (timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0)
                die("timerfd_settime");
            armed = next;
        }

        struct epoll_event evs[4];
        int n = epoll_wait(ep, evs, 4, -1);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < n; i++) {
            if (evs[i].data.fd == tfd) {
                uint64_t expirations;
                if (read(tfd, &expirations, sizeof expirations) < 0 && errno != EAGAIN)
                    die("timerfd read");
                armed = 0;
            } else if (evs[i].data.fd == sfd) {
                struct signalfd_siginfo si;
                while (read(sfd, &si, sizeof si) == sizeof si) {
                    print_stats(dirs);
                    if (si.ssi_signo != SIGUSR1)
                        return 0;
                }
            }
        }
    }
}
