//! The byte comparison of one output file, read once, in order, around the page cache.
//!
//! An output file is read from its first byte to its last in windows of [`WINDOW`] bytes, by a
//! reader thread of its own, into [`WINDOWS`] reused aligned blocks: with `O_DIRECT` where the
//! window is not in the page cache (an output just written by `convert` never is), by `pread`
//! where it is. Each window's bytes feed the file's CRC-32 and are compared with what the plan
//! puts there, tensor by tensor: the source bytes of each piece (through the source's map, cast
//! when the plan casts), zeros, constants. So the output is read once, at the disk's speed,
//! without a fresh page-cache page per 4 KiB (on this VM, the first touch of a page the host has
//! taken back is slow: docs/performance.md, run 8), and memory is the blocks, whatever the size.
//!
//! The expected bytes are derived here from the plan's pieces ([`split::piece_runs`]), not by the
//! writer's units and streams, so a fault of the writer is not repeated by its check. A tensor
//! whose bytes differ is handed back by index: the caller describes the first difference from the
//! whole tensor ([`super::compare_tensor`]), as before.

use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::dtype::{self, Dtype};
use crate::plan::{split, OutTensor, Piece};
use crate::write::read::{self, Block, ReadMode, ALIGN};
use crate::write::Sources;
use std::os::unix::fs::FileExt;

/// Bytes of output read and compared at a time.
pub(crate) const WINDOW: usize = 2 << 20;
/// Blocks per file (and as many for source bytes read around the cache): one compared while the
/// reader reads the other.
pub(crate) const WINDOWS: usize = 2;
/// Elements cast at a time for a comparison (a scratch buffer of at most 128 KiB).
const CAST_STEP: usize = 1 << 14;

/// What is expected in a range of an output tensor.
enum Want {
    /// Source bytes at an offset of a source file, of dtype `from` (cast to the tensor's dtype
    /// when it is another).
    Source {
        file: usize,
        off: usize,
        from: Dtype,
    },
    Zeros,
    /// One element's bytes, repeated.
    Fill(Vec<u8>),
}

/// A range `[start, start + len)` of an output tensor's bytes and what it must hold.
struct Segment {
    start: usize,
    len: usize,
    want: Want,
}

/// The segments of `t`, in order, tiling its bytes; `None` when the plan names a source the
/// checkpoint lacks, or does not tile the tensor (compared then from the whole tensor, which
/// says what is wrong).
fn segments(ckpt: &Checkpoint, t: &OutTensor) -> Option<Vec<Segment>> {
    let elem = t.dtype.size();
    let row_bytes = t.shape.get(1..).map(|s| s.iter().product::<usize>()).unwrap_or(1) * elem;
    let mut out = Vec::new();
    let mut at = 0;
    for piece in &t.pieces {
        match piece {
            Piece::Copy { rows, .. } | Piece::Concat { rows, .. } => {
                let info = |s: &str| ckpt.meta.tensors.get(s);
                if at != rows[0] * row_bytes {
                    return None;
                }
                for (source, off, src_len) in split::piece_runs(piece, &|s| info(s).map(|i| i.dtype.size()))? {
                    let i = info(source)?;
                    let len = src_len / i.dtype.size() * elem;
                    let off = i.start as usize + off;
                    out.push(Segment { start: at, len, want: Want::Source { file: i.file, off, from: i.dtype } });
                    at += len;
                }
            }
            Piece::Zeros { rows, .. } | Piece::Constant { rows, .. } => {
                if at != rows[0] * row_bytes {
                    return None;
                }
                let len = (rows[1] - rows[0]) * row_bytes;
                let want = match piece {
                    Piece::Constant { value, .. } => Want::Fill(dtype::encode_value(t.dtype, value.0).ok()?),
                    _ => Want::Zeros,
                };
                out.push(Segment { start: at, len, want });
                at += len;
            }
        }
    }
    (at as u64 == t.nbytes).then_some(out)
}

