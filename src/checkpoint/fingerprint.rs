//! A cheap fingerprint of a checkpoint's tensors, recorded in the manifest so that `verify` can
//! say that an output was made from another source before it compares a byte (issue #14).
//!
//! Entry points: [`fingerprint`] and [`compare`]. Each tensor gets a CRC-32 of its dtype,
//! shape and some of its data, keyed by its name: all of it up to [`WHOLE`] bytes, else [`WINDOWS`] windows of
//! [`WINDOW`] bytes spread evenly from the first byte to the last. So it reads at most a few pages
//! per tensor, and verify reads those pages again anyway. It is about the tensors, not the files:
//! the same tensors re-saved with another header order, metadata or file split are the same
//! source. Two checkpoints of the same shape but other weights differ in every sampled tensor; a
//! change the samples miss is still found by the byte comparison that follows.

use super::{Checkpoint, TensorInfo};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The name of the scheme below, recorded with the fingerprint.
pub const SCHEME: &str = "sampled-crc32-v2";
/// Tensors up to this many bytes are hashed whole.
pub const WHOLE: usize = 4096;
/// Windows sampled from a larger tensor.
pub const WINDOWS: usize = 8;
/// Bytes per window.
pub const WINDOW: usize = 64;

/// The fingerprint of a checkpoint (the manifest's `source_fingerprint`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// How it was computed ([`SCHEME`]).
    pub scheme: String,
    /// CRC-32 of every tensor's name and CRC-32 in name order, 8 hex digits.
    pub crc32: String,
    /// Per checkpoint tensor: CRC-32 of its name, dtype, shape and sampled data, 8 hex digits.
    pub tensors: BTreeMap<String, String>,
}

/// The fingerprint of `ckpt`'s tensors.
pub fn fingerprint(ckpt: &Checkpoint) -> Fingerprint {
    // The sampled pages are asked for first, all at once: on a cold cache, a page fault of the
    // map would read the 8 MiB around each window (the whole of most tensors) and wait for it.
    for info in ckpt.meta.tensors.values() {
        let len = info.end - info.start;
        let file = ckpt.file(info.file);
        if len <= WHOLE as u64 {
            crate::write::read::will_need(file, info.start, len);
        } else {
            let last = len - WINDOW as u64;
            for k in 0..WINDOWS as u64 {
                crate::write::read::will_need(file, info.start + k * last / (WINDOWS as u64 - 1), WINDOW as u64);
            }
        }
    }
    fingerprint_with(&ckpt.meta.tensors, &|_, info, off, len, out| {
        out.extend_from_slice(ckpt.bytes(info).get(off..off + len).unwrap_or(&[]))
    })
}

/// Reads `len` bytes at `off` of a tensor's data (name, info) and appends them to the buffer.
pub type ReadFn<'a> = dyn Fn(&str, &TensorInfo, usize, usize, &mut Vec<u8>) + Sync + 'a;

/// The fingerprint of `tensors` whose data `read` gives: a sharded input read back gives the
/// fingerprint of the checkpoint it was made from (`plan::backward`).
pub fn fingerprint_with(tensors: &BTreeMap<String, TensorInfo>, read: &ReadFn<'_>) -> Fingerprint {
    let tensors: BTreeMap<String, String> = tensors
        .par_iter()
        .map(|(name, info)| {
            // Not the name (v1 hashed it): it is the key, and the same tensor may be named in
            // another convention (a mapping's `source_prefixes`; issue #16).
            let mut h = crc32fast::Hasher::new();
            h.update(info.dtype.name().as_bytes());
            h.update(&[0]);
            h.update(&(info.shape.len() as u64).to_le_bytes());
            for d in &info.shape {
                h.update(&(*d as u64).to_le_bytes());
            }
            let n = info.nbytes() as usize;
            h.update(&(n as u64).to_le_bytes());
            let mut buf = Vec::with_capacity(WHOLE.min(n));
            if n <= WHOLE {
                read(name, info, 0, n, &mut buf);
                h.update(&buf);
            } else {
                let last = n - WINDOW;
                for k in 0..WINDOWS {
                    buf.clear();
                    read(name, info, k * last / (WINDOWS - 1), WINDOW, &mut buf);
                    h.update(&buf);
                }
            }
            (name.clone(), format!("{:08x}", h.finalize()))
        })
        .collect();
    Fingerprint { scheme: SCHEME.into(), crc32: overall(&tensors), tensors }
}

