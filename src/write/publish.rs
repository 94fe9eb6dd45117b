//! Claiming `--out` and publishing into it without replacing anything the run was not asked to
//! replace.
//!
//! - Claiming ([`claim`]): under an exclusive `flock` of `--out`'s parent directory, leftovers of
//!   dead runs are removed, a live run's staging directory is refused (`Busy`), and the staging
//!   directory is created. So of two runs on one `--out` that overlap in time, the second always
//!   sees the first's staging directory and exits 4. Where the filesystem has no `flock` (some
//!   network filesystems) the check is done without the lock; publishing below still never
//!   replaces another run's output without `--force`.
//! - Publishing ([`publish`]): `renameat2(RENAME_NOREPLACE)` onto a free `--out`, so anything that
//!   appeared there meanwhile (directory, file, link, another run's output) is never replaced:
//!   the run fails with [`WriteError::OutChanged`]. An empty directory that was at `--out` when
//!   the run started is first removed with `rmdir`, which fails if anything was put into it. With
//!   `--force` an existing directory is swapped with the new output in one
//!   `renameat2(RENAME_EXCHANGE)`, so `--out` is at every moment the complete old or the
//!   complete new output, and the old one is deleted after.
//! - Where `renameat2` or its flags are not supported (not Linux, or a filesystem without them),
//!   the fallback is the plain `rename`, done right after checking that `--out` is absent: it
//!   fails on anything but an empty directory, so at worst an empty directory created in that
//!   instant is replaced. `--force` then first moves the old output aside
//!   (`.NAME.reshard-old-PID`) and moves it back if the new one cannot take its place.
//!
//! Every step changes the run's [`Stage`] under the claims lock together with its system call.

use super::interrupt::{Stage, Ticket};
use super::{crash_point, crash_point_labelled, io, OutState, WriteError, OLD_MARKER, TMP_MARKER};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

/// `renameat2` with `flags`; `ErrorKind::Unsupported` where the system has none, or with the test
/// hook `RESHARD_RENAME=plain` (which forces the fallback).
fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    if std::env::var_os("RESHARD_RENAME").is_some_and(|v| v == "plain") {
        return Err(std::io::ErrorKind::Unsupported.into());
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
        let (a, b) = (c(from)?, c(to)?);
        // SAFETY: both paths are NUL-terminated strings that outlive the call; the kernel reads
        // nothing else of ours. The raw syscall, not libc's wrapper: older C libraries lack it.
        let rc = unsafe {
            libc::syscall(libc::SYS_renameat2, libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), flags)
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (from, to, flags);
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

#[cfg(target_os = "linux")]
const NOREPLACE: libc::c_uint = libc::RENAME_NOREPLACE;
#[cfg(target_os = "linux")]
const EXCHANGE: libc::c_uint = libc::RENAME_EXCHANGE;
#[cfg(not(target_os = "linux"))]
const NOREPLACE: libc::c_uint = 1;
#[cfg(not(target_os = "linux"))]
const EXCHANGE: libc::c_uint = 2;

/// Whether a `renameat2` error means the kernel or filesystem cannot do it (then: fallback).
fn unsupported(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::Unsupported
        || matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP))
}

/// Whether a rename failed because something is at the target.
fn occupied(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY | libc::ENOTDIR | libc::EISDIR))
}

/// Renames `from` to a free `to`; fails with an [`occupied`] error when something is there.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    match renameat2(from, to, NOREPLACE) {
        Err(e) if unsupported(&e) => match fs::symlink_metadata(to) {
            Ok(_) => Err(std::io::Error::from_raw_os_error(libc::EEXIST)),
            // The plain rename fails on everything but an empty directory.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fs::rename(from, to),
            Err(e) => Err(e),
        },
        r => r,
    }
}

/// Moves a previous output that was moved aside back to `out`, never over something else.
pub(crate) fn restore(old: &Path, out: &Path) -> std::io::Result<()> {
    rename_noreplace(old, out)
}

