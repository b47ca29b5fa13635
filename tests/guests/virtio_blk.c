/* virtio-blk driver, C guest (guest.h conventions): arg = address of a struct params (below, filled by the test). Negotiates RO, SEG_MAX, BLK_SIZE and FLUSH as offered (FLUSH must be), reads the config, sets up queue 0 (16 entries), then runs each request in turn as one chain: its 16-byte header, its data buffers, a status byte; records what the device answered in the request. FLAG_DRIVER_OK_EARLY first sets DRIVER_OK without FEATURES_OK and resets; FLAG_NOTIFY_EARLY notifies queue 0 before setting it up. Prints "capacity=<n>\n" and "request <i>: status=<s> len=<n>\n" each; returns 0, or the first VIRTIO_ERR_* met. */
#include "virtio.h"

#define BLK_F_SEG_MAX (1ull << 2)
#define BLK_F_RO (1ull << 5)
#define BLK_F_BLK_SIZE (1ull << 6)
#define BLK_F_FLUSH (1ull << 9)

#define BLK_CONFIG_CAPACITY 0
#define BLK_CONFIG_SEG_MAX 12
#define BLK_CONFIG_BLK_SIZE 20

#define FLAG_DRIVER_OK_EARLY 1
#define FLAG_NOTIFY_EARLY 2

#define MAX_REQUESTS 16
#define MAX_DATA 4
/* What a status byte reads when the device did not write it. */
#define NO_STATUS 0xff

struct data_buf {
    u64 addr;
    u32 len;
    u32 writable;
};

struct request {
    /* from the test */
    u32 type;
    u32 ndata;
    u64 sector;
    struct data_buf data[MAX_DATA];
    /* from the guest */
    u32 used_len;
    u32 status;
};

struct params {
    /* from the test */
    u64 base;
    u32 flags;
    u32 nrequests;
    /* from the guest */
    u64 offered;
    u64 features;
    u64 capacity;
    u32 seg_max;
    u32 blk_size;
    u32 broken_status; /* FLAG_DRIVER_OK_EARLY: Status and InterruptStatus after that DRIVER_OK */
    u32 broken_isr;
    u32 reset_status; /* ... and Status right after the reset that follows */
    u32 final_status; /* Status after the last request */
    struct request requests[MAX_REQUESTS];
};

/* The test packs these with Python's struct module. */
_Static_assert(sizeof(struct request) == 88, "request layout");
_Static_assert(__builtin_offsetof(struct params, requests) == 64, "params layout");

struct blk_header {
    u32 type;
    u32 reserved;
    u64 sector;
};

static struct virtio_dev dev;
static struct virtq vq;
static struct blk_header header;
static u8 status;

static void driver_ok_without_features_ok(struct params *p)
{
    uintptr_t status_reg = (uintptr_t)p->base + VIRTIO_MMIO_STATUS;
    mmio_write32(status_reg, 0);
    mmio_write32(status_reg, VIRTIO_STATUS_ACKNOWLEDGE);
    mmio_write32(status_reg, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    mmio_write32(status_reg, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_DRIVER_OK);
    p->broken_status = mmio_read32(status_reg);
    p->broken_isr = mmio_read32((uintptr_t)p->base + VIRTIO_MMIO_INTERRUPT_STATUS);
    mmio_write32(status_reg, 0);
    p->reset_status = mmio_read32(status_reg);
}

static u64 offered_features(void)
{
    u64 features = 0;
    for (u32 sel = 0; sel < 2; sel++) {
        virtio_write(&dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
        features |= (u64)virtio_read(&dev, VIRTIO_MMIO_DEVICE_FEATURES) << (32 * sel);
    }
    return features;
}

static int run_request(struct request *rq)
{
    struct vq_buf bufs[MAX_DATA + 2];
    unsigned n = 0;
    CHECK(rq->ndata <= MAX_DATA);

    header = (struct blk_header){.type = rq->type, .sector = rq->sector};
    status = NO_STATUS;
    bufs[n++] = (struct vq_buf){.addr = (u64)(uintptr_t)&header, .len = sizeof header};
    for (u32 i = 0; i < rq->ndata; i++)
        bufs[n++] = (struct vq_buf){.addr = rq->data[i].addr, .len = rq->data[i].len, .writable = rq->data[i].writable};
    bufs[n++] = (struct vq_buf){.addr = (u64)(uintptr_t)&status, .len = 1, .writable = true};

    int r = vq_submit(&vq, bufs, n);
    if (r < 0)
        return r;
    u32 len;
    r = vq_wait_used(&vq, &len);
    if (r < 0)
        return r;
    rq->used_len = len;
    rq->status = READ_ONCE(status);
    return 0;
}

int main(u64 arg)
{
    struct params *p = (struct params *)(uintptr_t)arg;
    CHECK(p->nrequests <= MAX_REQUESTS);

    if (p->flags & FLAG_DRIVER_OK_EARLY)
        driver_ok_without_features_ok(p);

    int r = virtio_init(&dev, (uintptr_t)p->base, VIRTIO_ID_BLOCK,
                        BLK_F_RO | BLK_F_SEG_MAX | BLK_F_BLK_SIZE | BLK_F_FLUSH);
    if (r < 0)
        return r;
    p->offered = offered_features();
    p->features = dev.features;
    /* Without FLUSH a driver cannot know when its writes are durable. */
    CHECK(p->features & BLK_F_FLUSH);
    p->capacity = virtio_config_read(&dev, BLK_CONFIG_CAPACITY, 8);
    p->seg_max = (u32)virtio_config_read(&dev, BLK_CONFIG_SEG_MAX, 4);
    p->blk_size = (u32)virtio_config_read(&dev, BLK_CONFIG_BLK_SIZE, 4);
    print("capacity=");
    print_dec(p->capacity);
    print("\n");

    if (p->flags & FLAG_NOTIFY_EARLY)
        virtio_write(&dev, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    r = vq_setup(&dev, 0, &vq, 16);
    if (r < 0)
        return r;
    virtio_driver_ok(&dev);

    for (u32 i = 0; i < p->nrequests; i++) {
        r = run_request(&p->requests[i]);
        if (r < 0)
            return r;
        print("request ");
        print_dec(i);
        print(": status=");
        print_dec(p->requests[i].status);
        print(" len=");
        print_dec(p->requests[i].used_len);
        print("\n");
    }
    p->final_status = virtio_read(&dev, VIRTIO_MMIO_STATUS);
    return 0;
}
