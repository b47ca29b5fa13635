/* virtio-blk benchmark driver, C guest (tests/guests/c/guest.h conventions): arg = guest address of a struct blk_plan (blk_jobs.h). Sets up both disks with one 64-entry queue each, touches its buffers, then runs job j as phase j (bench.h marks) and returns the number of jobs run; fails with the code of the first error. */
#include "bench.h"
#include "blk_jobs.h"
#include "virtio.h"

#define QUEUE_SIZE 64
#define VIRTIO_BLK_F_FLUSH (1ull << 9)
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_S_OK 0
#define SECTOR_SIZE 512

/* Exit codes beside the VIRTIO_ERR_* ones. */
#define ERR_PLAN 0x100   /* a job the plan cannot hold, or disks of different sizes */
#define ERR_STATUS 0x101 /* the device failed a request */
#define ERR_DATA 0x102   /* a read brought back the wrong blocks */

struct blk_header {
    u32 type;
    u32 reserved;
    u64 sector;
};

/* One request in flight: its header and status live here, its data in the plan's buffers. */
struct slot {
    struct blk_header header;
    u64 offset;
    u8 *data;
    u8 status;
};

struct disk {
    struct virtio_dev dev;
    struct virtq vq;
    u64 bytes;
};

static struct disk disks[2]; /* BLK_READ, BLK_WRITE */
static struct slot slots[BLK_MAX_DEPTH];
static u8 slot_of_head[QUEUE_SIZE];

static int disk_init(struct disk *d, u64 base)
{
    int r = virtio_init(&d->dev, (uintptr_t)base, VIRTIO_ID_BLOCK, VIRTIO_BLK_F_FLUSH);
    if (r < 0)
        return r;
    /* Without FLUSH the device makes every write durable before completing it; the host
     * baseline does not sync either. */
    if (!(d->dev.features & VIRTIO_BLK_F_FLUSH))
        return VIRTIO_ERR_FEATURES;
    d->bytes = virtio_config_read(&d->dev, 0, 8) * SECTOR_SIZE;
    r = vq_setup(&d->dev, 0, &d->vq, QUEUE_SIZE);
    if (r < 0)
        return r;
    virtio_driver_ok(&d->dev);
    return 0;
}

static void submit(struct virtq *vq, const struct blk_job *job, unsigned index, u64 offset)
{
    struct slot *s = &slots[index];
    bool read = job->op == BLK_READ;
    s->header.type = read ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT;
    s->header.sector = offset / SECTOR_SIZE;
    s->offset = offset;
    s->status = 0xff;
    struct vq_buf chain[3] = {
        bench_buf(&s->header, sizeof s->header, false),
        bench_buf(s->data, job->block_size, read),
        bench_buf(&s->status, 1, true),
    };
    int head = vq_submit(vq, chain, 3);
    if (head < 0)
        fail(head);
    slot_of_head[head] = (u8)index;
}

static struct slot *wait_completion(struct virtq *vq, const struct blk_job *job)
{
    bench_wait_used(vq);
    unsigned head = bench_take_used(vq, NULL);
    struct slot *s = &slots[slot_of_head[head]];
    if (s->status != VIRTIO_BLK_S_OK)
        fail(ERR_STATUS);
    if (job->op == BLK_READ && !blk_stamped(s->data, job->block_size, s->offset))
        fail(ERR_DATA);
    return s;
}

/* Keeps job->depth requests in flight: each completion is followed by the next submission. */
static void run(const struct blk_job *job)
{
    struct disk *d = &disks[job->op];
    u64 state = job->seed, submitted = 0;
    for (unsigned i = 0; i < job->depth && submitted < job->count; i++, submitted++)
        submit(&d->vq, job, i, blk_offset(job, submitted, &state, d->bytes));
    for (u64 done = 0; done < job->count; done++) {
        struct slot *s = wait_completion(&d->vq, job);
        if (submitted < job->count) {
            submit(&d->vq, job, (unsigned)(s - slots), blk_offset(job, submitted, &state, d->bytes));
            submitted++;
        }
    }
}

int main(u64 arg)
{
    const struct blk_plan *plan = (const struct blk_plan *)(uintptr_t)arg;
    int r = disk_init(&disks[BLK_READ], plan->read_disk);
    if (r == 0)
        r = disk_init(&disks[BLK_WRITE], plan->write_disk);
    if (r < 0)
        return r;
    if (disks[BLK_READ].bytes != disks[BLK_WRITE].bytes || plan->job_count > BLK_MAX_JOBS)
        return ERR_PLAN;

    u32 largest = 0;
    for (u32 j = 0; j < plan->job_count; j++) {
        const struct blk_job *job = &plan->jobs[j];
        if (job->op > BLK_WRITE || job->depth == 0 || job->depth > BLK_MAX_DEPTH || job->depth * 3 > QUEUE_SIZE ||
            job->block_size == 0 || job->block_size % BLK_STAMP_STRIDE || disks[0].bytes % job->block_size ||
            job->seed == 0)
            return ERR_PLAN;
        if (job->block_size > largest)
            largest = job->block_size;
    }
    u8 *buffers = (u8 *)(uintptr_t)plan->buffers;
    bench_touch(buffers, (u64)largest * BLK_MAX_DEPTH);

    for (u32 j = 0; j < plan->job_count; j++) {
        const struct blk_job *job = &plan->jobs[j];
        for (unsigned i = 0; i < BLK_MAX_DEPTH; i++)
            slots[i].data = buffers + (u64)i * job->block_size;
        bench_phase_start(j);
        run(job);
        bench_phase_end(j);
    }
    return (int)plan->job_count;
}
