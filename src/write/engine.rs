//! The data path: each output file is cut into units in offset order and written by one thread,
//! the files in parallel, largest first.
//!
//! A unit is a contiguous byte range of one output file: a long contiguous source run, a gather
//! of short runs (the rows of a row-parallel slice) and of runs to cast into one buffer of at most
//! 4 MiB, or zeros. Units are cut as they are written, one tensor piece at a time, so memory is
//! bounded by a few buffers per thread, whatever the model size.
//!
//! Two ways to write them ([`Io`]):
//! - durable output (the default, fsynced before the rename) goes around the page cache
//!   (`O_DIRECT`): the file is streamed through three aligned 2 MiB blocks, one filled (long runs,
//!   gathers and casts straight into the block, zeros) while two writer threads write the others,
//!   so the disk always has a write queued. The bytes have to reach the disk anyway; going through
//!   the cache first costs a copy into fresh cache pages, which on a VM whose free memory is
//!   handed back to the host (balloon free page reporting) also costs a host fault per page:
//!   measured 2x slower for casts (docs/performance.md);
//! - `--no-fsync` goes through the page cache: in-kernel `copy_file_range` for long runs, one
//!   `pwrite` per gather, zeros left to the preallocated file.
//!
//! On the direct path, the sources are read one of two ways ([`ReadMode`], `read.rs`):
//! - through the page cache (`pread` of long runs, the map for gathers), when the input is cached
//!   or fits the memory easily: the kernel's read-ahead then serves every rank of a row-parallel
//!   tensor from one read;
//! - when the part of the input that is not cached is more than half the available memory
//!   (`mincore` of the maps against `MemAvailable`: [`direct_pays`]), a read-ahead thread per file
//!   ([`read_ahead`]) reads its long runs around the cache (`O_DIRECT`, 2 MiB at a time into two
//!   aligned blocks, ranges that `mincore` found all cached before anything was read excepted:
//!   [`read::Residency`]) while the stream's thread
//!   copies the previous one into its block and the writers write, and it asks for the pages of
//!   the gathers ahead (`posix_fadvise(WILLNEED)` of each source span), so a page fault of the map
//!   waits for them instead of reading the 8 MiB around itself.
//!
//! The file's CRC-32 is computed as its bytes are written. One thread cuts and fills each file:
//! ext4 serialises buffered writes to one inode, so threads sharing a file wait for each other,
//! spinning. At most [`FILES_AT_ONCE`] files are in flight, so memory is bounded whatever the
//! number of cores.

use super::read::{self, Block, ReadMode, ALIGN};
use super::{io, manifest::FileEntry, WriteError};
use crate::checkpoint::Checkpoint;
use crate::dtype::{self, Dtype};
use crate::plan::{split, FilePlan, Piece, ShardPlan};
use rayon::prelude::*;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Runs at least this long are copied in-kernel.
const BIG_RUN: usize = 1 << 20;
/// Long runs are cut into chunks of this size so the cores share the work.
const CHUNK: usize = 32 << 20;
/// Short runs are gathered into buffers of up to this size.
const GATHER: usize = 4 << 20;
/// Elements per cast unit.
const CAST_ELEMS: usize = 1 << 19;

#[derive(Debug)]
enum Kind {
    /// `len` bytes at `src_off` of source file `src`, copied in the kernel.
    Copy { src: usize, src_off: u64 },
    /// Source runs `(file, offset, bytes)` written back to back, each converted from `cast.0` to
    /// `cast.1` when there is a cast.
    Gather { runs: Vec<(usize, u64, usize)>, cast: Option<(Dtype, Dtype)> },
    /// Zeros (already there: the file is preallocated).
    Zeros,
    /// One element's bytes repeated (a constant tensor).
    Fill { elem: Vec<u8> },
}

#[derive(Debug)]
struct Unit {
    dst: u64,
    len: u64,
    kind: Kind,
}

/// Accumulates short runs into gather units of at most `GATHER` output bytes.
struct Gathering {
    runs: Vec<(usize, u64, usize)>,
    cast: Option<(Dtype, Dtype)>,
    start: u64,
    len: u64,
}

impl Gathering {
    fn flush(&mut self, out: &mut Vec<Unit>) {
        if !self.runs.is_empty() {
            let kind = Kind::Gather { runs: std::mem::take(&mut self.runs), cast: self.cast };
            out.push(Unit { dst: self.start, len: self.len, kind });
        }
        self.start += self.len;
        self.len = 0;
    }

    /// Adds a run of `src_len` source bytes that becomes `out_len` output bytes.
    fn push(&mut self, run: (usize, u64, usize), out_len: u64, cast: Option<(Dtype, Dtype)>, out: &mut Vec<Unit>) {
        if !self.runs.is_empty() && (self.cast != cast || self.len + out_len > GATHER as u64) {
            self.flush(out);
        }
        self.cast = cast;
        self.runs.push(run);
        self.len += out_len;
    }

    /// Ends the gathering at the current offset and returns it (for a unit that is not a gather).
    fn skip_to(&mut self, out: &mut Vec<Unit>) -> u64 {
        self.flush(out);
        self.start
    }
}

