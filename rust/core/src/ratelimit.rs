//! Rate limiting for log messages the guest can cause: a guest that misbehaves in a loop would
//! otherwise flood the host's log (and pay for every record on its vCPU or device thread).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Each call site logs at most [`BURST`] messages per window of this length.
pub const WINDOW: Duration = Duration::from_secs(1);

/// How many messages a call site logs per [`WINDOW`] before it stays quiet.
pub const BURST: u32 = 5;

/// The state of one call site's limit.
#[derive(Debug, Default)]
pub struct RateLimit(Mutex<Option<Window>>);

#[derive(Debug)]
struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

impl RateLimit {
    /// A limit that has let nothing through yet.
    pub const fn new() -> Self {
        Self(Mutex::new(None))
    }

    /// Whether to log a message now: `Some(n)` to log it, saying that `n` messages were suppressed
    /// before it, or `None` to drop it (and count it).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut window = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let window = match &mut *window {
            Some(window) if now.saturating_duration_since(window.start) < WINDOW => window,
            slot => {
                let suppressed = slot.as_ref().map_or(0, |old| old.suppressed);
                *slot = Some(Window { start: now, logged: 1, suppressed: 0 });
                return Some(suppressed);
            }
        };
        if window.logged < BURST {
            window.logged += 1;
            Some(0)
        } else {
            window.suppressed += 1;
            None
        }
    }
}

/// Logs a message the guest caused, like `log::log!(level, ...)`, but at most [`BURST`] times per
/// [`WINDOW`] from each call site; the first message after a quiet spell says how many were
/// suppressed.
macro_rules! guest_log {
    ($level:expr, $($message:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if log::log_enabled!($level) {
            match LIMIT.admit() {
                Some(0) => log::log!($level, $($message)+),
                Some(suppressed) => {
                    log::log!($level, "{} ({suppressed} more like it suppressed)", format_args!($($message)+))
                }
                None => {}
            }
        }
    }};
}
pub(crate) use guest_log;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rest_of_the_window_is_counted() {
        let limit = RateLimit::new();
        let start = Instant::now();
        for _ in 0..BURST {
            assert_eq!(limit.admit_at(start), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(limit.admit_at(start + WINDOW / 2), None);
        }
        assert_eq!(limit.admit_at(start + WINDOW), Some(1000), "the next window reports the count");
        assert_eq!(limit.admit_at(start + WINDOW), Some(0));
        assert_eq!(limit.admit_at(start + 3 * WINDOW), Some(0), "a quiet window suppressed nothing");
    }
}
