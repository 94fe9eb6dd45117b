//! Carrying out a [`ShardPlan`]: one safetensors file per (rank, part), written in parallel with
//! rayon into a staging directory beside `--out`, then renamed into place only when complete.
//!
//! Entry point: [`write_plan`]. The safetensors header is written by [`header_bytes`] (plain JSON,
//! as the format allows) and the data is streamed piece by piece from the memory-mapped sources,
//! so memory use does not grow with the model. Every file gets a CRC-32 in the manifest.
//! How `--out` is claimed and published without replacing what the run was not asked to replace:
//! `publish.rs`; what a run owns and its cleanup on errors and signals: [`interrupt`].

mod engine;
pub(crate) use engine::{prefetch, Sources, FILES_AT_ONCE};
pub mod interrupt;
pub mod manifest;
mod publish;
pub(crate) mod read;

use crate::checkpoint::Checkpoint;
use crate::plan::{OutTensor, ShardPlan};
use crate::text::{q, qp};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Name of the manifest written beside the shards.
pub const MANIFEST_NAME: &str = "reshard-manifest.json";

/// Marker in the names of staging directories (`.NAME.reshard-tmp-PID`).
pub const TMP_MARKER: &str = ".reshard-tmp-";

/// Marker of a replaced output awaiting deletion (`.NAME.reshard-old-PID`).
pub const OLD_MARKER: &str = ".reshard-old-";

static CRASH_POINTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Fault injection for the crash-safety tests. With `RESHARD_CRASH_AT=N` in the environment the
/// process kills itself with SIGKILL at the N-th crash point of a conversion (1-based). Crash
/// points sit between every step that changes the disk: claiming `--out`, the staging directory,
/// each file created, each unit written, each fsync, each copy, the manifest, verifying, and each
/// step of publishing. With `RESHARD_PAUSE_AT=N` the thread that reaches the N-th point says so on
/// stderr and waits until stdin is closed (the signal and race tests). A thread that reaches a
/// crash point while a signal is being handled stops there ([`interrupt`]).
pub(crate) fn crash_point() {
    crash_point_labelled("");
}

/// [`crash_point`] with a name for the step, shown when pausing there.
pub(crate) fn crash_point_labelled(label: &str) {
    use std::sync::atomic::Ordering;
    use std::sync::OnceLock;
    static AT: OnceLock<(Option<u64>, Option<u64>)> = OnceLock::new();
    let n = CRASH_POINTS.fetch_add(1, Ordering::SeqCst) + 1;
    let var = |name| std::env::var(name).ok().and_then(|v| v.parse().ok());
    let (crash, pause) = AT.get_or_init(|| (var("RESHARD_CRASH_AT"), var("RESHARD_PAUSE_AT")));
    if *pause == Some(n) {
        let label = if label.is_empty() { String::new() } else { format!(" ({label})") };
        let _ = writeln!(std::io::stderr(), "reshard: paused at step {n}{label}; close stdin to go on");
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
    }
    if *crash == Some(n) {
        // SAFETY: sends a signal to this process; nothing is borrowed.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
    interrupt::stop_if_interrupted();
}

/// The number of crash points passed so far in this process (reported with
/// `RESHARD_CRASH_COUNT=1`, so the tests know how many points to try).
pub fn crash_points_passed() -> u64 {
    CRASH_POINTS.load(std::sync::atomic::Ordering::SeqCst)
}

/// Errors while writing the output.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum WriteError {
    #[error(
        "output {} already exists and is not empty\n(hint: pass --force to replace it, or choose another --out)",
        qp(path)
    )]
    OutExists { path: PathBuf },
    #[error("output {} exists and is not a directory", qp(path))]
    OutNotDir { path: PathBuf },
    #[error(
        "output {} is a symbolic link (to {}); reshard does not write through links, so that a replaced or removed output can never be somewhere else than --out\n(hint: pass the directory itself as --out)",
        qp(path),
        qp(target)
    )]
    OutIsSymlink { path: PathBuf, target: PathBuf },
    #[error(
        "output {} {what}; it was left untouched and the new output discarded\n(hint: pass --force to replace it, or choose another --out)",
        qp(path)
    )]
    OutChanged { path: PathBuf, what: &'static str },
    #[error("output {} is inside the input checkpoint {}; refusing to write into the input", qp(out), qp(input))]
    OutInsideInput { out: PathBuf, input: PathBuf },
    #[error("output {} contains the input checkpoint {}; --force would delete the input", qp(out), qp(input))]
    InputInsideOut { out: PathBuf, input: PathBuf },
    #[error("{}: {source}", qp(path))]
    Io { path: PathBuf, source: std::io::Error },
    #[error("tensor {} is an alias of {} but differs from it at byte {offset}\n(hint: the checkpoint's tied copies disagree; fix the checkpoint or map them as separate tensors)", q(alias), q(primary))]
    AliasDiffers { alias: String, primary: String, offset: usize },
    #[error("{} belongs to a conversion still running (pid {pid}); two runs must not write the same --out", qp(path))]
    Busy { path: PathBuf, pid: u32 },
    #[error("internal: piece of {} reads outside source {}", q(tensor), q(from))]
    Internal { tensor: String, from: String },
}

