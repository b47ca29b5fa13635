//! A 16550A UART (the `vm-superio` model) on the port bus: guest output goes to a
//! [`ConsoleOutput`], host input is fed into the receive FIFO as the guest drains it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use crate::bus::{BusDevice, DeviceError};
use crate::devices::console::{ConsoleOutput, ConsoleWriter};
use crate::devices::{AccessCounters, CountedDevice};

/// The registers of a UART span eight ports.
pub const SERIAL_PORT_SIZE: u64 = 8;

/// A UART whose interrupt line is `T`.
pub struct SerialPort<T: Trigger> {
    uart: Mutex<Uart<T>>,
    counters: AccessCounters,
}

struct Uart<T: Trigger> {
    model: Serial<T, NoEvents, ConsoleWriter>,
    /// Host input not yet in the receive FIFO.
    pending: VecDeque<u8>,
}

impl<T: Trigger> Uart<T> {
    /// Moves pending input into the FIFO as far as it has room (raising the interrupt if enabled).
    fn refill(&mut self) {
        let room = self.model.fifo_capacity().min(self.pending.len());
        if room > 0 {
            let chunk: Vec<u8> = self.pending.drain(..room).collect();
            if let Err(e) = self.model.enqueue_raw_bytes(&chunk) {
                log::warn!("serial input dropped: {e:?}");
            }
        }
    }
}

impl<T: Trigger> SerialPort<T> {
    /// A UART raising `interrupt` and writing to `output`.
    pub fn new(interrupt: T, output: Arc<ConsoleOutput>) -> Self {
        let uart = Uart { model: Serial::new(interrupt, ConsoleWriter(output)), pending: VecDeque::new() };
        Self { uart: Mutex::new(uart), counters: AccessCounters::default() }
    }

    /// Queues bytes for the guest to read.
    pub fn send_input(&self, data: &[u8]) {
        let mut uart = self.lock();
        uart.pending.extend(data);
        uart.refill();
    }

    fn lock(&self) -> MutexGuard<'_, Uart<T>> {
        // The model's state stays valid between register accesses, so a poisoned lock is usable.
        self.uart.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<T: Trigger + Send> BusDevice for SerialPort<T> {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.counters.count_read();
        let mut uart = self.lock();
        data.fill(0);
        data[0] = uart.model.read(offset as u8);
        uart.refill();
        Ok(())
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.counters.count_write();
        let mut uart = self.lock();
        uart.model.write(offset as u8, data[0]).map_err(|e| DeviceError::Failed(format!("serial port: {e:?}")))
    }
}

impl<T: Trigger + Send> CountedDevice for SerialPort<T> {
    fn counters(&self) -> &AccessCounters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 0x01;

    #[derive(Clone, Default)]
    struct CountingIrq(Arc<AtomicUsize>);

    impl Trigger for CountingIrq {
        type E = ();
        fn trigger(&self) -> Result<(), ()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn read(port: &SerialPort<CountingIrq>, offset: u64) -> u8 {
        let mut data = [0u8];
        port.read(0x3f8, offset, &mut data).unwrap();
        data[0]
    }

    #[test]
    fn guest_output_reaches_the_console() {
        let output = Arc::new(ConsoleOutput::new());
        let port = SerialPort::new(CountingIrq::default(), output.clone());
        for byte in b"hi\n" {
            port.write(0x3f8, DATA, &[*byte]).unwrap();
        }
        assert_eq!(output.read_from(0, Duration::ZERO).1, b"hi\n");
    }

    #[test]
    fn host_input_is_fed_as_the_guest_reads_with_interrupts() {
        let irq = CountingIrq::default();
        let port = SerialPort::new(irq.clone(), Arc::new(ConsoleOutput::new()));
        port.write(0x3f8, IER, &[0x01]).unwrap(); // received-data interrupt on
        let input: Vec<u8> = (0..200u32).map(|i| (i % 251) as u8).collect();
        port.send_input(&input);
        assert!(irq.0.load(Ordering::SeqCst) > 0);
        let mut received = Vec::new();
        while read(&port, LSR) & LSR_DATA_READY != 0 {
            received.push(read(&port, DATA));
        }
        assert_eq!(received, input, "more input than the FIFO holds arrives in order");
    }
}
