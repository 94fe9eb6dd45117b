//! Opening the files a user points reshard at (checkpoint files, config.json, mapping files, the
//! side files it copies, an output being verified) without trusting what kind of file they are.
//!
//! Only regular files are opened: reading a FIFO blocks until some other process writes to it
//! (for ever, in practice), and a device can do anything. [`stat`] follows symlinks and, when that
//! fails, says which link is broken and where it points; [`open_regular`] refuses anything but a
//! regular file before opening it, opens with `O_NONBLOCK` (so a file swapped for a FIFO in
//! between still cannot block the open) and checks the opened file again. Issue #14, class 6.
//!
//! Entry points: [`stat`], [`open_regular`], [`read_regular`], [`entry_exists`].

use crate::text::qp;
use std::fmt;
use std::fs::{self, File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// Links followed when explaining a broken chain (Linux itself gives up after 40).
const MAX_HOPS: usize = 40;

/// Why a path cannot be used as a regular input file.
#[derive(Debug)]
pub enum Problem {
    /// It exists, but is not a regular file: `"a FIFO"`, `"a directory"`, ...
    NotRegular(&'static str),
    /// A symlink whose chain of targets (as written in the links) ends at a path that does not
    /// exist.
    Dangling(Vec<PathBuf>),
    /// A symlink whose chain of targets (as written) comes back to itself, or goes on longer
    /// than the kernel follows.
    Loop(Vec<PathBuf>),
    /// Any other I/O error (not found, permission denied, ...).
    Io(std::io::Error),
}

/// A path that cannot be used as a regular input file, and why.
#[derive(Debug, thiserror::Error)]
pub struct FileError {
    /// The path as given.
    pub path: PathBuf,
    /// What is wrong with it.
    pub problem: Problem,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let chain = |c: &[PathBuf]| c.iter().map(|p| qp(p)).collect::<Vec<_>>().join(" -> ");
        let p = qp(&self.path);
        match &self.problem {
            Problem::NotRegular(kind) => write!(f, "{p} is {kind}, not a regular file"),
            Problem::Dangling(c) => write!(f, "{p} is a symlink to {}, which does not exist", chain(c)),
            Problem::Loop(c) => write!(f, "{p} is a symlink loop: {p} -> {}", chain(c)),
            Problem::Io(e) => write!(f, "cannot read {p}: {e}"),
        }
    }
}

impl FileError {
    /// Whether the path simply does not exist (no directory entry; not a broken link).
    pub fn is_not_found(&self) -> bool {
        matches!(&self.problem, Problem::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
    }
}

/// What kind of file `md` describes, as an article and a noun (`"a FIFO"`).
pub fn kind(md: &Metadata) -> &'static str {
    let t = md.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "a special file"
    }
}

