/* Block benchmark jobs, shared by the guest driver (blk_bench.c) and the host baseline
 * (io_baseline.c) so that both issue the same requests in the same order. bench_virtio.py packs
 * struct blk_plan with the same layout (BLK_PLAN_FORMAT and BLK_JOB_FORMAT there). Only
 * <stdint.h> types: the guest is freestanding. */
#ifndef BLK_JOBS_H
#define BLK_JOBS_H

#include <stdint.h>

#define BLK_MAX_JOBS 8
#define BLK_MAX_DEPTH 16
/* The read image's fill: every 4 KiB block starts with its own byte offset (a u64), so a reader
 * can tell that it got the blocks it asked for. Writes go to a second image of the same size, so
 * the stamps stay intact without writers having to stamp every block they send. */
#define BLK_STAMP_STRIDE 4096

enum { BLK_READ = 0, BLK_WRITE = 1 };
enum { BLK_SEQUENTIAL = 0, BLK_RANDOM = 1 };

struct blk_job {
    uint32_t op;         /* BLK_READ (from the read disk) or BLK_WRITE (to the write disk) */
    uint32_t pattern;    /* BLK_SEQUENTIAL or BLK_RANDOM */
    uint32_t block_size; /* bytes per request, a multiple of BLK_STAMP_STRIDE */
    uint32_t depth;      /* requests in flight (the guest; the host baseline is synchronous) */
    uint64_t count;      /* requests */
    uint64_t seed;       /* of the random offsets; non-zero */
};

struct blk_plan {
    uint64_t read_disk;  /* virtio-mmio registers of the stamped disk */
    uint64_t write_disk; /* ... and of the scratch disk, of the same size */
    uint64_t buffers;    /* guest address of BLK_MAX_DEPTH * the largest block_size bytes */
    uint32_t job_count;
    uint32_t reserved;
    struct blk_job jobs[BLK_MAX_JOBS];
};

/* xorshift64*: cheap, and identical on both sides. */
static inline uint64_t blk_next_random(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545f4914f6cdd1dull;
}

/* Byte offset of request `index` of `job` on a disk of `disk_bytes` (a multiple of block_size):
 * sequential requests wrap around at the end; random ones are block-aligned and uniform. */
static inline uint64_t blk_offset(const struct blk_job *job, uint64_t index, uint64_t *state,
                                  uint64_t disk_bytes)
{
    uint64_t blocks = disk_bytes / job->block_size;
    uint64_t block = job->pattern == BLK_RANDOM ? (blk_next_random(state) >> 11) % blocks : index % blocks;
    return block * job->block_size;
}

/* Whether a buffer read from `offset` carries the stamps of its first and last 4 KiB blocks
 * (all of them would cost a cache miss per block inside the timed loop). */
static inline int blk_stamped(const void *buf, uint32_t len, uint64_t offset)
{
    uint32_t last = len - BLK_STAMP_STRIDE;
    return *(const volatile uint64_t *)buf == offset &&
           *(const volatile uint64_t *)((const char *)buf + last) == offset + last;
}

#endif /* BLK_JOBS_H */