/// Cuts one file of the plan into units and hands them to `emit` in offset order, as they are
/// made: only the units of one piece are held at a time, so memory does not grow with the number
/// of rows in the model.
fn cut(
    ckpt: &Checkpoint,
    f: &FilePlan,
    header_len: u64,
    emit: &mut dyn FnMut(Unit) -> Result<(), WriteError>,
) -> Result<(), WriteError> {
    let mut out = Vec::new();
    let mut g = Gathering { runs: Vec::new(), cast: None, start: header_len, len: 0 };
    for t in &f.tensors {
        let row_bytes = t.shape.get(1..).map(|s| s.iter().product::<usize>()).unwrap_or(1) * t.dtype.size();
        for piece in &t.pieces {
            match piece {
                Piece::Copy { .. } | Piece::Concat { .. } => {
                    let elem_of = |s: &str| ckpt.meta.tensors.get(s).map(|i| i.dtype.size());
                    let runs = split::piece_runs(piece, &elem_of).ok_or_else(|| WriteError::Internal {
                        tensor: t.name.clone(),
                        from: piece.slices().first().map_or_else(String::new, |s| s.0.to_string()),
                    })?;
                    for (source, off, len) in runs {
                        let info = &ckpt.meta.tensors[source];
                        let elem = info.dtype.size();
                        let cast = (info.dtype != t.dtype).then_some((info.dtype, t.dtype));
                        let src_off = info.start + off as u64;
                        if cast.is_none() && len >= BIG_RUN {
                            let mut dst = g.skip_to(&mut out);
                            for k in (0..len).step_by(CHUNK) {
                                let l = CHUNK.min(len - k) as u64;
                                let kind = Kind::Copy { src: info.file, src_off: src_off + k as u64 };
                                out.push(Unit { dst, len: l, kind });
                                dst += l;
                            }
                            g.start = dst;
                        } else {
                            // Long runs to cast are cut so a unit's buffer stays bounded.
                            let step = if cast.is_some() { CAST_ELEMS * elem } else { len.max(1) };
                            for k in (0..len).step_by(step) {
                                let l = step.min(len - k);
                                let out_len = (l / elem * t.dtype.size()) as u64;
                                g.push((info.file, src_off + k as u64, l), out_len, cast, &mut out);
                            }
                        }
                    }
                }
                Piece::Zeros { rows, .. } => {
                    let dst = g.skip_to(&mut out);
                    let len = ((rows[1] - rows[0]) * row_bytes) as u64;
                    out.push(Unit { dst, len, kind: Kind::Zeros });
                    g.start = dst + len;
                }
                Piece::Constant { rows, value } => {
                    let elem = dtype::encode_value(t.dtype, value.0)
                        .map_err(|m| WriteError::Internal { tensor: t.name.clone(), from: m })?;
                    let dst = g.skip_to(&mut out);
                    let len = ((rows[1] - rows[0]) * row_bytes) as u64;
                    out.push(Unit { dst, len, kind: Kind::Fill { elem } });
                    g.start = dst + len;
                }
            }
            out.drain(..).try_for_each(&mut *emit)?;
        }
    }
    let end = g.skip_to(&mut out);
    out.drain(..).try_for_each(&mut *emit)?;
    if end != f.size {
        return Err(WriteError::Internal {
            tensor: f.name.clone(),
            from: format!("layout of {} bytes, planned {}", end, f.size),
        });
    }
    Ok(())
}

fn src_slice(ckpt: &Checkpoint, file: usize, off: u64, len: usize) -> Result<&[u8], WriteError> {
    ckpt.file_bytes(file).get(off as usize..off as usize + len).ok_or_else(|| WriteError::Internal {
        tensor: String::new(),
        from: format!("source file {file} range {off}+{len}"),
    })
}

/// Fills `buf` with a gather unit's bytes: its runs back to back, each cast when there is a cast.
fn gather(
    ckpt: &Checkpoint,
    runs: &[(usize, u64, usize)],
    cast: Option<(Dtype, Dtype)>,
    buf: &mut Vec<u8>,
) -> Result<(), WriteError> {
    buf.clear();
    for &(src, off, len) in runs {
        let bytes = src_slice(ckpt, src, off, len)?;
        match cast {
            Some((from, to)) => {
                if !dtype::cast_into(from, bytes, to, buf) {
                    // The planner refuses such a cast; never write one dtype's bytes as another's.
                    return Err(WriteError::Internal {
                        tensor: String::new(),
                        from: format!("a cast from {from} to {to}"),
                    });
                }
            }
            None => buf.extend_from_slice(bytes),
        }
    }
    Ok(())
}

/// Copies `len` bytes in the kernel; `Ok(false)` when the filesystem cannot (caller falls back).
#[cfg(target_os = "linux")]
fn copy_range(src: &File, mut src_off: u64, dst: &File, mut dst_off: u64, mut len: usize) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    while len > 0 {
        let (mut a, mut b) = (src_off as libc::loff_t, dst_off as libc::loff_t);
        // SAFETY: both descriptors are open for the duration of the call and the offsets are
        // passed by pointer to locals; the kernel reads and writes nothing else of ours.
        let n = unsafe { libc::copy_file_range(src.as_raw_fd(), &mut a, dst.as_raw_fd(), &mut b, len, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EBADF) => Ok(false),
                _ => Err(e),
            };
        }
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "source ended early"));
        }
        len -= n as usize;
        src_off += n as u64;
        dst_off += n as u64;
    }
    Ok(true)
}

