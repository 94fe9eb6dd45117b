//! `reshard plan`: the human table and the documented, stable `--json`.

use crate::util::*;

#[test]
fn plan_json_is_stable_and_parses() {
    let a = reshard(&[&"plan", &fixture("bart-tiny"), &"--tp", &"2", &"--json"]);
    assert_eq!(a.code, 0, "{}", a.stderr);
    let b = reshard(&[&"plan", &fixture("bart-tiny"), &"--tp", &"2", &"--json"]);
    assert_eq!(a.stdout, b.stdout, "plan --json must be deterministic");
    let plan: reshard::plan::ShardPlan = serde_json::from_str(&a.stdout).unwrap();
    assert_eq!(plan.format_version, 1);
    assert_eq!(plan.tp, 2);
    assert_eq!(plan.mapping, "built-in bart.json");
    assert_eq!(
        plan.files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
        ["model-rank-0-part-0.safetensors", "model-rank-1-part-0.safetensors"]
    );
    let v: serde_json::Value = serde_json::from_str(&a.stdout).unwrap();
    for key in [
        "format_version",
        "family",
        "mapping",
        "mapping_crc32",
        "tp",
        "max_part_size",
        "source_bytes",
        "aliases",
        "files",
    ] {
        assert!(v.get(key).is_some(), "documented field {key} missing");
    }
    let piece = &v["files"][0]["tensors"][0]["pieces"][0];
    for key in ["kind", "rows"] {
        assert!(piece.get(key).is_some(), "documented piece field {key} missing: {piece}");
    }
}

#[test]
fn plan_sizes_match_what_convert_writes() {
    let p = reshard(&[&"plan", &fixture("bart-awkward"), &"--tp", &"3", &"--json"]);
    let plan: reshard::plan::ShardPlan = serde_json::from_str(&p.stdout).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    assert_eq!(reshard(&[&"convert", &fixture("bart-awkward"), &"--tp", &"3", &"--out", &out]).code, 0);
    for f in &plan.files {
        assert_eq!(std::fs::metadata(out.join(&f.name)).unwrap().len(), f.size, "{}", f.name);
    }
}

#[test]
fn human_plan_shows_ranks_and_splits() {
    let r = reshard(&[&"plan", &fixture("bart-tiny"), &"--tp", &"2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("family bart (built-in bart.json), tp 2"), "{}", r.stdout);
    assert!(r.stdout.contains("model-rank-1-part-0.safetensors"));
    assert!(r.stdout.contains("`model.decoder.layers.0.encoder_attn.kv_proj.weight`"));
    assert!(r.stdout.contains("kv "));
    assert!(r.stdout.contains("zero rows"), "vocabulary padding is shown");
}
