//! Reading source bytes around the page cache.
//!
//! A conversion or a verification of a checkpoint that is not in the page cache reads each byte
//! once: going through the cache costs a copy into freshly allocated cache pages, which on a VM
//! that hands free memory back to its host also costs a host fault per page (docs/performance.md:
//! `cat` of a cold 4.9 GB shard took 7.1 s of system time, `dd iflag=direct` 0.12 s). So long
//! runs that are not cached are read with `O_DIRECT` into aligned blocks ([`Block`]) instead,
//! and copied from there.
//!
//! Whether a range is cached is asked of the kernel once, before anything is read, with
//! `mincore` on the file's map ([`Residency`]): a range whose every page was in the cache then is
//! read through it (a copy from cache pages that already exist), any other is read directly.
//! `RESHARD_READ=direct|cached` overrides the choice ([`ReadMode::from_env`]; tests and
//! benchmarks).

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Alignment of direct reads and writes: offsets, lengths and buffer addresses.
pub(crate) const ALIGN: usize = 4096;

/// A block of memory aligned to [`ALIGN`], as direct I/O needs: an anonymous map of its own,
/// page-aligned, and returned to the system when dropped (not kept in the allocator's arena of a
/// thread that has ended).
pub(crate) struct Block {
    mem: memmap2::MmapMut,
    len: usize,
}

impl Block {
    /// A zeroed block of `len` bytes.
    pub(crate) fn new(len: usize) -> Self {
        // A map that cannot be had is out of memory, as a failed allocation would be.
        let mem = memmap2::MmapMut::map_anon(len.max(1)).unwrap_or_else(|e| panic!("cannot map {len} bytes: {e}"));
        Block { mem, len }
    }

    /// The block's bytes (aligned to [`ALIGN`]: a map starts on a page).
    pub(crate) fn bytes(&mut self) -> &mut [u8] {
        &mut self.mem[..self.len]
    }

    /// The block's length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The block's bytes, read-only.
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.mem[..self.len]
    }
}

/// How long source runs are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadMode {
    /// Through the page cache (`pread`), always.
    Cached,
    /// Around it (`O_DIRECT`), always; an error where the filesystem refuses.
    Direct,
    /// Around it where [`resident`] says a range is not all cached, through it otherwise.
    Auto,
}

impl ReadMode {
    /// `RESHARD_READ=direct|cached` from the environment; [`ReadMode::Auto`] otherwise.
    pub(crate) fn from_env() -> Self {
        match std::env::var("RESHARD_READ").as_deref() {
            Ok("direct") => ReadMode::Direct,
            Ok("cached") => ReadMode::Cached,
            _ => ReadMode::Auto,
        }
    }
}

/// A second handle on the open file `f`, with `O_DIRECT`: opened through `/proc/self/fd`, so it is
/// the same file even if its path was replaced meanwhile (checked: same device and inode). `None`
/// where the system or the filesystem has no `O_DIRECT` (a tmpfs, no `/proc`).
pub(crate) fn open_direct(f: &File) -> Option<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let d = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", f.as_raw_fd()))
            .ok()?;
        let (a, b) = (f.metadata().ok()?, d.metadata().ok()?);
        (a.dev() == b.dev() && a.ino() == b.ino() && b.is_file()).then_some(d)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = f;
        None
    }
}

/// Which stretches of a mapped file were all in the page cache when it was looked at, in
/// [`GRAIN`]s, and how many of its bytes were not.
///
/// It is taken once, before any read of ours, and not asked again: every read through the cache
/// starts the kernel's read-ahead of the bytes after it (`read_ahead_kb`, 8 MiB on this VM), so a
/// range asked of `mincore` just before it is read is "cached" because the read before it drew it
/// in, and one read through the cache draws every later one through it. Measured on the full
/// 11B-Vision shape, cold, tp 4 (docs/performance.md, run 10): asked per read, 15.8 of the
/// 20 GB of source ended in the cache during a conversion, and verify read 45.3 GB for 43.1.
pub(crate) struct Residency {
    /// Per grain of the file: whether every page of it was cached.
    cached: Vec<bool>,
    uncached: u64,
}

/// The unit of a [`Residency`]: the reads it decides for are of this size.
pub(crate) const GRAIN: usize = 2 << 20;

