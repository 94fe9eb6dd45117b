//! Issue #7: a corpus of hostile and broken inputs, made by test code. Every case: no panic
//! (asserted by `reshard()`), the documented exit code, a message naming the culprit, and nothing
//! left behind that looks like a finished output.

use crate::util::*;
use std::fs;
use std::path::{Path, PathBuf};

/// Runs convert and asserts the exit code, the message, and that no output exists.
fn expect(src: &Path, out: &Path, extra: &[&str], code: i32, needles: &[&str]) -> String {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"convert", &src, &"--tp", &"2", &"--out", &out];
    for e in extra {
        args.push(e);
    }
    let r = reshard(&args);
    assert_eq!(r.code, code, "{}", r.stderr);
    for n in needles {
        assert!(r.stderr.contains(n), "expected {n:?} in: {}", r.stderr);
    }
    assert!(r.stdout.is_empty(), "no report on failure: {}", r.stdout);
    assert!(!out.join("reshard-manifest.json").exists(), "a failed run left a finished-looking output");
    if let Some(parent) = out.parent().filter(|p| p.is_dir()) {
        for e in fs::read_dir(parent).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!n.contains(".reshard-tmp-"), "staging directory {n} left behind");
        }
    }
    r.stderr
}

fn model(src: &Path) -> PathBuf {
    src.join("model.safetensors")
}

fn header_len(bytes: &[u8]) -> usize {
    u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

/// Rewrites the JSON header of a safetensors file through `f` (keeping the data as is).
fn edit_header(path: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let bytes = fs::read(path).unwrap();
    let n = header_len(&bytes);
    let mut h: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    f(&mut h);
    let mut text = serde_json::Value::Object(h).to_string();
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    fs::write(path, out).unwrap();
}

#[test]
fn truncated_file() {
    let (_t, src, out) = scratch("bart-tiny");
    let bytes = fs::read(model(&src)).unwrap();
    fs::write(model(&src), &bytes[..bytes.len() - 100]).unwrap();
    expect(&src, &out, &[], 2, &["model.safetensors", "past the", "truncated"]);
}

#[test]
fn file_shorter_than_a_header() {
    let (_t, src, out) = scratch("bart-tiny");
    fs::write(model(&src), [1, 2, 3]).unwrap();
    expect(&src, &out, &[], 2, &["model.safetensors", "too short"]);
}

#[test]
fn header_length_beyond_the_file() {
    let (_t, src, out) = scratch("bart-tiny");
    let mut bytes = fs::read(model(&src)).unwrap();
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&len.to_le_bytes());
    fs::write(model(&src), bytes).unwrap();
    expect(&src, &out, &[], 2, &["model.safetensors", "header length", "runs past the end"]);
}

#[test]
fn malformed_header_json() {
    let (_t, src, out) = scratch("bart-tiny");
    let mut bytes = fs::read(model(&src)).unwrap();
    bytes[8] = b'[';
    fs::write(model(&src), bytes).unwrap();
    expect(&src, &out, &[], 2, &["model.safetensors", "not valid safetensors JSON"]);
}

#[test]
fn overlapping_offsets() {
    let (_t, src, out) = scratch("bart-tiny");
    // Move the last tensor of the file 4 bytes back, into its predecessor.
    edit_header(&model(&src), |h| {
        let off = |v: &serde_json::Value, i: usize| v["data_offsets"][i].as_u64().unwrap_or(0);
        let last = h.iter().filter(|(k, _)| *k != "__metadata__").max_by_key(|(_, v)| off(v, 0)).unwrap().0.clone();
        let (a, b) = (off(&h[&last], 0), off(&h[&last], 1));
        h[&last]["data_offsets"] = serde_json::json!([a - 4, b - 4]);
    });
    expect(&src, &out, &[], 2, &["model.safetensors", "overlap"]);
}

#[test]
fn gapped_offsets() {
    let (_t, src, out) = scratch("bart-tiny");
    // Drop one tensor from the header: its bytes become a gap.
    edit_header(&model(&src), |h| {
        h.remove("model.encoder.layers.0.fc1.bias");
    });
    expect(&src, &out, &[], 2, &["model.safetensors", "unclaimed bytes"]);
}

#[test]
fn unknown_dtype() {
    let (_t, src, out) = scratch("bart-tiny");
    edit_header(&model(&src), |h| h["final_logits_bias"]["dtype"] = "Q4_K".into());
    expect(&src, &out, &[], 2, &["`final_logits_bias`", "unsupported dtype `Q4_K`"]);
}

#[test]
fn shape_disagreeing_with_config() {
    let (_t, src, out) = scratch("bart-tiny");
    let mut cfg = config(&src);
    cfg["vocab_size"] = 204.into();
    fs::write(src.join("config.json"), cfg.to_string()).unwrap();
    expect(&src, &out, &[], 2, &["`model.shared.weight`", "203 rows", "dim `vocab`", "204"]);
}

