/* Phase marks of the benchmark C guests: a 4-byte OUT to BENCH_MARK_PORT of phase << 1 when a
 * phase starts and of phase << 1 | 1 when it ends. The host stamps each with its own clock
 * (benchmarks/cguest.py), so phases are timed without trusting the guest's TSC rate, and the
 * cost of a mark (one exit) falls between phases, not inside one. */
#ifndef BENCH_H
#define BENCH_H

#include "guest.h"

#define BENCH_MARK_PORT 0x610

static inline void bench_phase_start(u32 phase) { outl(BENCH_MARK_PORT, phase << 1); }
static inline void bench_phase_end(u32 phase) { outl(BENCH_MARK_PORT, phase << 1 | 1); }

#endif /* BENCH_H */
