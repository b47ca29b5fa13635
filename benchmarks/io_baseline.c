// Device I/O baselines: the host doing the guest's I/O itself with plain system calls, so its
// numbers are the limit kvmkit's virtio devices are compared against; and the host ends of the
// guests' exchanges.
//
//   io_baseline blk <read image> <write image> <job>...
//       job = read|write:seq|rand:<block size>:<count>:<seed>
//   io_baseline net-read <netns> <interface> <jobs>
//   io_baseline net-send <netns> <tap> <job>...
//       job = <frame bytes>:<count>
//   io_baseline vsock-client <socket path> <port> <round trips> <stream bytes> <packet bytes>
//   io_baseline vsock-pair <round trips> <stream bytes> <packet bytes>
//
// blk prints the seconds each job took. The jobs are those of guests/blk_jobs.h, issued with
// pread (from the read image) and pwrite (to the write image) one at a time: the guest's queue
// depth has no synchronous counterpart.
//
// net-read counts the frames of guests/net_jobs.h that arrive on an interface of the network
// namespace <netns> (a path such as /run/netns/NAME), per job, and those the kernel dropped for
// want of room: it prints "ready" once it listens and its counts once its standard input is
// closed. net-send writes the jobs' frames into the
// existing tap <tap> of <netns>, one write() each, and prints when each job started and ended
// (CLOCK_MONOTONIC, like Python's time.monotonic()).
//
// vsock-client plays the host end of guests/vsock_jobs.h's exchange over kvmkit's vsock socket,
// after the CONNECT handshake; vsock-pair plays both ends over a socketpair, the guest's in a
// child process on the same CPU. Both print the seconds per round trip and those of each stream.
// Build: cc -O2 -I guests -o io_baseline io_baseline.c
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_packet.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "blk_jobs.h"
#include "net_jobs.h"
#include "vsock_jobs.h"

_Noreturn static void die(const char *what)
{
    fprintf(stderr, "%s: %s\n", what, strerror(errno));
    exit(1);
}

static double now(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) < 0)
        die("clock_gettime");
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

_Noreturn static void bad_job(const char *spec)
{
    fprintf(stderr, "invalid job %s (want read|write:seq|rand:<block size>:<count>:<seed>)\n", spec);
    exit(2);
}

static struct blk_job parse_job(const char *spec)
{
    char op[8], pattern[8];
    unsigned long long block_size, count, seed;
    int used = 0;
    if (sscanf(spec, "%7[a-z]:%7[a-z]:%llu:%llu:%llu%n", op, pattern, &block_size, &count, &seed, &used) != 5 ||
        spec[used] != '\0')
        bad_job(spec);
    struct blk_job job = {.block_size = (uint32_t)block_size, .depth = 1, .count = count, .seed = seed};
    if (strcmp(op, "read") == 0)
        job.op = BLK_READ;
    else if (strcmp(op, "write") == 0)
        job.op = BLK_WRITE;
    else
        bad_job(spec);
    if (strcmp(pattern, "seq") == 0)
        job.pattern = BLK_SEQUENTIAL;
    else if (strcmp(pattern, "rand") == 0)
        job.pattern = BLK_RANDOM;
    else
        bad_job(spec);
    if (block_size == 0 || block_size % BLK_STAMP_STRIDE || block_size > (1u << 30) || count == 0 || seed == 0)
        bad_job(spec);
    return job;
}

static double run_job(const int fds[2], const struct blk_job *job, uint64_t disk_bytes, char *buf)
{
    uint64_t state = job->seed;
    int fd = fds[job->op];
    double start = now();
    for (uint64_t i = 0; i < job->count; i++) {
        uint64_t offset = blk_offset(job, i, &state, disk_bytes);
        ssize_t n;
        if (job->op == BLK_READ) {
            n = pread(fd, buf, job->block_size, (off_t)offset);
            // The guest's check, so that both sides do the same work per request.
            if (n == (ssize_t)job->block_size && !blk_stamped(buf, job->block_size, offset)) {
                fprintf(stderr, "read at %llu: wrong data\n", (unsigned long long)offset);
                exit(1);
            }
        } else {
            n = pwrite(fd, buf, job->block_size, (off_t)offset);
        }
        if (n != (ssize_t)job->block_size) {
            if (n >= 0)
                errno = EIO;
            die(job->op == BLK_READ ? "pread" : "pwrite");
        }
    }
    return now() - start;
}

