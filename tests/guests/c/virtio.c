/* virtio-mmio version 2 transport and split virtqueues; see virtio.h. */
#include "virtio.h"

/* A device that keeps changing its config is broken; stop then. */
#define CONFIG_RETRIES 1000

int virtio_probe(uintptr_t base)
{
    if (mmio_read32(base + VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC)
        return VIRTIO_ERR_MAGIC;
    if (mmio_read32(base + VIRTIO_MMIO_VERSION) != VIRTIO_MMIO_MODERN)
        return VIRTIO_ERR_VERSION;
    u32 id = mmio_read32(base + VIRTIO_MMIO_DEVICE_ID);
    return id ? (int)id : VIRTIO_ERR_NO_DEVICE;
}

static void set_status(struct virtio_dev *dev, u32 bits)
{
    virtio_write(dev, VIRTIO_MMIO_STATUS, virtio_read(dev, VIRTIO_MMIO_STATUS) | bits);
}

void virtio_set_failed(struct virtio_dev *dev) { set_status(dev, VIRTIO_STATUS_FAILED); }

void virtio_driver_ok(struct virtio_dev *dev) { set_status(dev, VIRTIO_STATUS_DRIVER_OK); }

int virtio_init(struct virtio_dev *dev, uintptr_t base, u32 device_id, u64 wanted)
{
    int id = virtio_probe(base);
    if (id < 0)
        return id;
    if ((u32)id != device_id)
        return VIRTIO_ERR_DEVICE_ID;
    dev->base = base;
    dev->device_id = device_id;
    dev->features = 0;

    /* Reset, and wait until the device shows it is done. */
    virtio_write(dev, VIRTIO_MMIO_STATUS, 0);
    for (u64 start = rdtsc(); virtio_read(dev, VIRTIO_MMIO_STATUS) != 0;) {
        if (rdtsc() - start > VIRTIO_DEFAULT_TIMEOUT_TSC)
            return VIRTIO_ERR_TIMEOUT;
        cpu_relax();
    }
    set_status(dev, VIRTIO_STATUS_ACKNOWLEDGE);
    set_status(dev, VIRTIO_STATUS_DRIVER);

    u64 offered = 0;
    for (u32 sel = 0; sel < 2; sel++) {
        virtio_write(dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
        offered |= (u64)virtio_read(dev, VIRTIO_MMIO_DEVICE_FEATURES) << (32 * sel);
    }
    /* Without VERSION_1 it is a legacy device, which this driver does not speak. */
    if (!(offered & VIRTIO_F_VERSION_1))
        goto failed;
    u64 features = offered & (wanted | VIRTIO_F_VERSION_1);
    for (u32 sel = 0; sel < 2; sel++) {
        virtio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
        virtio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(features >> (32 * sel)));
    }
    set_status(dev, VIRTIO_STATUS_FEATURES_OK);
    /* The device clears FEATURES_OK again if it cannot work with this subset. */
    if (!(virtio_read(dev, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK))
        goto failed;
    dev->features = features;
    return 0;

failed:
    virtio_set_failed(dev);
    return VIRTIO_ERR_FEATURES;
}

static void write_addr(struct virtio_dev *dev, u32 low_reg, const void *p)
{
    u64 addr = (u64)(uintptr_t)p;
    virtio_write(dev, low_reg, (u32)addr);
    virtio_write(dev, low_reg + 4, (u32)(addr >> 32));
}

int vq_setup(struct virtio_dev *dev, u16 index, struct virtq *vq, u16 size)
{
    virtio_write(dev, VIRTIO_MMIO_QUEUE_SEL, index);
    if (virtio_read(dev, VIRTIO_MMIO_QUEUE_READY) != 0)
        return VIRTIO_ERR_QUEUE;
    u32 max = virtio_read(dev, VIRTIO_MMIO_QUEUE_NUM_MAX);
    /* Ring positions are free-running u16 counters taken modulo the size: a power of two. */
    if (size == 0 || (size & (size - 1)) || size > max || size > VIRTQ_MAX_SIZE)
        return VIRTIO_ERR_QUEUE;

    memset(vq, 0, sizeof *vq);
    vq->dev = dev;
    vq->index = index;
    vq->size = size;
    vq->num_free = size;
    vq->timeout_tsc = VIRTIO_DEFAULT_TIMEOUT_TSC;
    for (u16 i = 0; i + 1 < size; i++)
        vq->desc[i].next = (u16)(i + 1);

    virtio_write(dev, VIRTIO_MMIO_QUEUE_NUM, size);
    write_addr(dev, VIRTIO_MMIO_QUEUE_DESC_LOW, vq->desc);
    write_addr(dev, VIRTIO_MMIO_QUEUE_DRIVER_LOW, &vq->avail);
    write_addr(dev, VIRTIO_MMIO_QUEUE_DEVICE_LOW, &vq->used);
    /* The zeroed rings must be in memory before the device may look at them. */
    mb();
    virtio_write(dev, VIRTIO_MMIO_QUEUE_READY, 1);
    return 0;
}

int vq_submit(struct virtq *vq, const struct vq_buf *bufs, unsigned n)
{
    if (n == 0 || n > vq->num_free)
        return VIRTIO_ERR_FULL;
    /* Take the first n free descriptors: the free list's links already form the chain. */
    u16 head = vq->free_head, id = head;
    for (unsigned i = 0; i < n; i++) {
        struct virtq_desc *d = &vq->desc[id];
        d->addr = bufs[i].addr;
        d->len = bufs[i].len;
        d->flags = (u16)((bufs[i].writable ? VIRTQ_DESC_F_WRITE : 0) | (i + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
        if (i + 1 < n)
            id = d->next;
    }
    vq->free_head = vq->desc[id].next;
    vq->num_free = (u16)(vq->num_free - n);

    vq->avail.ring[vq->next_avail & (vq->size - 1)] = head;
    /* The descriptors and the ring entry must be visible before the index that publishes them. */
    wmb();
    vq->next_avail++;
    WRITE_ONCE(vq->avail.idx, vq->next_avail);
    /* ... and the index before the device is told to look. */
    mb();
    virtio_write(vq->dev, VIRTIO_MMIO_QUEUE_NOTIFY, vq->index);
    return head;
}

int vq_wait_used(struct virtq *vq, u32 *len)
{
    for (u64 start = rdtsc(); READ_ONCE(vq->used.idx) == vq->last_used;) {
        if (rdtsc() - start > vq->timeout_tsc)
            return VIRTIO_ERR_TIMEOUT;
        cpu_relax();
    }
    /* Read the element only after seeing the index that covers it. */
    rmb();
    struct virtq_used_elem elem = vq->used.ring[vq->last_used & (vq->size - 1)];
    vq->last_used++;
    if (elem.id >= vq->size)
        return VIRTIO_ERR_USED;

    u16 last = (u16)elem.id, count = 1;
    while (vq->desc[last].flags & VIRTQ_DESC_F_NEXT) {
        last = vq->desc[last].next;
        count++;
    }
    vq->desc[last].next = vq->free_head;
    vq->free_head = (u16)elem.id;
    vq->num_free = (u16)(vq->num_free + count);
    if (len)
        *len = elem.len;
    return (int)elem.id;
}

/* The MMIO transport wants 8- and 16-bit accesses for fields of that width and 32-bit ones for
 * 32- and 64-bit fields. */
static u64 config_field(const struct virtio_dev *dev, u32 offset, unsigned width)
{
    uintptr_t addr = dev->base + VIRTIO_MMIO_CONFIG + offset;
    switch (width) {
    case 1:
        return mmio_read8(addr);
    case 2:
        return mmio_read16(addr);
    case 4:
        return mmio_read32(addr);
    default:
        return mmio_read32(addr) | (u64)mmio_read32(addr + 4) << 32;
    }
}

static _Noreturn void config_unstable(void)
{
    print("virtio: device config never stable\n");
    fail(VIRTIO_ERR_TIMEOUT);
}

u64 virtio_config_read(const struct virtio_dev *dev, u32 offset, unsigned width)
{
    for (int i = 0; i < CONFIG_RETRIES; i++) {
        u32 generation = virtio_read(dev, VIRTIO_MMIO_CONFIG_GENERATION);
        u64 value = config_field(dev, offset, width);
        if (virtio_read(dev, VIRTIO_MMIO_CONFIG_GENERATION) == generation)
            return value;
    }
    config_unstable();
}

void virtio_config_read_bytes(const struct virtio_dev *dev, u32 offset, void *buf, size_t n)
{
    u8 *out = buf;
    for (int i = 0; i < CONFIG_RETRIES; i++) {
        u32 generation = virtio_read(dev, VIRTIO_MMIO_CONFIG_GENERATION);
        for (size_t j = 0; j < n; j++)
            out[j] = (u8)config_field(dev, offset + (u32)j, 1);
        if (virtio_read(dev, VIRTIO_MMIO_CONFIG_GENERATION) == generation)
            return;
    }
    config_unstable();
}

u32 virtio_irq_status(const struct virtio_dev *dev) { return virtio_read(dev, VIRTIO_MMIO_INTERRUPT_STATUS); }

void virtio_irq_ack(const struct virtio_dev *dev, u32 bits) { virtio_write(dev, VIRTIO_MMIO_INTERRUPT_ACK, bits); }
