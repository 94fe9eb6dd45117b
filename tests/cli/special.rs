//! Issue #14, class 6: special and broken files, made by test code. A FIFO, socket, device or
//! directory where a file is expected, a dangling or looping symlink, an unreadable side file:
//! each is refused with exit 2, a message naming the path and what it is, without blocking (every
//! run has a short timeout, so a regression that opens a FIFO fails instead of hanging), and
//! nothing is written. Every input path is covered: the checkpoint directory, a single file,
//! `--config`, `--mapping`, the index and its shards, and the side files, for plan, convert and
//! verify (validate reads the source through the same reader, after it has found a GPU).

use crate::util::*;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Far longer than any of these runs takes (well under a second), far shorter than for ever.
const LIMIT: Duration = Duration::from_secs(30);

pub fn mkfifo(p: &Path) {
    let _ = fs::remove_file(p);
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo {}", p.display());
}

fn rs(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reshard"));
    cmd.args(args.iter().map(|a| a.as_ref()));
    run(cmd, LIMIT)
}

/// A copy of a fixture at `TMP/src`, and a good conversion of it at `TMP/good` (for verify).
struct Case {
    tmp: tempfile::TempDir,
    src: PathBuf,
    good: PathBuf,
}

impl Case {
    fn new(fixture_name: &str) -> Case {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        copy_dir(&fixture(fixture_name), &src);
        let good = tmp.path().join("good");
        let r = rs(&[&"convert", &src, &"--tp", &"2", &"--out", &good]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        Case { tmp, src, good }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.src.join(name)
    }

    /// Replaces `name` in the source with whatever `make` creates at its path.
    fn replace(&self, name: &str, make: impl FnOnce(&Path)) {
        let p = self.p(name);
        if p.is_dir() {
            fs::remove_dir_all(&p).unwrap();
        } else {
            let _ = fs::remove_file(&p);
        }
        make(&p);
    }

    /// Runs plan, convert and verify on the source given as `source` (the input first, then
    /// flags such as `--config FILE`) and asserts for each: exit 2, every needle on stderr,
    /// nothing on stdout, and nothing written.
    fn refused(&self, source: &[&dyn AsRef<std::ffi::OsStr>], needles: &[&str]) {
        let out = self.tmp.path().join("out");
        let src: Vec<OsString> = source.iter().map(|a| a.as_ref().to_owned()).collect();
        let mut runs: Vec<Vec<OsString>> = Vec::new();
        runs.push([vec!["plan".into()], src.clone(), vec!["--tp".into(), "2".into()]].concat());
        runs.push(
            [vec!["convert".into()], src.clone(), vec!["--tp".into(), "2".into(), "--out".into(), out.clone().into()]]
                .concat(),
        );
        runs.push([vec!["verify".into(), src[0].clone(), self.good.clone().into()], src[1..].to_vec()].concat());
        for args in runs {
            let a: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|a| a as _).collect();
            let r = rs(&a);
            assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
            for n in needles {
                assert!(r.stderr.contains(n), "{args:?}: expected {n:?} in: {}", r.stderr);
            }
            assert!(r.stdout.is_empty(), "{args:?}: no report on failure: {}", r.stdout);
            assert!(!out.exists(), "{args:?}: a refused run wrote {}", out.display());
            for e in fs::read_dir(self.tmp.path()).unwrap() {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                assert!(!n.contains(".reshard-"), "{args:?}: left {n} behind");
            }
        }
    }
}

#[test]
fn issue14_fifo_as_model_safetensors() {
    let c = Case::new("bart-tiny");
    c.replace("model.safetensors", mkfifo);
    c.refused(&[&c.src], &["src/model.safetensors` is a FIFO, not a regular file"]);
}

#[test]
fn issue14_fifo_as_single_file_config_json_and_config_flag() {
    let c = Case::new("bart-tiny");
    let (model, cfg) = (c.p("model.safetensors"), c.tmp.path().join("config.fifo"));
    fs::copy(c.p("config.json"), c.tmp.path().join("config.json")).unwrap();
    mkfifo(&cfg);
    c.refused(&[&model, &"--config", &cfg], &["config.fifo` is a FIFO, not a regular file"]);
    // The single input file itself.
    let single = c.tmp.path().join("one.safetensors");
    mkfifo(&single);
    c.refused(&[&single, &"--config", &c.tmp.path().join("config.json")], &["one.safetensors` is a FIFO"]);
    // The directory's own config.json.
    c.replace("config.json", mkfifo);
    c.refused(&[&c.src], &["src/config.json` is a FIFO, not a regular file"]);
}

#[test]
fn issue14_fifo_as_mapping() {
    let c = Case::new("bart-tiny");
    let m = c.tmp.path().join("mapping.json");
    mkfifo(&m);
    c.refused(&[&c.src, &"--mapping", &m], &["mapping `", "mapping.json` is a FIFO, not a regular file"]);
}

