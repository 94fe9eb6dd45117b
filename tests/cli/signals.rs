//! Issue #14, class 1: SIGINT, SIGTERM and SIGHUP during `convert` remove what the run wrote, say
//! so on stderr and exit 130, 143, 129. Each run is paused at a chosen step (`RESHARD_PAUSE_AT`),
//! so the signal lands there deterministically.

use crate::util::*;
use std::path::Path;
use std::process::Command;

const SIGNALS: [(i32, &str, i32); 3] =
    [(libc::SIGINT, "SIGINT", 130), (libc::SIGTERM, "SIGTERM", 143), (libc::SIGHUP, "SIGHUP", 129)];

/// Starts `cmd` paused at step `at`; returns it once paused, with the pause line.
fn paused_at(mut cmd: Command, at: u64) -> (Running, String) {
    cmd.env("RESHARD_PAUSE_AT", at.to_string());
    let mut run = Running::spawn(cmd);
    let line = run.paused();
    (run, line)
}

fn staging_dirs(dir: &Path) -> Vec<String> {
    names_in(dir).into_iter().filter(|n| n.contains(".reshard-")).collect()
}

#[test]
fn issue14_each_signal_mid_write_removes_the_staging_directory() {
    let src = fixture("bart-awkward");
    for (mode, (sig, name, code)) in
        [("direct", SIGNALS[0]), ("direct", SIGNALS[1]), ("buffered", SIGNALS[1]), ("direct", SIGNALS[2])]
    {
        let (tmp, out) = scratch_out();
        let env = [("RESHARD_WRITE", mode)];
        let total = count_steps(convert_cmd(&src, &out, 2, &[], &env));
        std::fs::remove_dir_all(&out).unwrap();
        let (run, _) = paused_at(convert_cmd(&src, &out, 2, &[], &env), total / 2);
        // Mid-write: the staging directory holds some of the files.
        let staging = staging_dirs(tmp.path());
        assert_eq!(staging.len(), 1, "{staging:?}");
        assert!(!names_in(&tmp.path().join(&staging[0])).is_empty());
        run.signal(sig);
        let r = run.finish();
        assert_eq!(r.code, code, "{name} ({mode}): {}", r.stderr);
        let want = format!("interrupted by {name}: removed the staging directory");
        assert!(r.stderr.contains(&want) && r.stderr.contains(&staging[0]), "{name}: {}", r.stderr);
        assert!(r.stderr.contains("was not touched"), "{}", r.stderr);
        assert!(r.stdout.is_empty(), "{}", r.stdout);
        assert_eq!(names_in(tmp.path()), Vec::<String>::new(), "{name} ({mode}) left something");
    }
}

#[test]
fn issue14_a_signal_while_verifying_removes_the_staged_output() {
    let src = fixture("bart-awkward");
    let (tmp, out) = scratch_out();
    let total = count_steps(convert_cmd(&src, &out, 2, &["--verify"], &[]));
    std::fs::remove_dir_all(&out).unwrap();
    // The last steps: verifying, publishing, published.
    let (run, line) = paused_at(convert_cmd(&src, &out, 2, &["--verify"], &[]), total - 2);
    assert!(line.contains("(verifying)"), "{line}");
    run.signal(libc::SIGTERM);
    let r = run.finish();
    assert_eq!(r.code, 143, "{}", r.stderr);
    assert!(r.stderr.contains("interrupted by SIGTERM: removed the staging directory"), "{}", r.stderr);
    assert_eq!(names_in(tmp.path()), Vec::<String>::new());
}

#[test]
fn issue14_a_signal_before_the_staging_directory_exists() {
    let src = fixture("bart-tiny");
    let (tmp, out) = scratch_out();
    let (run, line) = paused_at(convert_cmd(&src, &out, 2, &[], &[]), 1);
    assert!(line.contains("(claiming --out)"), "{line}");
    run.signal(libc::SIGINT);
    let r = run.finish();
    assert_eq!(r.code, 130, "{}", r.stderr);
    assert!(r.stderr.contains("interrupted by SIGINT: `") && r.stderr.contains("out` was not touched"), "{}", r.stderr);
    assert_eq!(names_in(tmp.path()), Vec::<String>::new());
}