#[cfg(not(target_os = "linux"))]
fn copy_range(_: &File, _: u64, _: &File, _: u64, _: usize) -> std::io::Result<bool> {
    Ok(false)
}

/// Starts writeback of a range early, so the final fsync has less left to wait for.
fn start_writeback(f: &File, off: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a hint on an open descriptor; errors are harmless and ignored.
        unsafe {
            libc::sync_file_range(
                f.as_raw_fd(),
                off as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (f, off, len);
}

static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

/// Writes one unit into `dst` and feeds its bytes to `crc`; `buf` is the caller's scratch space.
fn exec(
    ckpt: &Checkpoint,
    u: &Unit,
    dst: &File,
    path: &Path,
    buf: &mut Vec<u8>,
    crc: &mut crc32fast::Hasher,
) -> Result<(), WriteError> {
    match &u.kind {
        Kind::Copy { src, src_off } => {
            let bytes = src_slice(ckpt, *src, *src_off, u.len as usize)?;
            // The checksum needs no lock on the output: an idle core computes it meanwhile.
            let (copied, sum) = rayon::join(
                || copy_range(ckpt.file(*src), *src_off, dst, u.dst, u.len as usize),
                || crc32fast::hash(bytes),
            );
            if !copied.map_err(io(path))? {
                dst.write_all_at(bytes, u.dst).map_err(io(path))?;
            }
            crc.combine(&crc32fast::Hasher::new_with_initial_len(sum, u.len));
        }
        Kind::Gather { runs, cast } => {
            gather(ckpt, runs, *cast, buf)?;
            dst.write_all_at(buf, u.dst).map_err(io(path))?;
            crc.update(buf);
        }
        Kind::Zeros => {
            let mut left = u.len as usize;
            while left > 0 {
                let n = left.min(ZEROS.len());
                crc.update(&ZEROS[..n]);
                left -= n;
            }
        }
        Kind::Fill { elem } => {
            // Constants are engine buffers (a few bytes each): one buffer of the whole unit.
            buf.clear();
            buf.resize(u.len as usize, 0);
            fill_repeated(buf, elem, 0);
            dst.write_all_at(buf, u.dst).map_err(io(path))?;
            crc.update(buf);
        }
    }
    Ok(())
}

/// Fills `b` with `elem` repeated, as the bytes from offset `at` of the repetition.
fn fill_repeated(b: &mut [u8], elem: &[u8], at: usize) {
    for (i, x) in b.iter_mut().enumerate() {
        *x = elem[(at + i) % elem.len()];
    }
}

/// Reserves the file's blocks up front (fewer, larger extents and an early ENOSPC); falls back
/// to a sparse file where the filesystem cannot.
fn preallocate(file: &File, size: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    if size > 0 {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain system call on an open descriptor; no memory is shared with the kernel.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)) {
            return Err(e);
        }
    }
    file.set_len(size)
}

/// Bytes a direct writer stages before each write. 2 MiB blocks wrote BART-large at tp 4 as fast
/// as 4 MiB ones (cached input, 3 alternating runs each: 1.03-1.13 s and 1.05-1.10 s against
/// 1.08-1.23 s; docs/performance.md, run 8) in half the memory.
const DIRECT_BUF: usize = 2 << 20;
/// Blocks per direct stream: one being filled while the two others are written. A fourth one,
/// full and queued for the writers, was no faster: cached BART-large at tp 4 wrote in 1.03-1.13 s
/// with three blocks of 2 MiB and 1.05-1.10 s with four (3 alternating runs each,
/// docs/performance.md, run 8), and it cost 2 MiB per file: with four, the full 11B-Vision shape
/// peaked at 29.2 MiB of anonymous memory at tp 4 and 30.0 MiB at tp 8 (2 files of 4 write blocks
/// and 2 read blocks: 24 MiB, plus 2.7-3.9 MiB of heap, mostly the plan, and the threads'
/// arenas), too close to the 32 MiB bound of [`FILES_AT_ONCE`].
const BLOCKS: usize = 3;
/// Writes in flight per direct stream: one write at a time leaves the disk idle between writes
/// (docs/performance.md: `dd oflag=direct` of 1.6 GB takes 1.16 s as one stream, 0.82-0.92 s as
/// two).
const WRITERS: usize = 2;
/// At most this many files are written at once, whatever the number of cores: each holds up to
/// 10 MiB of buffers ([`BLOCKS`] write blocks and [`READ_BLOCKS`] read blocks of 2 MiB), so that
/// the process stays under 32 MiB of anonymous memory, and the disk gains nothing from more
/// streams. `verify` reads at most as many files at once.
pub(crate) const FILES_AT_ONCE: usize = 2;

/// How output files are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Io {
    /// Through the page cache: in-kernel copies and `pwrite`s, writeback started per unit.
    Buffered,
    /// Around the page cache (`O_DIRECT`): the file is streamed, in offset order, through aligned
    /// 2 MiB blocks written straight to the disk, two at a time.
    Direct,
}