#[test]
fn issue14_fifo_as_index_or_index_shard() {
    let c = Case::new("mllama-sharded");
    c.replace("model-00002-of-00003.safetensors", mkfifo);
    c.refused(&[&c.src], &["model-00002-of-00003.safetensors` is a FIFO, not a regular file"]);
    let c = Case::new("mllama-sharded");
    c.replace("model.safetensors.index.json", mkfifo);
    c.refused(&[&c.src], &["model.safetensors.index.json` is a FIFO, not a regular file"]);
}

#[test]
fn issue14_directory_where_a_file_is_expected() {
    let mkdir = |p: &Path| fs::create_dir(p).unwrap();
    let c = Case::new("bart-tiny");
    c.replace("model.safetensors", mkdir);
    c.refused(&[&c.src], &["src/model.safetensors` is a directory, not a regular file"]);
    let c = Case::new("bart-tiny");
    let dir = c.tmp.path().join("adir");
    mkdir(&dir);
    c.refused(&[&c.p("model.safetensors"), &"--config", &dir], &["adir` is a directory, not a regular file"]);
    c.refused(&[&c.src, &"--mapping", &dir], &["mapping `", "adir` is a directory, not a regular file"]);
    c.replace("config.json", mkdir);
    c.refused(&[&c.src], &["src/config.json` is a directory, not a regular file"]);
    let c = Case::new("mllama-sharded");
    c.replace("model-00001-of-00003.safetensors", mkdir);
    c.refused(&[&c.src], &["model-00001-of-00003.safetensors` is a directory, not a regular file"]);
}

#[test]
fn issue14_socket_and_device() {
    let c = Case::new("bart-tiny");
    let mut listeners = Vec::new();
    c.replace("model.safetensors", |p| listeners.push(std::os::unix::net::UnixListener::bind(p).unwrap()));
    c.refused(&[&c.src], &["model.safetensors` is a socket, not a regular file"]);
    // A link to a character device (some sandboxes make /dev/null a regular file; then only the
    // socket is checked).
    use std::os::unix::fs::FileTypeExt;
    if fs::metadata("/dev/null").unwrap().file_type().is_char_device() {
        let c = Case::new("bart-tiny");
        c.replace("config.json", |p| symlink("/dev/null", p).unwrap());
        c.refused(&[&c.src], &["src/config.json` is a character device, not a regular file"]);
    }
}

#[test]
fn issue14_dangling_symlinks_name_the_link_and_its_target() {
    let dangle = |p: &Path| symlink("../../blobs/abc", p).unwrap();
    let which = "` is a symlink to `../../blobs/abc`, which does not exist";
    let c = Case::new("bart-tiny");
    c.replace("model.safetensors", dangle);
    c.refused(&[&c.src], &[&format!("src/model.safetensors{which}")]);
    let c = Case::new("bart-tiny");
    c.replace("config.json", dangle);
    c.refused(&[&c.src], &[&format!("src/config.json{which}")]);
    let c = Case::new("bart-tiny");
    let link = c.tmp.path().join("link.json");
    dangle(&link);
    c.refused(&[&c.p("model.safetensors"), &"--config", &link], &[&format!("link.json{which}")]);
    c.refused(&[&c.src, &"--mapping", &link], &[&format!("mapping `{}{which}", link.display())]);
    // The checkpoint directory itself.
    let dir_link = c.tmp.path().join("snapshot");
    symlink("../blobs/gone", &dir_link).unwrap();
    c.refused(&[&dir_link], &["snapshot` is a symlink to `../blobs/gone`, which does not exist"]);
    let c = Case::new("mllama-sharded");
    c.replace("model-00003-of-00003.safetensors", dangle);
    c.refused(&[&c.src], &[&format!("model-00003-of-00003.safetensors{which}")]);
    let c = Case::new("mllama-sharded");
    c.replace("model.safetensors.index.json", dangle);
    c.refused(&[&c.src], &[&format!("model.safetensors.index.json{which}")]);
}

#[test]
fn issue14_symlink_loops_are_named() {
    let c = Case::new("bart-tiny");
    c.replace("model.safetensors", |p| symlink("loop.a", p).unwrap());
    symlink("model.safetensors", c.p("loop.a")).unwrap();
    c.refused(&[&c.src], &["src/model.safetensors` is a symlink loop: `", "` -> `loop.a` -> `model.safetensors`"]);
    let c = Case::new("bart-tiny");
    c.replace("config.json", |p| symlink("config.json", p).unwrap());
    c.refused(&[&c.src], &["src/config.json` is a symlink loop", "-> `config.json`"]);
}