static uint64_t open_image(const char *path, int flags, int *fd)
{
    *fd = open(path, flags | O_CLOEXEC);
    if (*fd < 0)
        die(path);
    struct stat st;
    if (fstat(*fd, &st) < 0)
        die(path);
    return (uint64_t)st.st_size;
}

static int bench_blk(const char *read_image, const char *write_image, int njobs, char **specs)
{
    struct blk_job jobs[BLK_MAX_JOBS];
    if (njobs < 1 || njobs > BLK_MAX_JOBS) {
        fprintf(stderr, "want 1 to %d jobs\n", BLK_MAX_JOBS);
        return 2;
    }
    uint32_t largest = 0;
    for (int j = 0; j < njobs; j++) {
        jobs[j] = parse_job(specs[j]);
        if (jobs[j].block_size > largest)
            largest = jobs[j].block_size;
    }
    int fds[2];
    uint64_t disk_bytes = open_image(read_image, O_RDONLY, &fds[BLK_READ]);
    if (open_image(write_image, O_WRONLY, &fds[BLK_WRITE]) != disk_bytes) {
        fprintf(stderr, "%s and %s differ in size\n", read_image, write_image);
        return 1;
    }
    for (int j = 0; j < njobs; j++) {
        if (disk_bytes == 0 || disk_bytes % jobs[j].block_size) {
            fprintf(stderr, "%s: %llu bytes is not a multiple of the block size %u\n", read_image,
                    (unsigned long long)disk_bytes, jobs[j].block_size);
            return 1;
        }
    }
    // Page-aligned like the guest's buffers, and touched before the timing like them.
    char *buf;
    errno = posix_memalign((void **)&buf, 4096, largest);
    if (errno)
        die("posix_memalign");
    memset(buf, 0, largest);

    printf("{\"test\":\"blk\",\"seconds\":[");
    for (int j = 0; j < njobs; j++)
        printf("%s%.6f", j ? "," : "", run_job(fds, &jobs[j], disk_bytes, buf));
    printf("]}\n");
    free(buf);
    close(fds[BLK_READ]);
    close(fds[BLK_WRITE]);
    return 0;
}

// ---------------------------------------------------------------------------------- net

// Frames taken per recvmmsg, and of each only the bytes up to the job number.
#define READ_BATCH 64
#define READ_PREFIX 64
// Room for a backlog the reader catches up on rather than loses (the kernel's default is a few
// hundred frames); the same for both sides.
#define READ_BUFFER (8 << 20)
// How often a reader with nothing to read looks whether it is to stop.
#define READ_IDLE_MS 20

static void enter_netns(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        die(path);
    if (setns(fd, CLONE_NEWNET) < 0)
        die("setns");
    close(fd);
}

static unsigned interface_index(const char *name)
{
    unsigned index = if_nametoindex(name);
    if (index == 0)
        die(name);
    return index;
}

static int parse_count(const char *text, const char *what)
{
    char *end;
    long n = strtol(text, &end, 10);
    if (*end != '\0' || n < 1 || n > NET_MAX_JOBS) {
        fprintf(stderr, "%s: want 1 to %d, not %s\n", what, NET_MAX_JOBS, text);
        exit(2);
    }
    return (int)n;
}

