/* I/O benchmark for a Linux guest, and the host-side sink it streams to (bench_linux_virtio.py).
 *
 * Built with `cc -static -O2` and run both in the guest (put there by an extra initramfs
 * archive) and on the host. Every measuring command prints one line
 *     IOBENCH-RESULT <name> <value> <unit>
 * timed with clock_gettime(CLOCK_MONOTONIC) inside the guest, or `IOBENCH-ERROR <why>`.
 *
 *   seqread DEV BLOCK MIB         O_DIRECT sequential reads of BLOCK bytes until MIB MiB are read
 *                                 (wrapping at the device's end); MB/s
 *   seqwrite DEV BLOCK MIB        the same with writes; MB/s
 *   randread DEV BLOCK COUNT THREADS
 *                                 COUNT O_DIRECT reads of BLOCK bytes at random aligned offsets,
 *                                 split over THREADS threads (each one request at a time); IOPS
 *   tcp ADDR PORT MIB             connects, writes MIB MiB in 64 KiB writes, shuts down its
 *                                 sending side and waits for the sink's count; MB/s
 *   vsock CID PORT MIB            the same over an AF_VSOCK stream
 *   sink tcp PORT | sink unix PATH | sink vsock PORT
 *                                 (host side) accepts connections one after another, reads each to
 *                                 its end and answers with the byte count (8 bytes, little endian);
 *                                 prints "IOBENCH-SINK ready" once it listens
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MIB (1ull << 20)
#define CHUNK (64u << 10)
#define ALIGN 4096

static void die(const char *what)
{
    printf("IOBENCH-ERROR %s: %s\n", what, strerror(errno));
    fflush(stdout);
    exit(1);
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void result(const char *name, double value, const char *unit)
{
    printf("IOBENCH-RESULT %s %.3f %s\n", name, value, unit);
    fflush(stdout);
}

static void *aligned(size_t size)
{
    void *p;
    if (posix_memalign(&p, ALIGN, size) != 0)
        die("posix_memalign");
    memset(p, 0x5a, size);
    return p;
}

static int open_disk(const char *path, int flags, uint64_t *size)
{
    int fd = open(path, flags | O_DIRECT);
    if (fd < 0)
        die(path);
    if (ioctl(fd, BLKGETSIZE64, size) != 0)
        die("BLKGETSIZE64");
    return fd;
}

static int sequential(const char *path, size_t block, uint64_t total, int write_it)
{
    uint64_t size;
    int fd = open_disk(path, write_it ? O_RDWR : O_RDONLY, &size);
    char *buf = aligned(block);
    uint64_t span = size / block * block, offset = 0, done = 0;
    double start = now();
    while (done < total) {
        ssize_t n = write_it ? pwrite(fd, buf, block, (off_t)offset) : pread(fd, buf, block, (off_t)offset);
        if (n != (ssize_t)block)
            die(write_it ? "pwrite" : "pread");
        done += block;
        offset = (offset + block) % span;
    }
    double seconds = now() - start;
    close(fd);
    result(write_it ? "seqwrite" : "seqread", (double)total / seconds / 1e6, "MB/s");
    return 0;
}

struct reader {
    int fd;
    size_t block;
    uint64_t blocks, count, seed;
};

static void *random_reads(void *arg)
{
    struct reader *r = arg;
    char *buf = aligned(r->block);
    uint64_t x = r->seed;
    for (uint64_t i = 0; i < r->count; i++) {
        x ^= x << 13; /* xorshift64 */
        x ^= x >> 7;
        x ^= x << 17;
        if (pread(r->fd, buf, r->block, (off_t)((x % r->blocks) * r->block)) != (ssize_t)r->block)
            die("pread");
    }
    free(buf);
    return NULL;
}

static int randread(const char *path, size_t block, uint64_t count, unsigned threads)
{
    uint64_t size;
    int fd = open_disk(path, O_RDONLY, &size);
    pthread_t ids[64];
    struct reader readers[64];
    if (threads < 1 || threads > 64)
        threads = 1;
    for (unsigned i = 0; i < threads; i++)
        readers[i] = (struct reader){fd, block, size / block, count / threads, 0x9e3779b97f4a7c15ull * (i + 1)};
    double start = now();
    for (unsigned i = 0; i < threads; i++)
        if (pthread_create(&ids[i], NULL, random_reads, &readers[i]) != 0)
            die("pthread_create");
    for (unsigned i = 0; i < threads; i++)
        pthread_join(ids[i], NULL);
    double seconds = now() - start;
    close(fd);
    char name[32];
    snprintf(name, sizeof name, "randread-qd%u", threads);
    result(name, (double)(count / threads * threads) / seconds, "IOPS");
    return 0;
}

