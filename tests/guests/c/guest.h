/* Freestanding runtime for C guests (tests/guests/<name>.c, built by conftest's compile_c).
 *
 * Conventions:
 *   - The image is linked at 0x100000 (guest.ld) and entered at _start (start.S) in 64-bit long
 *     mode with the first 4 GiB identity mapped and interrupts off; RSP = stack top chosen by the
 *     host, RDI = the argument handed to main(). No SSE/x87: built with -mgeneral-regs-only.
 *   - Port GUEST_EXIT_PORT (0x600, 4 ports wide): a 4-byte OUT of main()'s return value (or
 *     fail()'s code); the guest then halts for good.
 *   - Port GUEST_DEBUG_PORT (0x604): one 1-byte OUT per character of debug text.
 */
#ifndef GUEST_H
#define GUEST_H

#define GUEST_EXIT_PORT 0x600
#define GUEST_DEBUG_PORT 0x604
/* Exit code of a failed CHECK(). */
#define GUEST_CHECK_FAILED 0xbad

#ifndef __ASSEMBLER__

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

/* Port I/O */

static inline void outb(u16 port, u8 value) { __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port)); }
static inline void outw(u16 port, u16 value) { __asm__ volatile("outw %0, %1" : : "a"(value), "Nd"(port)); }
static inline void outl(u16 port, u32 value) { __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port)); }

static inline u8 inb(u16 port)
{
    u8 value;
    __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static inline u16 inw(u16 port)
{
    u16 value;
    __asm__ volatile("inw %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static inline u32 inl(u16 port)
{
    u32 value;
    __asm__ volatile("inl %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

/* Barriers. x86 keeps ordinary loads in order with loads and stores with stores, so rmb/wmb
 * only have to stop the compiler; mb also orders stores before later loads. */

#define barrier() __asm__ volatile("" : : : "memory")
#define mb() __asm__ volatile("mfence" : : : "memory")
#define rmb() barrier()
#define wmb() barrier()

/* One access of exactly this width, never merged, split or cached in a register: for memory
 * that another agent (a device) reads or writes. */
#define READ_ONCE(x) (*(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

/* MMIO: one access of the given width at a physical (= virtual) address. */

static inline u8 mmio_read8(uintptr_t addr) { return *(const volatile u8 *)addr; }
static inline u16 mmio_read16(uintptr_t addr) { return *(const volatile u16 *)addr; }
static inline u32 mmio_read32(uintptr_t addr) { return *(const volatile u32 *)addr; }
static inline u64 mmio_read64(uintptr_t addr) { return *(const volatile u64 *)addr; }
static inline void mmio_write8(uintptr_t addr, u8 value) { *(volatile u8 *)addr = value; }
static inline void mmio_write16(uintptr_t addr, u16 value) { *(volatile u16 *)addr = value; }
static inline void mmio_write32(uintptr_t addr, u32 value) { *(volatile u32 *)addr = value; }
static inline void mmio_write64(uintptr_t addr, u64 value) { *(volatile u64 *)addr = value; }

static inline void cpu_relax(void) { __asm__ volatile("pause" : : : "memory"); }

/* Time stamp counter: for timeouts that do not depend on how fast a polling loop spins (a
 * PAUSE can cost a VM exit on some hosts). Its rate is unknown, typically 1-4 GHz. */
static inline u64 rdtsc(void)
{
    u32 low, high;
    __asm__ volatile("rdtsc" : "=a"(low), "=d"(high));
    return (u64)high << 32 | low;
}

/* The compiler may turn loops and struct copies into calls to these. */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *restrict dst, const void *restrict src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);

/* Debug text on GUEST_DEBUG_PORT. */
void print(const char *s);
void print_hex(u64 value); /* "0x" and the digits without leading zeros */
void print_dec(u64 value);

/* Reports `code` on GUEST_EXIT_PORT and halts. */
_Noreturn void fail(int code);
_Noreturn void check_failed(const char *expr, const char *file, int line);

/* Prints the failed expression with its place and fails with GUEST_CHECK_FAILED. */
#define CHECK(cond)                                                                                 \
    do {                                                                                            \
        if (!(cond))                                                                                \
            check_failed(#cond, __FILE__, __LINE__);                                                \
    } while (0)

int main(u64 arg);

#endif /* __ASSEMBLER__ */
#endif /* GUEST_H */
