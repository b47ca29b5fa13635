// Device I/O baseline: the host doing the guest's I/O itself, single-threaded, with plain
// system calls, so its numbers are the limit kvmkit's virtio devices are compared against.
//
//   io_baseline blk <read image> <write image> <job>...
//       job = read|write:seq|rand:<block size>:<count>:<seed>
//
// Prints one JSON object with the seconds each job took. The jobs are those of
// guests/blk_jobs.h, issued with pread (from the read image) and pwrite (to the write image)
// one at a time: the guest's queue depth has no synchronous counterpart.
// Build: cc -O2 -I guests -o io_baseline io_baseline.c
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "blk_jobs.h"

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

int main(int argc, char **argv)
{
    if (argc >= 5 && strcmp(argv[1], "blk") == 0)
        return bench_blk(argv[2], argv[3], argc - 4, argv + 4);
    fprintf(stderr, "usage: %s blk <read image> <write image> <job>...\n"
                    "       job = read|write:seq|rand:<block size>:<count>:<seed>\n",
            argv[0]);
    return 2;
}
