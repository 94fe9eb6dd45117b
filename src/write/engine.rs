//! The data path: every output file cut into independent work units that all cores share, so a
//! single large file is written as fast as many small ones.
//!
//! A unit is a contiguous byte range of one output file: an in-kernel copy of a long contiguous
//! source run (`copy_file_range` at explicit offsets, falling back to `pwrite` from the map), a
//! gather of short runs (the rows of a row-parallel slice) into one buffer and one `pwrite`, a
//! cast of a run into the target dtype, or zeros (left as a hole of the preallocated file). Each
//! unit returns the CRC-32 of its bytes; a file's checksum is the ordered combination. Memory is
//! bounded by the unit sizes times the number of threads, whatever the model size.

use super::{io, manifest::FileEntry, WriteError};
use crate::checkpoint::Checkpoint;
use crate::dtype::{self, Dtype};
use crate::plan::{split::byte_runs, Piece, ShardPlan};
use rayon::prelude::*;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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
    /// `len` bytes at `src_off` of source file `src`.
    Copy { src: usize, src_off: u64 },
    /// Several short source runs, written back to back.
    Gather { runs: Vec<(usize, u64, usize)> },
    /// `n` elements at `src_off` of source file `src`, converted from `from` to `to`.
    Cast { src: usize, src_off: u64, n: usize, from: Dtype, to: Dtype },
    /// Zeros (already there: the file is preallocated sparse).
    Zeros,
}

#[derive(Debug)]
struct Unit {
    file: usize,
    dst: u64,
    len: u64,
    kind: Kind,
}

/// Cuts every file of the plan into units; returns them and each file's header.
fn units(ckpt: &Checkpoint, plan: &ShardPlan) -> Result<(Vec<Unit>, Vec<Vec<u8>>), WriteError> {
    let mut out = Vec::new();
    let mut headers = Vec::new();
    for (fi, f) in plan.files.iter().enumerate() {
        let header = super::header_bytes(&f.tensors);
        let mut dst = header.len() as u64;
        headers.push(header);
        let mut gather: Vec<(usize, u64, usize)> = Vec::new();
        let mut gather_start = dst;
        let flush = |gather: &mut Vec<(usize, u64, usize)>, start: u64, out: &mut Vec<Unit>| {
            if !gather.is_empty() {
                let len = gather.iter().map(|g| g.2 as u64).sum();
                out.push(Unit { file: fi, dst: start, len, kind: Kind::Gather { runs: std::mem::take(gather) } });
            }
        };
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
                        for (off, len) in byte_runs(source_shape, elem, *dim, *start, *end) {
                            let src_off = info.start + off as u64;
                            if info.dtype != t.dtype {
                                flush(&mut gather, gather_start, &mut out);
                                let n = len / elem;
                                for k in (0..n).step_by(CAST_ELEMS) {
                                    let m = CAST_ELEMS.min(n - k);
                                    let l = (m * t.dtype.size()) as u64;
                                    let kind = Kind::Cast {
                                        src: info.file,
                                        src_off: src_off + (k * elem) as u64,
                                        n: m,
                                        from: info.dtype,
                                        to: t.dtype,
                                    };
                                    out.push(Unit { file: fi, dst, len: l, kind });
                                    dst += l;
                                }
                                gather_start = dst;
                            } else if len >= BIG_RUN {
                                flush(&mut gather, gather_start, &mut out);
                                for k in (0..len).step_by(CHUNK) {
                                    let l = CHUNK.min(len - k);
                                    out.push(Unit {
                                        file: fi,
                                        dst,
                                        len: l as u64,
                                        kind: Kind::Copy { src: info.file, src_off: src_off + k as u64 },
                                    });
                                    dst += l as u64;
                                }
                                gather_start = dst;
                            } else {
                                let pending: usize = gather.iter().map(|g| g.2).sum();
                                if pending + len > GATHER {
                                    flush(&mut gather, gather_start, &mut out);
                                    gather_start = dst;
                                }
                                gather.push((info.file, src_off, len));
                                dst += len as u64;
                            }
                        }
                    }
                    Piece::Zeros { rows, .. } => {
                        flush(&mut gather, gather_start, &mut out);
                        let len = ((rows[1] - rows[0]) * row_bytes) as u64;
                        out.push(Unit { file: fi, dst, len, kind: Kind::Zeros });
                        dst += len;
                        gather_start = dst;
                    }
                }
            }
        }
        flush(&mut gather, gather_start, &mut out);
        if dst != f.size {
            return Err(WriteError::Internal {
                tensor: f.name.clone(),
                from: format!("layout of {} bytes, planned {}", dst, f.size),
            });
        }
    }
    Ok((out, headers))
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

