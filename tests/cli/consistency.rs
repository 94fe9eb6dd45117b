//! Issue #14, class 3: a config.json that contradicts the tensors is refused before anything is
//! written (exit 2), by the `checks` of the mapping files. Every case is made by test code from a
//! fixture: config.json edited, or a tensor's shape changed in the safetensors header.

use crate::util::*;
use reshard::mapping::{CheckKind, SplitSpec};
use serde_json::{json, Value};
use std::fs;
use std::path::Path;

/// Sets `key` (dotted) of src/config.json to `value`; `None` removes it.
fn set_config(src: &Path, key: &str, value: Option<Value>) {
    let mut cfg = config(src);
    let (parent, last) = match key.rsplit_once('.') {
        Some((p, l)) => (p.split('.').fold(&mut cfg, |v, k| &mut v[k]), l),
        None => (&mut cfg, key),
    };
    let obj = parent.as_object_mut().unwrap();
    match value {
        Some(v) => obj.insert(last.to_string(), v),
        None => obj.remove(last),
    };
    fs::write(src.join("config.json"), cfg.to_string()).unwrap();
}

/// Gives tensor `name` of src/model.safetensors the shape `shape` (same bytes).
fn reshape(src: &Path, name: &str, shape: &[usize]) {
    let mut t = read_checkpoint(src);
    let x = t.get_mut(name).unwrap();
    assert_eq!(x.shape.iter().product::<usize>(), shape.iter().product::<usize>(), "test: same element count");
    x.shape = shape.to_vec();
    write_checkpoint(&src.join("model.safetensors"), &t);
}

/// Runs convert and asserts exit 2, every needle in the message, and that nothing was written.
fn refused(src: &Path, out: &Path, needles: &[&str]) -> String {
    let r = reshard(&[&"convert", &src, &"--tp", &"1", &"--out", &out]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    for n in needles {
        assert!(r.stderr.contains(n), "expected {n:?} in: {}", r.stderr);
    }
    assert!(r.stdout.is_empty(), "no report on failure: {}", r.stdout);
    assert!(!out.exists(), "a refused conversion created {}", out.display());
    for e in fs::read_dir(out.parent().unwrap()).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.contains(".reshard-"), "{n} left behind");
    }
    r.stderr
}

/// The config file as messages print it.
fn config_label(src: &Path) -> String {
    format!("`{}`", src.join("config.json").display())
}

#[test]
fn doubled_d_model() {
    let (_t, src, out) = scratch("bart-tiny");
    set_config(&src, "d_model", Some(json!(64)));
    refused(
        &src,
        &out,
        &[
            "`model.shared.weight` has shape [203, 32], but config.json implies [203, 64]",
            "dim 1 is 32, not `d_model` = 64",
        ],
    );
    let (_t, src, out) = scratch("whisper-tiny");
    set_config(&src, "d_model", Some(json!(64)));
    refused(&src, &out, &["`model.decoder.embed_tokens.weight` has shape [211, 32]", "not `d_model` = 64"]);
    let (_t, src, out) = scratch("mllama-gqa");
    set_config(&src, "text_config.hidden_size", Some(json!(128)));
    refused(
        &src,
        &out,
        &["`language_model.model.embed_tokens.weight` has shape [258, 64]", "`text_config.hidden_size` = 128"],
    );
}

#[test]
fn wrong_ffn_size() {
    let (_t, src, out) = scratch("bart-tiny");
    set_config(&src, "encoder_ffn_dim", Some(json!(128)));
    let e = refused(
        &src,
        &out,
        &[
            "tensor `model.encoder.layers.0.fc1.weight` has shape [64, 32], but config.json implies [128, 32]",
            "dim 0 is 64, not `encoder_ffn_dim` = 128 (dim `encoder_ffn`)",
            "of mapping built-in bart.json",
        ],
    );
    assert!(e.contains(&config_label(&src)), "{e}");
    let (_t, src, out) = scratch("whisper-tiny");
    set_config(&src, "decoder_ffn_dim", Some(json!(48)));
    refused(&src, &out, &["`model.decoder.layers.0.fc1.weight` has shape [64, 32]", "`decoder_ffn_dim` = 48"]);
    // Absent: Hugging Face's default (1536) applies, and contradicts the tensors.
    let (_t, src, out) = scratch("whisper-tiny");
    set_config(&src, "encoder_ffn_dim", None);
    refused(&src, &out, &["not `encoder_ffn_dim` = 1536 (dim `encoder_ffn`; absent from config.json: the default)"]);
    let (_t, src, out) = scratch("mllama-gqa");
    set_config(&src, "text_config.intermediate_size", Some(json!(96)));
    refused(
        &src,
        &out,
        &[
            "`language_model.model.layers.0.mlp.gate_proj.weight` has shape [128, 64]",
            "`text_config.intermediate_size` = 96",
        ],
    );
    let (_t, src, out) = scratch("mllama-gqa");
    set_config(&src, "vision_config.intermediate_size", Some(json!(128)));
    refused(&src, &out, &["mlp.fc1.weight` has shape [64, 32]", "`vision_config.intermediate_size` = 128"]);
}