/// Whether `have`, the bytes `[a, a + have.len())` of segment `s` of an output tensor of dtype
/// `to`, are what the segment wants. `pre` is source bytes already read (file, offset, bytes),
/// used where one of them covers the range; the source's map otherwise. `scratch` holds casts.
fn segment_holds(
    ckpt: &Checkpoint,
    pre: &[(usize, usize, &[u8])],
    s: &Segment,
    to: Dtype,
    a: usize,
    have: &[u8],
    scratch: &mut Vec<u8>,
) -> bool {
    match &s.want {
        Want::Zeros => have.iter().fold(0u8, |acc, &b| acc | b) == 0,
        Want::Fill(elem) => have.iter().enumerate().all(|(i, &b)| b == elem[(a + i) % elem.len()]),
        Want::Source { file, off, from } if *from == to => {
            let (lo, hi) = (off + a, off + a + have.len());
            let want = match pre.iter().find(|(f, o, bytes)| f == file && *o <= lo && hi <= o + bytes.len()) {
                Some((_, o, bytes)) => bytes.get(lo - o..hi - o),
                None => ckpt.file_bytes(*file).get(lo..hi),
            };
            want == Some(have)
        }
        Want::Source { file, off, from } => {
            // The elements that cover `[a, a + len)`, cast a step at a time.
            let (se, te) = (from.size(), to.size());
            let (first, last) = (a / te, (a + have.len()).div_ceil(te));
            let src = ckpt.file_bytes(*file);
            let mut e = first;
            while e < last {
                let n = CAST_STEP.min(last - e);
                let Some(bytes) = src.get(off + e * se..off + (e + n) * se) else { return false };
                scratch.clear();
                if !dtype::cast_into(*from, bytes, to, scratch) {
                    return false;
                }
                // Output bytes [e * te, (e + n) * te) of the segment, against `have`'s part of it.
                let (lo, hi) = ((e * te).max(a), ((e + n) * te).min(a + have.len()));
                if scratch[lo - e * te..hi - e * te] != have[lo - a..hi - a] {
                    return false;
                }
                e += n;
            }
            true
        }
    }
}

/// The tensor being compared as windows pass: its segments and how far they are done.
struct Current {
    segments: Vec<Segment>,
    /// First segment not yet wholly compared.
    next: usize,
    failed: bool,
}

/// The result of [`compare_file`].
pub(crate) struct Compared {
    /// The file's size and CRC-32, or why it could not be read to its end.
    pub sum: Result<(u64, u32), std::io::Error>,
    /// Indices (into the list given) of the tensors whose bytes are not what the plan puts there.
    pub failed: Vec<usize>,
}

/// Reads output file `i` of `out` once, in order, and compares the tensors of `tensors` (the
/// planned tensor and where the file holds it; sorted by offset, not overlapping) with the plan.
/// The source is read as `sources` says (the writer's rule): where it is read around the page
/// cache, a window's long uncast source runs are read into a block of their own, next to the
/// window. `done(bytes)` is told of each tensor compared.
pub(crate) fn compare_file(
    src: &Checkpoint,
    sources: &Sources,
    out: &Checkpoint,
    i: usize,
    tensors: &[(&OutTensor, &TensorInfo)],
    done: &(dyn Fn(u64) + Sync),
) -> Compared {
    compare_in_windows(src, sources, out, i, tensors, WINDOW, done)
}

/// Source runs of a window shorter than this (the rows of a row-parallel slice, which the other
/// ranks then find in the page cache; small tensors) are compared through the source's map; the
/// longer ones are read around the cache when the source is.
const MIN_RUN: usize = 64 << 10;
/// At most this many source runs of one window are read around the cache (the rest through the
/// map): each read may take up to `2 * ALIGN` bytes more than its run, so a block of
/// `window + RUNS * 2 * ALIGN` bytes holds them all.
const RUNS: usize = 16;

/// Source bytes read around the page cache for a window: the block, and the runs in it, each
/// (source file, source offset, where in the block, length).
struct Ahead {
    block: Block,
    runs: Vec<(usize, usize, usize, usize)>,
}

/// A window of the output file as the reader hands it over: its block, where in it the bytes
/// start, their length, the window's offset in the file, and the source bytes read for it.
type Window = (Block, usize, usize, usize, Option<Ahead>);

/// The source runs of the windows of one output file: the reader's cursor over its tensors.
struct Locator<'a> {
    src: &'a Checkpoint,
    tensors: &'a [(&'a OutTensor, &'a TensorInfo)],
    next: usize,
    /// The segments of the tensor last looked at, by index.
    segments: Option<(usize, Vec<Segment>)>,
    min_run: usize,
}

