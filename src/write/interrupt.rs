//! What a conversion owns on disk while it runs, and taking it back on an error or a signal.
//!
//! Every run holds a `Ticket` for its `Claim`: its `--out`, the parent directories it created,
//! and the `Stage` it is at (staging, previous output moved aside, published). A stage changes
//! under the same lock as the system call that changes the disk, so a claim always says exactly
//! what exists. Dropping the ticket of a run that did not publish undoes its claim (the error
//! path): the staging directory is removed, a previous output moved aside is moved back.
//!
//! [`install`] (the binary calls it before any other thread starts) blocks SIGINT, SIGTERM and
//! SIGHUP in every thread and starts one thread that waits for them with `sigwait`, so no code
//! runs in signal context. On a signal that thread takes the lock for good, so no stage changes
//! after it, undoes every claim, says on stderr what it removed or kept, and exits with 128 + the
//! signal number. The other threads stop at their next crash point (`stop_if_interrupted`) or
//! at the lock, so no file is started after the staging directory is gone; files they still hold
//! open were unlinked with it.

use super::publish::{remove_all, restore};
use crate::text::qp;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Where a run is, as far as the disk is concerned.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Stage {
    /// Nothing written yet.
    Preparing,
    /// Removing a leftover of a dead run.
    Clearing(PathBuf),
    /// The staging directory exists; `--out` is as it was.
    Staging(PathBuf),
    /// `--force` without an atomic exchange: the previous output was moved to `old`; the new one
    /// is still in the staging directory `dir`.
    MovedAside { dir: PathBuf, old: PathBuf },
    /// The new output is at `--out`; `old` is the replaced output, still to delete.
    Published { old: Option<PathBuf> },
}

/// What one run owns.
#[derive(Debug, Clone)]
pub(crate) struct Claim {
    /// The run's `--out`.
    pub out: PathBuf,
    /// Parent directories of `--out` this run created, outermost first.
    pub parents: Vec<PathBuf>,
    /// Where it is.
    pub stage: Stage,
}

/// Every claim of this process, by ticket number.
static CLAIMS: Mutex<BTreeMap<u64, Claim>> = Mutex::new(BTreeMap::new());
static NEXT_TICKET: AtomicU64 = AtomicU64::new(0);
/// The signal being handled (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Whether a signal also prints its `--json` error object on stdout.
static JSON_ERRORS: AtomicBool = AtomicBool::new(false);

/// For `--json`: a conversion ended by a signal also prints its error object
/// ([`crate::failure::Failure`], kind `signal.sigint` and so on) on stdout.
pub fn set_json_errors(on: bool) {
    JSON_ERRORS.store(on, Ordering::SeqCst);
}

fn claims() -> MutexGuard<'static, BTreeMap<u64, Claim>> {
    CLAIMS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A run's registration of its [`Claim`]; dropping it undoes what the claim still owns, unless
/// the run published (then only a replaced output left to delete is removed).
pub(crate) struct Ticket {
    id: u64,
    out: PathBuf,
}

impl Ticket {
    /// Registers a claim on `out` that owns nothing yet.
    pub fn new(out: &Path) -> Ticket {
        let id = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
        claims().insert(id, Claim { out: out.to_owned(), parents: vec![], stage: Stage::Preparing });
        Ticket { id, out: out.to_owned() }
    }

    /// Runs `f` on the claim under the lock, so that a change on disk and the stage that records
    /// it happen together. Blocks for ever once a signal is being handled.
    pub fn with<R>(&self, f: impl FnOnce(&mut Claim) -> R) -> R {
        let mut all = claims();
        let claim = all.entry(self.id).or_insert_with(|| Claim {
            out: self.out.clone(),
            parents: vec![],
            stage: Stage::Preparing,
        });
        f(claim)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut all = claims();
        let Some(claim) = all.remove(&self.id) else { return };
        for u in undo(&claim).into_iter().filter(|u| !u.ok) {
            let _ = writeln!(std::io::stderr(), "note: {}", u.what);
        }
    }
}

/// Whether a claim of this process owns `path` (a staging or replaced-output directory).
pub(crate) fn owned_here(path: &Path) -> bool {
    claims().values().any(|c| match &c.stage {
        Stage::Staging(d) | Stage::MovedAside { dir: d, .. } => d == path,
        Stage::Published { old: Some(o) } => o == path,
        _ => false,
    })
}

/// One thing [`undo`] did or failed to do, as a phrase for a message.
pub(crate) struct Undone {
    pub ok: bool,
    pub what: String,
}

