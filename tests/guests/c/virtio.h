/* Minimal polling driver library for virtio-mmio version 2 ("modern") devices with split
 * virtqueues, after the virtio 1.x specification (sections 2, 3.1 and 4.2).
 *
 * Usage: virtio_init(), vq_setup() per queue, virtio_driver_ok(), vq_submit() / vq_wait_used().
 * Rings live in caller-provided struct virtq objects (normally static, in .bss); guest physical
 * addresses equal virtual ones, so buffer addresses are plain pointers cast to u64.
 */
#ifndef VIRTIO_H
#define VIRTIO_H

#include "guest.h"

/* MMIO register offsets */
#define VIRTIO_MMIO_MAGIC_VALUE 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC 0x74726976 /* "virt" */
#define VIRTIO_MMIO_MODERN 2

/* Device status bits */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_DEVICE_NEEDS_RESET 64
#define VIRTIO_STATUS_FAILED 128

/* Device IDs */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_VSOCK 19

#define VIRTIO_F_VERSION_1 (1ull << 32)

/* InterruptStatus bits */
#define VIRTIO_INT_USED_BUFFER 1
#define VIRTIO_INT_CONFIG_CHANGE 2

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

/* Errors (negative return values) */
#define VIRTIO_ERR_MAGIC (-1)     /* no virtio-mmio device: wrong MagicValue */
#define VIRTIO_ERR_VERSION (-2)   /* not a version 2 (modern) transport */
#define VIRTIO_ERR_NO_DEVICE (-3) /* DeviceID 0: an empty slot */
#define VIRTIO_ERR_DEVICE_ID (-4) /* another kind of device than asked for */
#define VIRTIO_ERR_FEATURES (-5)  /* no VIRTIO_F_VERSION_1, or FEATURES_OK refused */
#define VIRTIO_ERR_QUEUE (-6)     /* queue missing, in use, or the size does not fit */
#define VIRTIO_ERR_FULL (-7)      /* not enough free descriptors */
#define VIRTIO_ERR_TIMEOUT (-8)   /* the device did not answer in time */
#define VIRTIO_ERR_USED (-9)      /* the device returned a bad descriptor id */

/* Queue size limit of struct virtq; the size in use is chosen by vq_setup(). */
#define VIRTQ_MAX_SIZE 64
/* How long vq_wait_used() and the reset in virtio_init() wait for the device, in TSC ticks
 * (2-8 s at common TSC rates). */
#define VIRTIO_DEFAULT_TIMEOUT_TSC 8000000000ull

struct virtio_dev {
    uintptr_t base;
    u32 device_id;
    u64 features; /* negotiated */
};

struct virtq_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct virtq_used_elem {
    u32 id;
    u32 len;
};

struct virtq {
    /* Device-visible rings, aligned as the spec requires (16, 2, 4 bytes). */
    struct virtq_desc desc[VIRTQ_MAX_SIZE] __attribute__((aligned(16)));
    struct {
        u16 flags;
        u16 idx;
        u16 ring[VIRTQ_MAX_SIZE];
        u16 used_event;
    } avail __attribute__((aligned(2)));
    struct {
        u16 flags;
        u16 idx;
        struct virtq_used_elem ring[VIRTQ_MAX_SIZE];
        u16 avail_event;
    } used __attribute__((aligned(4)));
    /* Driver state */
    struct virtio_dev *dev;
    u16 index;
    u16 size;
    u16 free_head; /* free descriptors are chained through desc[].next */
    u16 num_free;
    u16 next_avail;
    u16 last_used;
    u64 timeout_tsc; /* per vq_wait_used(); VIRTIO_DEFAULT_TIMEOUT_TSC after vq_setup() */
};

struct vq_buf {
    u64 addr;
    u32 len;
    bool writable; /* the device writes it (VIRTQ_DESC_F_WRITE) */
};

static inline u32 virtio_read(const struct virtio_dev *dev, u32 reg) { return mmio_read32(dev->base + reg); }
static inline void virtio_write(const struct virtio_dev *dev, u32 reg, u32 value)
{
    mmio_write32(dev->base + reg, value);
}

/* The DeviceID of the virtio-mmio version 2 device at `base`, or a VIRTIO_ERR_*. */
int virtio_probe(uintptr_t base);
/* Resets the device and negotiates features: VIRTIO_F_VERSION_1 plus whatever of `wanted` the
 * device offers (stored in dev->features). Returns 0 or a VIRTIO_ERR_*; on failure after the
 * probe the device is marked FAILED. */
int virtio_init(struct virtio_dev *dev, uintptr_t base, u32 device_id, u64 wanted);
/* Sets up queue `index` with `size` (a power of two, at most QueueNumMax and VIRTQ_MAX_SIZE)
 * entries in `vq`. Returns 0 or VIRTIO_ERR_QUEUE. */
int vq_setup(struct virtio_dev *dev, u16 index, struct virtq *vq, u16 size);
/* Tells the device the driver is ready (DRIVER_OK). */
void virtio_driver_ok(struct virtio_dev *dev);
/* Marks the device FAILED. */
void virtio_set_failed(struct virtio_dev *dev);
/* Puts `bufs` in one descriptor chain, makes it available and notifies the device. Returns the
 * chain's head descriptor id or VIRTIO_ERR_FULL. */
int vq_submit(struct virtq *vq, const struct vq_buf *bufs, unsigned n);
/* Waits for the next used chain, frees its descriptors and returns its head id, with the bytes
 * the device wrote in *len (if len is not NULL); VIRTIO_ERR_TIMEOUT or VIRTIO_ERR_USED on error. */
int vq_wait_used(struct virtq *vq, u32 *len);
/* A device config field of `width` 1, 2, 4 or 8 bytes at `offset`, read consistently (retried
 * while ConfigGeneration changes). */
u64 virtio_config_read(const struct virtio_dev *dev, u32 offset, unsigned width);
/* `n` bytes of device config from `offset`, byte by byte, read consistently. */
void virtio_config_read_bytes(const struct virtio_dev *dev, u32 offset, void *buf, size_t n);
u32 virtio_irq_status(const struct virtio_dev *dev);
void virtio_irq_ack(const struct virtio_dev *dev, u32 bits);

/* virtio-vsock: the header in front of every packet, and its operations (stream sockets). */
struct vsock_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));
#define VSOCK_HDR_LEN 44
_Static_assert(sizeof(struct vsock_hdr) == VSOCK_HDR_LEN, "virtio_vsock_hdr");
enum {
    VSOCK_OP_REQUEST = 1,
    VSOCK_OP_RESPONSE,
    VSOCK_OP_RST,
    VSOCK_OP_SHUTDOWN,
    VSOCK_OP_RW,
    VSOCK_OP_CREDIT_UPDATE,
    VSOCK_OP_CREDIT_REQUEST,
};

#endif /* VIRTIO_H */
