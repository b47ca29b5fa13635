// Exit-latency baseline: drives /dev/kvm directly with no abstraction, so its
// numbers are the floor kvmkit is compared against on the same machine.
//
//   baseline pio   <guest.bin> <iterations> <port>
//   baseline mmio  <guest.bin> <iterations> <addr>
//   baseline churn <guest.bin> <count>
//   baseline reset <page_writer.bin> <resets> <pages> <port> <irqchip 0|1>
//   baseline create <memory bytes> <count>
//
// Build: cc -O2 -o baseline baseline.c
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE   (2UL << 20)
#define GUEST_LOAD 0x1000UL
#define TSS_ADDR   0xfffbd000UL
#define PAGE_SIZE  4096UL

_Noreturn static void die(const char *what)
{
    fprintf(stderr, "%s: %s\n", what, strerror(errno));
    exit(1);
}

static int xioctl(int fd, unsigned long req, unsigned long arg, const char *name)
{
    int r = ioctl(fd, req, arg);
    if (r < 0)
        die(name);
    return r;
}
// Stringify the request so failures name the exact ioctl.
#define IOCTL(fd, req, arg) xioctl((fd), (req), (unsigned long)(arg), #req)

static double now(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) < 0)
        die("clock_gettime");
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t parse_u64(const char *s, const char *what, uint64_t min, uint64_t max)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *s == '\0' || *end != '\0' || v < min || v > max) {
        fprintf(stderr, "invalid %s: %s (want %llu..%llu)\n", what, s,
                (unsigned long long)min, (unsigned long long)max);
        exit(1);
    }
    return v;
}

static size_t load_guest(const char *path, uint8_t *buf, size_t cap)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        die(path);
    size_t n = fread(buf, 1, cap, f);
    if (ferror(f))
        die(path);
    if (n == 0 || fgetc(f) != EOF) {
        fprintf(stderr, "%s: empty or larger than %zu bytes\n", path, cap);
        exit(1);
    }
    fclose(f);
    return n;
}

struct vm {
    int vmfd, vcpufd;
    uint8_t *mem;
    size_t mem_size;
    struct kvm_run *run;
    size_t run_size;
};

// The host's supported CPUID, fetched once. Every VMM gives its vCPUs a CPUID (without one the
// guest sees no features), and what it enables changes the cost of each exit (the FPU state KVM
// switches), so the floor sets it too.
static struct {
    struct kvm_cpuid2 header;
    struct kvm_cpuid_entry2 entries[256];
} supported_cpuid = { .header.nent = 256 };

// Registers the VM's memory as slot 0; setting it again changes its flags.
static void set_memory_slot(const struct vm *vm, uint32_t flags)
{
    struct kvm_userspace_memory_region region = {
        .slot = 0,
        .flags = flags,
        .guest_phys_addr = 0,
        .memory_size = vm->mem_size,
        .userspace_addr = (uintptr_t)vm->mem,
    };
    IOCTL(vm->vmfd, KVM_SET_USER_MEMORY_REGION, &region);
}

// A VM with `mem_size` bytes of memory from address 0, the guest (if any) at GUEST_LOAD, and
// one vCPU; with `irqchip`, KVM's PIC, IOAPIC, LAPIC and PIT too (made before the vCPU).
static void vm_create(struct vm *vm, int kvm, size_t run_size, size_t mem_size, int irqchip,
                      const uint8_t *guest, size_t guest_len)
{
    vm->vmfd = IOCTL(kvm, KVM_CREATE_VM, 0);

    vm->mem_size = mem_size;
    vm->mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (vm->mem == MAP_FAILED)
        die("mmap guest memory");
    if (guest)
        memcpy(vm->mem + GUEST_LOAD, guest, guest_len);

    set_memory_slot(vm, 0);
    // Needed on Intel without unrestricted guest (real-mode emulation); harmless elsewhere.
    IOCTL(vm->vmfd, KVM_SET_TSS_ADDR, TSS_ADDR);
    if (irqchip) {
        IOCTL(vm->vmfd, KVM_CREATE_IRQCHIP, 0);
        struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
        IOCTL(vm->vmfd, KVM_CREATE_PIT2, &pit);
    }

    vm->vcpufd = IOCTL(vm->vmfd, KVM_CREATE_VCPU, 0);
    IOCTL(vm->vcpufd, KVM_SET_CPUID2, &supported_cpuid);
    vm->run_size = run_size;
    vm->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vm->vcpufd, 0);
    if (vm->run == MAP_FAILED)
        die("mmap kvm_run");
}

static void vm_destroy(struct vm *vm)
{
    if (munmap(vm->run, vm->run_size) < 0)
        die("munmap kvm_run");
    if (close(vm->vcpufd) < 0)
        die("close vcpu");
    if (close(vm->vmfd) < 0)
        die("close vm");
    if (munmap(vm->mem, vm->mem_size) < 0)
        die("munmap guest memory");
}

