/* Network benchmark jobs, shared by the guest driver (net_bench.c) and the host side
 * (io_baseline.c: the tap writer and the reader that counts what arrives), so that both sides send
 * the same frames. bench_virtio.py packs struct net_plan with the same layout (NET_PLAN_FORMAT and
 * NET_JOB_FORMAT there). Only <stdint.h> types: the guest is freestanding. */
#ifndef NET_JOBS_H
#define NET_JOBS_H

#include <stdint.h>

#define NET_MAX_JOBS 4
#define NET_HDR_LEN 12 /* the virtio-net header in front of each frame the guest sends */
#define NET_MIN_FRAME 60
#define NET_MAX_FRAME 1514
/* IEEE 802 "local experimental": the reader binds to it, and no protocol of the host takes it,
 * so the kernel drops each frame right after the reader's copy. */
#define NET_ETHERTYPE 0x88b5
/* Where a frame says which job sent it, right after its Ethernet header. */
#define NET_JOB_OFFSET 14

struct net_job {
    uint32_t frame_len; /* bytes, Ethernet header included, virtio-net header not */
    uint32_t depth;     /* transmit chains in flight (the guest; the host writes one at a time) */
    uint64_t count;     /* frames */
};

struct net_plan {
    uint64_t device; /* virtio-mmio registers of the card */
    uint32_t job_count;
    uint32_t reserved;
    struct net_job jobs[NET_MAX_JOBS];
};

/* The frame every send of job `job` carries: a unicast to nobody, the ethertype, the job and a
 * byte pattern. Plain loops: the guest has no libc. */
static inline void net_fill_frame(uint8_t *frame, uint32_t len, uint32_t job)
{
    static const uint8_t macs[12] = {0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01}; /* dst, src */
    for (uint32_t i = 0; i < len; i++)
        frame[i] = i < sizeof macs ? macs[i] : (uint8_t)i;
    frame[12] = NET_ETHERTYPE >> 8;
    frame[13] = NET_ETHERTYPE & 0xff;
    frame[NET_JOB_OFFSET] = (uint8_t)job;
}

#endif /* NET_JOBS_H */