#[test]
fn whisper_vocab_size_larger_and_smaller_than_the_embedding() {
    for (vocab, dim0) in [(212, "[212, 32]"), (300, "[300, 32]"), (210, "[210, 32]"), (100, "[100, 32]")] {
        let (_t, src, out) = scratch("whisper-tiny");
        set_config(&src, "vocab_size", Some(json!(vocab)));
        refused(
            &src,
            &out,
            &[
                &format!(
                    "tensor `model.decoder.embed_tokens.weight` has shape [211, 32], but config.json implies {dim0}"
                ),
                &format!("dim 0 is 211, not `vocab_size` = {vocab} (dim `vocab`)"),
                "of mapping built-in whisper.json",
            ],
        );
    }
}

#[test]
fn layer_count_disagreeing_with_the_tensors() {
    // (fixture, key, value, what the message must say)
    let cases: &[(&str, &str, u64, &[&str])] = &[
        (
            "bart-tiny",
            "encoder_layers",
            3,
            &[
                "`encoder_layers` = 3",
                "layer(s) [2] are expected but have no such tensors (no `model.encoder.layers.2.",
            ],
        ),
        (
            "bart-tiny",
            "decoder_layers",
            1,
            &["`decoder_layers` = 1", "layer(s) [1] have such tensors but are not expected (`model.decoder.layers.1."],
        ),
        (
            "whisper-tiny",
            "decoder_layers",
            4,
            &["config.json gives 4 layer(s): `decoder_layers` = 4", "[2, 3] are expected"],
        ),
        ("whisper-tiny", "encoder_layers", 1, &["`encoder_layers` = 1", "(`model.encoder.layers.1."]),
        (
            "mllama-gqa",
            "text_config.num_hidden_layers",
            5,
            &["`text_config.num_hidden_layers` = 5", "no `language_model.model.layers.4."],
        ),
        (
            "mllama-gqa",
            "text_config.num_hidden_layers",
            3,
            &["`text_config.num_hidden_layers` = 3", "(`language_model.model.layers.3."],
        ),
        (
            "mllama-gqa",
            "vision_config.num_hidden_layers",
            3,
            &["`vision_config.num_hidden_layers` = 3", "no `vision_model.transformer.layers.2."],
        ),
        (
            "mllama-gqa",
            "vision_config.num_global_layers",
            0,
            &["`vision_config.num_global_layers` = 0", "(`vision_model.global_transformer.layers.0."],
        ),
    ];
    for (name, key, value, needles) in cases {
        let (_t, src, out) = scratch(name);
        set_config(&src, key, Some(json!(value)));
        let e = refused(&src, &out, needles);
        assert!(e.contains("tensors matching `") && e.contains("checks["), "{e}");
    }
}

#[test]
fn a_layer_that_lacks_one_kind_of_tensor() {
    // Layer 1 of the encoder without fc2: every rule still matches something, so only the layer
    // checks see it.
    let (_t, src, out) = scratch("bart-tiny");
    let mut t = read_checkpoint(&src);
    t.remove("model.encoder.layers.1.fc2.weight");
    t.remove("model.encoder.layers.1.fc2.bias");
    write_checkpoint(&src.join("model.safetensors"), &t);
    refused(
        &src,
        &out,
        &[
            "tensors matching `model.encoder.layers.{i}.fc2.weight` exist for layer(s) [0]",
            "no `model.encoder.layers.1.fc2.weight`",
        ],
    );
    // An mllama self-attention layer listed as cross-attention in neither place.
    let (_t, src, out) = scratch("mllama-gqa");
    set_config(&src, "text_config.cross_attention_layers", Some(json!([1, 2, 3])));
    refused(
        &src,
        &out,
        &["`text_config.cross_attention_layers` lists [1, 2, 3]", "[2] are listed but have no such tensors"],
    );
}

#[test]
fn one_d_and_three_d_tensors_where_a_matrix_belongs() {
    let cases: &[(&str, &str, &[usize], &[&str])] = &[
        (
            "bart-tiny",
            "model.encoder.layers.0.fc1.weight",
            &[2048],
            &["`model.encoder.layers.0.fc1.weight` has shape [2048] (1-d), but config.json implies a 2-d [64, 32]", "`encoder_ffn_dim` = 64", "`d_model` = 32"],
        ),
        (
            "bart-tiny",
            "model.encoder.layers.0.fc1.weight",
            &[64, 32, 1],
            &["has shape [64, 32, 1] (3-d), but config.json implies a 2-d [64, 32]"],
        ),
        (
            "bart-tiny",
            "model.decoder.layers.1.encoder_attn.q_proj.weight",
            &[32, 4, 8],
            &["`model.decoder.layers.1.encoder_attn.q_proj.weight` has shape [32, 4, 8] (3-d), but config.json implies a 2-d [32, 32]"],
        ),
        (
            "whisper-tiny",
            "model.decoder.layers.0.fc2.weight",
            &[2048],
            &["`model.decoder.layers.0.fc2.weight` has shape [2048] (1-d), but config.json implies a 2-d [32, 64]"],
        ),
        (
            "mllama-gqa",
            "multi_modal_projector.weight",
            &[64, 8, 8],
            &["`multi_modal_projector.weight` has shape [64, 8, 8] (3-d), but config.json implies a 2-d [64, 64]", "`vision_config.vision_output_dim` = 64"],
        ),
        (
            "mllama-gqa",
            "language_model.model.layers.0.mlp.down_proj.weight",
            &[8192],
            &["has shape [8192] (1-d), but config.json implies a 2-d [64, 128]"],
        ),
    ];
    for (name, tensor, shape, needles) in cases {
        let (_t, src, out) = scratch(name);
        reshape(&src, tensor, shape);
        refused(&src, &out, needles);
    }
}

