/* What the benchmark C guests share.
 *
 * Phase marks: a 4-byte OUT to BENCH_MARK_PORT of phase << 1 when a phase starts and of
 * phase << 1 | 1 when it ends. The host stamps each with its own clock (benchmarks/cguest.py), so
 * phases are timed without trusting the guest's TSC rate, and the cost of a mark (one exit) falls
 * between phases, not inside one.
 *
 * Polling for used chains (bench_wait_used/bench_take_used) and preparing buffers, on the virtio
 * library of tests/guests/c. */
#ifndef BENCH_H
#define BENCH_H

#include "guest.h"
#include "virtio.h"

#define BENCH_MARK_PORT 0x610

static inline void bench_phase_start(u32 phase) { outl(BENCH_MARK_PORT, phase << 1); }
static inline void bench_phase_end(u32 phase) { outl(BENCH_MARK_PORT, phase << 1 | 1); }

static inline struct vq_buf bench_buf(const void *p, u32 len, bool writable)
{
    return (struct vq_buf){.addr = (u64)(uintptr_t)p, .len = len, .writable = writable};
}

static inline bool bench_has_used(const struct virtq *vq) { return READ_ONCE(vq->used.idx) != vq->last_used; }

/* Spins until one of the `n` queues has a used chain and returns the first that has. No PAUSE,
 * which can cost a VM exit and would add its latency to every completion; the TSC (which can
 * exit too) is read only after many spins, for the timeout. */
static inline struct virtq *bench_wait_any(struct virtq *const *vqs, unsigned n)
{
    u64 start = 0;
    for (u32 spins = 1;; spins++) {
        for (unsigned i = 0; i < n; i++)
            if (bench_has_used(vqs[i]))
                return vqs[i];
        if (spins % 4096 == 0) {
            u64 now = rdtsc();
            if (start == 0)
                start = now;
            else if (now - start > VIRTIO_DEFAULT_TIMEOUT_TSC)
                fail(VIRTIO_ERR_TIMEOUT);
        }
    }
}

static inline void bench_wait_used(struct virtq *vq) { bench_wait_any(&vq, 1); }

/* Takes the used chain bench_has_used() saw: its head, with the bytes written in *len. */
static inline unsigned bench_take_used(struct virtq *vq, u32 *len)
{
    int head = vq_wait_used(vq, len); /* returns at once: the index has moved */
    if (head < 0)
        fail(head);
    return (unsigned)head;
}

/* The first touch of a page can exit to the host; this keeps that out of the timed phases. */
static inline void bench_touch(void *p, u64 bytes)
{
    for (u64 at = 0; at < bytes; at += 4096)
        WRITE_ONCE(((u8 *)p)[at], 0);
}

#endif /* BENCH_H */