static int net_read(const char *netns, const char *ifname, const char *jobs_text)
{
    int njobs = parse_count(jobs_text, "jobs");
    enter_netns(netns);
    // Bound to the benchmark's ethertype, so the kernel filters out everything else.
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(NET_ETHERTYPE));
    if (fd < 0)
        die("socket(AF_PACKET)");
    int size = READ_BUFFER;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
        die("SO_RCVBUFFORCE");
    struct timeval idle = {.tv_usec = READ_IDLE_MS * 1000};
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &idle, sizeof idle) < 0)
        die("SO_RCVTIMEO");
    struct sockaddr_ll addr = {
        .sll_family = AF_PACKET, .sll_protocol = htons(NET_ETHERTYPE), .sll_ifindex = (int)interface_index(ifname)};
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("bind");
    printf("ready\n");
    fflush(stdout);

    static uint8_t bufs[READ_BATCH][READ_PREFIX];
    struct iovec iov[READ_BATCH];
    struct mmsghdr msgs[READ_BATCH];
    for (int i = 0; i < READ_BATCH; i++) {
        iov[i] = (struct iovec){.iov_base = bufs[i], .iov_len = READ_PREFIX};
        msgs[i] = (struct mmsghdr){.msg_hdr = {.msg_iov = &iov[i], .msg_iovlen = 1}};
    }
    uint64_t frames[NET_MAX_JOBS] = {0}, bytes[NET_MAX_JOBS] = {0};
    double last[NET_MAX_JOBS] = {0};
    for (int stopping = 0;;) {
        // MSG_TRUNC: each frame's whole length, although only its start is copied.
        int flags = MSG_TRUNC | (stopping ? MSG_DONTWAIT : MSG_WAITFORONE);
        int n = recvmmsg(fd, msgs, READ_BATCH, flags, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                die("recvmmsg");
            if (stopping)
                break; // all that had arrived by the stop is counted
            // Idle: stop once standard input is closed; the senders are done by then.
            struct pollfd in = {.fd = 0, .events = POLLIN};
            char c;
            if (poll(&in, 1, 0) > 0 && read(0, &c, 1) <= 0)
                stopping = 1;
            continue;
        }
        double t = now();
        for (int i = 0; i < n; i++) {
            unsigned len = msgs[i].msg_len, job = bufs[i][NET_JOB_OFFSET];
            if (len <= NET_JOB_OFFSET || job >= (unsigned)njobs)
                continue;
            frames[job]++;
            bytes[job] += len;
            last[job] = t;
        }
    }
    struct tpacket_stats stats;
    socklen_t stats_len = sizeof stats;
    if (getsockopt(fd, SOL_PACKET, PACKET_STATISTICS, &stats, &stats_len) < 0)
        die("PACKET_STATISTICS");
    printf("{\"test\":\"net-read\",\"frames\":[");
    for (int j = 0; j < njobs; j++)
        printf("%s%llu", j ? "," : "", (unsigned long long)frames[j]);
    printf("],\"bytes\":[");
    for (int j = 0; j < njobs; j++)
        printf("%s%llu", j ? "," : "", (unsigned long long)bytes[j]);
    printf("],\"last\":[");
    for (int j = 0; j < njobs; j++)
        printf("%s%.6f", j ? "," : "", last[j]);
    printf("],\"drops\":%u}\n", stats.tp_drops);
    close(fd);
    return 0;
}

static int net_send(const char *netns, const char *tap, int njobs, char **specs)
{
    struct net_job jobs[NET_MAX_JOBS];
    if (njobs < 1 || njobs > NET_MAX_JOBS) {
        fprintf(stderr, "want 1 to %d jobs\n", NET_MAX_JOBS);
        return 2;
    }
    for (int j = 0; j < njobs; j++) {
        unsigned long long len, count;
        int used = 0;
        if (sscanf(specs[j], "%llu:%llu%n", &len, &count, &used) != 2 || specs[j][used] != '\0' ||
            len < NET_MIN_FRAME || len > NET_MAX_FRAME || count == 0) {
            fprintf(stderr, "invalid job %s (want <frame bytes>:<count>)\n", specs[j]);
            return 2;
        }
        jobs[j] = (struct net_job){.frame_len = (uint32_t)len, .depth = 1, .count = count};
    }
    enter_netns(netns);
    // The tap belongs to the namespace the tun device is opened in.
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        die("/dev/net/tun");
    struct ifreq ifr = {.ifr_flags = IFF_TAP | IFF_NO_PI};
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", tap);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0)
        die("TUNSETIFF");
    uint8_t frame[NET_MAX_FRAME];
    double start[NET_MAX_JOBS], end[NET_MAX_JOBS];
    for (int j = 0; j < njobs; j++) {
        net_fill_frame(frame, jobs[j].frame_len, (uint32_t)j);
        start[j] = now();
        for (uint64_t i = 0; i < jobs[j].count; i++) {
            if (write(fd, frame, jobs[j].frame_len) != (ssize_t)jobs[j].frame_len)
                die("write to the tap");
        }
        end[j] = now();
    }
    printf("{\"test\":\"net-send\",\"start\":[");
    for (int j = 0; j < njobs; j++)
        printf("%s%.6f", j ? "," : "", start[j]);
    printf("],\"end\":[");
    for (int j = 0; j < njobs; j++)
        printf("%s%.6f", j ? "," : "", end[j]);
    printf("]}\n");
    close(fd);
    return 0;
}

