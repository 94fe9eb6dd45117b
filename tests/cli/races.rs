//! Issue #14, class 2: races on `--out`. A run never deletes or replaces what it did not create
//! unless `--force` was given; of two runs on one `--out` exactly one wins and the other exits 4
//! without claiming success; a symbolic link at `--out` is refused. Runs are paused at a chosen
//! step (`RESHARD_PAUSE_AT`) to make the overlap deterministic. Every case runs with the atomic
//! `renameat2` and with the fallback (`RESHARD_RENAME=plain`).

use crate::util::*;
use std::fs;
use std::path::{Path, PathBuf};

const RENAMES: [&str; 2] = ["atomic", "plain"];

/// Starts a conversion of bart-awkward into `out` paused mid-write.
fn paused_mid_write(out: &Path, rename: &str) -> Running {
    let mut cmd = convert_cmd(&fixture("bart-awkward"), out, 2, &[], &[("RESHARD_RENAME", rename)]);
    cmd.env("RESHARD_PAUSE_AT", "20");
    let mut run = Running::spawn(cmd);
    run.paused();
    run
}

/// Asserts a run failed with exit 4 for `out`, claimed nothing, and left no staging directory.
fn assert_lost(r: &Out, dir: &Path, needle: &str) {
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains(needle), "expected {needle:?} in: {}", r.stderr);
    assert!(!r.stdout.contains("wrote"), "{}", r.stdout);
    let left: Vec<String> = names_in(dir).into_iter().filter(|n| n.contains(".reshard-")).collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn issue14_what_appears_at_out_during_the_run_is_left_untouched() {
    for rename in RENAMES {
        // A directory with the user's files, an empty directory, a file, a symbolic link.
        for kind in ["dir", "empty dir", "file", "link"] {
            let (tmp, out) = scratch_out();
            let run = paused_mid_write(&out, rename);
            let target = tmp.path().join("elsewhere");
            match kind {
                "dir" => {
                    fs::create_dir(&out).unwrap();
                    fs::write(out.join("mine.txt"), "user data").unwrap();
                }
                "empty dir" => fs::create_dir(&out).unwrap(),
                "file" => fs::write(&out, "user data").unwrap(),
                _ => {
                    fs::create_dir(&target).unwrap();
                    std::os::unix::fs::symlink(&target, &out).unwrap();
                }
            }
            let r = run.run_to_end();
            let needle = match kind {
                "file" => "not a directory",
                "link" => "is a symbolic link",
                _ => "appeared while the conversion ran",
            };
            assert_lost(&r, tmp.path(), needle);
            assert!(r.stderr.contains("`"), "names the path: {}", r.stderr);
            match kind {
                "dir" => assert_eq!(names_in(&out), vec!["mine.txt"], "{rename} {kind}"),
                "empty dir" => assert!(names_in(&out).is_empty(), "{rename} {kind}"),
                "file" => assert_eq!(fs::read_to_string(&out).unwrap(), "user data"),
                _ => {
                    assert_eq!(fs::read_link(&out).unwrap(), target);
                    assert!(names_in(&target).is_empty());
                }
            }
        }
    }
}

/// An empty `--out` is a valid target; but not once the user put files into it, or put another
/// directory in its place, while the run went on.
#[test]
fn issue14_an_empty_out_that_changes_during_the_run_is_left_untouched() {
    for rename in RENAMES {
        let (tmp, out) = scratch_out();
        fs::create_dir(&out).unwrap();
        let run = paused_mid_write(&out, rename);
        fs::write(out.join("mine.txt"), "user data").unwrap();
        assert_lost(&run.run_to_end(), tmp.path(), "was empty when the conversion started and is not any more");
        assert_eq!(names_in(&out), vec!["mine.txt"]);

        fs::remove_dir_all(&out).unwrap();
        fs::create_dir(&out).unwrap();
        let run = paused_mid_write(&out, rename);
        // The old directory is kept (moved away), so the new one cannot get its inode number.
        fs::rename(&out, tmp.path().join("moved")).unwrap();
        fs::create_dir(tmp.path().join("other")).unwrap();
        fs::write(tmp.path().join("other/mine.txt"), "user data").unwrap();
        fs::rename(tmp.path().join("other"), &out).unwrap();
        assert_lost(&run.run_to_end(), tmp.path(), "was replaced by another directory");
        assert_eq!(names_in(&out), vec!["mine.txt"]);
        fs::remove_dir(tmp.path().join("moved")).unwrap();

        // The control: an empty --out left alone is replaced by the output.
        fs::remove_dir_all(&out).unwrap();
        fs::create_dir(&out).unwrap();
        let r = paused_mid_write(&out, rename).run_to_end();
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(verifies(&fixture("bart-awkward"), &out));
    }
}