/// The CRC-32 of every tensor's name and CRC-32 in name order.
fn overall(tensors: &BTreeMap<String, String>) -> String {
    let mut all = crc32fast::Hasher::new();
    for (name, crc) in tensors {
        all.update(name.as_bytes());
        all.update(&[0]);
        all.update(crc.as_bytes());
    }
    format!("{:08x}", all.finalize())
}

impl Fingerprint {
    /// The fingerprint without the tensors `drop` names: the tied copies a checkpoint may or may
    /// not carry (a sharded input read back has none), so that both compare alike.
    pub fn without<'a>(&self, drop: impl IntoIterator<Item = &'a str>) -> Fingerprint {
        let mut tensors = self.tensors.clone();
        for n in drop {
            tensors.remove(n);
        }
        Fingerprint { scheme: self.scheme.clone(), crc32: overall(&tensors), tensors }
    }

    /// The fingerprint with every tensor named by `name` (a mapping's canonical names), so that
    /// a checkpoint and the shards made from it, read back under canonical names, compare alike.
    pub fn renamed(&self, name: impl Fn(&str) -> String) -> Fingerprint {
        let tensors: BTreeMap<String, String> = self.tensors.iter().map(|(n, c)| (name(n), c.clone())).collect();
        Fingerprint { scheme: self.scheme.clone(), crc32: overall(&tensors), tensors }
    }
}

/// How a recorded fingerprint compares with the one of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Comparison {
    /// The same tensors.
    Same,
    /// Other tensors; what differs, in words.
    Differs(String),
    /// The recorded one uses a scheme this build does not know.
    UnknownScheme(String),
}

/// Compares the fingerprint `recorded` (the manifest's) with `now` (the checkpoint's).
pub fn compare(recorded: &Fingerprint, now: &Fingerprint) -> Comparison {
    if recorded.scheme != now.scheme {
        return Comparison::UnknownScheme(recorded.scheme.clone());
    }
    if recorded.crc32 == now.crc32 && recorded.tensors == now.tensors {
        return Comparison::Same;
    }
    let differ: Vec<&String> =
        now.tensors.iter().filter(|(n, c)| recorded.tensors.get(*n).is_some_and(|r| r != *c)).map(|(n, _)| n).collect();
    let gone: Vec<&String> = recorded.tensors.keys().filter(|n| !now.tensors.contains_key(*n)).collect();
    let new: Vec<&String> = now.tensors.keys().filter(|n| !recorded.tensors.contains_key(*n)).collect();
    let first = |v: &[&String]| v.first().map(|n| format!(" (first: {})", crate::text::q(n))).unwrap_or_default();
    let mut parts = Vec::new();
    if !differ.is_empty() {
        parts.push(format!(
            "{} of {} tensors differ in dtype, shape or sampled bytes{}",
            differ.len(),
            now.tensors.len(),
            first(&differ)
        ));
    }
    if !gone.is_empty() {
        parts.push(format!("{} tensor(s) of the manifest's source are not in it{}", gone.len(), first(&gone)));
    }
    if !new.is_empty() {
        parts.push(format!("{} tensor(s) in it were not in the manifest's source{}", new.len(), first(&new)));
    }
    if parts.is_empty() {
        parts.push(format!("fingerprint crc32 {} recorded, {} now", recorded.crc32, now.crc32));
    }
    Comparison::Differs(parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(tensors: &[(&str, &str)]) -> Fingerprint {
        let tensors: BTreeMap<String, String> = tensors.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        Fingerprint { scheme: SCHEME.into(), crc32: format!("{}", tensors.len()), tensors }
    }

    #[test]
    fn comparison_names_what_differs() {
        let a = fp(&[("a", "1"), ("b", "2"), ("c", "3")]);
        assert_eq!(compare(&a, &a.clone()), Comparison::Same);
        let b = fp(&[("a", "1"), ("b", "9"), ("d", "3")]);
        let Comparison::Differs(msg) = compare(&a, &b) else { panic!() };
        assert!(msg.contains("1 of 3 tensors differ in dtype, shape or sampled bytes (first: `b`)"), "{msg}");
        assert!(msg.contains("1 tensor(s) of the manifest's source are not in it (first: `c`)"), "{msg}");
        assert!(msg.contains("1 tensor(s) in it were not in the manifest's source (first: `d`)"), "{msg}");
        let old = Fingerprint { scheme: "v0".into(), ..a.clone() };
        assert_eq!(compare(&old, &a), Comparison::UnknownScheme("v0".into()));
    }
}
