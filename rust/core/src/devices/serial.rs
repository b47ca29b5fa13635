//! A 16550A UART (the `vm-superio` model) on the port bus: guest output goes to a
//! [`ConsoleOutput`], host input is fed into the receive FIFO as the guest drains it.
//!
//! A snapshot ([`SerialPortState`]) keeps the UART's registers, its receive FIFO and the host input
//! still waiting for room in it. The console output is the host's, not the UART's, and stays
//! with the port a state is restored into.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{Error as UartError, NoEvents};
use vm_superio::{Serial, SerialState, Trigger};

use crate::bus::{BusDevice, DeviceError};
use crate::devices::console::{ConsoleOutput, ConsoleWriter};
use crate::devices::{AccessCounters, CountedDevice};
use crate::snapshot::{Persist, StateError};

/// The registers of a UART span eight ports.
pub const SERIAL_PORT_SIZE: u64 = 8;

/// A UART whose interrupt line is `T`.
pub struct SerialPort<T: Trigger> {
    uart: Mutex<Uart<T>>,
    counters: AccessCounters,
}

struct Uart<T: Trigger> {
    model: Serial<SharedLine<T>, NoEvents, ConsoleWriter>,
    /// Host input not yet in the receive FIFO.
    pending: VecDeque<u8>,
}

/// The interrupt line, shared so that a restore can build a new model that raises the same line.
struct SharedLine<T>(Arc<T>);

impl<T> Clone for SharedLine<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T: Trigger> Trigger for SharedLine<T> {
    type E = T::E;

    fn trigger(&self) -> Result<(), T::E> {
        self.0.trigger()
    }
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
        let model = Serial::new(SharedLine(Arc::new(interrupt)), ConsoleWriter(output));
        let uart = Uart { model, pending: VecDeque::new() };
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

impl<T: Trigger + Send + Sync> BusDevice for SerialPort<T> {
    crate::persist_on_bus!();

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

impl<T: Trigger + Send + Sync> CountedDevice for SerialPort<T> {
    fn counters(&self) -> &AccessCounters {
        &self.counters
    }
}

/// The saved state of a [`SerialPort`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default)]
pub struct SerialPortState {
    /// The UART's registers and receive FIFO.
    #[serde(with = "UartState")]
    pub uart: SerialState,
    /// Host input not yet in the receive FIFO, oldest first; it moves in as the guest reads.
    pub pending_input: Vec<u8>,
}

impl Default for SerialPortState {
    /// A port after a reset, so that a field an older state lacks takes its reset value.
    fn default() -> Self {
        Self { uart: SerialState::default(), pending_input: Vec::new() }
    }
}

/// How `vm-superio`'s `SerialState` (which is not serde data itself) is written: its registers
/// and receive FIFO, field for field.
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState", default = "SerialState::default")]
struct UartState {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    /// The interrupts raised and not yet acknowledged.
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    /// The receive FIFO: bytes received and not yet read, oldest first.
    in_buffer: Vec<u8>,
}

impl<T: Trigger> Persist for SerialPort<T> {
    type State = SerialPortState;

    fn save(&self) -> SerialPortState {
        let uart = self.lock();
        SerialPortState { uart: uart.model.state(), pending_input: uart.pending.iter().copied().collect() }
    }