// ---------------------------------------------------------------------------------- vsock

// Generous, for a guest that needs milliseconds per packet; a hung peer still ends the run.
#define VSOCK_TIMEOUT_S 60

struct vsock_exchange {
    uint32_t round_trips, packet_bytes;
    uint64_t stream_bytes;
};

static uint8_t stream_buf[VSOCK_MAX_PACKET];

static void write_all(int fd, const void *data, size_t len)
{
    for (const char *p = data; len > 0;) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die("write to the stream");
        p += n;
        len -= (size_t)n;
    }
}

// Reads at most `len` bytes, at least one; the end of the stream is an error.
static size_t read_some(int fd, void *data, size_t len)
{
    for (;;) {
        ssize_t n = read(fd, data, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0)
            errno = EPIPE;
        if (n <= 0)
            die("read from the stream");
        return (size_t)n;
    }
}

static uint8_t read_byte(int fd)
{
    uint8_t byte;
    read_some(fd, &byte, 1);
    return byte;
}

_Noreturn static void protocol_error(const char *what)
{
    fprintf(stderr, "vsock exchange: %s\n", what);
    exit(1);
}

// The guest's end of the exchange, as vsock_bench.c plays it.
static void guest_end(int fd, const struct vsock_exchange *x)
{
    for (uint32_t i = 0; i < x->round_trips; i++) {
        uint8_t byte = read_byte(fd);
        write_all(fd, &byte, 1);
    }
    stream_buf[0] = VSOCK_STAMP;
    for (uint64_t sent = 0; sent < x->stream_bytes; sent += x->packet_bytes)
        write_all(fd, stream_buf, x->packet_bytes);
    for (uint64_t got = 0; got < x->stream_bytes;) {
        size_t want = x->stream_bytes - got < sizeof stream_buf ? x->stream_bytes - got : sizeof stream_buf;
        size_t n = read_some(fd, stream_buf, want);
        if (stream_buf[0] != (uint8_t)got)
            protocol_error("the host's stream is out of order");
        got += n;
    }
    uint8_t ack = VSOCK_ACK;
    write_all(fd, &ack, 1);
    if (read(fd, stream_buf, 1) != 0)
        protocol_error("the host did not close");
}

// The host's end: seconds per round trip, and of each stream.
static void host_end(int fd, const struct vsock_exchange *x, double seconds[3])
{
    double start = now();
    for (uint32_t i = 0; i < x->round_trips; i++) {
        uint8_t byte = (uint8_t)i;
        write_all(fd, &byte, 1);
        if (read_byte(fd) != (uint8_t)i)
            protocol_error("a round trip came back changed");
    }
    seconds[0] = (now() - start) / x->round_trips;

    start = now();
    for (uint64_t got = 0; got < x->stream_bytes;) {
        size_t want = x->stream_bytes - got < sizeof stream_buf ? x->stream_bytes - got : sizeof stream_buf;
        size_t n = read_some(fd, stream_buf, want);
        // Each of the guest's writes starts with a stamp.
        for (uint64_t at = (got + x->packet_bytes - 1) / x->packet_bytes * x->packet_bytes; at < got + n;
             at += x->packet_bytes)
            if (stream_buf[at - got] != VSOCK_STAMP)
                protocol_error("the guest's stream is out of order");
        got += n;
    }
    seconds[1] = now() - start;

    // VSOCK_MAX_PACKET is a multiple of 256, so every write carries the same bytes.
    for (size_t i = 0; i < sizeof stream_buf; i++)
        stream_buf[i] = (uint8_t)i;
    start = now();
    for (uint64_t sent = 0; sent < x->stream_bytes;) {
        size_t len = x->stream_bytes - sent < sizeof stream_buf ? x->stream_bytes - sent : sizeof stream_buf;
        write_all(fd, stream_buf, len);
        sent += len;
    }
    if (read_byte(fd) != VSOCK_ACK)
        protocol_error("no acknowledgement of the host's stream");
    seconds[2] = now() - start;
}

