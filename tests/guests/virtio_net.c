/* virtio-net ARP and ping, C guest (guest.h conventions): arg = address of struct params {u64 base (MMIO base of a virtio-net device); u32 bad_tx}. Negotiates MAC and STATUS only, prints "mac=<its MAC>\n" and "link=up\n" or "link=down\n" (from the status field; up when STATUS is not offered), posts 8 receive buffers, then (with bad_tx) submits a header-only transmit chain and one whose frame buffer is at 1 GiB (outside a small VM's RAM), each expected back used with length 0. As 10.0.2.15 it broadcasts an ARP who-has 10.0.2.1 (42-byte frame) and, with the link down, returns 0 there; otherwise it skips other frames until the reply and prints "arp 10.0.2.1 is-at <MAC>\n", then sends that MAC an ICMP echo request (id 0x4b56, seq 1, 32-byte payload: 74-byte frame) and prints "pong seq=1 ttl=<ttl>\n" once the reply checks out (addresses, IP and ICMP checksums, id, seq, payload). Returns 0; a CHECK failure (0xbad) or a VIRTIO_ERR_* otherwise. MACs print as lowercase aa:bb:cc:dd:ee:ff. */
#include "virtio.h"

#define F_MAC (1ull << 5)
#define F_STATUS (1ull << 16)
#define CONFIG_STATUS 6
#define S_LINK_UP 1
#define NET_HDR_LEN 12
#define ETH_MAX 1514
#define RX_BUFS 8
/* Frames that are not the awaited reply (IPv6 chatter of the host, say) before giving up. */
#define MAX_SKIPPED 64
#define OUTSIDE_RAM 0x40000000ull

#define ETH_ARP 0x0806
#define ETH_IPV4 0x0800
#define ICMP_ECHO_REPLY 0
#define ICMP_ECHO_REQUEST 8
#define PING_ID 0x4b56
#define PING_PAYLOAD 32

struct params {
    u64 base;
    u32 bad_tx;
};

struct net_hdr {
    u8 flags, gso_type;
    u16 hdr_len, gso_size, csum_start, csum_offset, num_buffers;
} __attribute__((packed));

struct eth {
    u8 dst[6], src[6];
    u16 type;
} __attribute__((packed));

struct arp {
    u16 htype, ptype;
    u8 hlen, plen;
    u16 op;
    u8 sha[6], spa[4], tha[6], tpa[4];
} __attribute__((packed));

struct ipv4 {
    u8 ver_ihl, tos;
    u16 total_len, id, frag;
    u8 ttl, proto;
    u16 csum;
    u8 src[4], dst[4];
} __attribute__((packed));

struct icmp {
    u8 type, code;
    u16 csum, id, seq;
} __attribute__((packed));

_Static_assert(sizeof(struct net_hdr) == NET_HDR_LEN, "virtio_net_hdr_v1");
_Static_assert(sizeof(struct eth) + sizeof(struct arp) == 42, "ARP frame");

static const u8 my_ip[4] = {10, 0, 2, 15}, host_ip[4] = {10, 0, 2, 1};
static const u8 broadcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

static struct virtio_dev dev;
static struct virtq rxq, txq;
static u8 rx_bufs[RX_BUFS][NET_HDR_LEN + ETH_MAX];
static u8 rx_of_head[VIRTQ_MAX_SIZE];
static struct net_hdr tx_hdr; /* all zero: no offloads asked for */
static u8 tx_frame[ETH_MAX];
static u8 frame[ETH_MAX]; /* the last frame received, copied out of its buffer */
static u8 my_mac[6];

static u16 be16(u16 x) { return (u16)(x << 8 | x >> 8); }

static struct vq_buf buf(const void *p, u32 len, bool writable)
{
    return (struct vq_buf){.addr = (u64)(uintptr_t)p, .len = len, .writable = writable};
}

static void print_mac(const u8 *mac)
{
    for (int i = 0; i < 6; i++) {
        if (i)
            print(":");
        outb(GUEST_DEBUG_PORT, (u8)"0123456789abcdef"[mac[i] >> 4]);
        outb(GUEST_DEBUG_PORT, (u8)"0123456789abcdef"[mac[i] & 15]);
    }
}

