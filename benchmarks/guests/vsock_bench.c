/* virtio-vsock benchmark driver, C guest (tests/guests/c/guest.h conventions): arg = guest address of a struct vsock_plan (vsock_jobs.h). Listens on plan->port, accepts the host's connection offering BUF_ALLOC bytes of credit, then runs the exchange of vsock_jobs.h: round trips as phase 0, its stream to the host as phase 1 (as many packet_bytes RW packets in flight as the device's credit allows), the host's stream as phase 2 (credit given back every BUF_ALLOC / 4 bytes); once the host has closed, resets the connection and returns 3 (the phases run). Control packets and one-byte writes do not wait for the device to take them. Fails with ERR_PLAN, ERR_PROTOCOL or a VIRTIO_ERR_*. */
#include "bench.h"
#include "vsock_jobs.h"

#define HOST_CID 2
#define TYPE_STREAM 1
#define QUEUE_SIZE 16
#define RX_BUFS 16
/* A header and the largest payload, a page apart from the next buffer. */
#define RX_STRIDE (VSOCK_MAX_PACKET + 4096)
/* The guest takes in data as it arrives, so this credit only paces the device. */
#define BUF_ALLOC (1u << 20)
#define ERR_PLAN 0x100
#define ERR_PROTOCOL 0x101 /* a packet the exchange does not expect */

_Static_assert(RX_BUFS * RX_STRIDE + VSOCK_MAX_PACKET <= VSOCK_BUFFER_BYTES, "buffers");

/* What the guest keeps of a received packet once its buffer is back with the device. */
struct packet {
    struct vsock_hdr h;
    u8 first; /* payload byte */
};

static struct virtio_dev dev;
static struct virtq rxq, txq;
static struct virtq *const both[2] = {&txq, &rxq};
static u8 *rx_buf[RX_BUFS];
static u8 rx_of_head[VIRTQ_MAX_SIZE];
static u8 *payload; /* of every streamed packet: only ever sent, so one buffer serves all */
/* Control packets and one-byte writes, one in flight at a time (settle()). */
static struct {
    struct vsock_hdr h;
    u8 byte;
} __attribute__((packed)) ctl;
static bool ctl_in_flight;
/* The header all streamed packets share: nothing in it changes while the guest streams. */
static struct vsock_hdr bulk;
static u64 cid;
static u32 local_port, peer_port;
/* Bytes the guest took in, and as many as the device last heard of. */
static u32 fwd_cnt, fwd_cnt_told;
/* Bytes the guest sent, and the device's credit for them. */
static u32 tx_cnt, peer_buf_alloc, peer_fwd_cnt;

static void post_rx(unsigned slot)
{
    struct vq_buf b = bench_buf(rx_buf[slot], VSOCK_HDR_LEN + VSOCK_MAX_PACKET, true);
    int head = vq_submit(&rxq, &b, 1);
    if (head < 0)
        fail(head);
    rx_of_head[head] = (u8)slot;
}

static struct vsock_hdr header(u16 op, u32 len)
{
    fwd_cnt_told = fwd_cnt;
    return (struct vsock_hdr){.src_cid = cid, .dst_cid = HOST_CID, .src_port = local_port, .dst_port = peer_port,
                        .len = len, .type = TYPE_STREAM, .op = op, .buf_alloc = BUF_ALLOC, .fwd_cnt = fwd_cnt};
}

/* The next packet from the device; its buffer goes straight back. */
static struct packet receive(void)
{
    bench_wait_used(&rxq);
    u32 len = 0;
    unsigned slot = rx_of_head[bench_take_used(&rxq, &len)];
    struct packet p;
    p.h = *(const struct vsock_hdr *)rx_buf[slot]; /* a few moves, not the runtime's byte-wise memcpy */
    p.first = rx_buf[slot][VSOCK_HDR_LEN];
    post_rx(slot);
    if (len != VSOCK_HDR_LEN + p.h.len || p.h.src_cid != HOST_CID || p.h.dst_cid != cid || p.h.type != TYPE_STREAM)
        fail(ERR_PROTOCOL);
    return p;
}

/* The next packet of the connection past credit updates, which must be `op`; takes the credit
 * each reports. */
static struct packet expect(u16 op)
{
    for (;;) {
        struct packet p = receive();
        if (p.h.src_port != peer_port || p.h.dst_port != local_port)
            fail(ERR_PROTOCOL);
        peer_buf_alloc = p.h.buf_alloc;
        peer_fwd_cnt = p.h.fwd_cnt;
        if (p.h.op == op)
            return p;
        if (p.h.op != VSOCK_OP_CREDIT_UPDATE)
            fail(ERR_PROTOCOL);
    }
}

/* Reclaims the control packet in flight, if any: then ctl may change, and the next used chain is
 * a streamed packet's. */
static void settle(void)
{
    if (ctl_in_flight) {
        bench_wait_used(&txq);
        bench_take_used(&txq, NULL);
        ctl_in_flight = false;
    }
}