static int stream(int fd, const char *name, uint64_t total)
{
    char *buf = aligned(CHUNK);
    uint64_t sent = 0, answer = 0;
    double start = now();
    while (sent < total) {
        size_t want = total - sent < CHUNK ? (size_t)(total - sent) : CHUNK;
        ssize_t n = write(fd, buf, want);
        if (n <= 0)
            die("write");
        sent += (uint64_t)n;
    }
    if (shutdown(fd, SHUT_WR) != 0)
        die("shutdown");
    size_t got = 0;
    while (got < sizeof answer) {
        ssize_t n = read(fd, (char *)&answer + got, sizeof answer - got);
        if (n <= 0)
            die("read the sink's count");
        got += (size_t)n;
    }
    double seconds = now() - start;
    close(fd);
    if (answer != total) {
        printf("IOBENCH-ERROR the sink counted %llu bytes of %llu\n", (unsigned long long)answer,
               (unsigned long long)total);
        return 1;
    }
    result(name, (double)total / seconds / 1e6, "MB/s");
    return 0;
}

static int tcp_send(const char *addr, int port, uint64_t total)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, addr, &sa.sin_addr) != 1)
        die("bad IPv4 address");
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
        die("tcp connect");
    return stream(fd, "tcp", total);
}

static int vsock_send(unsigned cid, unsigned port, uint64_t total)
{
    struct sockaddr_vm sa = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
        die("vsock connect");
    return stream(fd, "vsock", total);
}

static int sink(const char *kind, const char *where)
{
    int fd;
    if (strcmp(kind, "tcp") == 0) {
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(where))};
        int one = 1;
        fd = socket(AF_INET, SOCK_STREAM, 0);
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
            die("bind tcp");
    } else if (strcmp(kind, "unix") == 0) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        snprintf(sa.sun_path, sizeof sa.sun_path, "%s", where);
        unlink(where);
        fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
            die("bind unix");
    } else if (strcmp(kind, "vsock") == 0) {
        struct sockaddr_vm sa = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = (unsigned)atoi(where)};
        fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
            die("bind vsock");
    } else {
        fprintf(stderr, "unknown sink %s\n", kind);
        return 2;
    }
    if (listen(fd, 8) != 0)
        die("listen");
    printf("IOBENCH-SINK ready\n");
    fflush(stdout);
    size_t size = 1 << 20;
    char *buf = aligned(size);
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0)
            die("accept");
        uint64_t count = 0;
        ssize_t n;
        while ((n = read(c, buf, size)) > 0)
            count += (uint64_t)n;
        if (write(c, &count, sizeof count) != sizeof count)
            perror("write the count");
        close(c);
    }
}

int main(int argc, char **argv)
{
    const char *cmd = argc > 1 ? argv[1] : "";
    if ((strcmp(cmd, "seqread") == 0 || strcmp(cmd, "seqwrite") == 0) && argc == 5)
        return sequential(argv[2], strtoul(argv[3], NULL, 0), strtoull(argv[4], NULL, 0) * MIB, cmd[3] == 'w');
    if (strcmp(cmd, "randread") == 0 && argc == 6)
        return randread(argv[2], strtoul(argv[3], NULL, 0), strtoull(argv[4], NULL, 0),
                        (unsigned)strtoul(argv[5], NULL, 0));
    if (strcmp(cmd, "tcp") == 0 && argc == 5)
        return tcp_send(argv[2], atoi(argv[3]), strtoull(argv[4], NULL, 0) * MIB);
    if (strcmp(cmd, "vsock") == 0 && argc == 5)
        return vsock_send((unsigned)strtoul(argv[2], NULL, 0), (unsigned)strtoul(argv[3], NULL, 0),
                          strtoull(argv[4], NULL, 0) * MIB);
    if (strcmp(cmd, "sink") == 0 && argc == 4)
        return sink(argv[2], argv[3]);
    fprintf(stderr, "usage: see the comment at the top of linux_iobench.c\n");
    return 2;
}