static struct vsock_exchange parse_exchange(char **args)
{
    unsigned long long round_trips = strtoull(args[0], NULL, 10), bytes = strtoull(args[1], NULL, 10),
                       packet = strtoull(args[2], NULL, 10);
    if (round_trips == 0 || round_trips > UINT32_MAX || packet == 0 || packet > VSOCK_MAX_PACKET || bytes == 0 ||
        bytes % packet) {
        fprintf(stderr, "want round trips > 0, packet bytes up to %u and stream bytes a multiple of them\n",
                VSOCK_MAX_PACKET);
        exit(2);
    }
    return (struct vsock_exchange){
        .round_trips = (uint32_t)round_trips, .packet_bytes = (uint32_t)packet, .stream_bytes = bytes};
}

static void set_timeouts(int fd)
{
    struct timeval limit = {.tv_sec = VSOCK_TIMEOUT_S};
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof limit) < 0)
        die("socket timeouts");
}

static void print_vsock(const double seconds[3])
{
    printf("{\"test\":\"vsock\",\"round_trip\":%.9f,\"to_host\":%.6f,\"from_host\":%.6f}\n", seconds[0], seconds[1],
           seconds[2]);
}

static int vsock_client(const char *path, const char *port, char **args)
{
    struct vsock_exchange x = parse_exchange(args);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket(AF_UNIX)");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        fprintf(stderr, "%s: path too long\n", path);
        return 2;
    }
    strcpy(addr.sun_path, path);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        die(path);
    set_timeouts(fd);
    char line[64];
    int len = snprintf(line, sizeof line, "CONNECT %s\n", port);
    write_all(fd, line, (size_t)len);
    // The answer, a byte at a time so that nothing after it is taken.
    for (len = 0; len < (int)sizeof line - 1; len++) {
        line[len] = (char)read_byte(fd);
        if (line[len] == '\n')
            break;
    }
    line[len] = '\0';
    if (strncmp(line, "OK ", 3) != 0) {
        fprintf(stderr, "CONNECT %s: the device answered \"%s\"\n", port, line);
        return 1;
    }
    double seconds[3];
    host_end(fd, &x, seconds);
    close(fd);
    print_vsock(seconds);
    return 0;
}

static int vsock_pair(char **args)
{
    struct vsock_exchange x = parse_exchange(args);
    int fds[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) < 0)
        die("socketpair");
    set_timeouts(fds[0]);
    set_timeouts(fds[1]);
    // Both ends on one CPU (the child inherits this): a round trip is then two context switches,
    // the least it can cost. Across CPUs, it costs whatever waking an idle one does, which on
    // nested virtual machines varies 50-fold from run to run.
    int here = sched_getcpu();
    if (here < 0)
        die("sched_getcpu");
    cpu_set_t cpu;
    CPU_ZERO(&cpu);
    CPU_SET((size_t)here, &cpu);
    if (sched_setaffinity(0, sizeof cpu, &cpu) < 0)
        die("sched_setaffinity");
    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0) {
        close(fds[0]);
        guest_end(fds[1], &x);
        _exit(0);
    }
    close(fds[1]);
    double seconds[3];
    host_end(fds[0], &x, seconds);
    close(fds[0]);
    int status;
    if (waitpid(child, &status, 0) < 0)
        die("waitpid");
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "the guest's end failed\n");
        return 1;
    }
    print_vsock(seconds);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 5 && strcmp(argv[1], "blk") == 0)
        return bench_blk(argv[2], argv[3], argc - 4, argv + 4);
    if (argc == 5 && strcmp(argv[1], "net-read") == 0)
        return net_read(argv[2], argv[3], argv[4]);
    if (argc >= 5 && strcmp(argv[1], "net-send") == 0)
        return net_send(argv[2], argv[3], argc - 4, argv + 4);
    if (argc == 7 && strcmp(argv[1], "vsock-client") == 0)
        return vsock_client(argv[2], argv[3], argv + 4);
    if (argc == 5 && strcmp(argv[1], "vsock-pair") == 0)
        return vsock_pair(argv + 2);
    fprintf(stderr,
            "usage: %s blk <read image> <write image> <job>...\n"
            "           job = read|write:seq|rand:<block size>:<count>:<seed>\n"
            "       %s net-read <netns> <interface> <jobs>\n"
            "       %s net-send <netns> <tap> <frame bytes>:<count>...\n"
            "       %s vsock-client <socket path> <port> <round trips> <stream bytes> <packet bytes>\n"
            "       %s vsock-pair <round trips> <stream bytes> <packet bytes>\n",
            argv[0], argv[0], argv[0], argv[0], argv[0]);
    return 2;
}