#[test]
fn missing_tensor() {
    let (_t, src, out) = scratch("bart-tiny");
    let mut t = read_checkpoint(&src);
    t.remove("model.decoder.layers.1.encoder_attn.v_proj.weight");
    write_checkpoint(&model(&src), &t);
    expect(&src, &out, &[], 2, &["`model.decoder.layers.1.encoder_attn.v_proj.weight` is missing", "part `v`"]);
}

#[test]
fn unclaimed_extra_tensor() {
    let (_t, src, out) = scratch("bart-tiny");
    let mut t = read_checkpoint(&src);
    let x = t["final_logits_bias"].clone();
    t.insert("model.decoder.adapter.weight".into(), x);
    write_checkpoint(&model(&src), &t);
    expect(&src, &out, &[], 2, &["claimed by no rule", "`model.decoder.adapter.weight`"]);
}

/// Splits mllama-sharded's index into a given shape.
fn with_index(edit: impl FnOnce(&mut serde_json::Value)) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let (t, src, out) = scratch("mllama-sharded");
    let p = src.join("model.safetensors.index.json");
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    edit(&mut v);
    fs::write(&p, v.to_string()).unwrap();
    (t, src, out)
}

#[test]
fn index_naming_a_file_outside() {
    for evil in ["../model-00001-of-00003.safetensors", "/etc/passwd", "sub/../../x.safetensors"] {
        let (_t, src, out) = with_index(|v| v["weight_map"]["lm_head.weight"] = evil.into());
        expect(&src, &out, &[], 2, &["model.safetensors.index.json", "outside the checkpoint directory", evil]);
    }
}

#[test]
fn index_naming_a_missing_file() {
    let (_t, src, out) = with_index(|v| v["weight_map"]["lm_head.weight"] = "model-00009-of-00009.safetensors".into());
    expect(&src, &out, &[], 2, &["`model-00009-of-00009.safetensors`, which does not exist"]);
}

#[test]
fn tensor_listed_in_two_files() {
    let (_t, src, out) = scratch("mllama-sharded");
    let idx: serde_json::Value =
        serde_json::from_slice(&fs::read(src.join("model.safetensors.index.json")).unwrap()).unwrap();
    let a = idx["weight_map"]["lm_head.weight"].as_str().unwrap().to_string();
    let other =
        ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"].into_iter().find(|f| *f != a).unwrap();
    let mut t = read_file(&src.join(other));
    t.insert("lm_head.weight".into(), read_file(&src.join(&a))["lm_head.weight"].clone());
    write_checkpoint(&src.join(other), &t);
    expect(&src, &out, &[], 2, &["`lm_head.weight` is in two files"]);
}

