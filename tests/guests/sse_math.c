/* Freestanding floating-point code for the compiled-code tests, built with plain -O2 (no
 * -mgeneral-regs-only): GCC keeps floats and doubles in SSE registers and vectorises the loops.
 * compute(out, in, n) reads 64 floats at in, writes struct results at out (the mean and norm of the
 * first n <= 64 transformed values, and all 64 scaled) and returns. On
 * 32-bit x86 it takes its arguments in EAX, EDX, ECX (regparm). */
#define MAX 64

#if defined(__i386__)
#define ARGS __attribute__((regparm(3)))
#else
#define ARGS
#endif

struct results {
    double mean;
    double norm;
    float scaled[MAX];
};

ARGS void compute(struct results *out, const float *in, unsigned long n)
{
    /* On the stack, 16-byte aligned as the ABI promises: vector loads and stores need that. */
    float local[MAX] __attribute__((aligned(16)));
    double sum = 0, squares = 0;
    unsigned long i;

    if (n > MAX)
        n = MAX;
    /* Loops of a known count: -O2 vectorises them (mulps, addps, movaps to and from the stack). */
    for (i = 0; i < MAX; i++)
        local[i] = in[i] * 0.5f + 1.0f;
    for (i = 0; i < MAX; i++)
        out->scaled[i] = local[i] * 3.0f;
    for (i = 0; i < n; i++) {
        sum += local[i];
        squares += (double)local[i] * local[i];
    }
    out->mean = sum / (double)n;
    out->norm = __builtin_sqrt(squares);
}