impl Residency {
    /// The residency of `map` now; nothing cached when the kernel cannot say.
    pub(crate) fn of(map: &[u8]) -> Self {
        let page = page_size();
        let grains = map.len().div_ceil(GRAIN);
        let mut cached = Vec::with_capacity(grains);
        let mut resident = 0;
        for g in 0..grains {
            let (r, all) = resident_pages(map, g * GRAIN, GRAIN).unwrap_or((0, 1));
            cached.push(r == all);
            resident += r;
        }
        let uncached = (map.len() as u64).saturating_sub((resident * page) as u64);
        Residency { cached, uncached }
    }

    /// Whether every grain that `[off, off + len)` touches was all cached.
    pub(crate) fn cached(&self, off: usize, len: usize) -> bool {
        let (first, end) = (off / GRAIN, (off + len.max(1)).div_ceil(GRAIN));
        self.cached.get(first..end).is_some_and(|g| g.iter().all(|&c| c))
    }

    /// How many bytes of the file were not in the page cache (all when the kernel cannot say).
    pub(crate) fn uncached(&self) -> u64 {
        self.uncached
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        page as usize
    } else {
        ALIGN
    }
}

/// (resident pages, pages) of `map[off..off + len]`, from `mincore`; `None` when it fails.
fn resident_pages(map: &[u8], off: usize, len: usize) -> Option<(usize, usize)> {
    #[cfg(target_os = "linux")]
    {
        let page = page_size();
        let end = off.saturating_add(len).min(map.len());
        let (mut resident, mut total) = (0, 0);
        // The map starts on a page boundary, so page-aligned offsets into it are page-aligned
        // addresses.
        let mut at = off.min(end) - off.min(end) % page;
        let mut vec = [0u8; 4096];
        while at < end {
            let span = (end - at).min(vec.len() * page);
            let pages = span.div_ceil(page);
            // SAFETY: `at` is page-aligned within the live map and `span` does not go past its end
            // (mincore rounds it up to the page, and the map's last page is whole); `vec` holds
            // one byte per page of the span.
            let r = unsafe { libc::mincore(map.as_ptr().add(at) as *mut libc::c_void, span, vec.as_mut_ptr()) };
            if r != 0 {
                return None;
            }
            resident += vec[..pages].iter().filter(|v| *v & 1 == 1).count();
            total += pages;
            at += span;
        }
        Some((resident, total))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (map, off, len);
        None
    }
}

/// `MemAvailable` of /proc/meminfo in bytes (`None` where there is none).
pub(crate) fn mem_available() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 =
        m.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// Asks the kernel to start reading `len` bytes at `off` of `f` into the page cache, without
/// waiting (`posix_fadvise(WILLNEED)`, 8 MiB at a time: the kernel reads at most its read-ahead
/// window per call). Readers of a map then find the pages there, instead of each page fault
/// reading the 8 MiB around it, most of which, next to a long run read directly, nobody needs.
pub(crate) fn will_need(f: &File, off: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        const STEP: u64 = 8 << 20;
        let mut at = off;
        while at < off + len {
            let n = STEP.min(off + len - at);
            // SAFETY: a hint on an open descriptor; no memory is shared with the kernel.
            unsafe {
                libc::posix_fadvise(f.as_raw_fd(), at as libc::off_t, n as libc::off_t, libc::POSIX_FADV_WILLNEED)
            };
            at += n;
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (f, off, len);
}

/// Byte ranges of one file at most this far apart are asked for as one span by
/// [`will_need_spans`]: the rows of a row-parallel slice, whose gaps are the other ranks' columns.
const NEAR: u64 = 1 << 20;

/// [`will_need`] for byte ranges `(file, first byte, end)` given in order, `file` naming each
/// file's handle: ranges of one file at most [`NEAR`] apart are asked for as one span (the rows of
/// a row-parallel slice, which the other ranks then find in the cache), ranges farther apart
/// apart. One span from the first range to the last would also read everything between them,
/// long runs read around the cache among it: measured on the full 11B-Vision shape, cold, tp 4,
/// 31.7 GB read for 21.3 (docs/performance.md, run 10).
pub(crate) fn will_need_spans<'a>(
    file: impl Fn(usize) -> &'a File,
    ranges: impl IntoIterator<Item = (usize, u64, u64)>,
) {
    let mut span: Option<(usize, u64, u64)> = None;
    for (f, lo, hi) in ranges {
        span = match span {
            Some((g, l, h)) if g == f && lo >= l && lo <= h + NEAR => Some((g, l, h.max(hi))),
            prev => {
                if let Some((g, l, h)) = prev {
                    will_need(file(g), l, h - l);
                }
                Some((f, lo, hi))
            }
        };
    }
    if let Some((g, l, h)) = span {
        will_need(file(g), l, h - l);
    }
}

