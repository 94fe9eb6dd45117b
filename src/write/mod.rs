//! Carrying out a [`ShardPlan`]: one safetensors file per (rank, part), written in parallel with
//! rayon into a staging directory beside `--out`, then renamed into place only when complete.
//!
//! Entry point: [`write_plan`]. The safetensors header is written by [`header_bytes`] (plain JSON,
//! as the format allows) and the data is streamed piece by piece from the memory-mapped sources,
//! so memory use does not grow with the model. Every file gets a CRC-32 in the manifest.

mod engine;
pub mod manifest;

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
/// points sit between every step that changes the disk: the staging directory, each file
/// created, each unit written, each fsync, each copy, the manifest, and each rename.
pub(crate) fn crash_point() {
    use std::sync::atomic::Ordering;
    use std::sync::OnceLock;
    static AT: OnceLock<Option<u64>> = OnceLock::new();
    let n = CRASH_POINTS.fetch_add(1, Ordering::SeqCst) + 1;
    let at = AT.get_or_init(|| std::env::var("RESHARD_CRASH_AT").ok().and_then(|v| v.parse().ok()));
    if *at == Some(n) {
        // SAFETY: sends a signal to this process; nothing is borrowed.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
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

/// Checks that `out` may be written for input `input` (before any work).
pub fn check_out(input: &Path, out: &Path, force: bool) -> Result<(), WriteError> {
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
    match fs::symlink_metadata(out) {
        Ok(m) if !m.is_dir() => Err(WriteError::OutNotDir { path: out.to_owned() }),
        Ok(_) => {
            let non_empty = fs::read_dir(out).map_err(io(out))?.next().is_some();
            if non_empty && !force {
                Err(WriteError::OutExists { path: out.to_owned() })
            } else {
                Ok(())
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(out)(e)),
    }
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
    dir: PathBuf,
    out: PathBuf,
    published: bool,
    /// What was written.
    pub summary: WriteSummary,
}

impl Staged {
    /// Where the finished output sits until published.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Renames the staging directory to `--out` (replacing an old one only now).
    pub fn publish(mut self) -> Result<WriteSummary, WriteError> {
        publish(&self.dir, &self.out)?;
        self.published = true;
        Ok(std::mem::replace(
            &mut self.summary,
            WriteSummary { out: PathBuf::new(), files: vec![], copied: vec![], bytes: 0 },
        ))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Removes staging and replaced-output directories that interrupted runs left beside `out`
/// (their process is gone); returns what was removed. A leftover whose process still runs is an
/// error: two conversions must not write the same `--out`.
pub fn clean_leftovers(out: &Path) -> Result<Vec<PathBuf>, WriteError> {
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
        if pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists() {
            return Err(WriteError::Busy { path, pid });
        }
        fs::remove_dir_all(&path).map_err(io(&path))?;
        removed.push(path);
    }
    Ok(removed)
}

/// Writes every file of `plan`, the copied non-weight files and the manifest into a staging
/// directory beside `opts.out`. On error the staging directory is removed.
pub fn write_staged(ckpt: &Checkpoint, plan: &ShardPlan, opts: &WriteOptions) -> Result<Staged, WriteError> {
    check_out(&ckpt.meta.dir, &opts.out, opts.force)?;
    check_aliases(ckpt, plan)?;
    let removed = clean_leftovers(&opts.out)?;
    for r in &removed {
        eprintln!("note: removed {}, left by an interrupted run", qp(r));
    }
    let tmp = staging_dir(&opts.out)?;
    if let Some(parent) = tmp.parent() {
        fs::create_dir_all(parent).map_err(io(parent))?;
    }
    fs::create_dir(&tmp).map_err(io(&tmp))?;
    crash_point();
    let mut staged = Staged {
        dir: tmp,
        out: opts.out.clone(),
        published: false,
        summary: WriteSummary { out: opts.out.clone(), files: vec![], copied: vec![], bytes: 0 },
    };
    staged.summary = write_into(ckpt, plan, &staged.dir, opts)?;
    Ok(staged)
}

/// [`write_staged`] then [`Staged::publish`].
pub fn write_plan(ckpt: &Checkpoint, plan: &ShardPlan, opts: &WriteOptions) -> Result<WriteSummary, WriteError> {
    write_staged(ckpt, plan, opts)?.publish()
}

fn write_into(
    ckpt: &Checkpoint,
    plan: &ShardPlan,
    tmp: &Path,
    opts: &WriteOptions,
) -> Result<WriteSummary, WriteError> {
    // Before the data: the pages it samples are then read once, on a cold cache too, as the
    // writer reads every byte of the source after it.
    let fp = crate::checkpoint::fingerprint::fingerprint(ckpt);
    let files = engine::write_files(ckpt, plan, tmp, opts.progress, opts.fsync)?;
    let mut copied = Vec::new();
    for name in &ckpt.meta.extra_files {
        if name == MANIFEST_NAME {
            continue;
        }
        let (src, dst) = (ckpt.meta.dir.join(name), tmp.join(name));
        // Not fs::copy: it would carry the source's mode over; a new file honours the umask.
        let mut from = File::open(&src).map_err(io(&src))?;
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

/// Moves the finished staging directory to `out`, replacing an existing `out` only after the new
/// one is complete.
fn publish(tmp: &Path, out: &Path) -> Result<(), WriteError> {
    let old = tmp.with_file_name(
        tmp.file_name().map(|n| n.to_string_lossy().replace(TMP_MARKER, OLD_MARKER)).unwrap_or_default(),
    );
    let replacing = out.exists();
    if replacing {
        fs::rename(out, &old).map_err(io(out))?;
        crash_point();
    }
    if let Err(e) = fs::rename(tmp, out) {
        if replacing {
            let _ = fs::rename(&old, out);
        }
        return Err(io(out)(e));
    }
    crash_point();
    if replacing {
        fs::remove_dir_all(&old).map_err(io(&old))?;
        crash_point();
    }
    if let Some(parent) = std::path::absolute(out).ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
        let _ = File::open(&parent).and_then(|d| d.sync_all());
    }
    Ok(())
}
