/* virtio-rng driver, C guest (guest.h conventions): arg = address of a struct params (below, filled by the test). Sets up queue 0 (8 entries) and makes `requests` requests of `length` bytes, each a chain of two writable halves, filling buffer .. buffer + requests * length in order; records per request the used length, InterruptStatus once it is used (waiting a bounded time for it to show) and InterruptStatus after acknowledging that. With FLAG_INTERRUPTS it instead takes the device's interrupt: IDT gate IRQ_VECTOR, local APIC enabled, IOAPIC pin `gsi` routed to it (edge, vCPU 0), 8259 PICs masked, and waits for each request with sti; hlt; the handler reads and acknowledges InterruptStatus. Returns 0, or the first VIRTIO_ERR_* met. */
#include "virtio.h"

#define FLAG_INTERRUPTS 1
#define MAX_REQUESTS 8

#define IRQ_VECTOR 0x40
#define LAPIC_BASE 0xfee00000
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_SVR_ENABLE 0x100
#define IOAPIC_BASE 0xfec00000
#define IOAPIC_REGSEL 0x00
#define IOAPIC_WINDOW 0x10
#define IOAPIC_REDIRECTION(pin) (0x10 + 2 * (pin))

struct params {
    /* from the test */
    u64 base;
    u64 buffer;
    u32 requests;
    u32 length; /* even */
    u32 flags;
    u32 gsi;
    /* from the guest */
    u32 used_len[MAX_REQUESTS];
    u32 isr[MAX_REQUESTS];
    u32 isr_acked[MAX_REQUESTS];
    u32 interrupts; /* handler runs */
};

/* The test packs these with Python's struct module. */
_Static_assert(__builtin_offsetof(struct params, interrupts) == 128, "params layout");

struct idt_gate {
    u16 offset_low;
    u16 selector;
    u8 ist;
    u8 type; /* present, DPL 0, 64-bit interrupt gate: 0x8e */
    u16 offset_mid;
    u32 offset_high;
    u32 reserved;
};

static struct virtio_dev dev;
static struct virtq vq;
static struct idt_gate idt[IRQ_VECTOR + 1] __attribute__((aligned(16)));
static volatile u32 handled, handler_isr;

struct interrupt_frame;

__attribute__((interrupt)) static void on_interrupt(struct interrupt_frame *frame)
{
    (void)frame;
    u32 isr = virtio_irq_status(&dev);
    virtio_irq_ack(&dev, isr);
    handler_isr = isr;
    handled = handled + 1;
    mmio_write32(LAPIC_BASE + LAPIC_EOI, 0);
}

static void ioapic_write(u32 reg, u32 value)
{
    mmio_write32(IOAPIC_BASE + IOAPIC_REGSEL, reg);
    mmio_write32(IOAPIC_BASE + IOAPIC_WINDOW, value);
}

static void route_interrupt(u32 gsi)
{
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    u64 handler = (u64)(uintptr_t)on_interrupt;
    idt[IRQ_VECTOR] = (struct idt_gate){
        .offset_low = (u16)handler,
        .selector = cs,
        .type = 0x8e,
        .offset_mid = (u16)(handler >> 16),
        .offset_high = (u32)(handler >> 32),
    };
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) idtr = {sizeof idt - 1, (u64)(uintptr_t)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr));

    /* KVM also routes GSIs below 16 to its PIC, whose output the boot vCPU's LINT0 accepts:
     * masked, it cannot inject a second, unprogrammed vector. */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    mmio_write32(LAPIC_BASE + LAPIC_SVR, LAPIC_SVR_ENABLE | 0xff);
    ioapic_write(IOAPIC_REDIRECTION(gsi) + 1, 0); /* destination: APIC ID 0 */
    ioapic_write(IOAPIC_REDIRECTION(gsi), IRQ_VECTOR); /* fixed, edge, active high, unmasked */
}

/* The device raises InterruptStatus right after it publishes the used entry. */
static u32 wait_isr(void)
{
    u32 isr = 0;
    for (u64 start = rdtsc(); !(isr = virtio_irq_status(&dev)) && rdtsc() - start < 400000000ull;)
        cpu_relax();
    return isr;
}

int main(u64 arg)
{
    struct params *p = (struct params *)(uintptr_t)arg;
    CHECK(p->requests <= MAX_REQUESTS && p->length % 2 == 0);
    bool interrupts = p->flags & FLAG_INTERRUPTS;

    int r = virtio_init(&dev, (uintptr_t)p->base, VIRTIO_ID_RNG, 0);
    if (r < 0)
        return r;
    r = vq_setup(&dev, 0, &vq, 8);
    if (r < 0)
        return r;
    if (interrupts)
        route_interrupt(p->gsi);
    virtio_driver_ok(&dev);

    for (u32 i = 0; i < p->requests; i++) {
        u64 at = p->buffer + (u64)i * p->length;
        u32 half = p->length / 2;
        struct vq_buf bufs[2] = {{at, half, true}, {at + half, half, true}};
        u32 before = handled;
        r = vq_submit(&vq, bufs, 2);
        if (r < 0)
            return r;
        if (interrupts) {
            /* sti takes effect after hlt starts, so an interrupt already pending still wakes it. */
            while (handled == before)
                __asm__ volatile("sti; hlt; cli" : : : "memory");
        }
        r = vq_wait_used(&vq, &p->used_len[i]);
        if (r < 0)
            return r;
        if (interrupts) {
            p->isr[i] = handler_isr;
        } else {
            p->isr[i] = wait_isr();
            virtio_irq_ack(&dev, p->isr[i]);
        }
        p->isr_acked[i] = virtio_irq_status(&dev);
    }
    p->interrupts = handled;
    return 0;
}
