/* The runtime behind guest.h: memory functions, debug output and failure reporting. */
#include "guest.h"

void *memset(void *dst, int c, size_t n)
{
    u8 *d = dst;
    while (n--)
        *d++ = (u8)c;
    return dst;
}

void *memcpy(void *restrict dst, const void *restrict src, size_t n)
{
    u8 *d = dst;
    const u8 *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
    u8 *d = dst;
    const u8 *s = src;
    if (d <= s || d >= s + n)
        return memcpy(dst, src, n);
    while (n--)
        d[n] = s[n];
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x < *y ? -1 : 1;
    return 0;
}

void print(const char *s)
{
    while (*s)
        outb(GUEST_DEBUG_PORT, (u8)*s++);
}

void print_hex(u64 value)
{
    char buf[19]; /* "0x", 16 digits, NUL */
    char *p = buf + sizeof buf - 1;
    *p = 0;
    do {
        *--p = "0123456789abcdef"[value & 15];
        value >>= 4;
    } while (value);
    *--p = 'x';
    *--p = '0';
    print(p);
}

void print_dec(u64 value)
{
    char buf[21]; /* 20 digits, NUL */
    char *p = buf + sizeof buf - 1;
    *p = 0;
    do {
        *--p = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    print(p);
}

_Noreturn void fail(int code)
{
    outl(GUEST_EXIT_PORT, (u32)code);
    for (;;)
        __asm__ volatile("hlt");
}

_Noreturn void check_failed(const char *expr, const char *file, int line)
{
    print("CHECK failed: ");
    print(expr);
    print(" at ");
    print(file);
    print(":");
    print_dec((u64)line);
    print("\n");
    fail(GUEST_CHECK_FAILED);
}
