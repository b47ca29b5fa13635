/* virtio-net transmit benchmark driver, C guest (tests/guests/c/guest.h conventions): arg = guest address of a struct net_plan (net_jobs.h). Sets up the transmit queue only (nothing is received), then runs job j as phase j (bench.h marks): `count` sends of the job's frame behind a zeroed virtio-net header, `depth` chains in flight, each used one reclaimed and followed by the next. Returns the number of jobs run; fails with ERR_PLAN or a VIRTIO_ERR_*. */
#include "bench.h"
#include "net_jobs.h"

#define TX_QUEUE 1
#define QUEUE_SIZE 64
#define ERR_PLAN 0x100 /* a job the plan cannot hold */

static struct virtio_dev dev;
static struct virtq txq;
/* The header (zero: no offloads asked for) and the frame in one buffer, so that a chain is one
 * descriptor; every chain in flight points at it, as the device only reads. */
static u8 packet[NET_HDR_LEN + NET_MAX_FRAME];

static void submit(const struct vq_buf *b)
{
    int head = vq_submit(&txq, b, 1);
    if (head < 0)
        fail(head);
}

static void run(const struct net_job *job)
{
    struct vq_buf b = bench_buf(packet, NET_HDR_LEN + job->frame_len, false);
    u64 submitted = 0;
    for (; submitted < job->depth && submitted < job->count; submitted++)
        submit(&b);
    for (u64 done = 0; done < job->count; done++) {
        bench_wait_used(&txq);
        bench_take_used(&txq, NULL);
        if (submitted < job->count) {
            submit(&b);
            submitted++;
        }
    }
}

int main(u64 arg)
{
    const struct net_plan *plan = (const struct net_plan *)(uintptr_t)arg;
    if (plan->job_count > NET_MAX_JOBS)
        return ERR_PLAN;
    for (u32 j = 0; j < plan->job_count; j++) {
        const struct net_job *job = &plan->jobs[j];
        if (job->frame_len < NET_MIN_FRAME || job->frame_len > NET_MAX_FRAME || job->depth == 0 ||
            job->depth > QUEUE_SIZE || job->count == 0)
            return ERR_PLAN;
    }
    /* No features: the header stays zero and frames go out as they are. */
    int r = virtio_init(&dev, (uintptr_t)plan->device, VIRTIO_ID_NET, 0);
    if (r < 0 || (r = vq_setup(&dev, TX_QUEUE, &txq, QUEUE_SIZE)) < 0)
        return r;
    virtio_driver_ok(&dev);

    for (u32 j = 0; j < plan->job_count; j++) {
        const struct net_job *job = &plan->jobs[j];
        net_fill_frame(packet + NET_HDR_LEN, job->frame_len, j);
        bench_phase_start(j);
        run(job);
        bench_phase_end(j);
    }
    return (int)plan->job_count;
}