    /// Builds a new model from the state on this port's interrupt line and console. The model
    /// raises the interrupt if the state has one pending and enabled: the guest has not taken it
    /// yet (reading the identification register clears it), and the signal the saved port sent
    /// went to a line that may since have been reset, or lives in another process.
    fn restore(&self, state: &SerialPortState) -> Result<(), StateError> {
        let mut uart = self.lock();
        let line = uart.model.interrupt_evt().clone();
        let output = ConsoleWriter(uart.model.writer().0.clone());
        let model = Serial::from_state(&state.uart, line, NoEvents, output).map_err(|e| {
            StateError::new(match e {
                UartError::FullFifo => format!(
                    "serial port: the receive FIFO holds {} bytes, more than the UART's FIFO has room for",
                    state.uart.in_buffer.len()
                ),
                UartError::Trigger(e) => format!("serial port: the restored UART could not raise its interrupt: {e:?}"),
                UartError::IOError(e) => format!("serial port: {e}"),
            })
        })?;
        *uart = Uart { model, pending: state.pending_input.iter().copied().collect() };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_util::CountingIrq;
    use std::time::Duration;

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const SCR: u64 = 7;
    const LSR_DATA_READY: u8 = 0x01;
    const IER_RECEIVED_DATA: u8 = 0x01;
    const IER_TRANSMITTER_EMPTY: u8 = 0x02;
    const LCR_DIVISOR_LATCH: u8 = 0x80;
    /// The identification register when no interrupt is pending, with the 16550A's FIFO bits.
    const IIR_NONE: u8 = 0xc1;

    fn read(port: &SerialPort<CountingIrq>, offset: u64) -> u8 {
        let mut data = [0u8];
        port.read(0x3f8, offset, &mut data).unwrap();
        data[0]
    }

    fn write(port: &SerialPort<CountingIrq>, offset: u64, value: u8) {
        port.write(0x3f8, offset, &[value]).unwrap();
    }

    fn new_port() -> (SerialPort<CountingIrq>, CountingIrq, Arc<ConsoleOutput>) {
        let (irq, output) = (CountingIrq::default(), Arc::new(ConsoleOutput::new()));
        (SerialPort::new(irq.clone(), output.clone()), irq, output)
    }

    fn round_trip(state: &SerialPortState) -> SerialPortState {
        serde_json::from_str(&serde_json::to_string(state).unwrap()).unwrap()
    }

    /// The divisor latch, then registers 1 to 7, as a guest reads them (reading IIR acknowledges).
    fn registers(port: &SerialPort<CountingIrq>) -> Vec<u8> {
        let lcr = read(port, LCR);
        write(port, LCR, lcr | LCR_DIVISOR_LATCH);
        let mut values = vec![read(port, 0), read(port, 1)];
        write(port, LCR, lcr);
        values.extend((1..8).map(|offset| read(port, offset)));
        values
    }

    /// Reads the receive FIFO until it is empty, fed by pending host input as it drains.
    fn drain(port: &SerialPort<CountingIrq>) -> Vec<u8> {
        let mut received = Vec::new();
        while read(port, LSR) & LSR_DATA_READY != 0 {
            received.push(read(port, DATA));
        }
        received
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
        assert!(irq.count() > 0);
        let mut received = Vec::new();
        while read(&port, LSR) & LSR_DATA_READY != 0 {
            received.push(read(&port, DATA));
        }
        assert_eq!(received, input, "more input than the FIFO holds arrives in order");
    }

    #[test]
    fn restored_uart_answers_as_saved() {
        let (port, _, _) = new_port();
        write(&port, LCR, LCR_DIVISOR_LATCH);
        write(&port, 0, 0x01); // 115200 baud
        write(&port, 1, 0x00);
        write(&port, LCR, 0x1b); // 8 bits, even parity
        write(&port, MCR, 0x0b);
        write(&port, SCR, 0x5a);
        write(&port, IER, IER_RECEIVED_DATA);
        let input: Vec<u8> = (0..100u8).collect();
        port.send_input(&input); // more than the FIFO holds: some stays pending
        assert_eq!([read(&port, DATA), read(&port, DATA)], [0, 1]);
        let state = round_trip(&port.save());
        assert_eq!(state.uart.in_buffer.len() + state.pending_input.len(), 98);
        assert!(!state.pending_input.is_empty());

        let (fresh, _, fresh_output) = new_port();
        fresh.restore(&state).unwrap();
        assert_eq!(fresh.save(), state);
        let expected = registers(&port);
        assert_eq!(expected[..2], [0x01, 0x00]);
        assert_eq!(expected[2..], [IER_RECEIVED_DATA, 0xc4, 0x1b, 0x0b, 0x61, 0xb0, 0x5a]);
        assert_eq!(registers(&fresh), expected);
        let rest = drain(&port);
        assert_eq!(rest, &input[2..]);
        assert_eq!(drain(&fresh), rest);

        for device in [&port, &fresh] {
            write(device, DATA, b'k');
            device.send_input(b"later");
        }
        assert_eq!(fresh_output.read_from(0, Duration::ZERO).1, b"k", "output goes to the new port's console");
        assert_eq!(registers(&fresh), registers(&port));
        assert_eq!(drain(&fresh), drain(&port));
        assert_eq!(fresh.save(), port.save());
    }

    #[test]
    fn a_pending_interrupt_is_raised_again_after_restore() {
        let (port, irq, _) = new_port();
        write(&port, IER, IER_RECEIVED_DATA);
        port.send_input(b"x");
        assert_eq!(irq.count(), 1);
        let state = round_trip(&port.save());

        let (fresh, fresh_irq, _) = new_port();
        fresh.restore(&state).unwrap();
        assert_eq!(fresh_irq.count(), 1, "the guest has not taken the interrupt yet");
        assert_eq!(read(&fresh, IIR), 0xc4, "received data available");
        // In place, into the port that raised it.
        port.restore(&state).unwrap();
        assert_eq!(irq.count(), 2);
        assert_eq!(read(&port, DATA), b'x');

        // The transmitter-empty interrupt too.
        write(&port, IER, IER_TRANSMITTER_EMPTY);
        let state = port.save();
        fresh.restore(&state).unwrap();
        assert_eq!(fresh_irq.count(), 2);
        assert_eq!(read(&fresh, IIR), 0xc2);
    }

    #[test]
    fn no_interrupt_is_raised_when_none_is_pending() {
        let (port, _, _) = new_port();
        write(&port, IER, IER_RECEIVED_DATA);
        port.send_input(b"x");
        assert_eq!(read(&port, IIR), 0xc4); // the guest takes the interrupt
        write(&port, IER, 0);
        port.send_input(b"y"); // and masks it while data arrives
        let state = port.save();

        let (fresh, fresh_irq, _) = new_port();
        fresh.restore(&state).unwrap();
        assert_eq!(fresh_irq.count(), 0);
        assert_eq!(read(&fresh, IIR), IIR_NONE);
        assert_eq!(drain(&fresh), b"xy");
    }

    #[test]
    fn an_overfull_fifo_is_refused() {
        let (port, irq, _) = new_port();
        write(&port, IER, IER_RECEIVED_DATA);
        port.send_input(b"abc");
        let before = port.save();
        let mut state = before.clone();
        state.uart.in_buffer = vec![0; 65];
        let err = port.restore(&state).unwrap_err();
        assert!(err.0.starts_with("serial port:") && err.0.contains("65 bytes"), "{err}");
        assert_eq!(port.save(), before, "a refused state changes nothing");
        assert_eq!(irq.count(), 1);
        assert_eq!(drain(&port), b"abc");
    }

    #[test]
    fn an_empty_state_is_a_reset_uart() {
        let (port, irq, _) = new_port();
        write(&port, SCR, 0x77);
        write(&port, IER, IER_TRANSMITTER_EMPTY);
        port.restore(&serde_json::from_str("{}").unwrap()).unwrap();
        assert_eq!(irq.count(), 1, "only the write to IER raised the interrupt");
        assert_eq!(registers(&port), registers(&new_port().0));
        assert_eq!(read(&port, SCR), 0);
    }
}