fn removal(path: &Path, label: &str) -> Undone {
    match remove_all(path) {
        Ok(()) => Undone { ok: true, what: format!("removed {label} {}", qp(path)) },
        Err(e) => Undone { ok: false, what: format!("could not remove {label} {} ({e}); remove it by hand", qp(path)) },
    }
}

/// Takes back what `claim` owns: the staging directory, a previous output moved aside (moved
/// back), a replaced output (deleted), and the parent directories it created if they are empty.
pub(crate) fn undo(claim: &Claim) -> Vec<Undone> {
    let mut done = Vec::new();
    match &claim.stage {
        Stage::Preparing | Stage::Published { old: None } => {}
        Stage::Clearing(p) => done.push(removal(p, "the leftover of an interrupted run")),
        Stage::Staging(dir) => done.push(removal(dir, "the staging directory")),
        Stage::MovedAside { dir, old } => {
            done.push(removal(dir, "the staging directory"));
            done.push(match restore(old, &claim.out) {
                Ok(()) => Undone { ok: true, what: format!("moved the previous output back to {}", qp(&claim.out)) },
                Err(e) => Undone {
                    ok: false,
                    what: format!(
                        "could not move the previous output back to {} ({e}): it is at {}",
                        qp(&claim.out),
                        qp(old)
                    ),
                },
            });
        }
        Stage::Published { old: Some(old) } => done.push(removal(old, "the replaced output")),
    }
    if !matches!(claim.stage, Stage::Published { .. }) {
        for p in claim.parents.iter().rev() {
            if std::fs::remove_dir(p).is_ok() {
                done.push(Undone { ok: true, what: format!("removed the directory {} it had created", qp(p)) });
            }
        }
    }
    done
}

/// What `claim` leaves at `--out`, for the message of an interrupted run.
fn outcome(claim: &Claim) -> String {
    let out = qp(&claim.out);
    match &claim.stage {
        Stage::Preparing | Stage::Clearing(_) | Stage::Staging(_) => format!("{out} was not touched"),
        Stage::MovedAside { .. } => format!("{out} was not replaced"),
        Stage::Published { .. } => format!("the conversion had finished: {out} holds it"),
    }
}

/// The name of a signal this module handles.
fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}

/// The message of a run interrupted by `sig` whose claims were `claims`, after undoing them.
fn interrupted_message(sig: i32, claims: &[Claim]) -> String {
    let name = signal_name(sig);
    if claims.is_empty() {
        return format!("interrupted by {name} before anything was written");
    }
    let mut lines = Vec::new();
    for c in claims {
        let mut parts: Vec<String> = undo(c).into_iter().map(|u| u.what).collect();
        parts.push(outcome(c));
        lines.push(format!("interrupted by {name}: {}", parts.join("; ")));
    }
    lines.join("\n")
}

/// Handles `sig`: takes the claims lock for good, undoes every claim, reports, exits 128 + `sig`.
fn on_signal(sig: i32) -> ! {
    SIGNAL.store(sig, Ordering::SeqCst);
    let code = crate::exit_code::SIGNALLED + sig;
    // Never released: no stage changes after this, and threads that try to change one stop.
    let held = claims();
    let message = std::panic::catch_unwind(|| {
        let claims: Vec<Claim> = held.values().cloned().collect();
        interrupted_message(sig, &claims)
    })
    .unwrap_or_else(|_| format!("interrupted by {}", signal_name(sig)));
    let mut err = std::io::stderr();
    // SAFETY: isatty only reads the descriptor's state.
    if unsafe { libc::isatty(2) } == 1 {
        let _ = writeln!(err); // off the progress bar's line
    }
    let _ = writeln!(err, "{message}");
    if JSON_ERRORS.load(Ordering::SeqCst) {
        let f = crate::failure::Failure::other(
            u8::try_from(code).unwrap_or(u8::MAX),
            format!("signal.{}", signal_name(sig).to_ascii_lowercase()),
            message,
            Default::default(),
        );
        if let Ok(mut text) = serde_json::to_string_pretty(&f) {
            text.push('\n');
            // Straight to descriptor 1: the main thread may hold the lock of `std::io::stdout()`.
            let mut rest = text.as_bytes();
            while !rest.is_empty() {
                // SAFETY: writes from a valid buffer of that length; descriptor 1 is only written.
                let n = unsafe { libc::write(1, rest.as_ptr().cast(), rest.len()) };
                match usize::try_from(n) {
                    Ok(n) if n > 0 => rest = &rest[n.min(rest.len())..],
                    _ => break,
                }
            }
        }
    }
    // SAFETY: ends the process at once; nothing of ours needs to run after this.
    unsafe { libc::_exit(code) }
}

