//! Issue #7: SIGKILL at every step of a conversion (fault injection with RESHARD_CRASH_AT). After
//! each crash, --out either does not exist or is a complete output that verify accepts; leftovers
//! are clearly named; the next run removes them (saying so) and succeeds.

use crate::util::*;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

/// Which write path the runs take (`RESHARD_WRITE`): around the page cache, or through it.
#[derive(Clone, Copy)]
enum Io {
    Direct,
    Buffered,
}

/// How the output is published (`RESHARD_RENAME`): with `renameat2`, or with the fallback.
#[derive(Clone, Copy)]
enum Rename {
    Atomic,
    Plain,
}

/// What is run: `convert --tp 2`, or `merge` (issue #16).
#[derive(Clone, Copy, PartialEq)]
enum Job {
    Convert,
    Merge,
}

#[allow(clippy::too_many_arguments)]
fn convert_with(
    job: Job,
    src: &Path,
    out: &Path,
    force: bool,
    crash_at: Option<u64>,
    mode: Io,
    rename: Rename,
) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_reshard"));
    c.env(
        "RESHARD_RENAME",
        match rename {
            Rename::Atomic => "atomic",
            Rename::Plain => "plain",
        },
    );
    c.env(
        "RESHARD_WRITE",
        match mode {
            Io::Direct => "direct",
            Io::Buffered => "buffered",
        },
    );
    // Small parts: more files, more crash points.
    match job {
        Job::Convert => c.args(["convert", src.to_str().unwrap(), "--tp", "2"]),
        Job::Merge => c.args(["merge", src.to_str().unwrap()]),
    };
    c.args(["--max-part-size", "64KiB", "--out", out.to_str().unwrap()]);
    if force {
        c.arg("--force");
    }
    c.env("RESHARD_CRASH_COUNT", "1");
    if let Some(n) = crash_at {
        c.env("RESHARD_CRASH_AT", n.to_string());
    }
    c.output().unwrap()
}

fn points(o: &std::process::Output) -> u64 {
    let e = String::from_utf8_lossy(&o.stderr);
    e.lines().find_map(|l| l.strip_prefix("crash points: ")).and_then(|n| n.parse().ok()).expect("crash point count")
}

fn verify_ok(src: &Path, out: &Path) -> bool {
    reshard(&[&"verify", &src, &out, &"--no-forward"]).code == 0
}

fn leftovers(parent: &Path) -> Vec<String> {
    fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "out")
        .collect()
}

fn crash_everywhere(force: bool, mode: Io) {
    crash_at_steps(force, mode, Rename::Atomic, None);
}

/// Crashes a conversion at every step, or at the `last` steps only.
fn crash_at_steps(force: bool, mode: Io, rename: Rename, last: Option<u64>) {
    crash_job(Job::Convert, &fixture("bart-awkward"), force, mode, rename, last)
}

/// Crashes `job` of `src` at every step, or at the `last` steps only.
fn crash_job(job: Job, src: &Path, force: bool, mode: Io, rename: Rename, last: Option<u64>) {
    let convert = |src: &Path, out: &Path, force, at, mode| convert_with(job, src, out, force, at, mode, rename);
    // On the checkout's disk, where O_DIRECT works (a tmpfs /tmp may refuse it).
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = tmp.path().join("out");
    let src = src.to_owned();
    if force {
        assert!(convert(&src, &out, false, None, mode).status.success());
    }
    let total = points(&convert(&src, &out, force, None, mode));
    assert!(total >= 20, "only {total} crash points");
    for k in last.map_or(1, |n| total + 1 - n)..=total {
        if force {
            // Start each round from a complete previous output.
            let _ = fs::remove_dir_all(&out);
            for l in leftovers(tmp.path()) {
                fs::remove_dir_all(tmp.path().join(l)).unwrap();
            }
            assert!(convert(&src, &out, false, None, mode).status.success());
        } else {
            let _ = fs::remove_dir_all(&out);
        }
        let o = convert(&src, &out, force, Some(k), mode);
        assert_eq!(o.status.signal(), Some(9), "point {k}/{total}: not killed: {}", String::from_utf8_lossy(&o.stderr));
        // --out is absent or complete.
        assert!(!out.exists() || verify_ok(&src, &out), "point {k}/{total}: incomplete --out");
        for l in leftovers(tmp.path()) {
            assert!(
                l.starts_with(".out.reshard-tmp-") || l.starts_with(".out.reshard-old-"),
                "point {k}: unclear leftover {l}"
            );
        }
        let had_leftovers = !leftovers(tmp.path()).is_empty();
        // The next run cleans up and succeeds.
        let again = convert(&src, &out, true, None, mode);
        let stderr = String::from_utf8_lossy(&again.stderr);
        assert!(again.status.success(), "point {k}: recovery run failed: {stderr}");
        if had_leftovers {
            assert!(stderr.contains("left by an interrupted run"), "point {k}: leftovers removed silently: {stderr}");
        }
        assert!(leftovers(tmp.path()).is_empty(), "point {k}: {:?}", leftovers(tmp.path()));
        assert!(verify_ok(&src, &out), "point {k}: recovered output does not verify");
    }
}

#[test]
fn sigkill_at_every_step_of_a_fresh_conversion() {
    crash_everywhere(false, Io::Direct);
}

#[test]
fn sigkill_at_every_step_of_a_forced_replacement() {
    crash_everywhere(true, Io::Direct);
}

#[test]
fn sigkill_at_every_step_of_a_conversion_through_the_page_cache() {
    crash_everywhere(false, Io::Buffered);
}

/// Issue #14: publishing without `renameat2` (the fallback), fresh and replacing: a crash at each
/// of its steps also leaves `--out` absent, the old output or the new one.
#[test]
fn sigkill_at_every_step_of_publishing_without_renameat2() {
    crash_at_steps(false, Io::Direct, Rename::Plain, Some(3));
    crash_at_steps(true, Io::Direct, Rename::Plain, Some(5));
}

/// Issue #16: resharding from shards (tp 3 to tp 2) and merging them back to a Hugging Face
/// checkpoint take the same steps: a crash at each leaves `--out` absent or complete.
#[test]
fn sigkill_at_every_step_of_a_conversion_from_shards_and_of_a_merge() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let shards = tmp.path().join("tp3");
    let r = reshard(&[&"convert", &fixture("bart-awkward"), &"--tp", &"3", &"--out", &shards, &"--quiet"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    crash_job(Job::Convert, &shards, false, Io::Direct, Rename::Atomic, None);
    crash_job(Job::Merge, &shards, false, Io::Direct, Rename::Atomic, None);
}