#[test]
fn zero_head_count_names_the_key_and_the_file() {
    let cases = [
        ("bart-tiny", "decoder_attention_heads"),
        ("bart-mixed-heads", "encoder_attention_heads"),
        ("whisper-tiny", "encoder_attention_heads"),
        ("mllama-gqa", "text_config.num_attention_heads"),
        ("mllama-gqa", "text_config.num_key_value_heads"),
        ("mllama-gqa", "vision_config.attention_heads"),
    ];
    for (name, key) in cases {
        let (_t, src, out) = scratch(name);
        set_config(&src, key, Some(json!(0)));
        let e = refused(&src, &out, &[&format!("`{key}` = 0")]);
        assert!(e.contains(&config_label(&src)), "names the config file: {e}");
    }
}

/// Head counts that no tensor shape holds: q is [hidden, hidden] whatever the count, so a
/// doubled count that still divides the width is consistent with the tensors (and refused by the
/// checks only when it does not divide, or is 0).
const NOT_IN_ANY_SHAPE: &[&str] =
    &["encoder_attention_heads", "decoder_attention_heads", "vision_config.attention_heads"];

/// Every config.json key a bundled mapping reads, doubled and zeroed in turn: each contradicts
/// the tensors, and the refusal names the key.
#[test]
fn every_config_dim_is_checked_against_the_tensors() {
    for name in ["bart-tiny", "whisper-tiny", "mllama-gqa"] {
        let (meta, mapping) = reshard::Source::new(fixture(name)).load().unwrap();
        let (_t, src, _out) = scratch(name);
        let original = config(&src);
        let mut tried = 0;
        for spec in mapping.file.dims.values() {
            let Some(key) = spec.config.as_ref().or(spec.length.as_ref()) else { continue };
            let Some(v) = key.split('.').try_fold(&meta.config, |v, k| v.get(k)) else {
                panic!("{name}: fixture config lacks `{key}`");
            };
            let (doubled, zero) = match v {
                Value::Array(a) => (json!([a.clone(), a.clone()].concat()), json!([])),
                _ => (json!(v.as_u64().unwrap() * 2), json!(0)),
            };
            let mut variants = vec![("zero", zero)];
            if !NOT_IN_ANY_SHAPE.contains(&key.as_str()) {
                variants.push(("doubled", doubled));
            }
            for (what, value) in variants {
                fs::write(src.join("config.json"), original.to_string()).unwrap();
                set_config(&src, key, Some(value));
                let r = reshard(&[&"plan", &src, &"--tp", &"1"]);
                assert_eq!(r.code, 2, "{name}: `{key}` {what} was accepted: {}", r.stdout);
                assert!(r.stderr.contains(&format!("`{key}`")), "{name}: `{key}` {what}: {}", r.stderr);
                tried += 1;
            }
        }
        assert!(tried >= 10, "{name}: only {tried} variants");
    }
}

/// Every tensor of every fixture has its shape declared by a `shape` check, or is the k or v part
/// of a head split (whose rows the split checks against the kv head count, and which must stack
/// with the checked q).
#[test]
fn bundled_mappings_check_the_shape_of_every_tensor() {
    for name in [
        "bart-tiny",
        "bart-legacy",
        "bart-mixed-heads",
        "bart-awkward",
        "whisper-tiny",
        "mllama-gqa",
        "mllama-awkward",
        "mllama-sharded",
    ] {
        let (meta, mapping) = reshard::Source::new(fixture(name)).load().unwrap();
        for tensor in meta.tensors.keys() {
            let c = mapping.canonical(tensor);
            let by_check = mapping
                .checks
                .iter()
                .any(|k| matches!(k.kind, CheckKind::Shape { .. }) && k.pattern.matches(&c).is_some());
            let by_split = mapping.rules.iter().any(|r| {
                matches!(r.split, SplitSpec::FusedQkv { .. } | SplitSpec::Kv { .. })
                    && r.parts
                        .iter()
                        .any(|p| (p.shard_id == "k" || p.shard_id == "v") && p.pattern.matches(&c).is_some())
            });
            assert!(by_check || by_split, "{name}: no shape check covers `{tensor}`");
        }
    }
}