/// Reads `len` bytes at `off` of the `O_DIRECT` handle `direct` into `buf`, which must start on
/// [`ALIGN`] (a [`Block`]'s bytes, or a slice of them from an aligned offset) and hold
/// `len + 2 * ALIGN` bytes: the aligned range around them is read. Returns where in `buf` the
/// bytes start. A short read that leaves the grid (the end of the file) is completed with `plain`
/// (a buffered handle on the same file).
pub(crate) fn read_direct(direct: &File, plain: &File, off: u64, len: usize, buf: &mut [u8]) -> std::io::Result<usize> {
    let lo = off - off % ALIGN as u64;
    let skip = (off - lo) as usize;
    let want = (skip + len).next_multiple_of(ALIGN);
    if buf.len() < want {
        return Err(std::io::Error::other(format!("read block of {} bytes for {want}", buf.len())));
    }
    let mut got = 0;
    while got < skip + len {
        if got % ALIGN != 0 {
            // Only the end of the file ends a direct read off the grid; the rest, if any, is
            // read through the cache.
            plain.read_exact_at(&mut buf[got..skip + len], lo + got as u64)?;
            break;
        }
        match direct.read_at(&mut buf[got..want], lo + got as u64) {
            Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "source ended early")),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(skip)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A residency is what the cache held when it was taken: a file dropped from the cache is
    /// uncached in every grain, and stays so in that residency after it has been read.
    #[test]
    fn a_residency_is_taken_once() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![3u8; 2 * GRAIN + 5 * ALIGN]).unwrap();
        let f = File::open(&path).unwrap();
        f.sync_all().unwrap();
        // SAFETY: a hint on an open descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        // SAFETY: a private read-only map of a file this test owns.
        let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        let before = Residency::of(&map);
        if before.uncached() == 0 {
            return; // a filesystem that keeps its files in memory (tmpfs)
        }
        assert_eq!(before.uncached(), map.len() as u64);
        let _ = std::fs::read(&path).unwrap();
        let after = Residency::of(&map);
        for (off, len) in [(0, 1), (GRAIN - 1, 2), (2 * GRAIN, 5 * ALIGN), (0, map.len())] {
            assert!(!before.cached(off, len) && after.cached(off, len), "{off}+{len}");
        }
        assert_eq!(after.uncached(), 0);
    }

    /// Direct reads return exactly the bytes asked for, at every alignment and up to the file's
    /// last byte (off the 4 KiB grid).
    #[test]
    fn direct_reads_match_the_file() {
        // On the checkout's disk, where O_DIRECT works (a tmpfs /tmp may refuse it).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3 * ALIGN * 7 + 123).map(|i| (i * 31 + i / 4096) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let plain = File::open(&path).unwrap();
        let Some(direct) = open_direct(&plain) else { return };
        let mut block = Block::new(8 * ALIGN + 2 * ALIGN);
        for (off, len) in
            [(0, 1), (1, 4095), (4095, 2), (4096, 4096), (100, 5 * ALIGN), (data.len() - 7, 7), (0, 8 * ALIGN)]
        {
            let at = read_direct(&direct, &plain, off as u64, len, block.bytes()).unwrap();
            assert_eq!(&block.as_slice()[at..at + len], &data[off..off + len], "{off}+{len}");
        }
    }

    #[test]
    fn a_mapped_file_just_read_is_resident() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 5 * ALIGN]).unwrap();
        let f = File::open(&path).unwrap();
        // SAFETY: a private read-only map of a file this test owns.
        let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        let _ = std::fs::read(&path).unwrap();
        let r = Residency::of(&map);
        assert_eq!(r.uncached(), 0);
        assert!(r.cached(0, map.len()) && r.cached(10, 3) && r.cached(map.len(), 0));
    }
}