impl WriteError {
    /// Whether the error is about the input rather than the output environment.
    pub fn is_input_error(&self) -> bool {
        matches!(self, WriteError::AliasDiffers { .. })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WriteError + '_ {
    move |source| WriteError::Io { path: path.to_owned(), source }
}

/// The safetensors header region (8-byte length, JSON, space padding to a multiple of 8) for
/// tensors laid out back to back in the given order.
pub fn header_bytes(tensors: &[OutTensor]) -> Vec<u8> {
    let mut json = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut off = 0u64;
    for t in tensors {
        let name = serde_json::to_string(&t.name).expect("strings serialize");
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        json += &format!(
            ",{name}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{off},{}]}}",
            t.dtype.name(),
            shape.join(","),
            off + t.nbytes
        );
        off += t.nbytes;
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out
}

/// Options of [`write_plan`].
pub struct WriteOptions<'a> {
    /// Final output directory.
    pub out: PathBuf,
    /// Replace a non-empty `out`.
    pub force: bool,
    /// Called with byte counts as data is written (from several threads).
    pub progress: &'a (dyn Fn(u64) + Sync),
    /// fsync every file and the directory before the rename (the default). Without it the
    /// rename is still atomic, so a killed process leaves no partial `--out`, but a power loss or
    /// kernel crash soon after can.
    pub fsync: bool,
}

/// What was written.
#[derive(Debug, serde::Serialize)]
pub struct WriteSummary {
    /// The output directory.
    pub out: PathBuf,
    /// Files written, with checksums.
    pub files: Vec<manifest::FileEntry>,
    /// Non-weight files copied.
    pub copied: Vec<String>,
    /// Total bytes written (shards only).
    pub bytes: u64,
}

/// What was at `--out` when a conversion started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutState {
    /// Nothing.
    Absent,
    /// An empty directory (device and inode): the one thing a run without `--force` may replace,
    /// and only if it is still that directory and still empty when the output is published.
    Empty {
        /// Device number.
        dev: u64,
        /// Inode number.
        ino: u64,
    },
    /// A directory with entries (only with `--force`).
    NonEmpty,
}

/// Checks that `out` may be written for input `input` (before any work), and says what is there.
/// A symbolic link at `out` is refused, whatever it points to.
pub fn check_out(input: &Path, out: &Path, force: bool) -> Result<OutState, WriteError> {
    use std::os::unix::fs::MetadataExt;
    let out = &without_trailing_slash(out);
    let meta = match fs::symlink_metadata(out) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(out)(e)),
    };
    if meta.as_ref().is_some_and(|m| m.file_type().is_symlink()) {
        return Err(WriteError::OutIsSymlink { path: out.to_owned(), target: fs::read_link(out).map_err(io(out))? });
    }
    let abs_in = fs::canonicalize(input).map_err(io(input))?;
    let abs_in_dir =
        if abs_in.is_dir() { abs_in.clone() } else { abs_in.parent().map(Path::to_path_buf).unwrap_or_default() };
    let abs_out = absolute_nonexistent(out)?;
    if abs_out.starts_with(&abs_in_dir) {
        return Err(WriteError::OutInsideInput { out: out.to_owned(), input: input.to_owned() });
    }
    if abs_in_dir.starts_with(&abs_out) {
        return Err(WriteError::InputInsideOut { out: out.to_owned(), input: input.to_owned() });
    }
    match meta {
        None => Ok(OutState::Absent),
        Some(m) if !m.is_dir() => Err(WriteError::OutNotDir { path: out.to_owned() }),
        Some(m) => {
            if fs::read_dir(out).map_err(io(out))?.next().is_none() {
                Ok(OutState::Empty { dev: m.dev(), ino: m.ino() })
            } else if force {
                Ok(OutState::NonEmpty)
            } else {
                Err(WriteError::OutExists { path: out.to_owned() })
            }
        }
    }
}