fn exec(ckpt: &Checkpoint, u: &Unit, dst: &File, path: &Path, fsync: bool) -> Result<u32, WriteError> {
    let crc = match &u.kind {
        Kind::Copy { src, src_off } => {
            let bytes = src_slice(ckpt, *src, *src_off, u.len as usize)?;
            if !copy_range(ckpt.file(*src), *src_off, dst, u.dst, u.len as usize).map_err(io(path))? {
                dst.write_all_at(bytes, u.dst).map_err(io(path))?;
            }
            crc32fast::hash(bytes)
        }
        Kind::Gather { runs } => {
            let mut buf = Vec::with_capacity(u.len as usize);
            for (src, off, len) in runs {
                buf.extend_from_slice(src_slice(ckpt, *src, *off, *len)?);
            }
            dst.write_all_at(&buf, u.dst).map_err(io(path))?;
            crc32fast::hash(&buf)
        }
        Kind::Cast { src, src_off, n, from, to } => {
            let bytes = src_slice(ckpt, *src, *src_off, n * from.size())?;
            let mut buf = Vec::with_capacity(u.len as usize);
            dtype::cast_into(*from, bytes, *to, &mut buf);
            dst.write_all_at(&buf, u.dst).map_err(io(path))?;
            crc32fast::hash(&buf)
        }
        Kind::Zeros => {
            let mut h = crc32fast::Hasher::new();
            let mut left = u.len as usize;
            while left > 0 {
                let n = left.min(ZEROS.len());
                h.update(&ZEROS[..n]);
                left -= n;
            }
            h.finalize()
        }
    };
    if fsync {
        start_writeback(dst, u.dst, u.len);
    }
    Ok(crc)
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
    let (units, headers) = units(ckpt, plan)?;
    let paths: Vec<PathBuf> = plan.files.iter().map(|f| dir.join(&f.name)).collect();
    let mut files = Vec::with_capacity(paths.len());
    for ((f, path), header) in plan.files.iter().zip(&paths).zip(&headers) {
        let file = File::create(path).map_err(io(path))?;
        file.set_len(f.size).map_err(io(path))?;
        file.write_all_at(header, 0).map_err(io(path))?;
        super::crash_point();
        files.push(file);
    }
    let crcs: Vec<u32> = units
        .par_iter()
        .map(|u| {
            let crc = exec(ckpt, u, &files[u.file], &paths[u.file], fsync)?;
            super::crash_point();
            progress(u.len);
            Ok(crc)
        })
        .collect::<Result<_, WriteError>>()?;
    files.par_iter().zip(&paths).try_for_each(|(f, p)| {
        if fsync {
            f.sync_all().map_err(io(p))?;
        }
        super::crash_point();
        Ok::<_, WriteError>(())
    })?;
    // Units are in file order, each file's in offset order.
    let mut hashers: Vec<crc32fast::Hasher> = headers
        .iter()
        .map(|h| {
            let mut x = crc32fast::Hasher::new();
            x.update(h);
            x
        })
        .collect();
    for (u, crc) in units.iter().zip(crcs) {
        hashers[u.file].combine(&crc32fast::Hasher::new_with_initial_len(crc, u.len));
    }
    Ok(plan
        .files
        .iter()
        .zip(hashers)
        .map(|(f, h)| FileEntry {
            name: f.name.clone(),
            rank: f.rank,
            part: f.part,
            size: f.size,
            crc32: format!("{:08x}", h.finalize()),
        })
        .collect())
}