/// Removes a directory tree, again while a thread still adds to it (a writer that started a file
/// before the run was interrupted); a tree already gone is removed.
pub(crate) fn remove_all(path: &Path) -> std::io::Result<()> {
    let mut tries = 0;
    loop {
        match fs::remove_dir_all(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(_) if fs::symlink_metadata(path).is_err() => return Ok(()),
            Err(e) => {
                tries += 1;
                if tries >= 50 {
                    return Err(e);
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// An exclusive `flock` of a directory, released when dropped; `None` where the filesystem has
/// no locks.
fn lock_dir(dir: &Path) -> Option<File> {
    use std::os::fd::AsRawFd;
    let f = File::open(dir).ok()?;
    loop {
        // SAFETY: flock on a descriptor we own, open for the duration of the call.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Some(f);
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return None;
        }
    }
}

/// Creates the missing ancestors of `dir`, recording each one created in `created` (outermost
/// first), so they can be removed again when the run does not finish.
fn create_parents(dir: &Path, created: &mut Vec<PathBuf>) -> Result<(), WriteError> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|a| fs::symlink_metadata(a).is_err()).collect();
    for d in missing.into_iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => created.push(d.to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(d)(e)),
        }
    }
    Ok(())
}

/// Claims `out` for a run: its parent directories, the removal of dead runs' leftovers, and the
/// staging directory `tmp`, all under the parent's lock (see the module docs). Returns the
/// leftovers removed.
pub(crate) fn claim(ticket: &Ticket, out: &Path, tmp: &Path) -> Result<Vec<PathBuf>, WriteError> {
    let parent = tmp.parent().unwrap_or(Path::new("/"));
    ticket.with(|c| create_parents(parent, &mut c.parents))?;
    let _lock = lock_dir(parent);
    let removed = clean_leftovers(out, ticket)?;
    // Between the check and the staging directory, under the lock: a second run paused here
    // (RESHARD_PAUSE_AT) shows that it cannot get in between.
    crash_point_labelled("claiming --out");
    ticket.with(|c| {
        fs::create_dir(tmp).map_err(io(tmp))?;
        c.stage = Stage::Staging(tmp.to_owned());
        Ok::<(), WriteError>(())
    })?;
    Ok(removed)
}

/// Removes staging and replaced-output directories that interrupted runs left beside `out`
/// (their process is gone); returns what was removed. A leftover whose process still runs is an
/// error: two conversions must not write the same `--out`.
fn clean_leftovers(out: &Path, ticket: &Ticket) -> Result<Vec<PathBuf>, WriteError> {
    let abs = std::path::absolute(out).map_err(io(out))?;
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else { return Ok(vec![]) };
    let name = name.to_string_lossy();
    let Ok(entries) = fs::read_dir(parent) else { return Ok(vec![]) };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let f = e.file_name().to_string_lossy().into_owned();
        let pid = [TMP_MARKER, OLD_MARKER]
            .iter()
            .find_map(|m| f.strip_prefix(&format!(".{name}{m}")))
            .and_then(|p| p.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        let path = e.path();
        let alive = if pid == std::process::id() {
            super::interrupt::owned_here(&path)
        } else {
            Path::new(&format!("/proc/{pid}")).exists()
        };
        if alive {
            return Err(WriteError::Busy { path, pid });
        }
        ticket.with(|c| c.stage = Stage::Clearing(path.clone()));
        let r = remove_all(&path);
        ticket.with(|c| c.stage = Stage::Preparing);
        r.map_err(io(&path))?;
        removed.push(path);
    }
    Ok(removed)
}

