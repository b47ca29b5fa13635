/* virtio-vsock stream connections, C guest (guest.h conventions): arg = address of struct params (below). Reads its CID from the config space and prints "cid=<decimal>\n". Mode CONNECT: sends REQUEST from port 40000 to host port `port`; on RST prints "rst\n" and returns 1; on RESPONSE sends `data` in one RW packet, collects data_len bytes of RW payload, prints "fwd_cnt=<device's fwd_cnt in the last of them>\nreply=<the bytes>\n", sends SHUTDOWN (both directions), waits for the device's RST and returns 0. Mode LISTEN: answers each REQUEST for another port than `port` with RST and prints "refused <port>\n" (returning 2 after max_refusals of them, if not 0); accepts the first REQUEST for `port` with a RESPONSE offering buf_alloc bytes of buffer and prints "accepted from port <its source port>\n", collects RW payload until the device's SHUTDOWN, checking that it never exceeds the credit and giving credit back after each packet, sends the bytes back reversed in one RW packet, shuts down, waits for the RST, prints "received <n> bytes in <k> packets\n" and returns 0. Every packet from the device must come from CID 2 to the guest's CID, be a stream packet and fit its buffer; failures are CHECKs (0xbad) or a VIRTIO_ERR_*. */
#include "virtio.h"

#define HOST_CID 2
#define GUEST_PORT 40000
#define TYPE_STREAM 1
#define SHUTDOWN_RCV 1
#define SHUTDOWN_SEND 2
#define MAX_DATA 256
#define RX_BUFS 8
#define MODE_CONNECT 1
#define MODE_LISTEN 2

struct params {
    u64 base;
    u32 mode;
    u32 port;         /* CONNECT: the host port; LISTEN: the guest port that accepts */
    u32 buf_alloc;    /* the receive buffer the guest advertises */
    u32 max_refusals; /* LISTEN: return after refusing this many requests (0: never) */
    u32 data_len;     /* CONNECT: bytes of data to send */
    u8 data[MAX_DATA];
} __attribute__((packed));

struct packet {
    struct vsock_hdr h;
    u8 data[MAX_DATA];
};

static struct virtio_dev dev;
static struct virtq rxq, txq;
static struct packet rx_bufs[RX_BUFS], rx, tx;
static u8 rx_of_head[VIRTQ_MAX_SIZE];
static u8 data[MAX_DATA];
static u64 cid;
/* The connection: ports, the buffer the guest offers and how much of it the guest consumed. */
static u32 local_port, peer_port, buf_alloc, fwd_cnt;

static struct vq_buf buf(const void *p, u32 len, bool writable)
{
    return (struct vq_buf){.addr = (u64)(uintptr_t)p, .len = len, .writable = writable};
}

static void post_rx(unsigned slot)
{
    struct vq_buf b = buf(&rx_bufs[slot], sizeof rx_bufs[slot], true);
    int head = vq_submit(&rxq, &b, 1);
    CHECK(head >= 0);
    rx_of_head[head] = (u8)slot;
}

/* Waits for the next packet from the device, checks its addressing and copies it into `rx`. */
static const struct vsock_hdr *receive(void)
{
    u32 len = 0;
    int head = vq_wait_used(&rxq, &len);
    if (head < 0)
        fail(head);
    unsigned slot = rx_of_head[head];
    const struct vsock_hdr *h = &rx_bufs[slot].h;
    CHECK(len >= sizeof *h && len == sizeof *h + h->len && len <= sizeof rx_bufs[slot]);
    CHECK(h->src_cid == HOST_CID && h->dst_cid == cid && h->type == TYPE_STREAM);
    memcpy(&rx, &rx_bufs[slot], len);
    post_rx(slot);
    return &rx.h;
}

/* The next packet of the connection, past credit updates (the guest never runs short). */
static const struct vsock_hdr *receive_on_connection(void)
{
    for (;;) {
        const struct vsock_hdr *h = receive();
        CHECK(h->src_port == peer_port && h->dst_port == local_port);
        if (h->op != VSOCK_OP_CREDIT_UPDATE)
            return h;
    }
}

static void send(u16 op, u32 flags, const void *payload, u32 len)
{
    CHECK(len <= MAX_DATA);
    tx.h = (struct vsock_hdr){
        .src_cid = cid,
        .dst_cid = HOST_CID,
        .src_port = local_port,
        .dst_port = peer_port,
        .len = len,
        .type = TYPE_STREAM,
        .op = op,
        .flags = flags,
        .buf_alloc = buf_alloc,
        .fwd_cnt = fwd_cnt,
    };
    memcpy(tx.data, payload, len);
    struct vq_buf b = buf(&tx, (u32)sizeof tx.h + len, false);
    int head = vq_submit(&txq, &b, 1);
    CHECK(head >= 0);
    /* Once the device returns the chain it has acted on the packet. */
    int used = vq_wait_used(&txq, NULL);
    if (used < 0)
        fail(used);
    CHECK(used == head);
}

