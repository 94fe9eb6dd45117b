//! Issue #3: Whisper and mllama, and the BART quirks, at every tp that divides.

use crate::contract;
use crate::convert::{check, valid_tps};
use crate::util::*;
use std::fs;
use std::path::Path;

#[test]
fn whisper_every_tp() {
    assert_eq!(valid_tps("whisper-tiny"), [1, 2, 4]);
    for tp in [1, 2, 4] {
        check("whisper-tiny", tp, contract::whisper, &[]);
    }
}

#[test]
fn whisper_smaller_decoder_fixtures_every_tp() {
    // Issue #17: large-v3-turbo and distil-whisper shapes (fewer decoder than encoder layers, 128
    // mel bins), from the real transformers class; the bundled whisper.json as it is.
    for (name, decoder_layers) in [("whisper-turbo-tiny", 4), ("whisper-distil-tiny", 2)] {
        assert_eq!(uint(&config(&fixture(name)), "decoder_layers"), decoder_layers);
        assert_eq!(valid_tps(name), [1, 2, 4]);
        for tp in [1, 2, 4] {
            check(name, tp, contract::whisper, &[]);
        }
    }
}

#[test]
fn whisper_k_bias_is_synthesized_as_zeros() {
    let tmp = check("whisper-tiny", 2, contract::whisper, &[]);
    let rank1 = read_rank(&tmp.path().join("out"), 1);
    let b = &rank1["model.decoder.layers.1.encoder_attn.kv_proj.bias"];
    assert_eq!(b.shape, vec![32]);
    assert!(b.data[..16 * 4].iter().all(|&x| x == 0), "k half of the cross kv bias is zero");
    assert!(b.data[16 * 4..].iter().any(|&x| x != 0), "v half is the real v bias");
    assert!(!rank1.contains_key("proj_out.weight"));
}

#[test]
fn mllama_gqa_every_tp_including_kv_replication() {
    assert_eq!(valid_tps("mllama-gqa"), [1, 2, 4, 8]);
    for tp in [1, 2, 4, 8] {
        check("mllama-gqa", tp, contract::mllama, &[]);
    }
}

#[test]
fn mllama_awkward_every_tp() {
    // 12 q heads / 3 kv heads: tp 6 replicates each kv head on two ranks.
    assert_eq!(valid_tps("mllama-awkward"), [1, 3, 6]);
    for tp in [1, 3, 6] {
        check("mllama-awkward", tp, contract::mllama, &[]);
    }
}

#[test]
fn mllama_sharded_input_in_the_newer_naming() {
    assert!(fixture("mllama-sharded").join("model.safetensors.index.json").exists());
    assert_eq!(valid_tps("mllama-sharded"), [1, 2, 4, 8]);
    for tp in [1, 4, 8] {
        let tmp = check("mllama-sharded", tp, contract::mllama, &[]);
        // Written in the hub naming whatever the input used.
        let names = read_rank(&tmp.path().join("out"), 0);
        assert!(names.keys().all(|n| !n.starts_with("model.")), "{:?}", names.keys().next());
    }
}

#[test]
fn bart_legacy_tied_copies_are_accepted_when_identical() {
    let tmp = check("bart-legacy", 2, contract::bart, &[]);
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(tmp.path().join("out/reshard-manifest.json")).unwrap()).unwrap();
    assert_eq!(m["aliases"].as_array().unwrap().len(), 3);
    let rank0 = read_rank(&tmp.path().join("out"), 0);
    assert!(rank0.contains_key("final_logits_bias"));
}

#[test]
fn bart_legacy_tied_copies_that_differ_are_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&fixture("bart-legacy"), &src);
    let mut tensors = read_checkpoint(&src);
    tensors.get_mut("lm_head.weight").unwrap().data[40] ^= 1;
    write_checkpoint(&src.join("model.safetensors"), &tensors);
    let out = tmp.path().join("out");
    let r = reshard(&[&"convert", &src, &"--tp", &"2", &"--out", &out]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("`lm_head.weight` is an alias of `model.shared.weight` but differs from it at byte 40"),
        "{}",
        r.stderr
    );
    assert!(!out.exists());
}

#[test]
fn cross_attention_layers_disagreeing_with_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&fixture("mllama-gqa"), &src);
    let mut cfg = config(&src);
    cfg["text_config"]["cross_attention_layers"] = serde_json::json!([1, 2]);
    fs::write(src.join("config.json"), cfg.to_string()).unwrap();
    let r = reshard(&[&"plan", &src, &"--tp", &"2"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("`text_config.cross_attention_layers` lists [1, 2]"), "{}", r.stderr);
    assert!(r.stderr.contains("layer(s) [2] are listed but have no such tensors"), "{}", r.stderr);
    assert!(r.stderr.contains("layer(s) [3] have such tensors but are not listed"), "{}", r.stderr);
}

#[test]
fn kv_head_count_disagreeing_with_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&fixture("mllama-gqa"), &src);
    let mut cfg = config(&src);
    cfg["text_config"]["num_key_value_heads"] = 4.into();
    fs::write(src.join("config.json"), cfg.to_string()).unwrap();
    let r = reshard(&[&"plan", &src, &"--tp", &"2"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("k_proj.weight`: has 16 rows") && r.stderr.contains("4 heads (`kv_heads`)"),
        "{}",
        r.stderr
    );
}

#[test]
fn invalid_tp_for_gqa_lists_valid_values() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let r = reshard(&[&"convert", &fixture("mllama-awkward"), &"--tp", &"2", &"--out", &out]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("3 kv heads") && r.stderr.contains("valid tp values: 1, 3, 6"), "{}", r.stderr);
    assert!(!out.exists());
}

