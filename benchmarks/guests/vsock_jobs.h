/* vsock benchmark exchange, shared by the guest driver (vsock_bench.c) and the host side
 * (io_baseline.c, which plays both ends of it over a socketpair for the baseline and the host end
 * over kvmkit's Unix socket). bench_virtio.py packs struct vsock_plan with the same layout
 * (VSOCK_PLAN_FORMAT there). Only <stdint.h> types: the guest is freestanding.
 *
 * On one stream connection, which the host opens:
 *   1. round_trips times: the host sends one byte, the guest sends it back;
 *   2. the guest sends stream_bytes in writes (RW packets) of packet_bytes, each starting with
 *      VSOCK_STAMP;
 *   3. the host sends stream_bytes, byte i being (uint8_t)i, and the guest answers VSOCK_ACK
 *      once it has them all;
 *   4. the host closes the connection. */
#ifndef VSOCK_JOBS_H
#define VSOCK_JOBS_H

#include <stdint.h>

/* The largest payload kvmkit's device puts in one packet for the guest. */
#define VSOCK_MAX_PACKET (64u << 10)
/* Guest memory the driver uses at plan.buffers: receive buffers and what it sends. */
#define VSOCK_BUFFER_BYTES (2u << 20)
#define VSOCK_STAMP 0xa5
#define VSOCK_ACK 0x5a

struct vsock_plan {
    uint64_t device;       /* virtio-mmio registers of the vsock device */
    uint64_t buffers;      /* guest address of VSOCK_BUFFER_BYTES */
    uint32_t port;         /* the guest listens here */
    uint32_t round_trips;  /* step 1 */
    uint64_t stream_bytes; /* steps 2 and 3, a multiple of packet_bytes */
    uint32_t packet_bytes; /* step 2, at most VSOCK_MAX_PACKET */
    uint32_t reserved;
};

#endif /* VSOCK_JOBS_H */