#[test]
fn hf_cache_symlink_layout_works() {
    let tmp = tempfile::tempdir().unwrap();
    let (blobs, snap) = (tmp.path().join("blobs"), tmp.path().join("snapshots/0123abc"));
    fs::create_dir_all(&blobs).unwrap();
    fs::create_dir_all(&snap).unwrap();
    for e in fs::read_dir(fixture("mllama-sharded")).unwrap() {
        let e = e.unwrap();
        let blob = blobs.join(format!("blob-{}", e.file_name().to_string_lossy().len()));
        let blob = blob.with_extension(e.file_name().to_string_lossy().replace('.', "_"));
        fs::copy(e.path(), &blob).unwrap();
        std::os::unix::fs::symlink(
            Path::new("../..").join("blobs").join(blob.file_name().unwrap()),
            snap.join(e.file_name()),
        )
        .unwrap();
    }
    let out = tmp.path().join("out");
    let r = reshard(&[&"convert", &snap, &"--tp", &"2", &"--out", &out, &"--verify"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(out.join("config.json").is_file() && !out.join("config.json").is_symlink(), "copied files are real files");
}

#[test]
fn config_without_a_needed_key() {
    let (_t, src, out) = scratch("mllama-gqa");
    let mut cfg = config(&src);
    cfg["text_config"].as_object_mut().unwrap().remove("num_key_value_heads");
    fs::write(src.join("config.json"), cfg.to_string()).unwrap();
    expect(&src, &out, &[], 2, &["no key `text_config.num_key_value_heads`", "dim `kv_heads`"]);
}

#[test]
fn config_that_is_not_json() {
    let (_t, src, out) = scratch("bart-tiny");
    fs::write(src.join("config.json"), "{\"model_type\": ").unwrap();
    expect(&src, &out, &[], 2, &["config.json", "invalid JSON"]);
}

#[test]
fn tp_zero_and_tp_not_dividing() {
    let (_t, src, out) = scratch("bart-tiny");
    let r = reshard(&[&"convert", &src, &"--tp", &"0", &"--out", &out]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--tp"), "{}", r.stderr);
    let r = reshard(&[&"convert", &src, &"--tp", &"3", &"--out", &out]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("valid tp values: 1, 2, 4"), "{}", r.stderr);
    assert!(!out.exists());
}

fn bad_mapping(edit: impl FnOnce(&mut serde_json::Value)) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let mut v: serde_json::Value =
        serde_json::from_slice(&fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings/bart.json")).unwrap())
            .unwrap();
    edit(&mut v);
    let p = tmp.path().join("bad.json");
    fs::write(&p, v.to_string()).unwrap();
    (tmp, p)
}

#[test]
fn mapping_with_an_unknown_key_a_bad_pattern_a_dead_rule() {
    let (_t, src, out) = scratch("bart-tiny");
    let (_m1, unknown) = bad_mapping(|v| v["params"][3]["splitt"] = "x".into());
    expect(&src, &out, &["--mapping", unknown.to_str().unwrap()], 2, &["bad.json", "params[3]", "splitt"]);
    let (_m2, pattern) =
        bad_mapping(|v| v["params"][5]["source"] = "model.{side:encoder|decoder}.layers.{i.fc1.{p}".into());
    expect(&src, &out, &["--mapping", pattern.to_str().unwrap()], 2, &["params[5].source", "pattern"]);
    let (_m3, dead) = bad_mapping(|v| {
        let rule =
            serde_json::json!({"source": "model.decoder.layers.{i}.adapter.weight", "split": {"kind": "column"}});
        v["params"].as_array_mut().unwrap().push(rule);
    });
    expect(&src, &out, &["--mapping", dead.to_str().unwrap()], 2, &["params[12]", "matches no tensor"]);
    let (_m4, missing) = (tempfile::tempdir().unwrap(), PathBuf::from("/nonexistent/mapping.json"));
    expect(&src, &out, &["--mapping", missing.to_str().unwrap()], 2, &["/nonexistent/mapping.json"]);
}

#[test]
fn out_exists_is_a_file_or_is_not_writable() {
    let (_t, src, out) = scratch("bart-tiny");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep.txt"), "mine").unwrap();
    let r = reshard(&[&"convert", &src, &"--tp", &"2", &"--out", &out]);
    assert_eq!(r.code, 4);
    assert!(r.stderr.contains("already exists"), "{}", r.stderr);
    assert_eq!(fs::read_to_string(out.join("keep.txt")).unwrap(), "mine", "untouched");
    let file = out.join("keep.txt");
    expect(&src, &file, &[], 4, &["keep.txt", "not a directory"]);
    // Root ignores permission bits, so "not writable" is a place nobody can create a directory:
    // inside a regular file, and in procfs.
    let under_file = file.join("sub");
    expect(&src, &under_file, &[], 4, &["keep.txt"]);
    let r = reshard(&[&"convert", &src, &"--tp", &"2", &"--out", &"/proc/reshard-test-out"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains("/proc"), "{}", r.stderr);
}

#[test]
fn out_equal_to_or_inside_the_input() {
    let (_t, src, _) = scratch("bart-tiny");
    for out in [src.clone(), src.join("out"), src.join("a/b")] {
        let r = reshard(&[&"convert", &src, &"--tp", &"2", &"--out", &out, &"--force"]);
        assert_eq!(r.code, 4, "{}", r.stderr);
        assert!(r.stderr.contains("input"), "{}", r.stderr);
    }
    assert!(model(&src).exists() && fs::read_dir(&src).unwrap().count() == 4, "input untouched");
}

/// The disk filling up mid-write, simulated with RLIMIT_FSIZE (SIGXFSZ ignored, so writes fail
/// with EFBIG as they would with ENOSPC).
#[test]
fn disk_full_during_the_write() {
    use std::os::unix::process::CommandExt;
    let (_t, src, out) = scratch("bart-awkward");
    for limit in [4096u64, 200_000] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_reshard"));
        cmd.args(["convert", src.to_str().unwrap(), "--tp", "1", "--out", out.to_str().unwrap()]);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let l = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let o = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(4), "limit {limit}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains("model-rank-0-part-0.safetensors") && stderr.contains("too large"), "{stderr}");
        assert!(!out.exists(), "no output after a failed write");
        let left: Vec<_> = fs::read_dir(out.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 1, "only the input remains: {left:?}");
    }
}

#[test]
fn names_from_files_are_escaped_before_printing() {
    let (_t, src, out) = scratch("bart-tiny");
    let mut t = read_checkpoint(&src);
    let x = t["final_logits_bias"].clone();
    t.insert("evil\u{1b}]0;pwned\u{7}\u{1b}[31m.weight".into(), x);
    write_checkpoint(&model(&src), &t);
    let err = expect(&src, &out, &[], 2, &["claimed by no rule", "evil\\u{1b}]0;pwned\\u{7}\\u{1b}[31m.weight"]);
    assert!(!err.contains('\u{1b}') && !err.contains('\u{7}'), "raw control characters reached the terminal");
}

#[test]
fn output_honours_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let (_t, src, out) = scratch("bart-tiny");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_reshard"));
    cmd.args(["convert", src.to_str().unwrap(), "--tp", "2", "--out", out.to_str().unwrap()]);
    // SAFETY: umask is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o027);
            Ok(())
        });
    }
    assert!(cmd.status().unwrap().success());
    assert_eq!(fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o750);
    for e in fs::read_dir(&out).unwrap() {
        let e = e.unwrap();
        assert_eq!(e.metadata().unwrap().permissions().mode() & 0o777, 0o640, "{:?}", e.file_name());
    }
}
