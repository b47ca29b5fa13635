//! Feeds a virtio-blk device a request queue whose descriptor table, available ring, request
//! headers and data all come from the input: queue walking and block request parsing must fail
//! bad requests cleanly, never panic, hang or reach outside guest memory or the image.

#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use kvmkit_core::devices::virtio::{ActiveQueues, Block, Interrupt, VirtioDevice};
use kvmkit_core::vstate::memory::GuestMemory;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const MEMORY_SIZE: usize = 1 << 20;
const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;
const IMAGE_SIZE: u64 = 64 << 10;

/// One small image for the whole run.
fn image() -> &'static PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("kvmkit-fuzz-{}.img", std::process::id()));
        std::fs::File::create(&path).and_then(|f| f.set_len(IMAGE_SIZE)).unwrap();
        path
    })
}

fuzz_target!(|data: &[u8]| {
    let memory = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).unwrap());
    // The input covers the rings and the first buffers; the rest of memory is zero.
    memory.write_slice(&data[..data.len().min(MEMORY_SIZE)], GuestAddress(0)).unwrap();
    let mut queue = Queue::new(QUEUE_SIZE).unwrap();
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    let mut block = Block::new(image(), false).unwrap();
    let interrupt = Arc::new(Interrupt::new(None, block.counters().clone()));
    let active = ActiveQueues { memory, queues: vec![queue], features: 0, interrupt };
    block.activate(active).unwrap();
    block.process_queue(0);
});