// Flat 4 GiB segments, 64-bit code with `long_mode`; no GDT in guest memory is needed because
// KVM loads the hidden descriptor caches straight from kvm_sregs.
static void set_flat_segments(struct kvm_sregs *sregs, int long_mode)
{
    struct kvm_segment data = {
        .base = 0, .limit = 0xffffffff, .selector = 0x10,
        .type = 3, .present = 1, .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1,
    };
    struct kvm_segment code = data;
    code.selector = 0x08;
    code.type = 11;
    code.db = !long_mode;
    code.l = long_mode;

    sregs->cs = code;
    sregs->ds = sregs->es = sregs->fs = sregs->gs = sregs->ss = data;
    // VMX entry checks require TR to be a usable busy 32-bit TSS.
    sregs->tr = (struct kvm_segment){
        .base = 0, .limit = 0x67, .selector = 0x18,
        .type = 11, .present = 1, .s = 0,
    };
}

static void set_protected_mode(int vcpufd)
{
    struct kvm_sregs sregs;
    IOCTL(vcpufd, KVM_GET_SREGS, &sregs);
    set_flat_segments(&sregs, 0);
    sregs.cr0 |= 1; // PE

    IOCTL(vcpufd, KVM_SET_SREGS, &sregs);
}

static void set_real_mode(int vcpufd)
{
    struct kvm_sregs sregs;
    IOCTL(vcpufd, KVM_GET_SREGS, &sregs);
    // Reset state has CS at 0xffff0000; move it so CS:IP == 0:0x1000.
    sregs.cs.selector = 0;
    sregs.cs.base = 0;
    IOCTL(vcpufd, KVM_SET_SREGS, &sregs);
}

static void set_regs(int vcpufd, uint64_t rcx, uint64_t rdx, uint64_t rbx)
{
    struct kvm_regs regs = {
        .rip = GUEST_LOAD, .rflags = 2, .rcx = rcx, .rdx = rdx, .rbx = rbx,
    };
    IOCTL(vcpufd, KVM_SET_REGS, &regs);
}

