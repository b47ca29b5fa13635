/* virtio library walk-through, C guest (guest.h conventions), for a scripted device: arg = MMIO base of a virtio-rng-like device with queue 0 (QueueNumMax >= 4, no queue 1) that answers each chain by writing its readable bytes reversed into its writable buffers. Negotiates (bits 0 and 5 wanted), prints "features=<hex>\n" and "config=<u64> <u32 at 8> <u16 at 12> <u8 at 14> <6 chars at 16>\n" (numbers in hex), runs 5 rounds of a 3-descriptor chain ("ping<round>!" -> 4 + 4 writable bytes preset to 0xee) plus a 1-byte writable chain on a 4-entry queue, and returns the 31-hash of every writable byte & 0x7fffffff, or the first VIRTIO_ERR_* met. */
#include "virtio.h"

#define ROUNDS 5

static struct virtio_dev dev;
static struct virtq vq;
static u8 request[6], response[2][4], lone[1];

static struct vq_buf buf(const void *p, u32 len, bool writable)
{
    return (struct vq_buf){.addr = (u64)(uintptr_t)p, .len = len, .writable = writable};
}

int main(u64 arg)
{
    int r = virtio_init(&dev, (uintptr_t)arg, VIRTIO_ID_RNG, 1ull << 0 | 1ull << 5);
    if (r < 0)
        return r;
    print("features=");
    print_hex(dev.features);
    print("\n");

    CHECK(vq_setup(&dev, 1, &vq, 4) == VIRTIO_ERR_QUEUE);  /* no such queue */
    CHECK(vq_setup(&dev, 0, &vq, 3) == VIRTIO_ERR_QUEUE);  /* not a power of two */
    CHECK(vq_setup(&dev, 0, &vq, 64) == VIRTIO_ERR_QUEUE); /* above QueueNumMax */
    r = vq_setup(&dev, 0, &vq, 4);
    if (r < 0)
        return r;
    CHECK(vq_setup(&dev, 0, &vq, 4) == VIRTIO_ERR_QUEUE); /* already live */
    /* The scripted device answers at once; a short bound keeps the no-answer case quick. */
    vq.timeout_tsc = 50000000;

    u64 first_field = virtio_config_read(&dev, 0, 8);
    char name[7] = {0};
    virtio_config_read_bytes(&dev, 16, name, 6);
    print("config=");
    print_hex(first_field);
    print(" ");
    print_hex(virtio_config_read(&dev, 8, 4));
    print(" ");
    print_hex(virtio_config_read(&dev, 12, 2));
    print(" ");
    print_hex(virtio_config_read(&dev, 14, 1));
    print(" ");
    print(name);
    print("\n");
    virtio_driver_ok(&dev);

    u32 hash = 0;
    for (int round = 0; round < ROUNDS; round++) {
        memcpy(request, "ping?!", 6);
        request[4] = (u8)('0' + round);
        memset(response, 0xee, sizeof response);
        memset(lone, 0xee, sizeof lone);

        struct vq_buf chain[3] = {
            buf(request, 6, false),
            buf(response[0], 4, true),
            buf(response[1], 4, true),
        };
        int first = vq_submit(&vq, chain, 3);
        CHECK(first >= 0);
        CHECK(vq_submit(&vq, chain, 2) == VIRTIO_ERR_FULL);
        struct vq_buf single = buf(lone, 1, true);
        int second = vq_submit(&vq, &single, 1);
        CHECK(second >= 0 && second != first);
        CHECK(vq_submit(&vq, &single, 1) == VIRTIO_ERR_FULL);

        u32 len = 0;
        r = vq_wait_used(&vq, &len);
        if (r < 0)
            return r;
        CHECK(r == first && len == 6);
        r = vq_wait_used(&vq, &len);
        if (r < 0)
            return r;
        CHECK(r == second && len == 0);
        CHECK(vq.num_free == 4);

        CHECK(virtio_irq_status(&dev) & VIRTIO_INT_USED_BUFFER);
        virtio_irq_ack(&dev, VIRTIO_INT_USED_BUFFER);

        for (unsigned i = 0; i < sizeof response; i++)
            hash = hash * 31 + ((u8 *)response)[i];
        hash = hash * 31 + lone[0];
    }
    return (int)(hash & 0x7fffffff);
}