impl Locator<'_> {
    /// Into `out`, in order, the uncast source runs of at least `min_run` bytes (at most [`RUNS`])
    /// that bytes `[pos, end)` of the output file hold: (source file, source offset, length).
    /// Into `rest`, in order, the ranges (source file, first byte, end) of the other source bytes
    /// they hold, read through the map.
    fn runs(
        &mut self,
        pos: usize,
        end: usize,
        out: &mut Vec<(usize, usize, usize)>,
        rest: &mut Vec<(usize, u64, u64)>,
    ) {
        out.clear();
        rest.clear();
        while self.tensors.get(self.next).is_some_and(|(_, i)| (i.end as usize) <= pos) {
            self.next += 1;
        }
        for (k, (t, info)) in self.tensors.iter().enumerate().skip(self.next) {
            let (ts, te) = (info.start as usize, info.end as usize);
            if ts >= end {
                break;
            }
            if self.segments.as_ref().is_none_or(|(j, _)| *j != k) {
                self.segments = segments(self.src, t).map(|s| (k, s));
            }
            let Some((_, segs)) = &self.segments else { continue };
            let (a, b) = (pos.max(ts) - ts, end.min(te) - ts);
            for s in &segs[segs.partition_point(|s| s.start + s.len <= a)..] {
                if s.start >= b {
                    break;
                }
                let (sa, sb) = (a.max(s.start), b.min(s.start + s.len));
                let Want::Source { file, off, from } = s.want else { continue };
                if from == t.dtype && sb - sa >= self.min_run && out.len() < RUNS {
                    out.push((file, off + sa - s.start, sb - sa));
                    continue;
                }
                // The source bytes of output bytes [sa, sb) of the segment (cast or not).
                let (in_elem, out_elem) = (from.size(), t.dtype.size());
                let lo = off + (sa - s.start) / out_elem * in_elem;
                let hi = off + (sb - s.start).div_ceil(out_elem) * in_elem;
                rest.push((file, lo as u64, hi as u64));
            }
        }
    }
}