/// What one publishing step did.
enum Step {
    /// The new output is at `--out`, nothing replaced.
    Done,
    /// The new output is at `--out`; the replaced one is at this path, to delete.
    Replaced(PathBuf),
    /// Look again; `changed` names the change made on disk, if any (a crash point follows).
    Again { changed: Option<&'static str> },
}

/// The replaced-output name for staging directory `tmp` (`.NAME.reshard-old-PID`).
fn old_dir(tmp: &Path) -> PathBuf {
    tmp.with_file_name(tmp.file_name().map(|n| n.to_string_lossy().replace(TMP_MARKER, OLD_MARKER)).unwrap_or_default())
}

/// Moves the finished staging directory `tmp` to `out`, replacing only what the run may
/// replace: an empty directory that was there when it started (`before`), or with `force` any
/// directory. Anything else at `out` is left untouched and the run fails.
pub(crate) fn publish(
    ticket: &Ticket,
    tmp: &Path,
    out: &Path,
    force: bool,
    before: OutState,
) -> Result<(), WriteError> {
    crash_point_labelled("publishing");
    // Each look at `out` either finishes or changes something and looks again; a few rounds are
    // enough unless another program keeps changing `out`.
    for _ in 0..4 {
        match ticket.with(|c| step(&mut c.stage, tmp, out, force, before))? {
            Step::Done => {
                crash_point();
                sync_parent(out);
                return Ok(());
            }
            Step::Replaced(old) => {
                crash_point_labelled("replaced, deleting the previous output");
                // On failure the stage keeps `old`, and the ticket names it when dropped.
                if remove_all(&old).is_ok() {
                    ticket.with(|c| c.stage = Stage::Published { old: None });
                    crash_point();
                }
                sync_parent(out);
                return Ok(());
            }
            Step::Again { changed: Some(label) } => crash_point_labelled(label),
            Step::Again { changed: None } => {}
        }
    }
    Err(WriteError::OutChanged { path: out.to_owned(), what: "kept changing while the new output was moved there" })
}

/// One look at `out` and the one change it calls for, with the stage that records it.
fn step(stage: &mut Stage, tmp: &Path, out: &Path, force: bool, before: OutState) -> Result<Step, WriteError> {
    use std::os::unix::fs::MetadataExt;
    let aside = matches!(stage, Stage::MovedAside { .. });
    match fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match rename_noreplace(tmp, out) {
            Ok(()) => {
                let old = match std::mem::replace(stage, Stage::Published { old: None }) {
                    Stage::MovedAside { old, .. } => Some(old),
                    _ => None,
                };
                *stage = Stage::Published { old: old.clone() };
                Ok(old.map_or(Step::Done, Step::Replaced))
            }
            Err(e) if occupied(&e) => Ok(Step::Again { changed: None }),
            Err(e) => Err(io(out)(e)),
        },
        Err(e) => Err(io(out)(e)),
        Ok(_) if aside => Err(WriteError::OutChanged {
            path: out.to_owned(),
            what: "appeared after the previous output was moved aside",
        }),
        Ok(m) if m.file_type().is_symlink() => {
            Err(WriteError::OutIsSymlink { path: out.to_owned(), target: fs::read_link(out).unwrap_or_default() })
        }
        Ok(m) if !m.is_dir() => Err(WriteError::OutNotDir { path: out.to_owned() }),
        Ok(m) if before == (OutState::Empty { dev: m.dev(), ino: m.ino() }) => match fs::remove_dir(out) {
            Ok(()) => Ok(Step::Again { changed: Some("removed the empty --out") }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Step::Again { changed: None }),
            Err(e) if occupied(&e) => Err(WriteError::OutChanged {
                path: out.to_owned(),
                what: "was empty when the conversion started and is not any more",
            }),
            Err(e) => Err(io(out)(e)),
        },
        Ok(_) if force => replace(stage, tmp, out),
        Ok(_) => Err(WriteError::OutChanged {
            path: out.to_owned(),
            what: match before {
                OutState::Absent => "appeared while the conversion ran",
                _ => "was replaced by another directory while the conversion ran",
            },
        }),
    }
}

/// `--force` onto an existing directory: one exchange, or (fallback) the old output moved aside.
fn replace(stage: &mut Stage, tmp: &Path, out: &Path) -> Result<Step, WriteError> {
    match renameat2(tmp, out, EXCHANGE) {
        Ok(()) => {
            // `tmp` now holds what was at `out`.
            *stage = Stage::Published { old: Some(tmp.to_owned()) };
            Ok(Step::Replaced(tmp.to_owned()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Step::Again { changed: None }),
        Err(e) if unsupported(&e) => {
            let old = old_dir(tmp);
            match fs::rename(out, &old) {
                Ok(()) => {
                    *stage = Stage::MovedAside { dir: tmp.to_owned(), old };
                    Ok(Step::Again { changed: Some("previous output moved aside") })
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Step::Again { changed: None }),
                Err(e) => Err(io(out)(e)),
            }
        }
        Err(e) => Err(io(out)(e)),
    }
}

/// Makes the rename durable: fsync of `out`'s parent directory (best effort).
fn sync_parent(out: &Path) {
    if let Some(parent) = std::path::absolute(out).ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
        let _ = File::open(&parent).and_then(|d| d.sync_all());
    }
}