#[test]
fn issue14_broken_side_files_are_refused_before_anything_is_written() {
    let hint = "every file beside the weights is copied into the output";
    let c = Case::new("bart-tiny");
    fs::write(c.p("tokenizer.json"), "{}").unwrap();
    c.replace("tokenizer.json", mkfifo);
    c.refused(&[&c.src], &["src/tokenizer.json` is a FIFO, not a regular file", hint]);
    let c = Case::new("bart-tiny");
    symlink("../../blobs/tok", c.p("special_tokens_map.json")).unwrap();
    c.refused(&[&c.src], &["special_tokens_map.json` is a symlink to `../../blobs/tok`, which does not exist", hint]);
    let c = Case::new("bart-tiny");
    let _l = std::os::unix::net::UnixListener::bind(c.p("vocab.sock")).unwrap();
    c.refused(&[&c.src], &["vocab.sock` is a socket, not a regular file", hint]);
    // Directories, hidden entries and weight files other than the model are not copied, broken
    // or not.
    let c = Case::new("bart-tiny");
    fs::create_dir(c.p("onnx")).unwrap();
    mkfifo(&c.p(".lock"));
    symlink("gone", c.p("pytorch_model.bin")).unwrap();
    let out = c.tmp.path().join("out");
    let r = rs(&[&"convert", &c.src, &"--tp", &"2", &"--out", &out]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!out.join("onnx").exists() && !out.join(".lock").exists());
}

/// Runs `cmd` without the capabilities that let root read any file, so that permission bits
/// hold for it as for any user (tests run as root in CI, where chmod 000 stops nothing).
fn without_dac_override(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing is allocated between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::geteuid() == 0 {
                let zero: libc::c_ulong = 0;
                for cap in [1, 2] {
                    // CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: dropped from the bounding set, so
                    // the exec does not grant them again. Failure shows in the probe below.
                    libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, zero, zero, zero);
                }
            }
            Ok(())
        });
    }
}

#[test]
fn issue14_unreadable_side_file_is_refused_before_anything_is_written() {
    let c = Case::new("bart-tiny");
    let tok = c.p("tokenizer.json");
    fs::write(&tok, "{}").unwrap();
    fs::set_permissions(&tok, fs::Permissions::from_mode(0o000)).unwrap();
    let mut probe = Command::new("cat");
    probe.arg(&tok).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    without_dac_override(&mut probe);
    if probe.status().is_ok_and(|s| s.success()) {
        // Root that cannot drop CAP_DAC_OVERRIDE here: a mode-000 file is readable, so this case
        // cannot be made. The FIFO, socket and dangling cases above are the unreadable side files
        // that work as root.
        eprintln!("skipped: a mode-000 file is readable in this environment");
        return;
    }
    let out = c.tmp.path().join("out");
    for args in [vec!["plan", "--tp", "2"], vec!["convert", "--tp", "2", "--out", out.to_str().unwrap()]] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_reshard"));
        cmd.arg(args[0]).arg(&c.src).args(&args[1..]);
        without_dac_override(&mut cmd);
        let r = run(cmd, LIMIT);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("src/tokenizer.json`: Permission denied"), "{}", r.stderr);
        assert!(r.stderr.contains("copied into the output"), "{}", r.stderr);
        assert!(!out.exists(), "nothing written");
        let left: Vec<_> = fs::read_dir(c.tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "only src and good: {left:?}");
    }
}

#[test]
fn issue14_hf_cache_snapshot_links_still_work_through_every_command() {
    // A snapshot of links into blobs/, as the Hugging Face cache lays it out, single-file form.
    let tmp = tempfile::tempdir().unwrap();
    let (blobs, snap) = (tmp.path().join("blobs"), tmp.path().join("snapshots/0123abc"));
    fs::create_dir_all(&blobs).unwrap();
    fs::create_dir_all(&snap).unwrap();
    for (i, e) in fs::read_dir(fixture("bart-tiny")).unwrap().enumerate() {
        let e = e.unwrap();
        fs::copy(e.path(), blobs.join(format!("b{i}"))).unwrap();
        symlink(format!("../../blobs/b{i}"), snap.join(e.file_name())).unwrap();
    }
    let out = tmp.path().join("out");
    assert_eq!(rs(&[&"plan", &snap, &"--tp", &"2"]).code, 0);
    let r = rs(&[&"convert", &snap, &"--tp", &"2", &"--out", &out]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = rs(&[&"verify", &snap, &out]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn issue14_fifos_in_the_output_do_not_block_verify() {
    let c = Case::new("bart-tiny");
    mkfifo(&c.good.join("model-rank-1-part-0.safetensors"));
    let r = rs(&[&"verify", &c.src, &c.good]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stdout.contains("model-rank-1-part-0.safetensors` is a FIFO, not a regular file"), "{}", r.stdout);
    let c = Case::new("bart-tiny");
    mkfifo(&c.good.join("reshard-manifest.json"));
    let r = rs(&[&"verify", &c.src, &c.good]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stdout.contains("reshard-manifest.json` is a FIFO, not a regular file"), "{}", r.stdout);
}