/// [`compare_file`] in windows of `window` bytes (any size: tests cut tensors, segments and
/// elements everywhere).
fn compare_in_windows(
    src: &Checkpoint,
    sources: &Sources,
    out: &Checkpoint,
    i: usize,
    tensors: &[(&OutTensor, &TensorInfo)],
    window: usize,
    done: &(dyn Fn(u64) + Sync),
) -> Compared {
    use std::sync::mpsc::sync_channel;
    let (file, map) = (out.file(i), out.file_bytes(i));
    let size = map.len();
    let direct = read::open_direct(file);
    let mut failed = Vec::new();
    let mut crc = crc32fast::Hasher::new();
    let mut scratch = Vec::new();
    let read = std::thread::scope(|sc| {
        let (full_tx, full) = sync_channel::<std::io::Result<Window>>(WINDOWS - 2);
        let (free, free_rx) = sync_channel::<Block>(WINDOWS);
        let (free_src, free_src_rx) = sync_channel::<Block>(WINDOWS);
        let (direct, force) = (direct.as_ref(), sources.mode == ReadMode::Direct);
        sc.spawn(move || {
            let (mut made, mut made_src) = (0, 0);
            let min_run = MIN_RUN.min(window / 8).max(1);
            let mut locator = Locator { src, tensors, next: 0, segments: None, min_run };
            let (mut runs, mut rest) = (Vec::new(), Vec::new());
            // What was cached before this file is read: asked per window, the kernel's read-ahead
            // after one window read through the cache would make every later one look cached.
            let out_cached = (!force).then(|| read::Residency::of(map));
            // Output windows need room for one read's alignment, source blocks for [`RUNS`].
            let block_of = |made: &mut usize, free: &std::sync::mpsc::Receiver<Block>, len: usize| {
                if *made < WINDOWS {
                    *made += 1;
                    Some(Block::new(len))
                } else {
                    free.recv().ok()
                }
            };
            for pos in (0..size).step_by(window) {
                let len = window.min(size - pos);
                let Some(mut block) = block_of(&mut made, &free_rx, window + 2 * ALIGN) else { return };
                let was_cached = out_cached.as_ref().is_some_and(|c| c.cached(pos, len));
                let mut r = match direct.filter(|_| !was_cached) {
                    Some(d) => read::read_direct(d, file, pos as u64, len, block.bytes()),
                    None => file.read_exact_at(&mut block.bytes()[..len], pos as u64).map(|()| 0),
                }
                .map(|at| (block, at, len, pos, None));
                if r.is_ok() && sources.mode != ReadMode::Cached {
                    locator.runs(pos, pos + len, &mut runs, &mut rest);
                    // The pages the map is read for are asked for now, in the spans they make: a
                    // page fault of the map would otherwise read the 8 MiB around it, most of it
                    // long runs read around the cache (measured on the full 11B-Vision shape,
                    // cold: 45.8 GB read for 43.1; docs/performance.md, run 10).
                    read::will_need_spans(|f| src.file(f), rest.iter().copied());
                    let mut ahead: Option<Ahead> = None;
                    let mut at = 0;
                    for &(f, off, l) in &runs {
                        let Some(d) = sources.direct_for(f, off as u64, l) else { continue };
                        let a = match &mut ahead {
                            Some(a) => a,
                            None => {
                                let len = window + RUNS * 2 * ALIGN;
                                let Some(block) = block_of(&mut made_src, &free_src_rx, len) else { return };
                                ahead.insert(Ahead { block, runs: Vec::with_capacity(runs.len()) })
                            }
                        };
                        match read::read_direct(d, src.file(f), off as u64, l, &mut a.block.bytes()[at..]) {
                            Ok(skip) => {
                                a.runs.push((f, off, at + skip, l));
                                at = (at + skip + l).next_multiple_of(ALIGN);
                            }
                            Err(e) => {
                                r = Err(e);
                                break;
                            }
                        }
                    }
                    if let Ok(w) = &mut r {
                        w.4 = ahead;
                    }
                }
                let stop = r.is_err();
                if full_tx.send(r).is_err() || stop {
                    return;
                }
            }
        });
        let mut next = 0; // the first tensor not wholly compared
        let mut cur: Option<Current> = None;
        for msg in full {
            let (block, at, len, pos, ahead) = msg?;
            let window = &block.as_slice()[at..at + len];
            let pre: Vec<(usize, usize, &[u8])> = ahead.as_ref().map_or_else(Vec::new, |a| {
                a.runs.iter().map(|&(f, off, at, l)| (f, off, &a.block.as_slice()[at..at + l])).collect()
            });
            crc.update(window);
            let end = pos + len;
            while let Some((t, info)) = tensors.get(next) {
                let (ts, te) = (info.start as usize, info.end as usize);
                if ts >= end && te > ts {
                    break;
                }
                let mut c = match cur.take() {
                    Some(c) => c,
                    None => match segments(src, t) {
                        // A tensor that starts before this window was compared in the earlier
                        // ones (the tensors are sorted and do not overlap: the header parser
                        // refuses overlaps); one that does not is compared from the whole.
                        Some(segments) if ts >= pos || te == ts => Current { segments, next: 0, failed: false },
                        _ => Current { segments: vec![], next: 0, failed: true },
                    },
                };
                // The tensor's bytes in this window, relative to the tensor.
                let (a, b) = (pos.max(ts) - ts, end.min(te).max(ts) - ts);
                while !c.failed && c.next < c.segments.len() {
                    let s = &c.segments[c.next];
                    let (sa, sb) = (a.max(s.start), b.min(s.start + s.len));
                    if sa < sb {
                        let have = &window[ts + sa - pos..ts + sb - pos];
                        if !segment_holds(src, &pre, s, t.dtype, sa - s.start, have, &mut scratch) {
                            c.failed = true;
                        }
                    }
                    if s.start + s.len > b {
                        break; // the segment goes on in the next window
                    }
                    c.next += 1;
                }
                if te > end {
                    cur = Some(c);
                    break;
                }
                if c.failed {
                    failed.push(next);
                }
                done(t.nbytes);
                next += 1;
            }
            // The reader is gone only when it stopped on an error, sent already.
            let _ = free.send(block);
            if let Some(a) = ahead {
                let _ = free_src.send(a.block);
            }
        }
        Ok::<usize, std::io::Error>(next)
    });
    let sum = match read {
        Ok(next) => {
            // Tensors the file ended before (the header was checked against the file's size,
            // so only a file that changed meanwhile) are not what the plan puts there.
            failed.extend(next..tensors.len());
            Ok((size as u64, crc.finalize()))
        }
        Err(e) => Err(e),
    };
    Compared { sum, failed }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::PlanOptions;

    /// The blocks of the files verify reads at once (a window and the source bytes beside it,
    /// [`WINDOWS`] each) leave room under the writer's 32 MiB bound for the rest: the heap (the
    /// plan and the ranks' headers) and the forward check that runs beside them.
    #[test]
    fn blocks_in_flight_leave_room_under_32_mib() {
        let per_file = WINDOWS * (WINDOW + 2 * ALIGN) + WINDOWS * (WINDOW + RUNS * 2 * ALIGN);
        assert!(crate::write::FILES_AT_ONCE * per_file <= 17 << 20, "{} bytes of blocks", per_file);
    }

    /// Every fixture shape the comparison meets: plain copies, row-parallel slices, casts (f32 to
    /// bf16, with windows that cut elements), zeros (vocabulary padding, Whisper's synthesized k
    /// bias), kv-head replicas. Each file is proven equal, with the CRC-32 of its bytes, in windows
    /// of any size; and a byte changed in the middle or at the end of any one tensor is found in
    /// that tensor and no other.
    #[test]
    fn windows_of_any_size_compare_every_byte_and_find_each_change() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let cases = [
            ("bart-tiny", 2, None),
            ("bart-tiny", 4, Some(Dtype::BF16)),
            ("whisper-tiny", 2, None),
            ("mllama-gqa", 4, None),
        ];
        for (fixture, tp, dtype) in cases {
            let tmp = tempfile::tempdir_in(root).unwrap();
            let src = crate::Source::new(root.join("fixtures").join(fixture));
            let out = tmp.path().join("out");
            let opts = crate::write::WriteOptions { out: out.clone(), force: false, progress: &|_| {}, fsync: false };
            let (plan, _) = crate::convert(&src, &PlanOptions { dtype, ..PlanOptions::new(tp) }, &opts).unwrap();
            let opened = src.read().unwrap().open().unwrap();
            let bad = tmp.path().join("bad");
            std::fs::create_dir(&bad).unwrap();
            for f in plan.files.iter().filter(|f| f.rank == tp - 1) {
                let names = [f.name.clone()];
                let whole = std::fs::read(out.join(&f.name)).unwrap();
                let shard = Checkpoint::open(crate::verify::open_meta(&out, &names).unwrap()).unwrap();
                let mut tensors: Vec<(&OutTensor, &TensorInfo)> =
                    f.tensors.iter().map(|t| (t, &shard.meta.tensors[&t.name])).collect();
                tensors.sort_by_key(|(_, i)| i.start);
                // Through the page cache, and around it (where the filesystem allows O_DIRECT),
                // the source's runs too.
                let handles = (0..opened.ckpt.meta.files.len()).map(|i| read::open_direct(opened.ckpt.file(i)));
                let around =
                    Sources { mode: ReadMode::Direct, direct: handles.collect(), cached: vec![], prefetch: false };
                let cached = Sources { mode: ReadMode::Cached, direct: vec![], cached: vec![], prefetch: false };
                for (reads, window) in
                    [&cached, &around].into_iter().flat_map(|r| [999, ALIGN, 3 * ALIGN + 2, 1 << 20].map(|w| (r, w)))
                {
                    let c = compare_in_windows(&opened.ckpt, reads, &shard, 0, &tensors, window, &|_| {});
                    assert_eq!(c.failed, Vec::<usize>::new(), "{fixture} tp {tp} {} window {window}", f.name);
                    assert_eq!(c.sum.unwrap(), (whole.len() as u64, crc32fast::hash(&whole)));
                }
                for (j, (t, info)) in tensors.iter().enumerate().filter(|(_, (_, i))| i.end > i.start) {
                    for at in [(info.start + info.end) / 2, info.end - 1] {
                        let mut changed = whole.clone();
                        changed[at as usize] ^= 0x40;
                        std::fs::write(bad.join(&f.name), &changed).unwrap();
                        let shard = Checkpoint::open(crate::verify::open_meta(&bad, &names).unwrap()).unwrap();
                        for (reads, window) in [(&cached, 999), (&around, 3 * ALIGN)] {
                            let c = compare_in_windows(&opened.ckpt, reads, &shard, 0, &tensors, window, &|_| {});
                            assert_eq!(c.failed, vec![j], "{fixture} {}: byte {at} of {}", f.name, t.name);
                            assert_ne!(c.sum.unwrap().1, crc32fast::hash(&whole));
                        }
                    }
                }
            }
        }
    }
}
