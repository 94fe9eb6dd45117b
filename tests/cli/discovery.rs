//! Issue #14, class 8: a path that is not a checkpoint gets a message saying what is there and
//! what to pass instead: PyTorch pickles (not supported, and why), a Hugging Face cache root (its
//! snapshots), a parent directory (the checkpoints below it), a single file without --config (the
//! config.json beside it). Exit 2 and nothing written, for plan, convert and verify.

use crate::special::mkfifo;
use crate::util::*;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

/// Runs plan, convert and verify on `source` and asserts exit 2, the needles on stderr, the
/// absent ones absent, and that no output was written.
fn refused(source: &[&dyn AsRef<std::ffi::OsStr>], needles: &[&str], absent: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let good = tmp.path().join("good");
    let r = reshard(&[&"convert", &fixture("bart-tiny"), &"--tp", &"2", &"--out", &good]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rest = &source[1..];
    let mut runs: Vec<Vec<&dyn AsRef<std::ffi::OsStr>>> = vec![
        [&[&"plan" as &dyn AsRef<std::ffi::OsStr>], source, &[&"--tp", &"2"]].concat(),
        [&[&"convert" as &dyn AsRef<std::ffi::OsStr>], source, &[&"--tp", &"2", &"--out", &out]].concat(),
    ];
    runs.push([&[&"verify" as &dyn AsRef<std::ffi::OsStr>, source[0], &good], rest].concat());
    let mut last = String::new();
    for args in runs {
        let r = reshard(&args);
        assert_eq!(r.code, 2, "{}", r.stderr);
        for n in needles {
            assert!(r.stderr.contains(n), "expected {n:?} in: {}", r.stderr);
        }
        for n in absent {
            assert!(!r.stderr.contains(n), "did not expect {n:?} in: {}", r.stderr);
        }
        assert!(r.stdout.is_empty());
        assert!(!out.exists());
        last = r.stderr;
    }
    last
}

const PICKLE: &[&str] = &[
    "PyTorch pickle",
    "arbitrary code",
    "cannot be memory-mapped",
    "save_pretrained(NEW_DIR, safe_serialization=True)",
];

#[test]
fn issue14_pytorch_pickle_checkpoints_are_not_supported_and_why() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("bart-pt");
    fs::create_dir(&d).unwrap();
    fs::copy(fixture("bart-tiny").join("config.json"), d.join("config.json")).unwrap();
    fs::write(d.join("pytorch_model.bin"), b"PK\x03\x04 not really").unwrap();
    fs::write(d.join("training_args.bin"), b"x").unwrap();
    let e =
        refused(&[&d], &[&["bart-pt` holds only PyTorch pickle weights (`pytorch_model.bin`)"], PICKLE].concat(), &[]);
    assert!(!e.contains("training_args.bin"), "trainer state is not weights: {e}");
    // Sharded pickles, and .pt files.
    fs::remove_file(d.join("pytorch_model.bin")).unwrap();
    for n in ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"] {
        fs::write(d.join(n), b"{}").unwrap();
    }
    refused(
        &[&d],
        &["`pytorch_model-00001-of-00002.bin`, `pytorch_model-00002-of-00002.bin`, `pytorch_model.bin.index.json`"],
        &[],
    );
    // One pickle file given as the input.
    let pt = tmp.path().join("model.pt");
    fs::write(&pt, b"x").unwrap();
    refused(
        &[&pt, &"--config", &d.join("config.json")],
        &[&["model.pt` is a PyTorch pickle checkpoint"], PICKLE].concat(),
        &[],
    );
}

/// A Hugging Face cache root: `models--org--name/{blobs,refs,snapshots}`, with the bart-tiny
/// fixture as snapshot `abc123` (links into blobs/) and an empty older snapshot.
fn cache_root(dir: &Path, refs_main: Option<&str>) {
    let (blobs, snap) = (dir.join("blobs"), dir.join("snapshots/abc123"));
    fs::create_dir_all(&blobs).unwrap();
    fs::create_dir_all(&snap).unwrap();
    fs::create_dir_all(dir.join("snapshots/0ld999")).unwrap();
    fs::create_dir_all(dir.join("refs")).unwrap();
    if let Some(r) = refs_main {
        fs::write(dir.join("refs/main"), r).unwrap();
    }
    for (i, e) in fs::read_dir(fixture("bart-tiny")).unwrap().enumerate() {
        let e = e.unwrap();
        fs::copy(e.path(), blobs.join(format!("b{i}"))).unwrap();
        symlink(format!("../../blobs/b{i}"), snap.join(e.file_name())).unwrap();
    }
}