#[test]
fn explicit_mapping_overrides_detection() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("my-whisper.json");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    fs::copy(root.join("mappings/whisper.json"), &m).unwrap();
    let r = reshard(&[&"plan", &fixture("whisper-tiny"), &"--tp", &"2", &"--json", &"--mapping", &m]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["mapping"].as_str().unwrap(), m.display().to_string());
}

#[test]
fn single_file_with_config() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let f = fixture("whisper-tiny").join("model.safetensors");
    let r = reshard(&[&"convert", &f, &"--tp", &"2", &"--out", &out]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("needs --config"), "{}", r.stderr);
    let cfg = fixture("whisper-tiny").join("config.json");
    let r = reshard(&[&"convert", &f, &"--config", &cfg, &"--tp", &"2", &"--out", &out]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let want = contract::whisper(&read_checkpoint(&fixture("whisper-tiny")), &config(&fixture("whisper-tiny")), 2);
    assert_rank_eq("single file", 1, &read_rank(&out, 1), &want[1]);
}

/// A Whisper-large-v3-shaped checkpoint with `decoder_layers` decoder layers, float16, its data a
/// sparse hole (plan reads headers only): the tensor list of whisper-tiny with each layer repeated
/// and every dim at its real size.
fn whisper_large(dir: &Path, decoder_layers: usize, config_decoder_layers: usize) {
    // openai/whisper-large-v3's config.json (the keys the mapping reads); openai/whisper-large-v3-turbo
    // has the same with decoder_layers 4, distil-whisper/distil-large-v3 with decoder_layers 2.
    let cfg = serde_json::json!({
        "architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper", "d_model": 1280,
        "encoder_attention_heads": 20, "decoder_attention_heads": 20, "encoder_ffn_dim": 5120,
        "decoder_ffn_dim": 5120, "encoder_layers": 32, "decoder_layers": config_decoder_layers,
        "max_source_positions": 1500, "max_target_positions": 448, "num_mel_bins": 128, "vocab_size": 51866,
        "torch_dtype": "float16"
    });
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let real = |d: usize| match d {
        32 => 1280,
        64 => 5120,
        211 => 51866,
        8 => 128,
        16 => 1500,
        24 => 448,
        d => d,
    };
    let list = fs::read_to_string(fixture("whisper-tiny.tensors.txt")).unwrap();
    let mut tensors: Vec<(String, Vec<usize>)> = Vec::new();
    for line in list.lines() {
        let (name, rest) = line.split_once(' ').unwrap();
        let shape: Vec<usize> =
            rest.split(['[', ']', ',']).filter_map(|d| d.trim().parse().ok()).map(real).collect::<Vec<_>>();
        if name.contains(".layers.0.") {
            let n = if name.starts_with("model.decoder.") { decoder_layers } else { 32 };
            for i in 0..n {
                tensors.push((name.replace(".layers.0.", &format!(".layers.{i}.")), shape.clone()));
            }
        } else if !name.contains(".layers.") {
            tensors.push((name.to_string(), shape));
        }
    }
    let mut header = serde_json::Map::new();
    let mut off = 0u64;
    for (name, shape) in &tensors {
        let n = shape.iter().product::<usize>() as u64 * 2;
        header
            .insert(name.clone(), serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [off, off + n]}));
        off += n;
    }
    let mut h = serde_json::Value::Object(header).to_string();
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(h.as_bytes());
    let path = dir.join("model.safetensors");
    fs::write(&path, &bytes).unwrap();
    fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(bytes.len() as u64 + off).unwrap();
}

#[test]
fn whisper_smaller_decoder_variants_with_their_real_configs() {
    // Issue #17: large-v3-turbo (4 decoder layers) and distil-large-v3 (2) need no mapping of
    // their own: whisper.json takes its layer counts from config.json.
    let tmp = tempfile::tempdir().unwrap();
    for (variant, layers) in [("large-v3-turbo", 4), ("distil-large-v3", 2)] {
        let src = tmp.path().join(variant);
        whisper_large(&src, layers, layers);
        let r = reshard(&[&"plan", &src, &"--tp", &"4", &"--json"]);
        assert_eq!(r.code, 0, "{variant}: {}", r.stderr);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(v["family"], "whisper");
        let names: Vec<&str> = v["files"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["rank"] == 0)
            .flat_map(|f| f["tensors"].as_array().unwrap())
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        let last = format!("model.decoder.layers.{}.encoder_attn.kv_proj.weight", layers - 1);
        let kv = v["files"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|f| f["tensors"].as_array().unwrap())
            .find(|t| t["name"] == last.as_str())
            .unwrap_or_else(|| panic!("{variant}: {last} in the plan"));
        // 20 heads of 64 over 4 ranks: 5 heads of k and 5 of v per rank.
        assert_eq!(kv["shape"], serde_json::json!([640, 1280]), "{variant}");
        assert!(!names.iter().any(|n| n.starts_with(&format!("model.decoder.layers.{layers}."))), "{variant}");
        assert_eq!(
            names.iter().filter(|n| n.starts_with("model.encoder.layers.") && n.ends_with("fc1.weight")).count(),
            32
        );
        // 20 heads: tp 8 does not divide.
        let r = reshard(&[&"plan", &src, &"--tp", &"8"]);
        assert_eq!(r.code, 2, "{variant}: {}", r.stderr);
        assert!(r.stderr.contains("valid tp values: 1, 2, 4, 5, 10, 20"), "{variant}: {}", r.stderr);
    }
    // A config that says 32 decoder layers on turbo's tensors is refused with both counts.
    let src = tmp.path().join("mismatch");
    whisper_large(&src, 4, 32);
    let r = reshard(&[&"plan", &src, &"--tp", &"2"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("decoder_layers"), "{}", r.stderr);
}