static int open_kvm(size_t *run_size)
{
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("open /dev/kvm");
    int api = IOCTL(kvm, KVM_GET_API_VERSION, 0);
    if (api != KVM_API_VERSION) {
        fprintf(stderr, "KVM_GET_API_VERSION: got %d, want %d\n", api, KVM_API_VERSION);
        exit(1);
    }
    int sz = IOCTL(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if ((size_t)sz < sizeof(struct kvm_run)) {
        fprintf(stderr, "KVM_GET_VCPU_MMAP_SIZE: %d is too small\n", sz);
        exit(1);
    }
    *run_size = (size_t)sz;
    IOCTL(kvm, KVM_GET_SUPPORTED_CPUID, &supported_cpuid);
    return kvm;
}

_Noreturn static void bad_exit(const struct kvm_run *run)
{
    fprintf(stderr, "unexpected exit_reason %u", run->exit_reason);
    if (run->exit_reason == KVM_EXIT_FAIL_ENTRY)
        fprintf(stderr, " (hardware_entry_failure_reason 0x%llx)",
                (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
    else if (run->exit_reason == KVM_EXIT_INTERNAL_ERROR)
        fprintf(stderr, " (internal suberror %u)", run->internal.suberror);
    fputc('\n', stderr);
    exit(1);
}

// What a bench that runs a guest starts from: the guest's image and /dev/kvm.
struct bench {
    int kvm;
    size_t run_size;
    const uint8_t *guest;
    size_t guest_len;
};

static void bench_open(struct bench *b, const char *guest_path)
{
    static uint8_t guest[MEM_SIZE - GUEST_LOAD];
    b->guest = guest;
    b->guest_len = load_guest(guest_path, guest, sizeof(guest));
    b->kvm = open_kvm(&b->run_size);
}

// A VM of MEM_SIZE with the bench's guest loaded and its one vCPU made.
static void bench_vm(const struct bench *b, struct vm *vm, int irqchip)
{
    vm_create(vm, b->kvm, b->run_size, MEM_SIZE, irqchip, b->guest, b->guest_len);
}

// bench_vm in protected mode, the registers set for the guest at GUEST_LOAD.
static void bench_protected_vm(const struct bench *b, struct vm *vm, uint64_t rcx, uint64_t rdx,
                               uint64_t rbx)
{
    bench_vm(b, vm, 0);
    set_protected_mode(vm->vcpufd);
    set_regs(vm->vcpufd, rcx, rdx, rbx);
}

static int bench_close(struct bench *b, struct vm *vm)
{
    vm_destroy(vm);
    close(b->kvm);
    return 0;
}

// Nanoseconds each of the `count` runs since `start` took.
static double ns_per(double start, uint64_t count)
{
    return (now() - start) / (double)count * 1e9;
}

// Single-vCPU exit loop for "pio" and "mmio": returns after the guest's HLT.
static int bench_exits(int is_mmio, const char *guest_path, uint64_t iters, uint64_t target)
{
    struct bench b;
    bench_open(&b, guest_path);
    struct vm vm;
    if (is_mmio)
        bench_protected_vm(&b, &vm, iters, 0, target);
    else
        bench_protected_vm(&b, &vm, iters, target, 0);

    struct kvm_run *run = vm.run;
    uint64_t exits = 0;
    double t0 = now();
    for (;;) {
        IOCTL(vm.vcpufd, KVM_RUN, 0);
        exits++;
        if (run->exit_reason == KVM_EXIT_HLT)
            break;
        // Checking the exit payload is a few compares; it guards against
        // timing some other exit by accident.
        if (!is_mmio && run->exit_reason == KVM_EXIT_IO &&
            run->io.direction == KVM_EXIT_IO_OUT && run->io.port == target &&
            run->io.size == 1)
            continue;
        if (is_mmio && run->exit_reason == KVM_EXIT_MMIO &&
            run->mmio.is_write && run->mmio.phys_addr == target && run->mmio.len == 4)
            continue;
        bad_exit(run);
    }
    double secs = now() - t0;

    // A guest that never reached the exit target (wrong binary, address in
    // RAM) would otherwise report a meaningless time.
    if (exits != iters + 1) {
        fprintf(stderr, "got %llu exits, want iterations + 1 = %llu\n",
                (unsigned long long)exits, (unsigned long long)(iters + 1));
        exit(1);
    }
    // exits includes the final HLT exit, i.e. iterations + 1.
    printf("{\"test\":\"%s\",\"exits\":%llu,\"seconds\":%.6f,\"ns_per_exit\":%.1f}\n",
           is_mmio ? "mmio" : "pio", (unsigned long long)exits, secs,
           secs * 1e9 / (double)exits);
    return bench_close(&b, &vm);
}

static int bench_churn(const char *guest_path, uint64_t count)
{
    struct bench b;
    bench_open(&b, guest_path);

    double t0 = now();
    for (uint64_t i = 0; i < count; i++) {
        struct vm vm;
        bench_vm(&b, &vm, 0);
        set_real_mode(vm.vcpufd);
        set_regs(vm.vcpufd, 0, 0, 0);

        IOCTL(vm.vcpufd, KVM_RUN, 0);
        if (vm.run->exit_reason != KVM_EXIT_HLT)
            bad_exit(vm.run);
        // Verify once that the guest really ran; doing it every time would
        // add a syscall per VM to what is meant to measure lifecycle cost.
        if (i == 0) {
            struct kvm_regs regs;
            IOCTL(vm.vcpufd, KVM_GET_REGS, &regs);
            if ((regs.rax & 0xffff) != 3) {
                fprintf(stderr, "churn guest: AX = 0x%llx, want 3\n",
                        (unsigned long long)(regs.rax & 0xffff));
                exit(1);
            }
        }
        vm_destroy(&vm);
    }
    double secs = now() - t0;

    printf("{\"test\":\"churn\",\"vms\":%llu,\"seconds\":%.6f,\"vms_per_second\":%.1f}\n",
           (unsigned long long)count, secs, (double)count / secs);
    close(b.kvm);
    return 0;
}

// --- In-place reset: what a VMM must do at the least to put a VM back to a saved state.

#define DIRTY_BASE  0x100000UL // the first page the page writer writes (its EBX)
#define MAX_IO_MSRS 256        // entries KVM takes in one KVM_GET/SET_MSRS
#define XSAVE_FIXED 4096       // size of struct kvm_xsave

// The optional parts of a vCPU's state this KVM has, as kvmkit asks for them.
struct state_caps {
    size_t xsave_size; // 0 without XSAVE: x87 and SSE then go through KVM_GET/SET_FPU
    int xcrs, events, debugregs, clock_realtime;
};

static struct state_caps state_caps(int vmfd)
{
    struct state_caps caps = {
        .xcrs = IOCTL(vmfd, KVM_CHECK_EXTENSION, KVM_CAP_XCRS),
        .events = IOCTL(vmfd, KVM_CHECK_EXTENSION, KVM_CAP_VCPU_EVENTS),
        .debugregs = IOCTL(vmfd, KVM_CHECK_EXTENSION, KVM_CAP_DEBUGREGS),
        .clock_realtime =
            (IOCTL(vmfd, KVM_CHECK_EXTENSION, KVM_CAP_ADJUST_CLOCK) & KVM_CLOCK_REALTIME) != 0,
    };
    if (IOCTL(vmfd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE)) {
        int xsave2 = IOCTL(vmfd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
        caps.xsave_size = xsave2 > XSAVE_FIXED ? (size_t)xsave2 : XSAVE_FIXED;
    }
    return caps;
}

// Everything kvmkit saves of a VM without devices: the VM's and the vCPU's KVM state, and memory.
struct saved_state {
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct kvm_fpu fpu;
    struct kvm_xsave *xsave;
    struct kvm_xcrs xcrs;
    struct kvm_debugregs debugregs;
    struct kvm_lapic_state lapic;
    struct kvm_mp_state mp_state;
    struct kvm_vcpu_events events;
    struct kvm_msrs *msrs;
    struct kvm_irqchip chips[3];
    struct kvm_pit_state2 pit;
    struct kvm_clock_data clock;
    uint64_t clock_realtime_ns; // the host's CLOCK_REALTIME when the clock was read
    uint8_t *mem;
};

static uint64_t realtime_ns(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) < 0)
        die("clock_gettime");
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static struct kvm_msrs *msrs_alloc(size_t count)
{
    struct kvm_msrs *msrs = calloc(1, sizeof(*msrs) + count * sizeof(struct kvm_msr_entry));
    if (!msrs)
        die("calloc");
    msrs->nmsrs = (uint32_t)count;
    return msrs;
}

// MSRs written back before the others, in this order, as kvmkit does: the TSC (the TSC deadline
// and KVM's clock are read against it), the PMU capabilities (they decide what the counters
// take) and the async page fault vector (enabling its delivery needs it).
static const uint32_t write_first[] = { 0x10, 0x345, 0x4b564d06 };
#define WRITE_FIRST (sizeof(write_first) / sizeof(write_first[0]))

// An MSR's place in write_first, or WRITE_FIRST for any other.
static size_t write_rank(uint32_t index)
{
    size_t rank = 0;
    while (rank < WRITE_FIRST && write_first[rank] != index)
        rank++;
    return rank;
}

// The MSRs of KVM's list the vCPU can read, with their values, in kvmkit's order for writing
// them back: write_first, then the rest in KVM's order.
static struct kvm_msrs *read_msrs(int kvm, int vcpufd)
{
    struct kvm_msr_list probe = { .nmsrs = 0 };
    if (ioctl(kvm, KVM_GET_MSR_INDEX_LIST, &probe) < 0 && errno != E2BIG)
        die("KVM_GET_MSR_INDEX_LIST");
    if (probe.nmsrs > MAX_IO_MSRS) {
        fprintf(stderr, "KVM lists %u MSRs, more than one KVM_SET_MSRS takes\n", probe.nmsrs);
        exit(1);
    }
    struct kvm_msr_list *list = calloc(1, sizeof(*list) + probe.nmsrs * sizeof(uint32_t));
    if (!list)
        die("calloc");
    list->nmsrs = probe.nmsrs;
    IOCTL(kvm, KVM_GET_MSR_INDEX_LIST, list);

    struct kvm_msrs *query = msrs_alloc(list->nmsrs);
    size_t n = 0;
    for (size_t rank = 0; rank <= WRITE_FIRST; rank++)
        for (uint32_t i = 0; i < list->nmsrs; i++)
            if (write_rank(list->indices[i]) == rank)
                query->entries[n++].index = list->indices[i];
    free(list);

    // KVM stops at the first MSR it cannot read: leave that one out and go on after it.
    struct kvm_msrs *msrs = msrs_alloc(n);
    size_t kept = 0;
    query->nmsrs = (uint32_t)n;
    while (query->nmsrs > 0) {
        size_t asked = query->nmsrs;
        size_t read = (size_t)IOCTL(vcpufd, KVM_GET_MSRS, query);
        memcpy(msrs->entries + kept, query->entries, read * sizeof(struct kvm_msr_entry));
        kept += read;
        size_t done = read < asked ? read + 1 : read;
        memmove(query->entries, query->entries + done,
                (asked - done) * sizeof(struct kvm_msr_entry));
        query->nmsrs = (uint32_t)(asked - done);
    }
    free(query);
    msrs->nmsrs = (uint32_t)kept;
    return msrs;
}

// Writes the saved MSRs back. KVM refuses a few values it reports (the async page fault vector
// without an in-kernel LAPIC, say); kvmkit then checks that the vCPU holds that value already
// and leaves it out from then on. With `prune` this does the same, dropping it from `msrs`.
static void set_msrs(int vcpufd, struct kvm_msrs *msrs, int prune)
{
    for (;;) {
        uint32_t written = (uint32_t)IOCTL(vcpufd, KVM_SET_MSRS, msrs);
        if (written == msrs->nmsrs)
            return;
        struct kvm_msr_entry refused = msrs->entries[written];
        struct kvm_msrs *current = msrs_alloc(1);
        current->entries[0].index = refused.index;
        int held = IOCTL(vcpufd, KVM_GET_MSRS, current) == 1 &&
                   current->entries[0].data == refused.data;
        free(current);
        if (!prune || !held) {
            fprintf(stderr, "KVM_SET_MSRS: KVM refused MSR 0x%x = 0x%llx\n", refused.index,
                    (unsigned long long)refused.data);
            exit(1);
        }
        memmove(msrs->entries + written, msrs->entries + written + 1,
                (msrs->nmsrs - written - 1) * sizeof(struct kvm_msr_entry));
        msrs->nmsrs--;
    }
}

static void save_state(int kvm, const struct vm *vm, const struct state_caps *caps, int irqchip,
                       struct saved_state *s)
{
    int fd = vm->vcpufd;
    if (irqchip)
        IOCTL(fd, KVM_GET_MP_STATE, &s->mp_state);
    IOCTL(fd, KVM_GET_REGS, &s->regs);
    IOCTL(fd, KVM_GET_SREGS, &s->sregs);
    if (caps->xsave_size) {
        s->xsave = calloc(1, caps->xsave_size);
        if (!s->xsave)
            die("calloc");
        if (caps->xsave_size > XSAVE_FIXED)
            IOCTL(fd, KVM_GET_XSAVE2, s->xsave);
        else
            IOCTL(fd, KVM_GET_XSAVE, s->xsave);
    } else {
        IOCTL(fd, KVM_GET_FPU, &s->fpu);
    }
    if (caps->xcrs)
        IOCTL(fd, KVM_GET_XCRS, &s->xcrs);
    if (caps->debugregs)
        IOCTL(fd, KVM_GET_DEBUGREGS, &s->debugregs);
    if (irqchip)
        IOCTL(fd, KVM_GET_LAPIC, &s->lapic);
    s->msrs = read_msrs(kvm, fd);
    if (caps->events)
        IOCTL(fd, KVM_GET_VCPU_EVENTS, &s->events);

    if (irqchip) {
        for (uint32_t chip = 0; chip < 3; chip++) {
            s->chips[chip].chip_id = chip; // PIC master, PIC slave, IOAPIC
            IOCTL(vm->vmfd, KVM_GET_IRQCHIP, &s->chips[chip]);
        }
        IOCTL(vm->vmfd, KVM_GET_PIT2, &s->pit);
    }
    IOCTL(vm->vmfd, KVM_GET_CLOCK, &s->clock);
    s->clock_realtime_ns = realtime_ns();

    s->mem = malloc(vm->mem_size);
    if (!s->mem)
        die("malloc saved memory");
    memcpy(s->mem, vm->mem, vm->mem_size);
}

// The VM-wide state, in kvmkit's order: interrupt controllers, PIT, then the clock advanced by
// the real time elapsed since it was saved.
static void restore_vm(int vmfd, const struct state_caps *caps, int irqchip,
                       const struct saved_state *s)
{
    if (irqchip) {
        for (int chip = 0; chip < 3; chip++)
            IOCTL(vmfd, KVM_SET_IRQCHIP, &s->chips[chip]);
        IOCTL(vmfd, KVM_SET_PIT2, &s->pit);
    }
    struct kvm_clock_data clock = { .clock = s->clock.clock };
    if (caps->clock_realtime && (s->clock.flags & KVM_CLOCK_REALTIME)) {
        clock.realtime = s->clock.realtime; // KVM adds the time elapsed since then
        clock.flags = KVM_CLOCK_REALTIME;
    } else {
        clock.clock += realtime_ns() - s->clock_realtime_ns;
    }
    IOCTL(vmfd, KVM_SET_CLOCK, &clock);
}

// The vCPU's state, the ioctls kvmkit's in-place restore issues in its order (it skips CPUID and
// the TSC frequency, which have not changed, and the MP state of a vCPU without a LAPIC).
static void restore_vcpu(int fd, const struct state_caps *caps, int irqchip,
                         struct saved_state *s, int prune_msrs)
{
    IOCTL(fd, KVM_SET_SREGS, &s->sregs);
    IOCTL(fd, KVM_SET_REGS, &s->regs);
    if (caps->xsave_size)
        IOCTL(fd, KVM_SET_XSAVE, s->xsave);
    else
        IOCTL(fd, KVM_SET_FPU, &s->fpu);
    if (caps->xcrs)
        IOCTL(fd, KVM_SET_XCRS, &s->xcrs);
    if (caps->debugregs)
        IOCTL(fd, KVM_SET_DEBUGREGS, &s->debugregs);
    if (irqchip)
        IOCTL(fd, KVM_SET_LAPIC, &s->lapic);
    set_msrs(fd, s->msrs, prune_msrs);
    if (irqchip)
        IOCTL(fd, KVM_SET_MP_STATE, &s->mp_state);
    if (caps->events)
        IOCTL(fd, KVM_SET_VCPU_EVENTS, &s->events);
}

// Copies back from the saved memory the pages KVM's dirty log names; returns how many.
static size_t restore_dirty_pages(const struct vm *vm, uint64_t *bitmap, const uint8_t *saved)
{
    struct kvm_dirty_log log = { .slot = 0, .dirty_bitmap = bitmap };
    IOCTL(vm->vmfd, KVM_GET_DIRTY_LOG, &log);
    size_t copied = 0;
    for (size_t word = 0; word < vm->mem_size / PAGE_SIZE / 64; word++)
        for (uint64_t bits = bitmap[word]; bits; bits &= bits - 1) {
            size_t offset = (word * 64 + (size_t)__builtin_ctzll(bits)) * PAGE_SIZE;
            memcpy(vm->mem + offset, saved + offset, PAGE_SIZE);
            copied++;
        }
    return copied;
}

// Runs the page writer to its OUT on `port`, then completes that OUT with a KVM_RUN that
// returns at once (immediate_exit), as kvmkit does when a handler stops the run there.
static void run_to_port(struct vm *vm, uint64_t port)
{
    IOCTL(vm->vcpufd, KVM_RUN, 0);
    const struct kvm_run *run = vm->run;
    if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT ||
        run->io.port != port)
        bad_exit(run);
    vm->run->immediate_exit = 1;
    if (ioctl(vm->vcpufd, KVM_RUN, 0) == 0 || errno != EINTR)
        die("KVM_RUN with immediate_exit");
    vm->run->immediate_exit = 0;
}

static void print_array(const char *name, const double *values, uint64_t count)
{
    printf(",\"%s\":[", name);
    for (uint64_t i = 0; i < count; i++)
        printf("%s%.3f", i ? "," : "", values[i]);
    putchar(']');
}

// `resets` times: the guest writes one dword into each of `pages` pages and stops at its OUT
// (untimed), then the VM is put back to the state saved after the first such run (timed, by
// phase as kvmkit reports them).
static int bench_reset(const char *guest_path, uint64_t resets, uint64_t pages, uint64_t port,
                       int irqchip)
{
    struct bench b;
    bench_open(&b, guest_path);
    struct vm vm;
    bench_vm(&b, &vm, irqchip);
    set_protected_mode(vm.vcpufd);
    struct kvm_regs regs = {
        .rip = GUEST_LOAD, .rflags = 2, .rbx = DIRTY_BASE, .rsi = pages, .rdx = port,
    };
    IOCTL(vm.vcpufd, KVM_SET_REGS, &regs);
    struct state_caps caps = state_caps(vm.vmfd);
    run_to_port(&vm, port);

    // The snapshot: state saved, memory copied, and the guest's writes logged from now on.
    struct saved_state saved = { 0 };
    save_state(b.kvm, &vm, &caps, irqchip, &saved);
    set_memory_slot(&vm, KVM_MEM_LOG_DIRTY_PAGES);
    uint64_t *bitmap = calloc(MEM_SIZE / PAGE_SIZE / 64, sizeof(uint64_t));
    double *total = calloc(resets, sizeof(double));
    double *phase[3] = { calloc(resets, sizeof(double)), calloc(resets, sizeof(double)),
                         calloc(resets, sizeof(double)) };
    if (!bitmap || !total || !phase[0] || !phase[1] || !phase[2])
        die("calloc");

    // A first reset, untimed, finds the MSRs KVM will not take back (as kvmkit's first does).
    run_to_port(&vm, port);
    restore_dirty_pages(&vm, bitmap, saved.mem);
    restore_vm(vm.vmfd, &caps, irqchip, &saved);
    restore_vcpu(vm.vcpufd, &caps, irqchip, &saved, 1);

    size_t copied_min = SIZE_MAX, copied_max = 0;
    for (uint64_t i = 0; i < resets; i++) {
        run_to_port(&vm, port);
        double t0 = now();
        size_t copied = restore_dirty_pages(&vm, bitmap, saved.mem);
        double t1 = now();
        restore_vm(vm.vmfd, &caps, irqchip, &saved);
        double t2 = now();
        restore_vcpu(vm.vcpufd, &caps, irqchip, &saved, 0);
        double t3 = now();
        total[i] = (t3 - t0) * 1e6;
        phase[0][i] = (t1 - t0) * 1e6;
        phase[1][i] = (t2 - t1) * 1e6;
        phase[2][i] = (t3 - t2) * 1e6;
        copied_min = copied < copied_min ? copied : copied_min;
        copied_max = copied > copied_max ? copied : copied_max;
    }
    // The resets must have undone every write, or the figures are of something else.
    if (memcmp(vm.mem, saved.mem, MEM_SIZE) != 0) {
        fprintf(stderr, "memory differs from the saved copy after a reset\n");
        exit(1);
    }

    printf("{\"test\":\"reset\",\"irqchip\":%d,\"msrs\":%u,\"pages_copied_min\":%zu,"
           "\"pages_copied_max\":%zu",
           irqchip, saved.msrs->nmsrs, copied_min, copied_max);
    print_array("us", total, resets);
    print_array("memory_us", phase[0], resets);
    print_array("vm_us", phase[1], resets);
    print_array("vcpus_us", phase[2], resets);
    printf("}\n");
    return bench_close(&b, &vm);
}

// --- VM creation: the least a VMM does to make a VM of one vCPU, for forks to be compared with.

static int bench_create(uint64_t mem_size, uint64_t count)
{
    size_t run_size;
    int kvm = open_kvm(&run_size);
    double *us = calloc(count, sizeof(double));
    if (!us)
        die("calloc");
    for (uint64_t i = 0; i < count; i++) {
        struct vm vm;
        double t0 = now();
        vm_create(&vm, kvm, run_size, mem_size, 0, NULL, 0);
        us[i] = (now() - t0) * 1e6;
        vm_destroy(&vm);
    }
    printf("{\"test\":\"create\",\"memory\":%llu", (unsigned long long)mem_size);
    print_array("us", us, count);
    printf("}\n");
    close(kvm);
    return 0;
}

_Noreturn static void usage(const char *argv0)
{
    fprintf(stderr,
            "usage: %s pio   <guest.bin> <iterations> <port>\n"
            "       %s mmio  <guest.bin> <iterations> <addr>\n"
            "       %s churn <guest.bin> <count>\n"
            "       %s reset <page_writer.bin> <resets> <pages> <port> <irqchip 0|1>\n"
            "       %s create <memory bytes> <count>\n"
            "       %s call  <function.bin> <calls> <length>\n"
            "       %s step  <step_loop.bin> <steps>\n",
            argv0, argv0, argv0, argv0, argv0, argv0, argv0);
    exit(2);
}

// Long mode with the first GiB identity mapped by 2 MiB pages, tables at 0x9000 (as kvmkit's
// setup("long") does).
static void set_long_mode(const struct vm *vm)
{
    uint64_t *pml4 = (uint64_t *)(vm->mem + 0x9000), *pdpt = pml4 + 512, *pd = pdpt + 512;
    pml4[0] = 0xa000 | 3;
    pdpt[0] = 0xb000 | 3;
    for (uint64_t i = 0; i < 512; i++)
        pd[i] = (i << 21) | 0x83;
    struct kvm_sregs sregs;
    IOCTL(vm->vcpufd, KVM_GET_SREGS, &sregs);
    set_flat_segments(&sregs, 1);
    sregs.cr3 = 0x9000;
    sregs.cr4 = 0x20 | 0x200 | 0x400; // PAE, OSFXSR, OSXMMEXCPT
    sregs.cr0 = 0x80000001 | 0x2;     // PG, PE, MP
    sregs.efer = 0x500;               // LME, LMA
    IOCTL(vm->vcpufd, KVM_SET_SREGS, &sregs);
}

// Function calls: `iters` calls of the 64-bit function at GUEST_LOAD with (data, length), each
// one KVM_RUN that starts at a `call *%r11; hlt` trampoline with the registers set through
// kvm_run's synchronized copy, as kvmkit's Vcpu.call does. Prints ns per call and the last RAX.
#define CALL_TRAMPOLINE 0x4f0UL
#define CALL_STACK      0x8000UL
#define CALL_DATA       0x100000UL
static int bench_call(const char *guest_path, uint64_t iters, uint64_t length)
{
    struct bench b;
    bench_open(&b, guest_path);
    if (!(IOCTL(b.kvm, KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS) & KVM_SYNC_X86_REGS)) {
        fprintf(stderr, "this KVM lacks KVM_CAP_SYNC_REGS\n");
        return 1;
    }
    struct vm vm;
    bench_vm(&b, &vm, 0);
    set_long_mode(&vm);
    static const uint8_t trampoline[] = { 0x41, 0xff, 0xd3, 0xf4 }; // call *%r11; hlt
    memcpy(vm.mem + CALL_TRAMPOLINE, trampoline, sizeof(trampoline));
    for (uint64_t i = 0; i < length; i++)
        vm.mem[CALL_DATA + i] = (uint8_t)(i * 7 + 1);
    struct kvm_regs *regs = &vm.run->s.regs.regs;
    vm.run->kvm_valid_regs = KVM_SYNC_X86_REGS;
    IOCTL(vm.vcpufd, KVM_GET_REGS, regs);
    uint64_t rax = 0;
    double start = 0;
    // One untimed call first, as kvmkit's side makes one too.
    for (uint64_t i = 0; i <= iters; i++) {
        if (i == 1)
            start = now();
        regs->rip = CALL_TRAMPOLINE;
        regs->rsp = CALL_STACK;
        regs->r11 = GUEST_LOAD;
        regs->rdi = CALL_DATA;
        regs->rsi = length;
        regs->rflags = 2;
        vm.run->kvm_dirty_regs = KVM_SYNC_X86_REGS;
        IOCTL(vm.vcpufd, KVM_RUN, 0);
        if (vm.run->exit_reason != KVM_EXIT_HLT || regs->rip != CALL_TRAMPOLINE + 4)
            bad_exit(vm.run);
        rax = regs->rax;
    }
    printf("{\"ns_per_call\": %.1f, \"rax\": %llu}\n", ns_per(start, iters), (unsigned long long)rax);
    return bench_close(&b, &vm);
}

// Single-step: `steps` KVM_RUNs of the step loop with KVM_GUESTDBG_SINGLESTEP (and BLOCKIRQ where
// KVM has it, as kvmkit's steps do), each ending in KVM_EXIT_DEBUG. Prints ns per step.
static int bench_step(const char *guest_path, uint64_t steps)
{
    struct bench b;
    bench_open(&b, guest_path);
    struct vm vm;
    bench_protected_vm(&b, &vm, 0, 0, 0);
    struct kvm_guest_debug debug = { .control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP };
#if defined(KVM_CAP_SET_GUEST_DEBUG2) && defined(KVM_GUESTDBG_BLOCKIRQ)
    int flags = ioctl(vm.vmfd, KVM_CHECK_EXTENSION, KVM_CAP_SET_GUEST_DEBUG2);
    if (flags > 0 && (flags & KVM_GUESTDBG_BLOCKIRQ))
        debug.control |= KVM_GUESTDBG_BLOCKIRQ;
#endif
    IOCTL(vm.vcpufd, KVM_SET_GUEST_DEBUG, &debug);
    double start = 0;
    for (uint64_t i = 0; i <= steps; i++) {
        if (i == 1)
            start = now();
        IOCTL(vm.vcpufd, KVM_RUN, 0);
        if (vm.run->exit_reason != KVM_EXIT_DEBUG)
            bad_exit(vm.run);
    }
    printf("{\"ns_per_step\": %.1f}\n", ns_per(start, steps));
    return bench_close(&b, &vm);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage(argv[0]);
    // The guests loop on ECX with dec/jnz, so 0 would mean 2^32 iterations.
    if (strcmp(argv[1], "pio") == 0 && argc == 5)
        return bench_exits(0, argv[2], parse_u64(argv[3], "iterations", 1, UINT32_MAX),
                           parse_u64(argv[4], "port", 0, 0xffff));
    if (strcmp(argv[1], "mmio") == 0 && argc == 5)
        // Must lie outside guest RAM (or nothing exits) and within the 32-bit space.
        return bench_exits(1, argv[2], parse_u64(argv[3], "iterations", 1, UINT32_MAX),
                           parse_u64(argv[4], "addr", MEM_SIZE, 0xfffffffcULL));
    if (strcmp(argv[1], "churn") == 0 && argc == 4)
        return bench_churn(argv[2], parse_u64(argv[3], "count", 1, UINT64_MAX));
    if (strcmp(argv[1], "reset") == 0 && argc == 7)
        // The pages lie between DIRTY_BASE and the end of memory.
        return bench_reset(argv[2], parse_u64(argv[3], "resets", 1, UINT32_MAX),
                           parse_u64(argv[4], "pages", 1, (MEM_SIZE - DIRTY_BASE) / PAGE_SIZE),
                           parse_u64(argv[5], "port", 0, 0xffff),
                           (int)parse_u64(argv[6], "irqchip", 0, 1));
    if (strcmp(argv[1], "create") == 0 && argc == 4) {
        // One memory slot from 0, below the 32-bit MMIO gap as kvmkit lays it out.
        uint64_t mem_size = parse_u64(argv[2], "memory bytes", MEM_SIZE, 0xd0000000ULL);
        if (mem_size % PAGE_SIZE) {
            fprintf(stderr, "memory bytes must be a multiple of %lu\n", PAGE_SIZE);
            exit(1);
        }
        return bench_create(mem_size, parse_u64(argv[3], "count", 1, UINT64_MAX));
    }
    if (strcmp(argv[1], "step") == 0 && argc == 4)
        return bench_step(argv[2], parse_u64(argv[3], "steps", 1, UINT64_MAX));
    if (strcmp(argv[1], "call") == 0 && argc == 5)
        return bench_call(argv[2], parse_u64(argv[3], "calls", 1, UINT64_MAX),
                          parse_u64(argv[4], "length", 0, MEM_SIZE - CALL_DATA));
    usage(argv[0]);
}