/// A file written as a stream, in offset order, through [`BLOCKS`] aligned blocks: one is filled
/// while [`WRITERS`] writer threads write the others, each at its block's offset. The last block
/// is padded to [`ALIGN`]; [`stream_to`] cuts the file back to size.
struct Stream<'a> {
    path: &'a Path,
    cur: Block,
    fill: usize,
    /// File offset of the current block's first byte.
    pos: u64,
    crc: crc32fast::Hasher,
    /// Full blocks to the writers: (block, bytes to write, file offset).
    full: std::sync::mpsc::SyncSender<(Block, usize, u64)>,
    /// Written blocks back from the writers.
    free: std::sync::mpsc::Receiver<Block>,
}

impl Stream<'_> {
    /// Hands the current block (padded to [`ALIGN`]) to the writers and takes a free one.
    fn flush(&mut self) -> Result<(), WriteError> {
        let fill = self.fill;
        let padded = fill.next_multiple_of(ALIGN);
        let block = self.cur.bytes();
        self.crc.update(&block[..fill]);
        block[fill..padded].fill(0);
        // A closed channel means the writers stopped on an error, which `stream_to` reports.
        let stopped =
            || WriteError::Io { path: self.path.to_path_buf(), source: std::io::Error::other("writer stopped") };
        let next = self.free.recv().map_err(|_| stopped())?;
        let full = std::mem::replace(&mut self.cur, next);
        self.full.send((full, padded, self.pos)).map_err(|_| stopped())?;
        self.pos += fill as u64;
        self.fill = 0;
        Ok(())
    }

    /// Appends `len` bytes made by `make`, which fills the slice it is given (at most a block)
    /// with the bytes from `at` on.
    fn put(
        &mut self,
        mut len: usize,
        mut make: impl FnMut(&mut [u8], usize) -> Result<(), WriteError>,
    ) -> Result<(), WriteError> {
        let mut at = 0;
        while len > 0 {
            let n = len.min(self.cur.len() - self.fill);
            let fill = self.fill;
            make(&mut self.cur.bytes()[fill..fill + n], at)?;
            self.fill += n;
            at += n;
            len -= n;
            if self.fill == self.cur.len() {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        self.put(bytes.len(), |b, at| {
            b.copy_from_slice(&bytes[at..at + b.len()]);
            Ok(())
        })
    }
}

/// Writes `size` bytes made by `fill` to `file` as a [`Stream`], with writer threads, then cuts
/// the padding of the last block off. Returns the CRC-32 of the bytes.
fn stream_to(
    file: &File,
    path: &Path,
    size: u64,
    fill: impl FnOnce(&mut Stream) -> Result<(), WriteError>,
) -> Result<crc32fast::Hasher, WriteError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc::sync_channel, Mutex};
    let (full_tx, full_rx) = sync_channel::<(Block, usize, u64)>(BLOCKS);
    let (free_tx, free_rx) = sync_channel::<Block>(BLOCKS);
    for _ in 1..BLOCKS {
        let _ = free_tx.send(Block::new(DIRECT_BUF));
    }
    let full_rx = Mutex::new(full_rx);
    let failed = AtomicBool::new(false);
    let (streamed, written) = std::thread::scope(|sc| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                let (full_rx, free_tx, failed) = (&full_rx, free_tx.clone(), &failed);
                sc.spawn(move || -> Result<(), WriteError> {
                    loop {
                        // The lock is held while waiting: the other writer waits for the next
                        // block either way.
                        let next = full_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok((mut b, len, pos)) = next else { return Ok(()) };
                        if failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        if let Err(e) = file.write_all_at(&b.bytes()[..len], pos) {
                            failed.store(true, Ordering::Relaxed);
                            return Err(io(path)(e));
                        }
                        // Once the stream has ended nobody takes blocks back, but the blocks still
                        // queued must be written: the loop ends only when the queue is empty.
                        let _ = free_tx.send(b);
                    }
                })
            })
            .collect();
        drop(free_tx);
        let mut out = Stream {
            path,
            cur: Block::new(DIRECT_BUF),
            fill: 0,
            pos: 0,
            crc: crc32fast::Hasher::new(),
            full: full_tx,
            free: free_rx,
        };
        let streamed = fill(&mut out).and_then(|()| if out.fill > 0 { out.flush() } else { Ok(()) });
        let (pos, crc) = (out.pos, out.crc.clone());
        drop(out); // closes the channel: the writers end once they have written what they hold
        let mut written = Ok(());
        for w in writers {
            let r = w.join().unwrap_or_else(|_| {
                Err(WriteError::Internal { tensor: path.display().to_string(), from: "writer thread panicked".into() })
            });
            if written.is_ok() {
                written = r;
            }
        }
        (streamed.map(|()| (pos, crc)), written)
    });
    // A writer's error first: it is the cause of a "writer stopped".
    written?;
    let (pos, crc) = streamed?;
    if pos != size {
        return Err(WriteError::Internal {
            tensor: path.display().to_string(),
            from: format!("streamed {pos} bytes, planned {size}"),
        });
    }
    file.set_len(size).map_err(io(path))?;
    Ok(crc)
}