/// Whether `path` has a directory entry, even a broken symlink (which `Path::exists` denies).
/// Never opens or follows anything.
pub fn entry_exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// The metadata of `path`, following symlinks. A dangling link or a loop is reported as such,
/// with the chain of link targets.
pub fn stat(path: &Path) -> Result<Metadata, FileError> {
    let err = |problem| FileError { path: path.to_owned(), problem };
    match fs::metadata(path) {
        Ok(md) => Ok(md),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(err(Problem::Loop(link_chain(path).0))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && is_symlink(path) => {
            let (chain, looped) = link_chain(path);
            Err(err(if looped { Problem::Loop(chain) } else { Problem::Dangling(chain) }))
        }
        Err(e) => Err(err(Problem::Io(e))),
    }
}

fn is_symlink(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// The targets of the chain of links starting at `path`, as written in each link, and whether
/// the chain comes back to a link already seen (or exceeds [`MAX_HOPS`]).
fn link_chain(path: &Path) -> (Vec<PathBuf>, bool) {
    let mut chain = Vec::new();
    let mut seen = vec![normalize(path)];
    let mut cur = path.to_owned();
    while let Ok(target) = fs::read_link(&cur) {
        let next = match cur.parent() {
            Some(parent) if target.is_relative() => parent.join(&target),
            _ => target.clone(),
        };
        chain.push(target);
        let key = normalize(&next);
        if seen.contains(&key) || chain.len() >= MAX_HOPS {
            return (chain, true);
        }
        seen.push(key);
        cur = next;
    }
    (chain, false)
}

/// `path` with `.` removed and `..` applied lexically: good enough to notice a chain of links
/// coming back to one already seen (a chain it misses still ends at [`MAX_HOPS`]).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Opens `path` for reading if, after following symlinks, it is a regular file. Never blocks:
/// the type is checked before the open, the open uses `O_NONBLOCK` (which Linux ignores for
/// regular files, so reads and maps of the returned file behave as usual), and the opened file is
/// checked again in case the path was replaced in between.
pub fn open_regular(path: &Path) -> Result<File, FileError> {
    let err = |problem| FileError { path: path.to_owned(), problem };
    let md = stat(path)?;
    if !md.is_file() {
        return Err(err(Problem::NotRegular(kind(&md))));
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| err(Problem::Io(e)))?;
    let md = file.metadata().map_err(|e| err(Problem::Io(e)))?;
    if !md.is_file() {
        return Err(err(Problem::NotRegular(kind(&md))));
    }
    Ok(file)
}

/// Reads the whole of a regular file (see [`open_regular`]).
pub fn read_regular(path: &Path) -> Result<Vec<u8>, FileError> {
    let mut file = open_regular(path)?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).map_err(|e| FileError { path: path.to_owned(), problem: Problem::Io(e) })?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    }

    #[test]
    fn regular_files_and_links_to_them_open() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("blob"), b"abc").unwrap();
        symlink("blob", d.path().join("link")).unwrap();
        symlink("link", d.path().join("link2")).unwrap();
        assert_eq!(read_regular(&d.path().join("link2")).unwrap(), b"abc");
    }

    #[test]
    fn special_files_are_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        mkfifo(&fifo);
        let e = open_regular(&fifo).unwrap_err().to_string();
        assert!(e.ends_with("fifo` is a FIFO, not a regular file"), "{e}");
        let e = open_regular(d.path()).unwrap_err().to_string();
        assert!(e.ends_with("is a directory, not a regular file"), "{e}");
        // Some sandboxes make /dev/null a regular file.
        if fs::metadata("/dev/null").unwrap().file_type().is_char_device() {
            let e = open_regular(Path::new("/dev/null")).unwrap_err().to_string();
            assert_eq!(e, "`/dev/null` is a character device, not a regular file");
        }
        let _sock = std::os::unix::net::UnixListener::bind(d.path().join("sock")).unwrap();
        let e = open_regular(&d.path().join("sock")).unwrap_err().to_string();
        assert!(e.ends_with("is a socket, not a regular file"), "{e}");
    }

    #[test]
    fn broken_links_are_named_with_their_targets() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        symlink("../../blobs/abc", p("dangling")).unwrap();
        let e = stat(&p("dangling")).unwrap_err();
        assert!(!e.is_not_found());
        assert!(e.to_string().ends_with("dangling` is a symlink to `../../blobs/abc`, which does not exist"), "{e}");
        symlink("dangling", p("two")).unwrap();
        let e = stat(&p("two")).unwrap_err().to_string();
        assert!(e.ends_with("two` is a symlink to `dangling` -> `../../blobs/abc`, which does not exist"), "{e}");
        symlink("b", p("a")).unwrap();
        symlink("./a", p("b")).unwrap();
        let e = open_regular(&p("a")).unwrap_err().to_string();
        assert!(e.contains("a` is a symlink loop: `") && e.ends_with("a` -> `b` -> `./a`"), "{e}");
        symlink("self", p("self")).unwrap();
        let e = stat(&p("self")).unwrap_err().to_string();
        assert!(e.contains("is a symlink loop") && e.ends_with("-> `self`"), "{e}");
        let e = stat(&p("nothing")).unwrap_err();
        assert!(e.is_not_found() && e.to_string().starts_with("cannot read"), "{e}");
        assert!(entry_exists(&p("dangling")) && !entry_exists(&p("nothing")));
    }
}
