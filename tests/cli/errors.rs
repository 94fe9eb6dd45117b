//! Bad inputs: a clear message naming the culprit, the documented exit code, and no output.

use crate::util::*;
use std::fs;
use std::path::Path;

#[test]
fn invalid_tp_is_refused_before_writing_with_the_valid_values() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let r = reshard(&[&"convert", &fixture("bart-tiny"), &"--tp", &"3", &"--out", &out]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("tp 3 does not fit"), "{}", r.stderr);
    assert!(r.stderr.contains("valid tp values: 1, 2, 4"), "{}", r.stderr);
    assert!(!out.exists());
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0, "nothing left behind");
    let r = reshard(&[&"plan", &fixture("bart-tiny"), &"--tp", &"0"]);
    assert_eq!(r.code, 2);
}

#[test]
fn out_inside_input_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&fixture("bart-tiny"), &src);
    for out in [src.join("out"), src.clone(), tmp.path().to_path_buf()] {
        let r = reshard(&[&"convert", &src, &"--tp", &"1", &"--out", &out, &"--force"]);
        assert_eq!(r.code, 4, "{}: {}", out.display(), r.stderr);
        assert!(r.stderr.contains("input"), "{}", r.stderr);
    }
    assert!(src.join("model.safetensors").exists());
}

#[test]
fn out_that_is_a_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("file");
    fs::write(&out, "x").unwrap();
    let r = reshard(&[&"convert", &fixture("bart-tiny"), &"--tp", &"1", &"--out", &out, &"--force"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains("not a directory"), "{}", r.stderr);
}

#[test]
fn unclaimed_tensor_and_unknown_family() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&fixture("bart-tiny"), &src);
    let cfg = fs::read_to_string(src.join("config.json")).unwrap().replace("\"bart\"", "\"t5\"");
    fs::write(src.join("config.json"), cfg).unwrap();
    let r = reshard(&[&"plan", &src, &"--tp", &"1"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("no bundled mapping for model_type `t5`") && r.stderr.contains("--mapping"),
        "{}",
        r.stderr
    );
    // A whisper mapping forced on a BART checkpoint: tensors nobody claims.
    let r = reshard(&[
        &"plan",
        &fixture("bart-tiny"),
        &"--tp",
        &"1",
        &"--mapping",
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings/whisper.json"),
        &"--force-mapping",
    ]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("claimed by no rule"), "{}", r.stderr);
}

#[test]
fn bad_mapping_names_the_json_path() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m.json");
    let text = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings/bart.json")).unwrap();
    fs::write(
        &m,
        text.replacen("\"split\": {\"kind\": \"column\"}", "\"split\": {\"kind\": \"column\", \"pad\": 1}", 1),
    )
    .unwrap();
    let r = reshard(&[&"plan", &fixture("bart-tiny"), &"--tp", &"1", &"--mapping", &m]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("params[2].split") && r.stderr.contains("pad"), "{}", r.stderr);
}

#[test]
fn config_missing_a_needed_key() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&fixture("bart-tiny"), &src);
    let mut cfg = config(&src);
    cfg.as_object_mut().unwrap().remove("decoder_attention_heads");
    fs::write(src.join("config.json"), cfg.to_string()).unwrap();
    let r = reshard(&[&"plan", &src, &"--tp", &"1"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("no key `decoder_attention_heads`"), "{}", r.stderr);
}

#[test]
fn head_count_disagreeing_with_a_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&fixture("bart-tiny"), &src);
    let mut cfg = config(&src);
    cfg["decoder_attention_heads"] = 3.into();
    fs::write(src.join("config.json"), cfg.to_string()).unwrap();
    let r = reshard(&[&"plan", &src, &"--tp", &"1"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("model.decoder.layers.0") && r.stderr.contains("3 heads"), "{}", r.stderr);
}
