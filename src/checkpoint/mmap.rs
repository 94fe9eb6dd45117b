//! The only `unsafe` in the crate: memory-mapping the checkpoint's files.

use super::{CheckpointError, CheckpointMeta, TensorInfo};
use crate::input;
use memmap2::{Advice, Mmap};
use std::fs::File;

/// A checkpoint with its files mapped, for zero-copy reads of tensor data, and its side files
/// open for copying.
pub struct Checkpoint {
    /// The metadata the maps were checked against.
    pub meta: CheckpointMeta,
    maps: Vec<Mmap>,
    files: Vec<File>,
    side: Vec<File>,
}

impl Checkpoint {
    /// Maps every file of `meta` read-only and opens its side files ([`CheckpointMeta::extra_files`]).
    ///
    /// Each file's size is checked again against the size seen when its header was parsed, so a
    /// file replaced or truncated between `read` and `open` is an error, not an out-of-bounds read.
    /// Files are opened with [`input::open_regular`] again, so one replaced by a FIFO in between
    /// cannot block; and since the side files are copied from the handles opened here, one that
    /// became unreadable is found before the first shard byte is written.
    pub fn open(meta: CheckpointMeta) -> Result<Self, CheckpointError> {
        let mut maps = Vec::with_capacity(meta.files.len());
        let mut files = Vec::with_capacity(meta.files.len());
        for f in &meta.files {
            let io = |source| CheckpointError::Io { path: f.path.clone(), source };
            let file = input::open_regular(&f.path)?;
            let len = file.metadata().map_err(io)?.len();
            if len != f.size {
                return Err(io(std::io::Error::other(format!(
                    "file changed size while being read ({} -> {len} bytes)",
                    f.size
                ))));
            }
            // SAFETY: the map is read-only and private to this process. The tool never writes to
            // its inputs (convert refuses an --out inside the input); another process truncating
            // a source file during a run could still fault, which is the accepted mmap trade-off
            // of every safetensors reader. All slicing of the map is bounds-checked in `bytes`.
            let map = unsafe { Mmap::map(&file) }.map_err(io)?;
            // Parallel readers are much faster with WillNeed than with Sequential (crates.md).
            let _ = map.advise(Advice::WillNeed);
            maps.push(map);
            files.push(file);
        }
        let side = meta
            .extra_files
            .iter()
            .map(|n| input::open_regular(&meta.dir.join(n)).map_err(|source| CheckpointError::SideFile { source }))
            .collect::<Result<_, _>>()?;
        Ok(Checkpoint { meta, maps, files, side })
    }

    /// The open side file `i` of [`CheckpointMeta::extra_files`] (for copying).
    pub fn side_file(&self, i: usize) -> &File {
        &self.side[i]
    }

    /// The data bytes of a tensor. The range was validated when the header was parsed.
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        self.maps.get(t.file).and_then(|m| m.get(t.start as usize..t.end as usize)).unwrap_or(&[])
    }

    /// All bytes of source file `i` (mapped).
    pub fn file_bytes(&self, i: usize) -> &[u8] {
        self.maps.get(i).map(|m| &m[..]).unwrap_or(&[])
    }

    /// The open source file `i` (for in-kernel copies).
    pub fn file(&self, i: usize) -> &File {
        &self.files[i]
    }

    /// The data bytes of a tensor by name.
    pub fn tensor_bytes(&self, name: &str) -> Option<&[u8]> {
        self.meta.tensors.get(name).map(|t| self.bytes(t))
    }
}