/* Sends a packet of `len` payload bytes (0, or 1: `byte`) without waiting for the device to
 * take it. */
static void send(u16 op, u32 len, u8 byte)
{
    settle();
    ctl.h = header(op, len);
    ctl.byte = byte;
    tx_cnt += len;
    struct vq_buf b = bench_buf(&ctl, VSOCK_HDR_LEN + len, false);
    int head = vq_submit(&txq, &b, 1);
    if (head < 0)
        fail(head);
    ctl_in_flight = true;
}

static void accept(u32 port)
{
    struct packet p = receive();
    if (p.h.op != VSOCK_OP_REQUEST || p.h.dst_port != port)
        fail(ERR_PROTOCOL);
    local_port = port;
    peer_port = p.h.src_port;
    peer_buf_alloc = p.h.buf_alloc;
    peer_fwd_cnt = p.h.fwd_cnt;
    send(VSOCK_OP_RESPONSE, 0, 0);
}

static void round_trips(u32 count)
{
    for (u32 i = 0; i < count; i++) {
        struct packet p = expect(VSOCK_OP_RW);
        if (p.h.len != 1)
            fail(ERR_PROTOCOL);
        fwd_cnt++;
        send(VSOCK_OP_RW, 1, p.first);
    }
}

static u32 credit(void)
{
    u32 in_flight = tx_cnt - peer_fwd_cnt;
    return peer_buf_alloc > in_flight ? peer_buf_alloc - in_flight : 0;
}

/* Keeps packets going while credit and descriptors last, otherwise reclaims sent ones and takes
 * in credit updates. */
static void stream_out(u64 bytes, u32 packet_bytes)
{
    struct vq_buf chain[2] = {bench_buf(&bulk, VSOCK_HDR_LEN, false), bench_buf(payload, packet_bytes, false)};
    settle();
    bulk = header(VSOCK_OP_RW, packet_bytes);
    u64 packets = bytes / packet_bytes, sent = 0;
    for (u64 done = 0; done < packets;) {
        if (sent < packets && txq.num_free >= 2 && credit() >= packet_bytes) {
            if (vq_submit(&txq, chain, 2) < 0)
                fail(VIRTIO_ERR_FULL);
            tx_cnt += packet_bytes;
            sent++;
        } else if (bench_wait_any(both, 2) == &txq) {
            bench_take_used(&txq, NULL);
            done++;
        } else {
            expect(VSOCK_OP_CREDIT_UPDATE);
        }
    }
}

static void stream_in(u64 bytes)
{
    for (u64 got = 0; got < bytes;) {
        struct packet p = expect(VSOCK_OP_RW);
        if (p.h.len == 0 || p.h.len > bytes - got || p.first != (u8)got)
            fail(ERR_PROTOCOL);
        got += p.h.len;
        fwd_cnt += p.h.len;
        if (fwd_cnt - fwd_cnt_told >= BUF_ALLOC / 4)
            send(VSOCK_OP_CREDIT_UPDATE, 0, 0);
    }
    send(VSOCK_OP_RW, 1, VSOCK_ACK);
}

int main(u64 arg)
{
    const struct vsock_plan *plan = (const struct vsock_plan *)(uintptr_t)arg;
    if (plan->packet_bytes == 0 || plan->packet_bytes > VSOCK_MAX_PACKET || plan->stream_bytes == 0 ||
        plan->stream_bytes % plan->packet_bytes)
        return ERR_PLAN;
    u8 *buffers = (u8 *)(uintptr_t)plan->buffers;
    bench_touch(buffers, VSOCK_BUFFER_BYTES);
    for (unsigned i = 0; i < RX_BUFS; i++)
        rx_buf[i] = buffers + i * RX_STRIDE;
    payload = buffers + RX_BUFS * RX_STRIDE;
    payload[0] = VSOCK_STAMP;

    int r = virtio_init(&dev, (uintptr_t)plan->device, VIRTIO_ID_VSOCK, 0);
    if (r < 0)
        return r;
    cid = virtio_config_read(&dev, 0, 8);
    /* The event queue (2) stays unused: the device sends no events. */
    if ((r = vq_setup(&dev, 0, &rxq, QUEUE_SIZE)) < 0 || (r = vq_setup(&dev, 1, &txq, QUEUE_SIZE)) < 0)
        return r;
    virtio_driver_ok(&dev);
    for (unsigned slot = 0; slot < RX_BUFS; slot++)
        post_rx(slot);

    accept(plan->port);
    bench_phase_start(0);
    round_trips(plan->round_trips);
    bench_phase_end(0);
    bench_phase_start(1);
    stream_out(plan->stream_bytes, plan->packet_bytes);
    bench_phase_end(1);
    bench_phase_start(2);
    stream_in(plan->stream_bytes);
    bench_phase_end(2);
    expect(VSOCK_OP_SHUTDOWN);
    send(VSOCK_OP_RST, 0, 0);
    settle();
    return 3;
}