/// Elements cast at a time when a gather is appended to a direct stream: the cast bytes go
/// through a scratch buffer of at most 128 KiB, not a buffer of the whole unit.
const CAST_STEP: usize = 1 << 14;

/// Appends one unit to a direct stream. Long runs come from `reader` when there is one (read
/// ahead, around the page cache where the source is not cached), else by `pread`; gathers and
/// casts go straight into the stream's block, through `scratch` for casts.
fn exec_direct(
    ckpt: &Checkpoint,
    u: &Unit,
    out: &mut Stream,
    reader: Option<&Reader>,
    scratch: &mut Vec<u8>,
) -> Result<(), WriteError> {
    match &u.kind {
        Kind::Copy { src, src_off } => {
            // `pread` rather than the map: the kernel copies from its cache without a page
            // fault per 4 KiB of source.
            let (file, src_path) = (ckpt.file(*src), &ckpt.meta.files[*src].path);
            let pread = |out: &mut Stream, off: u64, len: usize| {
                out.put(len, |b, at| file.read_exact_at(b, off + at as u64).map_err(io(src_path)))
            };
            let Some(reader) = reader else { return pread(out, *src_off, u.len as usize) };
            let mut k = 0;
            while k < u.len {
                let stopped = || WriteError::Internal {
                    tensor: src_path.display().to_string(),
                    from: format!("the reader stopped before offset {}", src_off + k),
                };
                let Ahead::Run(off, len, chunk) = reader.chunks.recv().map_err(|_| stopped())?? else {
                    return Err(stopped());
                };
                if off != src_off + k || len as u64 > u.len - k {
                    return Err(WriteError::Internal {
                        tensor: src_path.display().to_string(),
                        from: format!("read ahead {off}+{len}, expected offset {}", src_off + k),
                    });
                }
                match chunk {
                    None => pread(out, off, len)?,
                    Some((block, at)) => {
                        out.append(&block.as_slice()[at..at + len])?;
                        // The reader is gone only when it stopped on an error, sent already.
                        let _ = reader.free.send(block);
                    }
                }
                k += len as u64;
            }
            Ok(())
        }
        Kind::Gather { runs, cast } => {
            if let Some(reader) = reader {
                // Its pages are on their way into the cache: the map's page faults wait for them
                // rather than read around them.
                let gone = || WriteError::Internal { tensor: String::new(), from: "the reader stopped".into() };
                let Ahead::Gather = reader.chunks.recv().map_err(|_| gone())?? else { return Err(gone()) };
            }
            for &(src, off, len) in runs {
                let bytes = src_slice(ckpt, src, off, len)?;
                let Some((from, to)) = *cast else {
                    out.append(bytes)?;
                    continue;
                };
                for c in bytes.chunks(CAST_STEP * from.size()) {
                    scratch.clear();
                    if !dtype::cast_into(from, c, to, scratch) {
                        // The planner refuses such a cast; never write one dtype's bytes as another's.
                        return Err(WriteError::Internal {
                            tensor: String::new(),
                            from: format!("a cast from {from} to {to}"),
                        });
                    }
                    out.append(scratch)?;
                }
            }
            Ok(())
        }
        Kind::Zeros => out.put(u.len as usize, |b, _| {
            b.fill(0);
            Ok(())
        }),
        Kind::Fill { elem } => out.put(u.len as usize, |b, at| {
            fill_repeated(b, elem, at);
            Ok(())
        }),
    }
}

/// Bytes of source read ahead at a time.
const READ_CHUNK: usize = 2 << 20;
/// Read blocks per file: one being copied into the stream, the other being read.
const READ_BLOCKS: usize = 2;

/// What the read-ahead thread has done for the next unit of the stream.
enum Ahead {
    /// A chunk of a long source run: its source offset, its length, and either `None`, to be
    /// read through the page cache by the stream's thread, or the block holding it and where in
    /// it.
    Run(u64, usize, Option<(Block, usize)>),
    /// The page-cache reads of a gather unit's source ranges are started.
    Gather,
}

/// The stream's end of a file's read-ahead thread ([`read_ahead`]).
struct Reader {
    chunks: std::sync::mpsc::Receiver<Result<Ahead, WriteError>>,
    /// Blocks back to the reader once copied.
    free: std::sync::mpsc::SyncSender<Block>,
}