/// Two runs on one `--out`: the first is paused where it has checked that no other run writes
/// `--out` and is about to create its staging directory; the second is started then. It must not
/// get past the same point (it waits for the first's lock, then sees its staging directory); the
/// old check let both through, and both published and printed "wrote". Exactly one exits 0, the
/// other exits 4 and says why; the output verifies; with and without `--force`.
#[test]
fn issue14_two_runs_on_one_out_exactly_one_wins() {
    let src = fixture("bart-awkward");
    for rename in RENAMES {
        for force in [false, true] {
            let (tmp, out) = scratch_out();
            if force {
                assert!(convert_cmd(&src, &out, 1, &[], &[]).output().unwrap().status.success());
            }
            let extra: &[&str] = if force { &["--force"] } else { &[] };
            let start = || {
                let mut cmd = convert_cmd(&src, &out, 2, extra, &[("RESHARD_RENAME", rename)]);
                cmd.env("RESHARD_PAUSE_AT", "1");
                Running::spawn(cmd)
            };
            let mut first = start();
            assert!(first.paused().contains("(claiming --out)"));
            let mut second = start();
            let label = format!("{rename} force={force}");
            let got_in = second.paused_within(std::time::Duration::from_secs(3));
            first.resume();
            second.resume();
            let results = [first.finish(), second.finish()];
            let winners: Vec<&Out> = results.iter().filter(|r| r.code == 0).collect();
            assert_eq!(
                winners.len(),
                1,
                "{label} (second run paused too: {got_in:?}): {:?}",
                results.iter().map(|r| &r.stderr).collect::<Vec<_>>()
            );
            assert!(winners[0].stdout.contains("wrote"), "{}", winners[0].stdout);
            let loser = results.iter().find(|r| r.code != 0).unwrap();
            assert_lost(loser, tmp.path(), "still running");
            assert_eq!(names_in(tmp.path()), vec!["out"], "{label}");
            assert!(verifies(&src, &out), "{label}");
            assert_eq!(manifest_tp(&out), 2, "{label}");
        }
    }
}

/// The same without pauses: three runs started together, a few times over.
#[test]
fn issue14_runs_started_together_have_one_winner() {
    let src = fixture("bart-tiny");
    for round in 0..3 {
        let (tmp, out) = scratch_out();
        let runs: Vec<Running> = (0..3).map(|_| Running::spawn(convert_cmd(&src, &out, 2, &[], &[]))).collect();
        let results: Vec<Out> = runs.into_iter().map(Running::finish).collect();
        let codes: Vec<i32> = results.iter().map(|r| r.code).collect();
        assert_eq!(codes.iter().filter(|&&c| c == 0).count(), 1, "round {round}: {codes:?}");
        assert!(codes.iter().all(|&c| c == 0 || c == 4), "round {round}: {codes:?}");
        assert_eq!(results.iter().filter(|r| r.stdout.contains("wrote")).count(), 1, "round {round}");
        assert_eq!(names_in(tmp.path()), vec!["out"]);
        assert!(verifies(&src, &out));
    }
}

/// A symbolic link at `--out` is refused (exit 4, "is a symbolic link"), whatever it points to
/// and with `--force` too; the link and what it points to stay as they were.
#[test]
fn issue14_out_that_is_a_symlink_is_refused() {
    let src = fixture("bart-tiny");
    let (tmp, out) = scratch_out();
    let target = tmp.path().join("target");
    std::os::unix::fs::symlink(&target, &out).unwrap();
    for (setup, extra) in [("dangling", &[][..]), ("empty", &[][..]), ("full", &["--force"][..])] {
        match setup {
            "empty" => fs::create_dir(&target).unwrap(),
            "full" => fs::write(target.join("mine.txt"), "user data").unwrap(),
            _ => {}
        }
        // Also spelled with a trailing slash, which would make the system follow the link.
        for spelling in [out.clone(), PathBuf::from(format!("{}/", out.display()))] {
            let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"convert", &src, &"--tp", &"2", &"--out", &spelling];
            for e in extra {
                args.push(e);
            }
            let r = reshard(&args);
            assert_eq!(r.code, 4, "{setup}: {}", r.stderr);
            let named = r.stderr.contains("is a symbolic link") && r.stderr.contains("target`");
            assert!(named, "{setup} {}: {}", spelling.display(), r.stderr);
        }
        assert_eq!(fs::read_link(&out).unwrap(), target);
        let want: Vec<&str> = if setup == "full" { vec!["mine.txt"] } else { vec![] };
        if setup != "dangling" {
            assert_eq!(names_in(&target), want, "{setup}");
        }
        let want = if setup == "dangling" { vec!["out"] } else { vec!["out", "target"] };
        assert_eq!(names_in(tmp.path()), want, "{setup}");
    }
}
