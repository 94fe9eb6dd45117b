//! Progress reporting from the library's long phases (verifying, the forward check) to whoever
//! draws it: the library only counts; the binary decides whether and how to draw a bar.
//!
//! Entry point: [`Progress`], carried in [`crate::verify::VerifyOptions`]; the default reports
//! nothing.

use std::sync::Arc;

/// The unit a phase counts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Bytes (of tensor data compared or written).
    Bytes,
    /// Items (cross-attention layers).
    Items,
}

/// Receives progress; must be cheap, it is called from worker threads.
pub trait Sink: Send + Sync {
    /// A phase begins: `label` (`verifying`, `forward check`), `total` units of `unit`.
    fn start(&self, label: &str, total: u64, unit: Unit);
    /// `n` more units of the current phase are done.
    fn inc(&self, n: u64);
}

/// A handle to a [`Sink`], or nothing.
#[derive(Clone, Default)]
pub struct Progress(Option<Arc<dyn Sink>>);

impl Progress {
    /// Reports to `sink`.
    pub fn new(sink: Arc<dyn Sink>) -> Progress {
        Progress(Some(sink))
    }

    /// See [`Sink::start`].
    pub fn start(&self, label: &str, total: u64, unit: Unit) {
        if let Some(s) = &self.0 {
            s.start(label, total, unit);
        }
    }

    /// See [`Sink::inc`].
    pub fn inc(&self, n: u64) {
        if let Some(s) = &self.0 {
            s.inc(n);
        }
    }
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Progress(sink)" } else { "Progress(none)" })
    }
}