/// Blocks for ever when a signal is being handled (the signal thread is taking back what the run
/// owns and will end the process). Called at every crash point, so writer threads start no new
/// file once a signal arrived.
pub(crate) fn stop_if_interrupted() {
    if SIGNAL.load(Ordering::SeqCst) != 0 {
        loop {
            std::thread::park();
        }
    }
}

/// For the binary: call after a conversion, before printing its result or error and exiting.
/// Returns at once, unless a signal is being handled; then it never returns, and the signal
/// thread ends the process with the signal's exit code and message.
pub fn wait_if_interrupted() {
    stop_if_interrupted();
}

/// The signals that end a conversion cleanly. One ignored when the process started (`nohup`
/// ignores SIGHUP) stays ignored.
fn handled_signals() -> libc::sigset_t {
    // SAFETY: sigset_t and sigaction are plain C data, initialised by sigemptyset and by the
    // kernel before they are read; the null pointer asks sigaction for the current action only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            let mut old: libc::sigaction = std::mem::zeroed();
            let ignored = libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN;
            if !ignored {
                libc::sigaddset(&mut set, sig);
            }
        }
        set
    }
}

/// A signal set that may move to the signal thread (plain data).
struct SignalSet(libc::sigset_t);

/// Makes SIGINT, SIGTERM and SIGHUP end a conversion cleanly: each removes what the run wrote
/// (or finishes what it cannot take back, see the module docs), prints what it did on stderr, and
/// exits with 128 + the signal number (130, 143, 129).
///
/// Must be called before the process starts any other thread: the signals are blocked in the
/// calling thread, and threads inherit that, so only the signal thread ever receives them.
/// Calling it again does nothing.
pub fn install() -> std::io::Result<()> {
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        return Ok(());
    }
    let set = SignalSet(handled_signals());
    let mask = |how| {
        // SAFETY: `set` is an initialised signal set; the old mask is not asked for.
        match unsafe { libc::pthread_sigmask(how, &set.0, std::ptr::null_mut()) } {
            0 => Ok(()),
            rc => Err(std::io::Error::from_raw_os_error(rc)),
        }
    };
    mask(libc::SIG_BLOCK)?;
    let waiting = SignalSet(set.0);
    let spawned = std::thread::Builder::new().name("reshard-signals".into()).spawn(move || {
        let waiting = waiting;
        loop {
            let mut sig = 0;
            // SAFETY: `waiting` is an initialised set blocked in every thread; `sig` is a local.
            if unsafe { libc::sigwait(&waiting.0, &mut sig) } == 0 {
                on_signal(sig);
            }
        }
    });
    if let Err(e) = spawned {
        let _ = mask(libc::SIG_UNBLOCK);
        return Err(e);
    }
    *installed = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(stage: Stage) -> Claim {
        Claim { out: PathBuf::from("/x/out"), parents: vec![], stage }
    }

    #[test]
    fn the_message_names_what_was_removed_and_what_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join(".out.reshard-tmp-1");
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("f"), b"x").unwrap();
        let m = interrupted_message(libc::SIGTERM, &[claim(Stage::Staging(staging.clone()))]);
        assert!(m.starts_with("interrupted by SIGTERM: removed the staging directory"), "{m}");
        assert!(m.contains(".out.reshard-tmp-1") && m.contains("`/x/out` was not touched"), "{m}");
        assert!(!staging.exists());
        let m = interrupted_message(libc::SIGHUP, &[claim(Stage::Published { old: None })]);
        assert_eq!(m, "interrupted by SIGHUP: the conversion had finished: `/x/out` holds it");
        assert_eq!(interrupted_message(libc::SIGINT, &[]), "interrupted by SIGINT before anything was written");
    }

    #[test]
    fn undo_moves_a_previous_output_back_and_removes_created_parents() {
        let dir = tempfile::tempdir().unwrap();
        let (a, out) = (dir.path().join("a"), dir.path().join("a/out"));
        let (tmp, old) = (dir.path().join("a/.out.reshard-tmp-1"), dir.path().join("a/.out.reshard-old-1"));
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("keep"), b"old").unwrap();
        let c =
            Claim { out: out.clone(), parents: vec![a.clone()], stage: Stage::MovedAside { dir: tmp.clone(), old } };
        let done = undo(&c);
        assert!(done.iter().all(|u| u.ok), "{:?}", done.iter().map(|u| &u.what).collect::<Vec<_>>());
        assert_eq!(std::fs::read(out.join("keep")).unwrap(), b"old");
        assert!(!tmp.exists() && a.exists(), "a parent that is not empty stays");
        std::fs::remove_dir_all(&out).unwrap();
        let c = Claim { out, parents: vec![a.clone()], stage: Stage::Preparing };
        assert_eq!(undo(&c).len(), 1);
        assert!(!a.exists());
    }
}
