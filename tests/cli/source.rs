//! Issue #14, class 7: the manifest records a fingerprint of the source, and `verify` checks it
//! first, so an output made from another checkpoint is one clear finding, not a mismatch in every
//! tensor.

use crate::util::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn convert(src: &Path, out: &Path) {
    let r = reshard(&[&"convert", &src, &"--tp", &"2", &"--out", &out]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

fn verify_json(src: &Path, out: &Path) -> (i32, serde_json::Value) {
    let r = reshard(&[&"verify", &src, &out, &"--json"]);
    let v = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {} {}", r.stdout, r.stderr));
    (r.code, v)
}

/// A copy of bart-tiny whose tensors went through `edit`, rewritten by the test's own writer
/// (no `__metadata__`: the header bytes differ from the fixture's whatever `edit` does).
fn rewritten(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, T>)) -> PathBuf {
    let src = dir.join("other");
    copy_dir(&fixture("bart-tiny"), &src);
    let mut tensors = read_checkpoint(&src);
    edit(&mut tensors);
    write_checkpoint(&src.join("model.safetensors"), &tensors);
    src
}

fn scale_all(tensors: &mut BTreeMap<String, T>) {
    for t in tensors.values_mut() {
        let v: Vec<u8> = t
            .data
            .chunks_exact(4)
            .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) * 0.5 + 1e-3).to_le_bytes())
            .collect();
        t.data = v;
    }
}

#[test]
fn issue14_verify_against_a_different_source_of_the_same_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    convert(&fixture("bart-tiny"), &out);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("reshard-manifest.json")).unwrap()).unwrap();
    assert_eq!(m["source_fingerprint"]["scheme"], "sampled-crc32-v2");
    assert_eq!(m["source_fingerprint"]["tensors"].as_object().unwrap().len(), 92);
    // Another checkpoint, same names, dtypes and shapes, other weights.
    let other = rewritten(tmp.path(), scale_all);
    let (code, v) = verify_json(&other, &out);
    assert_eq!(code, 1, "{v:#}");
    let findings = v["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 1, "one finding, not one per tensor: {v:#}");
    assert_eq!(findings[0]["kind"], "source");
    let msg = findings[0]["message"].as_str().unwrap();
    assert!(msg.contains("was made from a different source than"), "{msg}");
    assert!(
        msg.contains("92 of 92 tensors differ in dtype, shape or sampled bytes (first: `final_logits_bias`)"),
        "{msg}"
    );
    assert_eq!(v["tensors_checked"], 0);
    let human = reshard(&[&"verify", &other, &out]);
    assert_eq!(human.code, 1);
    assert!(
        human.stdout.contains("[source] ") && human.stdout.contains("was made from a different source"),
        "{}",
        human.stdout
    );
    // One tensor changed: named.
    let tmp2 = tempfile::tempdir().unwrap();
    let one = rewritten(tmp2.path(), |t| t.get_mut("model.decoder.layers.1.fc2.weight").unwrap().data[2] ^= 0x10);
    let (code, v) = verify_json(&one, &out);
    assert_eq!(code, 1, "{v:#}");
    let msg = v["findings"][0]["message"].as_str().unwrap();
    assert!(
        msg.contains(
            "1 of 92 tensors differ in dtype, shape or sampled bytes (first: `model.decoder.layers.1.fc2.weight`)"
        ),
        "{msg}"
    );
}

#[test]
fn issue14_the_same_tensors_saved_again_are_the_same_source() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    convert(&fixture("bart-tiny"), &out);
    let again = rewritten(tmp.path(), |_| {});
    assert_ne!(
        std::fs::read(again.join("model.safetensors")).unwrap(),
        std::fs::read(fixture("bart-tiny").join("model.safetensors")).unwrap(),
        "the file differs"
    );
    let (code, v) = verify_json(&again, &out);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["source_checked"], true);
    let human = reshard(&[&"verify", &again, &out]);
    assert!(human.stdout.contains("source: the manifest's fingerprint of the source matches"), "{}", human.stdout);
}

#[test]
fn issue14_an_old_manifest_without_a_fingerprint_still_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    convert(&fixture("bart-tiny"), &out);
    let mpath = out.join("reshard-manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    assert!(m.as_object_mut().unwrap().remove("source_fingerprint").is_some());
    std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let (code, v) = verify_json(&fixture("bart-tiny"), &out);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["manifest_checked"], true);
    assert_eq!(v["source_checked"], false);
    assert!(v["notes"][0].as_str().unwrap().contains("records no source fingerprint"), "{v:#}");
    let human = reshard(&[&"verify", &fixture("bart-tiny"), &out]);
    assert!(human.stdout.contains("note: reshard-manifest.json records no source fingerprint"), "{}", human.stdout);
    // Against another source it falls back to the byte comparison, which still fails.
    let other = rewritten(tmp.path(), scale_all);
    let (code, v) = verify_json(&other, &out);
    assert_eq!(code, 1, "{v:#}");
    assert!(v["findings"].as_array().unwrap().iter().all(|f| f["kind"] != "source"), "{v:#}");
    assert!(v["findings"].as_array().unwrap().iter().any(|f| f["kind"] == "mismatch"), "{v:#}");
}
