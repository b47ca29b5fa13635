/* gdb test guest, C guest (guest.h conventions), built with symbols and debug info: arg 0 calls tick(1)..tick(4), which add to the global `counter`, then OUTs the 4 low bytes of the global `marker` (0x1234 unless a debugger changed it) to port 0x610 and returns counter (10); arg 1 spins forever incrementing `spins`. Other vCPUs enter at secondary(), which halts for good. */
#include "guest.h"

#define REPORT_PORT 0x610

/* Globals, not static, so that gdb finds them and the compiler keeps every access. */
volatile u64 counter;
volatile u64 marker = 0x1234;
volatile u64 spins;

__attribute__((noinline)) void tick(u64 step)
{
    counter += step;
}

__attribute__((noinline)) void spin(void)
{
    for (;;)
        spins++;
}

void secondary(void)
{
    for (;;)
        __asm__ volatile("hlt");
}

int main(u64 arg)
{
    if (arg == 1)
        spin();
    for (u64 i = 1; i <= 4; i++)
        tick(i);
    outl(REPORT_PORT, (u32)marker);
    return (int)counter;
}
