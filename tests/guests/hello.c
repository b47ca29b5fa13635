/* C runtime check, C guest (guest.h conventions): arg = seed; fills 256 bytes from a 64-bit LCG seeded with arg ^ seed (0x9e3779b97f4a7c15, in .data), copies them, flips bit 0 of byte 100 and sets the first 16 bytes to 0x5a in the copy, returns the 32-bit hash h = h * 31 + byte over it (h starts at 0); prints "hello arg=<hex>\nhash=<hex>\n". */
#include "guest.h"

/* Not static, so that the compiler loads them instead of folding in their initial values:
 * seed must come from the image's .data, hash_start from the .bss that start.S clears. */
u64 seed = 0x9e3779b97f4a7c15ull;
u32 hash_start;
static u8 bytes[256], copy[256];

int main(u64 arg)
{
    print("hello arg=");
    print_hex(arg);
    print("\n");

    u64 x = arg ^ seed;
    for (unsigned i = 0; i < sizeof bytes; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        bytes[i] = (u8)(x >> 56);
    }
    memcpy(copy, bytes, sizeof copy);
    CHECK(memcmp(copy, bytes, sizeof copy) == 0);
    copy[100] ^= 1;
    CHECK(memcmp(copy, bytes, sizeof copy) != 0);
    CHECK(memcmp("abc", "abd", 3) < 0 && memcmp("abd", "abc", 3) > 0);
    memset(copy, 0x5a, 16);

    u32 hash = hash_start;
    for (unsigned i = 0; i < sizeof copy; i++)
        hash = hash * 31 + copy[i];
    print("hash=");
    print_hex(hash);
    print("\n");
    return (int)hash;
}
