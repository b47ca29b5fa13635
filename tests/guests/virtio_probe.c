/* virtio-mmio probe, C guest (guest.h conventions): arg = MMIO base; returns virtio_probe(arg) (the DeviceID or a negative VIRTIO_ERR_*) and prints "probe=<decimal or -decimal>\n". */
#include "virtio.h"

int main(u64 arg)
{
    int result = virtio_probe((uintptr_t)arg);
    print("probe=");
    if (result < 0)
        print("-");
    print_dec((u64)(result < 0 ? -result : result));
    print("\n");
    return result;
}