/// Reads the long source runs of file `f`, in the order the stream needs them, [`READ_CHUNK`]
/// bytes at a time, ahead of the stream: around the page cache (into one of [`READ_BLOCKS`]
/// aligned blocks) where `direct` has a handle and, unless `mode` forces it, the range is not all
/// in the cache; chunks that are are left to the stream's `pread`. Stops at the first error
/// (sent on) or when the stream hangs up.
fn read_ahead(
    ckpt: &Checkpoint,
    f: &FilePlan,
    header_len: u64,
    sources: &Sources,
    chunks: std::sync::mpsc::SyncSender<Result<Ahead, WriteError>>,
    free: std::sync::mpsc::Receiver<Block>,
) {
    let mut made = 0;
    let gone = || WriteError::Internal { tensor: f.name.clone(), from: "the stream stopped".into() };
    let r = cut(ckpt, f, header_len, &mut |u| {
        let (src, src_off) = match u.kind {
            Kind::Copy { src, src_off } => (src, src_off),
            Kind::Gather { runs, .. } => {
                // Its pages are asked for ahead, in spans of nearby runs: a row-parallel slice
                // spans whole rows, which the other ranks read from the cache after this one.
                let ranges = runs.iter().map(|&(file, off, len)| (file, off, off + len as u64));
                read::will_need_spans(|i| ckpt.file(i), ranges);
                return chunks.send(Ok(Ahead::Gather)).map_err(|_| gone());
            }
            _ => return Ok(()),
        };
        for k in (0..u.len).step_by(READ_CHUNK) {
            let (off, len) = (src_off + k, READ_CHUNK.min((u.len - k) as usize));
            let chunk = match sources.direct_for(src, off, len) {
                None => None,
                Some(d) => {
                    let mut block = if made < READ_BLOCKS {
                        made += 1;
                        Block::new(READ_CHUNK + 2 * ALIGN)
                    } else {
                        free.recv().map_err(|_| gone())?
                    };
                    let at = read::read_direct(d, ckpt.file(src), off, len, block.bytes())
                        .map_err(io(&ckpt.meta.files[src].path))?;
                    Some((block, at))
                }
            };
            chunks.send(Ok(Ahead::Run(off, len, chunk))).map_err(|_| gone())?;
        }
        Ok(())
    });
    if let Err(e) = r {
        // Nobody to tell when the stream itself hung up.
        let _ = chunks.send(Err(e));
    }
}

/// Opens `path` for direct writes; `None` where the system has no `O_DIRECT`.
fn create_direct(path: &Path) -> std::io::Result<Option<File>> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map(Some)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        Ok(None)
    }
}

/// Whether direct writes work in `dir`: one aligned block written to a probe file, removed after.
fn direct_works(dir: &Path) -> bool {
    let probe = dir.join(".reshard-direct-probe");
    let ok = match create_direct(&probe) {
        Ok(Some(f)) => f.write_all_at(Block::new(ALIGN).bytes(), 0).is_ok(),
        _ => false,
    };
    let _ = std::fs::remove_file(&probe);
    ok
}

/// Picks how to write into `dir`. Durable output is written around the page cache: on the disk
/// it must reach anyway, without first filling (and faulting in) cache pages for it; without
/// fsync the page cache is faster. `RESHARD_WRITE=direct|buffered` overrides the choice (tests,
/// benchmarks); direct where the filesystem cannot is then an error.
fn choose_io(dir: &Path, fsync: bool) -> Result<Io, WriteError> {
    match std::env::var("RESHARD_WRITE").as_deref() {
        Ok("buffered") => Ok(Io::Buffered),
        Ok("direct") if direct_works(dir) => Ok(Io::Direct),
        Ok("direct") => Err(WriteError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::other("RESHARD_WRITE=direct, but this filesystem refuses O_DIRECT writes"),
        }),
        _ if fsync && direct_works(dir) => Ok(Io::Direct),
        _ => Ok(Io::Buffered),
    }
}

/// Ends a file: fsynced when asked; returns its CRC-32 as the manifest writes it.
fn finish(file: &File, path: &Path, fsync: bool, crc: crc32fast::Hasher) -> Result<String, WriteError> {
    if fsync {
        file.sync_all().map_err(io(path))?;
    }
    super::crash_point();
    Ok(format!("{:08x}", crc.finalize()))
}

/// Writes one output file, unit after unit, and returns its CRC-32.
///
/// One thread per file: ext4 (like most filesystems) serialises buffered writes to one inode, so
/// two threads writing the same file only wait for each other (measured: docs/performance.md).
fn write_file(
    ckpt: &Checkpoint,
    f: &FilePlan,
    path: &Path,
    progress: &(dyn Fn(u64) + Sync),
    fsync: bool,
    mode: Io,
    src: &Sources,
) -> Result<String, WriteError> {
    let header = super::header_bytes(&f.tensors);
    if mode == Io::Direct {
        return write_file_direct(ckpt, f, &header, path, progress, fsync, src);
    }
    let file = File::create(path).map_err(io(path))?;
    preallocate(&file, f.size).map_err(io(path))?;
    file.write_all_at(&header, 0).map_err(io(path))?;
    super::crash_point();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    let mut buf = Vec::new();
    cut(ckpt, f, header.len() as u64, &mut |u| {
        exec(ckpt, &u, &file, path, &mut buf, &mut crc)?;
        if fsync {
            start_writeback(&file, u.dst, u.len);
        }
        super::crash_point();
        progress(u.len);
        Ok(())
    })?;
    finish(&file, path, fsync, crc)
}

