//! Bulk transfers (a checkpoint or a dataset streamed in 1 MiB chunks) announced to whoever tunes the process's
//! memory allocator.
//!
//! A server that gives freed memory back to the system at once stays small when idle, but a transfer frees and
//! allocates a chunk's worth of memory per MiB it moves, and memory given back is faulted in and zeroed again on
//! its next use. The binary that picks the allocator's policy registers a hook ([`on_transfers`]); the code
//! that moves the bytes holds a [`Transfer`] while it does. Without a hook, announcing does nothing.

use std::sync::{Mutex, OnceLock};

/// Told `true` when the first transfer starts and `false` when the last one ends.
type Hook = fn(bool);

static HOOK: OnceLock<Hook> = OnceLock::new();

/// Transfers in flight in this process.
static IN_FLIGHT: Mutex<usize> = Mutex::new(0);

/// Registers the hook told when transfers start and end; only the first registration counts.
pub fn on_transfers(hook: Hook) {
    let _ = HOOK.set(hook);
}

/// A bulk transfer in flight, until dropped.
#[must_use = "the transfer counts only while this is held"]
#[derive(Debug)]
pub struct Transfer(());

/// Announces a bulk transfer, which lasts until the returned value is dropped.
pub fn transfer() -> Transfer {
    let mut n = IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
    *n += 1;
    if *n == 1
        && let Some(hook) = HOOK.get()
    {
        // Told under the lock, so that a start and an end told at once reach the hook in the order counted.
        hook(true);
    }
    Transfer(())
}

impl Drop for Transfer {
    fn drop(&mut self) {
        let mut n = IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0
            && let Some(hook) = HOOK.get()
        {
            hook(false);
        }
    }
}

/// How many bytes make a transfer bulk: a code snapshot or a small checkpoint moves without announcing itself
/// (announcing costs a collection of freed memory at the end).
pub const BULK_BYTES: u64 = 16 << 20;

/// Counts the bytes a transfer has moved, and announces it as a [`Transfer`] once they pass [`BULK_BYTES`].
#[derive(Debug, Default)]
pub struct Meter {
    moved: u64,
    transfer: Option<Transfer>,
}

impl Meter {
    /// Counts `n` more bytes moved.
    pub fn moved(&mut self, n: usize) {
        self.moved = self.moved.saturating_add(n as u64);
        if self.transfer.is_none() && self.moved >= BULK_BYTES {
            self.transfer = Some(transfer());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn in_flight() -> usize {
        *IN_FLIGHT.lock().unwrap()
    }

    static STARTS: AtomicUsize = AtomicUsize::new(0);
    static ENDS: AtomicUsize = AtomicUsize::new(0);

    fn count(active: bool) {
        if active {
            STARTS.fetch_add(1, Ordering::SeqCst);
        } else {
            ENDS.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_hook_hears_the_first_start_and_the_last_end() {
        on_transfers(count);
        let a = transfer();
        let b = transfer();
        assert_eq!(in_flight(), 2);
        drop(a);
        assert_eq!(
            (STARTS.load(Ordering::SeqCst), ENDS.load(Ordering::SeqCst)),
            (1, 0)
        );
        drop(b);
        assert_eq!(
            (STARTS.load(Ordering::SeqCst), ENDS.load(Ordering::SeqCst)),
            (1, 1)
        );
        let threads: Vec<_> = (0..8)
            .map(|_| std::thread::spawn(|| drop(transfer())))
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(in_flight(), 0);
        assert_eq!(STARTS.load(Ordering::SeqCst), ENDS.load(Ordering::SeqCst));
        // A meter announces its transfer once past the bulk size, until dropped.
        let mut meter = Meter::default();
        meter.moved(usize::try_from(BULK_BYTES).unwrap() - 1);
        assert_eq!(in_flight(), 0);
        meter.moved(1);
        meter.moved(1 << 20);
        assert_eq!(in_flight(), 1);
        drop(meter);
        assert_eq!(in_flight(), 0);
    }
}
