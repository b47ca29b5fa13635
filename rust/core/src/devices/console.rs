//! Where a guest console's output goes: kept in memory for readers, who can wait for more, and
//! optionally copied to a log file and a live writer such as a terminal.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// How much output is kept in memory; older bytes are dropped (the log file keeps everything).
const KEPT_BYTES: usize = 16 << 20;
/// Waiting readers are woken when a line ends. Output that does not end one (a shell's prompt)
/// reaches them within this long, because they look again this often while they wait.
const UNTERMINATED_LATENCY: Duration = Duration::from_millis(10);

/// The output of a guest console.
#[derive(Default)]
pub struct ConsoleOutput {
    state: Mutex<State>,
    grew: Condvar,
}

#[derive(Default)]
struct State {
    kept: VecDeque<u8>,
    /// Bytes written in all, so offsets stay valid after old output is dropped.
    total: u64,
    copies: Vec<Box<dyn Write + Send>>,
    /// Readers waiting for output. Appending wakes them only when there are some and a line
    /// ends: a guest writes its console byte by byte, and waking a reader for each byte costs
    /// the guest a thread switch per byte (a Linux boot's log took half its boot time so).
    waiting: usize,
    /// Signalled at the next output once armed, for an event loop waiting for output.
    notifier: Option<EventFd>,
    armed: bool,
}

impl ConsoleOutput {
    /// Empty output with no copies.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also sends all further output to `copy` (a log file, a terminal). A copy that fails is
    /// dropped, so a closed terminal cannot stall the guest.
    pub fn add_copy(&self, copy: Box<dyn Write + Send>) {
        self.lock().copies.push(copy);
    }

    /// Appends guest output.
    pub fn append(&self, data: &[u8]) {
        let mut state = self.lock();
        state.kept.extend(data);
        let excess = state.kept.len().saturating_sub(KEPT_BYTES);
        state.kept.drain(..excess);
        state.total += data.len() as u64;
        state.copies.retain_mut(|copy| copy.write_all(data).and_then(|()| copy.flush()).is_ok());
        let wake = state.waiting > 0 && data.contains(&b'\n');
        if std::mem::take(&mut state.armed) {
            if let Some(notifier) = &state.notifier {
                let _ = notifier.write(1);
            }
        }
        drop(state);
        if wake {
            self.grew.notify_all();
        }
    }

    /// A non-blocking eventfd that becomes readable at the next output, for an event loop to wait
    /// on: arm it, look for the output wanted, then wait for the descriptor and read it to clear
    /// it. Arming costs the guest one write to it at its next output, and nothing after.
    pub fn arm_notifier(&self) -> std::io::Result<RawFd> {
        let mut state = self.lock();
        if state.notifier.is_none() {
            state.notifier = Some(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        state.armed = true;
        Ok(state.notifier.as_ref().expect("made above").as_raw_fd())
    }

    /// Bytes written so far.
    pub fn total(&self) -> u64 {
        self.lock().total
    }

    /// The output from `offset` on (from the oldest kept byte if `offset` was dropped), waiting up
    /// to `wait` for some if there is none yet: a line's end is seen at once, anything else
    /// within `UNTERMINATED_LATENCY`. Returns the offset the bytes start at.
    pub fn read_from(&self, offset: u64, wait: Duration) -> (u64, Vec<u8>) {
        // A wait too long to be a time of day is a wait without end.
        let deadline = Instant::now().checked_add(wait);
        let mut state = self.lock();
        while state.total <= offset {
            let left = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                break;
            }
            state.waiting += 1;
            let slice = left.min(UNTERMINATED_LATENCY);
            state = self.grew.wait_timeout(state, slice).unwrap_or_else(|p| p.into_inner()).0;
            state.waiting -= 1;
        }
        let oldest = state.total - state.kept.len() as u64;
        let start = offset.clamp(oldest, state.total);
        let bytes = state.kept.iter().skip((start - oldest) as usize).copied().collect();
        (start, bytes)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A `Write` that appends to a [`ConsoleOutput`], for UART models that write to one.
pub struct ConsoleWriter(pub std::sync::Arc<ConsoleOutput>);

impl Write for ConsoleWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.append(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex as StdMutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<StdMutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn readers_get_output_from_their_offset_and_copies_get_all() {
        let output = ConsoleOutput::new();
        let copy = Shared::default();
        output.add_copy(Box::new(copy.clone()));
        output.append(b"Linux version ");
        output.append(b"6.1");
        assert_eq!(output.read_from(0, Duration::ZERO), (0, b"Linux version 6.1".to_vec()));
        assert_eq!(output.read_from(6, Duration::ZERO), (6, b"version 6.1".to_vec()));
        assert_eq!(output.read_from(17, Duration::from_millis(10)), (17, Vec::new()));
        assert_eq!(*copy.0.lock().unwrap(), b"Linux version 6.1");
    }

    #[test]
    fn an_armed_notifier_fires_once_at_the_next_output() {
        let output = ConsoleOutput::new();
        let fd = output.arm_notifier().unwrap();
        let pending = |fd: RawFd| {
            let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd, no wait.
            unsafe { libc::poll(&mut poll, 1, 0) == 1 }
        };
        assert!(!pending(fd));
        output.append(b"$ ");
        assert!(pending(fd));
        let notifier = output.lock().notifier.as_ref().unwrap().read().unwrap();
        assert_eq!(notifier, 1);
        output.append(b"more");
        assert!(!pending(fd), "disarmed after firing");
        assert_eq!(output.arm_notifier().unwrap(), fd, "one descriptor for the console's life");
    }

    #[test]
    fn a_waiting_reader_gets_a_prompt_without_a_newline() {
        let output = Arc::new(ConsoleOutput::new());
        let writer = output.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            writer.append(b"ready");
        });
        assert_eq!(output.read_from(0, Duration::from_secs(10)), (0, b"ready".to_vec()));
        thread.join().unwrap();
    }
}