/* Shuts the connection down both ways and waits for the device to end it. */
static void close_connection(void)
{
    send(VSOCK_OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, NULL, 0);
    for (;;) {
        const struct vsock_hdr *h = receive_on_connection();
        if (h->op == VSOCK_OP_RST)
            return;
        CHECK(h->op == VSOCK_OP_SHUTDOWN); /* the host may close its end first */
    }
}

static int connect_to_host(const struct params *p)
{
    local_port = GUEST_PORT;
    peer_port = p->port;
    send(VSOCK_OP_REQUEST, 0, NULL, 0);
    const struct vsock_hdr *h = receive_on_connection();
    if (h->op == VSOCK_OP_RST) {
        print("rst\n");
        return 1;
    }
    CHECK(h->op == VSOCK_OP_RESPONSE);
    CHECK(h->buf_alloc >= p->data_len); /* the device has room for the data */
    send(VSOCK_OP_RW, 0, p->data, p->data_len);

    u32 got = 0, device_fwd_cnt = 0;
    while (got < p->data_len) {
        h = receive_on_connection();
        CHECK(h->op == VSOCK_OP_RW && h->len > 0 && got + h->len <= p->data_len);
        memcpy(data + got, rx.data, h->len);
        got += h->len;
        fwd_cnt += h->len;
        device_fwd_cnt = h->fwd_cnt;
    }
    print("fwd_cnt=");
    print_dec(device_fwd_cnt);
    print("\nreply=");
    data[got] = 0;
    print((const char *)data);
    print("\n");
    close_connection();
    return 0;
}

static int accept_from_host(const struct params *p)
{
    u32 refusals = 0;
    for (;;) {
        const struct vsock_hdr *h = receive();
        CHECK(h->op == VSOCK_OP_REQUEST);
        local_port = h->dst_port;
        peer_port = h->src_port;
        if (h->dst_port == p->port)
            break;
        send(VSOCK_OP_RST, 0, NULL, 0);
        print("refused ");
        print_dec(h->dst_port);
        print("\n");
        if (++refusals == p->max_refusals)
            return 2;
    }
    send(VSOCK_OP_RESPONSE, 0, NULL, 0);
    print("accepted from port ");
    print_dec(peer_port);
    print("\n");

    u32 got = 0, packets = 0, told = 0; /* told: the fwd_cnt the device heard last */
    for (;;) {
        const struct vsock_hdr *h = receive_on_connection();
        if (h->op == VSOCK_OP_SHUTDOWN) {
            CHECK(h->flags & SHUTDOWN_SEND);
            break;
        }
        CHECK(h->op == VSOCK_OP_RW && h->len > 0);
        CHECK(got + h->len - told <= buf_alloc); /* within the credit the guest gave */
        CHECK(got + h->len <= sizeof data);
        memcpy(data + got, rx.data, h->len);
        got += h->len;
        packets++;
        fwd_cnt = got;
        send(VSOCK_OP_CREDIT_UPDATE, 0, NULL, 0);
        told = fwd_cnt;
    }
    for (u32 i = 0; i < got / 2; i++) {
        u8 t = data[i];
        data[i] = data[got - 1 - i];
        data[got - 1 - i] = t;
    }
    send(VSOCK_OP_RW, 0, data, got);
    close_connection();
    print("received ");
    print_dec(got);
    print(" bytes in ");
    print_dec(packets);
    print(" packets\n");
    return 0;
}

int main(u64 arg)
{
    const struct params *p = (const struct params *)(uintptr_t)arg;
    int r = virtio_init(&dev, (uintptr_t)p->base, VIRTIO_ID_VSOCK, 0);
    if (r < 0)
        return r;
    cid = virtio_config_read(&dev, 0, 8);
    print("cid=");
    print_dec(cid);
    print("\n");
    /* The event queue (2) stays unused: this driver needs no transport events. */
    if ((r = vq_setup(&dev, 0, &rxq, 16)) < 0 || (r = vq_setup(&dev, 1, &txq, 8)) < 0)
        return r;
    virtio_driver_ok(&dev);
    for (unsigned slot = 0; slot < RX_BUFS; slot++)
        post_rx(slot);

    buf_alloc = p->buf_alloc;
    CHECK(p->data_len < MAX_DATA); /* room for the NUL that ends the printed reply */
    switch (p->mode) {
    case MODE_CONNECT:
        return connect_to_host(p);
    case MODE_LISTEN:
        return accept_from_host(p);
    default:
        return -100;
    }
}
