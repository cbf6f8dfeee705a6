//! Live progress of a long operation (a backup, a restore, a bulk delete), shared
//! between the task doing the work and the pages that show it.

use std::sync::{
    Mutex,
    atomic::{AtomicU64, Ordering},
};

/// Counters a running operation updates and a page reads. Cheap to update from a
/// hot loop (atomics); the phase is a short word (`dumping`, `verifying`).
#[derive(Debug, Default)]
pub struct Progress {
    bytes: AtomicU64,
    items: AtomicU64,
    items_total: AtomicU64,
    phase: Mutex<String>,
}

impl Progress {
    pub fn new(phase: &str) -> Progress {
        let p = Progress::default();
        p.set_phase(phase);
        p
    }

    pub fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn add_items(&self, n: u64) {
        self.items.fetch_add(n, Ordering::Relaxed);
    }

    pub fn items(&self) -> u64 {
        self.items.load(Ordering::Relaxed)
    }

    /// The number of items expected in all, when known (0 = unknown).
    pub fn set_items_total(&self, n: u64) {
        self.items_total.store(n, Ordering::Relaxed);
    }

    pub fn items_total(&self) -> u64 {
        self.items_total.load(Ordering::Relaxed)
    }

    pub fn set_phase(&self, phase: &str) {
        if let Ok(mut p) = self.phase.lock() {
            phase.clone_into(&mut p);
        }
    }

    pub fn phase(&self) -> String {
        self.phase.lock().map(|p| p.clone()).unwrap_or_default()
    }
}