#[test]
fn issue14_hf_cache_root_suggests_its_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("models--facebook--bart-tiny");
    cache_root(&root, Some("abc123\n"));
    let e = refused(
        &[&root],
        &[
            "models--facebook--bart-tiny` is a Hugging Face cache root",
            "pass `snapshots/<revision>`: `",
            "models--facebook--bart-tiny/snapshots/abc123` is refs/main",
            "snapshots: `0ld999`, `abc123`",
        ],
        &["neither"],
    );
    assert!(!e.contains("abc123\n"), "refs/main is trimmed: {e}");
    // The suggested path works.
    let r = reshard(&[&"plan", &root.join("snapshots/abc123"), &"--tp", &"2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Without refs/main (or with one that is a FIFO: never opened for long), every snapshot.
    mkfifo(&root.join("refs/main"));
    refused(&[&root], &["pass `snapshots/<revision>`, one of `0ld999`, `abc123`"], &["refs/main"]);
}

#[test]
fn issue14_parent_directory_lists_the_checkpoints_below_it() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    copy_dir(&fixture("bart-tiny"), &models.join("bart"));
    copy_dir(&fixture("whisper-tiny"), &models.join("whisper/v1"));
    copy_dir(&fixture("bart-tiny"), &models.join("too/deep/down"));
    fs::create_dir_all(models.join("empty")).unwrap();
    cache_root(&models.join("hub/models--facebook--bart-tiny"), None);
    let m = models.display();
    let e = refused(
        &[&models],
        &[
            "neither `model.safetensors` nor `model.safetensors.index.json` found; checkpoints below it",
            &format!("\n  `{m}/bart`\n"),
            &format!("\n  `{m}/hub/models--facebook--bart-tiny/snapshots/abc123`\n"),
            &format!("\n  `{m}/whisper/v1`\n"),
            "(hint: pass one of them)",
        ],
        &["too/deep", "empty", "0ld999"],
    );
    assert!(e.find("/bart`").unwrap() < e.find("/whisper/v1`").unwrap(), "sorted: {e}");
}

#[test]
fn issue14_single_file_without_config_offers_the_one_beside_it() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&fixture("bart-tiny"), &src);
    let cfg = src.join("config.json").display().to_string();
    refused(
        &[&src.join("model.safetensors")],
        &[
            "model.safetensors`: a single .safetensors file needs --config FILE",
            &format!(
                "(hint: a config.json is beside it: add --config `{cfg}`, or pass the directory `{}`)",
                src.display()
            ),
        ],
        &[],
    );
    let other = tmp.path().join("other.safetensors");
    fs::copy(src.join("model.safetensors"), &other).unwrap();
    refused(&[&other], &["needs --config FILE"], &["hint", "beside"]);
    fs::write(tmp.path().join("config.json"), "{}").unwrap();
    refused(&[&other], &["(hint: a config.json is beside it: add --config `"], &["pass the directory"]);
}

#[test]
fn issue14_directory_with_other_safetensors_files_names_them() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&fixture("bart-tiny"), &src);
    fs::rename(src.join("model.safetensors"), src.join("bart.safetensors")).unwrap();
    refused(
        &[&src],
        &[
            "found; it has `bart.safetensors`",
            &format!(
                "(hint: pass one file with its config, e.g. `{0}/bart.safetensors` --config `{0}/config.json`)",
                src.display()
            ),
        ],
        &[],
    );
    // Nothing useful at all: the plain message.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    refused(
        &[&empty],
        &["empty`: neither `model.safetensors` nor", "(hint: pass the checkpoint directory"],
        &["below"],
    );
}