/// `out` without a trailing `/` or `/.`, which would make the system follow a symbolic link at
/// `out` instead of seeing it.
fn without_trailing_slash(out: &Path) -> PathBuf {
    out.components().collect()
}

/// Absolute, symlink-resolved form of a path whose last components may not exist yet.
fn absolute_nonexistent(p: &Path) -> Result<PathBuf, WriteError> {
    let abs = std::path::absolute(p).map_err(io(p))?;
    let mut existing = abs.as_path();
    let mut tail = Vec::new();
    loop {
        if let Ok(c) = fs::canonicalize(existing) {
            let mut r = c;
            for t in tail.iter().rev() {
                r.push(t);
            }
            return Ok(r);
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                tail.push(name.to_owned());
                existing = parent;
            }
            _ => return Ok(abs),
        }
    }
}

/// The staging directory used for `out`.
pub fn staging_dir(out: &Path) -> Result<PathBuf, WriteError> {
    let abs = std::path::absolute(out).map_err(io(out))?;
    let name = abs.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let parent = abs.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(parent.join(format!(".{name}{TMP_MARKER}{}", std::process::id())))
}

/// The aliases of `plan` whose source bytes differ from their primary's, each with the first
/// byte where they differ (the shorter length when one is a prefix of the other).
pub fn alias_mismatches<'a>(
    ckpt: &'a Checkpoint,
    plan: &'a ShardPlan,
) -> impl Iterator<Item = (&'a str, &'a str, usize)> + 'a {
    plan.aliases.iter().filter_map(move |[alias, primary]| {
        let (a, p) = (ckpt.tensor_bytes(alias).unwrap_or(&[]), ckpt.tensor_bytes(primary).unwrap_or(&[]));
        let offset = a.iter().zip(p).position(|(x, y)| x != y).or((a.len() != p.len()).then(|| a.len().min(p.len())))?;
        Some((alias.as_str(), primary.as_str(), offset))
    })
}

/// Checks that every alias is byte-identical to its primary.
pub fn check_aliases(ckpt: &Checkpoint, plan: &ShardPlan) -> Result<(), WriteError> {
    match alias_mismatches(ckpt, plan).next() {
        Some((alias, primary, offset)) => {
            Err(WriteError::AliasDiffers { alias: alias.into(), primary: primary.into(), offset })
        }
        None => Ok(()),
    }
}

/// A finished output in its staging directory, not yet at `--out`. Dropping it without
/// [`Staged::publish`] removes the staging directory.
pub struct Staged {
    ticket: interrupt::Ticket,
    dir: PathBuf,
    out: PathBuf,
    force: bool,
    before: OutState,
    /// What was written.
    pub summary: WriteSummary,
}

impl Staged {
    /// Where the finished output sits until published.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Moves the staging directory to `--out` without replacing anything the run may not
    /// replace: a free `--out`, the empty directory that was there at the start, or with
    /// `--force` an existing directory, swapped in one step. Anything else that appeared at
    /// `--out` meanwhile is left untouched, and the run fails ([`WriteError::OutChanged`]).
    pub fn publish(self) -> Result<WriteSummary, WriteError> {
        publish::publish(&self.ticket, &self.dir, &self.out, self.force, self.before)?;
        Ok(self.summary)
    }
}

