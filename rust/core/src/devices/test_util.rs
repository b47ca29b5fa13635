//! What device tests share.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vm_superio::Trigger;

/// An interrupt line that counts how often it was raised.
#[derive(Clone, Default)]
pub struct CountingIrq(Arc<AtomicUsize>);

impl Trigger for CountingIrq {
    type E = ();

    fn trigger(&self) -> Result<(), ()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl CountingIrq {
    /// Interrupts raised so far.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}
