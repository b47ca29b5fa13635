//! Drives a virtio-mmio transport with an arbitrary sequence of register accesses and queue
//! notifications over guest memory whose first bytes come from the input: the handshake state
//! machine, queue setup and the queue walk must never panic or touch memory out of bounds.
//!
//! Input: a 2-byte little-endian count of operations, the operations (7 bytes each: kind, 2-byte
//! register offset, 4-byte value), then the first bytes of guest memory (rings, descriptors,
//! buffers). Operations come first so that inputs within libFuzzer's default length cap (4 KiB)
//! still drive the registers. `fuzz/seeds.py` writes seeds that make a driver's moves.

#![no_main]

use std::sync::{Arc, Mutex};

use kvmkit_core::bus::BusDevice;
use kvmkit_core::devices::virtio::{DeviceCounters, Interrupt, MmioTransport, Rng, SharedDevice, VirtioDevice};
use kvmkit_core::vstate::memory::GuestMemory;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEMORY_SIZE: usize = 1 << 20;
const OP_SIZE: usize = 7;

fuzz_target!(|data: &[u8]| {
    let Some((count, rest)) = data.split_first_chunk::<2>() else { return };
    let ops_len = (usize::from(u16::from_le_bytes(*count)) * OP_SIZE).min(rest.len());
    let (ops, seed) = rest.split_at(ops_len);
    let memory = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).unwrap());
    memory.write_slice(&seed[..seed.len().min(MEMORY_SIZE)], GuestAddress(0)).unwrap();
    let rng = Rng::new();
    let counters: Arc<DeviceCounters> = rng.counters().clone();
    let device: SharedDevice = Arc::new(Mutex::new(rng));
    let interrupt = Arc::new(Interrupt::new(None, counters));
    let notifier = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let transport = MmioTransport::new(device.clone(), memory, interrupt, vec![notifier.try_clone().unwrap()]);
    for op in ops.chunks_exact(OP_SIZE) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x200;
        let value = [op[3], op[4], op[5], op[6]];
        match op[0] % 4 {
            0 => {
                let mut buf = [0u8; 4];
                let _ = transport.read(0, offset, &mut buf);
            }
            1 => {
                let _ = transport.write(0, offset, &value);
            }
            2 => {
                let width = usize::from(op[3] % 4) + 1;
                let _ = transport.write(0, offset, &value[..width]);
            }
            _ => {
                // What the event loop does when the notifier fires.
                if notifier.read().is_ok() {
                    device.lock().unwrap().process_queue(0);
                }
            }
        }
    }
});