/// Writes every file of `plan`, the copied non-weight files and the manifest into a staging
/// directory beside `opts.out`, claimed as described in `publish.rs`: a conversion of the same
/// `--out` still running is an error ([`WriteError::Busy`]), leftovers of dead runs are removed
/// (with a note on stderr). On error the staging directory is removed.
pub fn write_staged(
    ckpt: &Checkpoint,
    plan: &ShardPlan,
    fingerprint: crate::checkpoint::fingerprint::Fingerprint,
    opts: &WriteOptions,
) -> Result<Staged, WriteError> {
    let out = without_trailing_slash(&opts.out);
    let before = check_out(&ckpt.meta.dir, &out, opts.force)?;
    check_aliases(ckpt, plan)?;
    let ticket = interrupt::Ticket::new(&out);
    let tmp = staging_dir(&out)?;
    for r in publish::claim(&ticket, &out, &tmp)? {
        eprintln!("note: removed {}, left by an interrupted run", qp(&r));
    }
    crash_point();
    let summary = write_into(ckpt, plan, fingerprint, &tmp, opts)?;
    Ok(Staged { ticket, dir: tmp, out, force: opts.force, before, summary })
}

/// [`write_staged`] then [`Staged::publish`], with the fingerprint of `ckpt`'s tensors.
pub fn write_plan(ckpt: &Checkpoint, plan: &ShardPlan, opts: &WriteOptions) -> Result<WriteSummary, WriteError> {
    write_staged(ckpt, plan, crate::checkpoint::fingerprint::fingerprint(ckpt), opts)?.publish()
}

/// The index transformers writes beside the parts of a sharded checkpoint.
fn hf_index(plan: &ShardPlan) -> serde_json::Value {
    let weight_map: serde_json::Map<String, serde_json::Value> = plan
        .files
        .iter()
        .flat_map(|f| f.tensors.iter().map(move |t| (t.name.clone(), serde_json::Value::from(f.name.clone()))))
        .collect();
    let total: u64 = plan.files.iter().flat_map(|f| &f.tensors).map(|t| t.nbytes).sum();
    serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map })
}

fn write_into(
    ckpt: &Checkpoint,
    plan: &ShardPlan,
    fp: crate::checkpoint::fingerprint::Fingerprint,
    tmp: &Path,
    opts: &WriteOptions,
) -> Result<WriteSummary, WriteError> {
    let files = engine::write_files(ckpt, plan, tmp, opts.progress, opts.fsync)?;
    if plan.output == crate::plan::OutputKind::HuggingFace && plan.files.len() > 1 {
        let path = tmp.join(crate::checkpoint::index::INDEX_NAME);
        let mut text = serde_json::to_vec_pretty(&hf_index(plan)).expect("an index serializes");
        text.push(b'\n');
        let mut w = File::create(&path).map_err(io(&path))?;
        w.write_all(&text).map_err(io(&path))?;
        if opts.fsync {
            w.sync_all().map_err(io(&path))?;
        }
        crash_point();
    }
    let mut copied = Vec::new();
    for (i, name) in ckpt.meta.extra_files.iter().enumerate() {
        // An input's manifest describes the input; an index would describe other files.
        if name == MANIFEST_NAME || name == crate::checkpoint::index::INDEX_NAME {
            continue;
        }
        let dst = tmp.join(name);
        // Not fs::copy: it would carry the source's mode over; a new file honours the umask.
        // Copied from the handle Checkpoint::open opened and checked before any shard was written.
        let mut from = ckpt.side_file(i);
        let mut to = File::create(&dst).map_err(io(&dst))?;
        std::io::copy(&mut from, &mut to).map_err(io(&dst))?;
        if opts.fsync {
            to.sync_all().map_err(io(&dst))?;
        }
        crash_point();
        copied.push(name.clone());
    }
    let m = manifest::Manifest::new(&ckpt.meta, fp, plan, &files, &copied);
    let mpath = tmp.join(MANIFEST_NAME);
    let mut w = File::create(&mpath).map_err(io(&mpath))?;
    let text = serde_json::to_vec_pretty(&m).expect("manifest serializes");
    w.write_all(&text).and_then(|_| w.write_all(b"\n")).map_err(io(&mpath))?;
    if opts.fsync {
        w.sync_all().map_err(io(&mpath))?;
    }
    crash_point();
    if opts.fsync {
        File::open(tmp).and_then(|d| d.sync_all()).map_err(io(tmp))?;
    }
    crash_point();
    let bytes = files.iter().map(|f| f.size).sum();
    Ok(WriteSummary { out: opts.out.clone(), files, copied, bytes })
}