/// [`write_file`] around the page cache: one [`Stream`], in offset order, its long source runs
/// read ahead by a [`read_ahead`] thread unless `read` is [`ReadMode::Cached`].
fn write_file_direct(
    ckpt: &Checkpoint,
    f: &FilePlan,
    header: &[u8],
    path: &Path,
    progress: &(dyn Fn(u64) + Sync),
    fsync: bool,
    src: &Sources,
) -> Result<String, WriteError> {
    use std::sync::mpsc::sync_channel;
    let file = create_direct(path)
        .map_err(io(path))?
        .ok_or_else(|| WriteError::Io { path: path.to_path_buf(), source: std::io::Error::other("no O_DIRECT") })?;
    preallocate(&file, f.size.next_multiple_of(ALIGN as u64)).map_err(io(path))?;
    let header_len = header.len() as u64;
    let crc = std::thread::scope(|sc| {
        let reader = (src.mode != ReadMode::Cached).then(|| {
            let (chunks_tx, chunks) = sync_channel(2 * READ_BLOCKS);
            let (free, free_rx) = sync_channel(READ_BLOCKS);
            sc.spawn(move || read_ahead(ckpt, f, header_len, src, chunks_tx, free_rx));
            Reader { chunks, free }
        });
        // The reader ends when `reader` is dropped, at the end of this closure, if not before.
        stream_to(&file, path, f.size, |out| {
            out.append(header)?;
            super::crash_point();
            let mut scratch = Vec::new();
            cut(ckpt, f, header_len, &mut |u| {
                exec_direct(ckpt, &u, out, reader.as_ref(), &mut scratch)?;
                super::crash_point();
                progress(u.len);
                Ok(())
            })
        })
    })?;
    finish(&file, path, fsync, crc)
}

/// How the sources are read on the direct write path.
pub(crate) struct Sources {
    pub(crate) mode: ReadMode,
    /// An `O_DIRECT` handle per source file, where the filesystem allows one.
    pub(crate) direct: Vec<Option<File>>,
    /// What of each source file was in the page cache before anything was read
    /// ([`read::Residency`]); empty when the sources are read through the cache.
    pub(crate) cached: Vec<read::Residency>,
    /// Whether to read the sources into the page cache ahead of the writers ([`prefetch`]): the
    /// automatic choice went through the cache, and part of the input is not there yet.
    pub(crate) prefetch: bool,
}

impl Sources {
    /// The read mode from the environment ([`ReadMode::from_env`]) and the direct handles it
    /// needs; with `RESHARD_READ=direct`, a source that refuses `O_DIRECT` is an error.
    ///
    /// Without `RESHARD_READ`, the sources are read around the page cache only when the part of
    /// them that is not cached is more than half the memory available ([`direct_pays`]); then a
    /// range that is all cached is still read from the cache.
    /// Through the page cache always when the output is not written directly (`direct_writes`).
    pub(crate) fn open(ckpt: &Checkpoint, direct_writes: bool) -> Result<Self, WriteError> {
        let mut mode = ReadMode::from_env();
        let mut prefetch = false;
        let mut cached = Vec::new();
        if mode == ReadMode::Auto {
            cached = (0..ckpt.meta.files.len()).map(|i| read::Residency::of(ckpt.file_bytes(i))).collect();
            let uncached: u64 = cached.iter().map(read::Residency::uncached).sum();
            if !direct_writes || !direct_pays(uncached) {
                mode = ReadMode::Cached;
                prefetch = uncached > 0;
            }
        }
        if mode != ReadMode::Auto {
            // Forced either way, or read through the cache: nobody asks.
            cached.clear();
        }
        if !direct_writes {
            mode = ReadMode::Cached;
        }
        let mut direct = Vec::new();
        if mode != ReadMode::Cached {
            for (i, sf) in ckpt.meta.files.iter().enumerate() {
                let d = read::open_direct(ckpt.file(i));
                if d.is_none() && mode == ReadMode::Direct {
                    return Err(WriteError::Io {
                        path: sf.path.clone(),
                        source: std::io::Error::other(
                            "RESHARD_READ=direct, but this file cannot be opened with O_DIRECT",
                        ),
                    });
                }
                direct.push(d);
            }
        }
        Ok(Sources { mode, direct, cached, prefetch })
    }

    /// The `O_DIRECT` handle to read `[off, off + len)` of source file `file` with; `None` when
    /// it is read through the page cache: the mode says so, or the range was all cached when the
    /// sources were opened (unless the mode forces `O_DIRECT`), or the file has no such handle.
    pub(crate) fn direct_for(&self, file: usize, off: u64, len: usize) -> Option<&File> {
        let cached = match self.mode {
            ReadMode::Cached => true,
            ReadMode::Direct => false,
            ReadMode::Auto => self.cached.get(file).is_some_and(|r| r.cached(off as usize, len)),
        };
        self.direct.get(file)?.as_ref().filter(|_| !cached)
    }
}

/// Reads every source file into the page cache, in order, 8 MiB at a time, until `stop`: the
/// reads through the cache then find their pages there, read in large requests, instead of each
/// waiting for its own read-ahead. Only for an input that fits the memory easily
/// ([`direct_pays`]): measured on a cold Whisper-large-v3 (3.1 GB) at tp 4 (docs/performance.md,
/// run 8).
pub(crate) fn prefetch(ckpt: &Checkpoint, stop: &std::sync::atomic::AtomicBool) {
    const STEP: u64 = 8 << 20;
    for (i, f) in ckpt.meta.files.iter().enumerate() {
        for off in (0..f.size).step_by(STEP as usize) {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            // Blocks while the disk's queue is full, so this runs at the disk's speed.
            read::will_need(ckpt.file(i), off, STEP.min(f.size - off));
        }
    }
}