/* The Internet checksum (RFC 1071) of `len` bytes; 0 over data that carries a correct one. */
static u16 checksum(const void *data, u32 len)
{
    const u8 *p = data;
    u32 sum = 0;
    for (u32 i = 0; i + 1 < len; i += 2)
        sum += (u32)p[i] << 8 | p[i + 1];
    if (len & 1)
        sum += (u32)p[len - 1] << 8;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return be16((u16)~sum);
}

static void post_rx(unsigned slot)
{
    struct vq_buf b = buf(rx_bufs[slot], sizeof rx_bufs[slot], true);
    int head = vq_submit(&rxq, &b, 1);
    CHECK(head >= 0);
    rx_of_head[head] = (u8)slot;
}

/* Submits one transmit chain and returns the length the device reports for it. */
static u32 transmit(const struct vq_buf *bufs, unsigned n)
{
    int head = vq_submit(&txq, bufs, n);
    CHECK(head >= 0);
    u32 len = 0xffffffff;
    int used = vq_wait_used(&txq, &len);
    if (used < 0)
        fail(used);
    CHECK(used == head);
    return len;
}

static void send_frame(u32 len)
{
    struct vq_buf chain[2] = {buf(&tx_hdr, sizeof tx_hdr, false), buf(tx_frame, len, false)};
    CHECK(transmit(chain, 2) == 0);
}

/* Waits for the next frame, copies it into `frame` and gives its buffer back; returns its length. */
static u32 receive(void)
{
    u32 len = 0;
    int head = vq_wait_used(&rxq, &len);
    if (head < 0)
        fail(head);
    unsigned slot = rx_of_head[head];
    const struct net_hdr *hdr = (const struct net_hdr *)rx_bufs[slot];
    CHECK(len >= NET_HDR_LEN + sizeof(struct eth) && len <= sizeof rx_bufs[slot]);
    /* Without offloads every frame comes whole, in one buffer. */
    CHECK(hdr->gso_type == 0 && hdr->num_buffers == 1);
    len -= NET_HDR_LEN;
    memcpy(frame, rx_bufs[slot] + NET_HDR_LEN, len);
    post_rx(slot);
    return len;
}

static void send_bad_chains(void)
{
    struct vq_buf header_only = buf(&tx_hdr, sizeof tx_hdr, false);
    CHECK(transmit(&header_only, 1) == 0);
    struct vq_buf outside[2] = {buf(&tx_hdr, sizeof tx_hdr, false), {.addr = OUTSIDE_RAM, .len = 42}};
    CHECK(transmit(outside, 2) == 0);
}

static void arp_who_has_host(void)
{
    struct eth *eth = (struct eth *)tx_frame;
    struct arp *arp = (struct arp *)(eth + 1);
    memcpy(eth->dst, broadcast, 6);
    memcpy(eth->src, my_mac, 6);
    eth->type = be16(ETH_ARP);
    *arp = (struct arp){.htype = be16(1), .ptype = be16(ETH_IPV4), .hlen = 6, .plen = 4, .op = be16(1)};
    memcpy(arp->sha, my_mac, 6);
    memcpy(arp->spa, my_ip, 4);
    memcpy(arp->tpa, host_ip, 4);
    send_frame(sizeof *eth + sizeof *arp);
}

/* Waits for the host's ARP reply and returns its MAC in `mac`. */
static void await_arp_reply(u8 *mac)
{
    for (int skipped = 0; skipped <= MAX_SKIPPED; skipped++) {
        u32 len = receive();
        const struct eth *eth = (const struct eth *)frame;
        const struct arp *arp = (const struct arp *)(eth + 1);
        if (len < sizeof *eth + sizeof *arp || eth->type != be16(ETH_ARP) || arp->op != be16(2))
            continue;
        CHECK(memcmp(arp->spa, host_ip, 4) == 0);
        CHECK(memcmp(arp->tha, my_mac, 6) == 0 && memcmp(arp->tpa, my_ip, 4) == 0);
        CHECK(memcmp(eth->dst, my_mac, 6) == 0 && memcmp(eth->src, arp->sha, 6) == 0);
        memcpy(mac, arp->sha, 6);
        return;
    }
    print("no ARP reply\n");
    fail(GUEST_CHECK_FAILED);
}

