// Exit-latency baseline: drives /dev/kvm directly with no abstraction, so its
// numbers are the floor kvmkit is compared against on the same machine.
//
//   baseline pio   <guest.bin> <iterations> <port>
//   baseline mmio  <guest.bin> <iterations> <addr>
//   baseline churn <guest.bin> <count>
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

static void vm_create(struct vm *vm, int kvm, size_t run_size,
                      const uint8_t *guest, size_t guest_len)
{
    vm->vmfd = IOCTL(kvm, KVM_CREATE_VM, 0);

    vm->mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (vm->mem == MAP_FAILED)
        die("mmap guest memory");
    memcpy(vm->mem + GUEST_LOAD, guest, guest_len);

    struct kvm_userspace_memory_region region = {
        .slot = 0,
        .guest_phys_addr = 0,
        .memory_size = MEM_SIZE,
        .userspace_addr = (uintptr_t)vm->mem,
    };
    IOCTL(vm->vmfd, KVM_SET_USER_MEMORY_REGION, &region);
    // Needed on Intel without unrestricted guest (real-mode emulation); harmless elsewhere.
    IOCTL(vm->vmfd, KVM_SET_TSS_ADDR, TSS_ADDR);

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
    if (munmap(vm->mem, MEM_SIZE) < 0)
        die("munmap guest memory");
}

// Flat 4 GiB segments; no GDT in guest memory is needed because KVM loads the
// hidden descriptor caches straight from kvm_sregs.
static void set_protected_mode(int vcpufd)
{
    struct kvm_sregs sregs;
    IOCTL(vcpufd, KVM_GET_SREGS, &sregs);

    struct kvm_segment code = {
        .base = 0, .limit = 0xffffffff, .selector = 0x08,
        .type = 11, .present = 1, .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1,
    };
    struct kvm_segment data = code;
    data.selector = 0x10;
    data.type = 3;

    sregs.cs = code;
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    // VMX entry checks require TR to be a usable busy 32-bit TSS.
    sregs.tr = (struct kvm_segment){
        .base = 0, .limit = 0x67, .selector = 0x18,
        .type = 11, .present = 1, .s = 0,
    };
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

// Single-vCPU exit loop for "pio" and "mmio": returns after the guest's HLT.
static int bench_exits(int is_mmio, const char *guest_path, uint64_t iters, uint64_t target)
{
    static uint8_t guest[MEM_SIZE - GUEST_LOAD];
    size_t guest_len = load_guest(guest_path, guest, sizeof(guest));
    size_t run_size;
    int kvm = open_kvm(&run_size);

    struct vm vm;
    vm_create(&vm, kvm, run_size, guest, guest_len);
    set_protected_mode(vm.vcpufd);
    if (is_mmio)
        set_regs(vm.vcpufd, iters, 0, target);
    else
        set_regs(vm.vcpufd, iters, target, 0);

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

    vm_destroy(&vm);
    close(kvm);
    return 0;
}

static int bench_churn(const char *guest_path, uint64_t count)
{
    static uint8_t guest[MEM_SIZE - GUEST_LOAD];
    size_t guest_len = load_guest(guest_path, guest, sizeof(guest));
    size_t run_size;
    int kvm = open_kvm(&run_size);

    double t0 = now();
    for (uint64_t i = 0; i < count; i++) {
        struct vm vm;
        vm_create(&vm, kvm, run_size, guest, guest_len);
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
    close(kvm);
    return 0;
}

_Noreturn static void usage(const char *argv0)
{
    fprintf(stderr,
            "usage: %s pio   <guest.bin> <iterations> <port>\n"
            "       %s mmio  <guest.bin> <iterations> <addr>\n"
            "       %s churn <guest.bin> <count>\n",
            argv0, argv0, argv0);
    exit(2);
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
    usage(argv[0]);
}