/// Whether reading around the page cache pays: when the `uncached` bytes of the sources (`mincore`
/// of the maps) are more than half of `MemAvailable`. Measured (docs/performance.md,
/// run 8): a cold 21.3 GB input at tp 4 converted in 33.6 s read directly against 39.5 s through
/// the cache (16.7 s of system time, reclaiming and refilling cache pages), but a cold 1.6 GB one
/// in 3.8-4.7 s against 2.0-3.4 s: while the input fits the memory, the kernel's read-ahead keeps
/// more reads in flight than the stream's one, and every rank of a row-parallel tensor finds its
/// rows in the cache.
fn direct_pays(uncached: u64) -> bool {
    read::mem_available().is_some_and(|avail| uncached > avail / 2)
}

/// Writes every file of `plan` into `dir`; returns their manifest entries (size and CRC-32).
/// With `fsync`, writeback starts as each unit is written and every file is fsynced at the end.
pub fn write_files(
    ckpt: &Checkpoint,
    plan: &ShardPlan,
    dir: &Path,
    progress: &(dyn Fn(u64) + Sync),
    fsync: bool,
) -> Result<Vec<FileEntry>, WriteError> {
    // The layout of every file is checked before anything is written.
    for f in &plan.files {
        cut(ckpt, f, super::header_bytes(&f.tensors).len() as u64, &mut |_| Ok(()))?;
    }
    let mode = choose_io(dir, fsync)?;
    let src = Sources::open(ckpt, mode == Io::Direct)?;
    // Largest files first, so the last one to start is a small one.
    let mut order: Vec<usize> = (0..plan.files.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(plan.files[i].size));
    let write = || {
        order
            .par_iter()
            .with_max_len(1)
            .map(|&i| {
                let f = &plan.files[i];
                write_file(ckpt, f, &dir.join(&f.name), progress, fsync, mode, &src).map(|c| (i, c))
            })
            .collect::<Result<Vec<(usize, String)>, WriteError>>()
    };
    let threads = rayon::current_num_threads().min(FILES_AT_ONCE);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let written = std::thread::scope(|sc| {
        if src.prefetch {
            sc.spawn(|| prefetch(ckpt, &stop));
        }
        let r = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
            Ok(pool) => pool.install(write),
            // No threads to be had: the current pool, with its own width.
            Err(_) => write(),
        };
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    });
    let mut crcs = written?;
    crcs.sort();
    Ok(plan
        .files
        .iter()
        .zip(crcs)
        .map(|(f, (_, crc32))| FileEntry { name: f.name.clone(), rank: f.rank, part: f.part, size: f.size, crc32 })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stream writes every byte at its offset, across block boundaries and with a last block
    /// off the 4 KiB grid, cuts the padding off, and checksums exactly the bytes written. (A plain
    /// file: the stream's logic does not depend on O_DIRECT, which the CLI tests exercise.)
    #[test]
    fn stream_writes_every_byte_in_place() {
        let dir = tempfile::tempdir().unwrap();
        for size in [1, ALIGN - 1, ALIGN, DIRECT_BUF, 2 * DIRECT_BUF + 12_345, 7 * DIRECT_BUF - 1] {
            let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4099) as u8).collect();
            let path = dir.path().join(format!("f{size}"));
            let file = File::create(&path).unwrap();
            // Uneven pieces, so appends straddle block boundaries.
            let crc =
                stream_to(&file, &path, size as u64, |out| data.chunks(1_000_003).try_for_each(|c| out.append(c)))
                    .unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), data, "size {size}");
            assert_eq!(crc.finalize(), crc32fast::hash(&data), "size {size}");
        }
    }

    /// The blocks of the files in flight leave room under the 32 MiB bound of [`FILES_AT_ONCE`]
    /// for the rest of the process: the heap (mostly the plan, 2.7-3.9 MiB for the full
    /// 11B-Vision shape at tp 4-8), the threads' arenas (up to 2 MiB) and their stacks.
    #[test]
    fn blocks_in_flight_leave_room_under_32_mib() {
        let per_file = BLOCKS * DIRECT_BUF + READ_BLOCKS * (READ_CHUNK + 2 * ALIGN);
        assert!(FILES_AT_ONCE * per_file <= 24 << 20, "{} MiB of blocks", (FILES_AT_ONCE * per_file) >> 20);
    }

    #[test]
    fn stream_refuses_a_size_other_than_planned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::create(&path).unwrap();
        let r = stream_to(&file, &path, 10, |out| out.append(&[1; 9]));
        assert!(matches!(r, Err(WriteError::Internal { .. })), "{:?}", r.err());
    }

    /// A write error in the writer thread comes back as that error, not as a hang or a panic.
    #[test]
    fn stream_reports_the_writers_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"").unwrap();
        let read_only = File::open(&path).unwrap();
        let r = stream_to(&read_only, &path, 3 * DIRECT_BUF as u64, |out| {
            (0..3).try_for_each(|_| {
                out.put(DIRECT_BUF, |b, _| {
                    b.fill(5);
                    Ok(())
                })
            })
        });
        match r {
            Err(WriteError::Io { path: p, source }) => {
                assert!(p == path && source.to_string() != "writer stopped", "{source}")
            }
            other => panic!("{:?}", other.err()),
        }
    }
}