static void ping(const u8 *host_mac)
{
    struct eth *eth = (struct eth *)tx_frame;
    struct ipv4 *ip = (struct ipv4 *)(eth + 1);
    struct icmp *icmp = (struct icmp *)(ip + 1);
    u8 *payload = (u8 *)(icmp + 1);
    memcpy(eth->dst, host_mac, 6);
    memcpy(eth->src, my_mac, 6);
    eth->type = be16(ETH_IPV4);
    *ip = (struct ipv4){.ver_ihl = 0x45, .total_len = be16(sizeof *ip + sizeof *icmp + PING_PAYLOAD), .ttl = 64, .proto = 1};
    memcpy(ip->src, my_ip, 4);
    memcpy(ip->dst, host_ip, 4);
    ip->csum = checksum(ip, sizeof *ip);
    *icmp = (struct icmp){.type = ICMP_ECHO_REQUEST, .id = be16(PING_ID), .seq = be16(1)};
    for (int i = 0; i < PING_PAYLOAD; i++)
        payload[i] = (u8)('a' + i % 26);
    icmp->csum = checksum(icmp, sizeof *icmp + PING_PAYLOAD);
    send_frame(sizeof *eth + sizeof *ip + sizeof *icmp + PING_PAYLOAD);

    for (int skipped = 0; skipped <= MAX_SKIPPED; skipped++) {
        u32 len = receive();
        const struct eth *r_eth = (const struct eth *)frame;
        const struct ipv4 *r_ip = (const struct ipv4 *)(r_eth + 1);
        const struct icmp *r_icmp = (const struct icmp *)(r_ip + 1);
        if (len < sizeof *eth + sizeof *ip + sizeof *icmp || r_eth->type != be16(ETH_IPV4) || r_ip->proto != 1)
            continue;
        CHECK(r_ip->ver_ihl == 0x45); /* Linux sends no IP options */
        CHECK(checksum(r_ip, sizeof *r_ip) == 0);
        u32 ip_len = be16(r_ip->total_len);
        CHECK(ip_len == sizeof *ip + sizeof *icmp + PING_PAYLOAD && sizeof *eth + ip_len <= len);
        CHECK(memcmp(r_ip->src, host_ip, 4) == 0 && memcmp(r_ip->dst, my_ip, 4) == 0);
        CHECK(memcmp(r_eth->src, host_mac, 6) == 0 && memcmp(r_eth->dst, my_mac, 6) == 0);
        CHECK(checksum(r_icmp, ip_len - sizeof *ip) == 0);
        CHECK(r_icmp->type == ICMP_ECHO_REPLY && r_icmp->code == 0);
        CHECK(r_icmp->id == be16(PING_ID) && r_icmp->seq == be16(1));
        CHECK(memcmp(r_icmp + 1, payload, PING_PAYLOAD) == 0);
        print("pong seq=1 ttl=");
        print_dec(r_ip->ttl);
        print("\n");
        return;
    }
    print("no echo reply\n");
    fail(GUEST_CHECK_FAILED);
}

int main(u64 arg)
{
    const struct params *p = (const struct params *)(uintptr_t)arg;
    int r = virtio_init(&dev, (uintptr_t)p->base, VIRTIO_ID_NET, F_MAC | F_STATUS);
    if (r < 0)
        return r;
    CHECK(dev.features & F_MAC);
    virtio_config_read_bytes(&dev, 0, my_mac, 6);
    print("mac=");
    print_mac(my_mac);
    print("\n");
    bool link_up = !(dev.features & F_STATUS) || (virtio_config_read(&dev, CONFIG_STATUS, 2) & S_LINK_UP);
    print(link_up ? "link=up\n" : "link=down\n");
    if ((r = vq_setup(&dev, 0, &rxq, 16)) < 0 || (r = vq_setup(&dev, 1, &txq, 8)) < 0)
        return r;
    virtio_driver_ok(&dev);

    for (unsigned slot = 0; slot < RX_BUFS; slot++)
        post_rx(slot);
    if (p->bad_tx)
        send_bad_chains();

    u8 host_mac[6];
    arp_who_has_host();
    if (!link_up)
        return 0;
    await_arp_reply(host_mac);
    print("arp 10.0.2.1 is-at ");
    print_mac(host_mac);
    print("\n");
    ping(host_mac);
    return 0;
}