/// Parent directories a run created for `--out` are its own: removed, and named.
#[test]
fn issue14_a_signal_removes_the_parent_directories_the_run_created() {
    let src = fixture("bart-awkward");
    let (tmp, _) = scratch_out();
    let out = tmp.path().join("new/deeper/out");
    let (run, _) = paused_at(convert_cmd(&src, &out, 2, &[], &[]), 10);
    assert!(tmp.path().join("new/deeper").is_dir());
    run.signal(libc::SIGHUP);
    let r = run.finish();
    assert_eq!(r.code, 129, "{}", r.stderr);
    for d in ["new/deeper` it had created", "new` it had created", "removed the staging directory"] {
        assert!(r.stderr.contains(d), "{d}: {}", r.stderr);
    }
    assert_eq!(names_in(tmp.path()), Vec::<String>::new());
}

/// `--force` over a tp 1 output with a tp 2 one, interrupted at each step of the replacement,
/// with the atomic exchange and with the fallback (old output moved aside): `--out` always ends
/// as one complete output, the old one until the new one is in place, and nothing else is left.
#[test]
fn issue14_a_signal_during_a_forced_replacement_leaves_one_complete_output() {
    let src = fixture("bart-awkward");
    // (RESHARD_RENAME, steps before the end, label, tp at --out after, words in the message)
    let cases: [(&str, u64, &str, u64, &str); 4] = [
        ("atomic", 2, "(publishing)", 1, "was not touched"),
        ("atomic", 1, "(replaced, deleting the previous output)", 2, "removed the replaced output"),
        ("plain", 2, "(previous output moved aside)", 1, "moved the previous output back to"),
        ("plain", 1, "(replaced, deleting the previous output)", 2, "removed the replaced output"),
    ];
    for (rename, from_end, label, tp_after, words) in cases {
        let (tmp, out) = scratch_out();
        let env = [("RESHARD_RENAME", rename)];
        assert!(convert_cmd(&src, &out, 1, &[], &[]).output().unwrap().status.success());
        let total = count_steps(convert_cmd(&src, &out, 2, &["--force"], &env));
        std::fs::remove_dir_all(&out).unwrap();
        assert!(convert_cmd(&src, &out, 1, &[], &[]).output().unwrap().status.success());
        let (run, line) = paused_at(convert_cmd(&src, &out, 2, &["--force"], &env), total - from_end);
        assert!(line.contains(label), "{rename} {label}: {line}");
        run.signal(libc::SIGTERM);
        let r = run.finish();
        assert_eq!(r.code, 143, "{}", r.stderr);
        assert!(r.stderr.contains(words), "{rename} {label}: {}", r.stderr);
        assert_eq!(names_in(tmp.path()), vec!["out"], "{rename} {label}: {}", r.stderr);
        assert!(verifies(&src, &out), "{rename} {label}");
        assert_eq!(manifest_tp(&out), tp_after, "{rename} {label}");
    }
}

/// `nohup` ignores SIGHUP for the program it starts; it stays ignored.
#[test]
fn issue14_an_ignored_sighup_stays_ignored() {
    use std::os::unix::process::CommandExt;
    let src = fixture("bart-awkward");
    let (_tmp, out) = scratch_out();
    let mut cmd = convert_cmd(&src, &out, 2, &[], &[]);
    // SAFETY: only signal(2) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    let (mut run, _) = paused_at(cmd, 10);
    run.signal(libc::SIGHUP);
    std::thread::sleep(std::time::Duration::from_millis(200));
    run.resume();
    let r = run.finish();
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(verifies(&src, &out));
}

#[test]
fn issue17_a_signal_under_json_prints_the_error_object() {
    let src = fixture("bart-awkward");
    let (_tmp, out) = scratch_out();
    let total = count_steps(convert_cmd(&src, &out, 2, &["--json"], &[]));
    std::fs::remove_dir_all(&out).unwrap();
    let (run, _) = paused_at(convert_cmd(&src, &out, 2, &["--json"], &[]), total / 2);
    run.signal(libc::SIGINT);
    let r = run.finish();
    assert_eq!(r.code, 130, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout));
    assert_eq!((v["ok"].as_bool(), v["exit_code"].as_u64()), (Some(false), Some(130)), "{v:#}");
    assert_eq!(v["kind"], "signal.sigint", "{v:#}");
    assert!(r.stderr.contains(v["message"].as_str().unwrap()), "{}", r.stderr);
}
