//! The data path: each output file is cut into units in offset order and written by one thread,
//! the files in parallel, largest first.
//!
//! A unit is a contiguous byte range of one output file: an in-kernel copy of a long contiguous
//! source run (`copy_file_range` at explicit offsets, falling back to `pwrite` from the map), a
//! gather of short runs (the rows of a row-parallel slice) and of runs to cast into one buffer of
//! at most 4 MiB and one `pwrite`, or zeros (already there: the file is preallocated). The file's
//! CRC-32 is computed as its units are written, the one of an in-kernel copy on another core
//! meanwhile. Memory is bounded by one gather buffer per thread, whatever the model size.
//!
//! Why one writer per file: ext4 serialises buffered writes to one inode, so threads sharing a
//! file wait for each other, spinning (docs/performance.md has the measurements).

use super::{io, manifest::FileEntry, WriteError};
use crate::checkpoint::Checkpoint;
use crate::dtype::{self, Dtype};
use crate::plan::{split::byte_runs, FilePlan, Piece, ShardPlan};
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
                Piece::Copy { source, source_shape, dim, start, end, .. } => {
                    let info = ckpt
                        .meta
                        .tensors
                        .get(source)
                        .ok_or_else(|| WriteError::Internal { tensor: t.name.clone(), from: source.clone() })?;
                    let elem = info.dtype.size();
                    let cast = (info.dtype != t.dtype).then_some((info.dtype, t.dtype));
                    for (off, len) in byte_runs(source_shape, elem, *dim, *start, *end) {
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
            buf.clear();
            for (src, off, len) in runs {
                let bytes = src_slice(ckpt, *src, *off, *len)?;
                match cast {
                    Some((from, to)) => dtype::cast_into(*from, bytes, *to, buf),
                    None => buf.extend_from_slice(bytes),
                }
            }
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
    }
    Ok(())
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
) -> Result<String, WriteError> {
    let header = super::header_bytes(&f.tensors);
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
    if fsync {
        file.sync_all().map_err(io(path))?;
    }
    super::crash_point();
    Ok(format!("{:08x}", crc.finalize()))
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
    // Largest files first, so the last one to start is a small one.
    let mut order: Vec<usize> = (0..plan.files.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(plan.files[i].size));
    let mut crcs: Vec<(usize, String)> = order
        .par_iter()
        .with_max_len(1)
        .map(|&i| {
            let f = &plan.files[i];
            write_file(ckpt, f, &dir.join(&f.name), progress, fsync).map(|c| (i, c))
        })
        .collect::<Result<_, WriteError>>()?;
    crcs.sort();
    Ok(plan
        .files
        .iter()
        .zip(crcs)
        .map(|(f, (_, crc32))| FileEntry { name: f.name.clone(), rank: f.rank, part: f.part, size: f.size, crc32 })
        .collect())
}
