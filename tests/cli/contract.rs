//! The output contract (shared/reference/vllm-layout.md), written out per family in plain test
//! code, independent of the mapping files and the planner: what rank r of tp must hold, computed
//! directly from the source tensors.

use crate::util::{uint, T};
use std::collections::BTreeMap;

pub type Ranks = Vec<BTreeMap<String, T>>;

fn heads_for(name: &str, enc: usize, dec: usize) -> usize {
    if name.contains("encoder.layers") {
        enc
    } else {
        dec
    }
}

/// vLLM from 0.14.0 on (the default target): every decoder layer's self-attention and
/// cross-attention `attn` holds four persistent float32 scalar buffers equal to 1.0 (the kv-cache
/// quantization scales); the encoder's attention holds none.
pub fn with_attention_scales(src: &BTreeMap<String, T>, mut ranks: Ranks) -> Ranks {
    let layers: std::collections::BTreeSet<&str> =
        src.keys().filter_map(|k| k.strip_prefix("model.decoder.layers.")?.split('.').next()).collect();
    assert!(!layers.is_empty(), "an encoder-decoder fixture has decoder layers");
    let one = T { dtype: "F32".into(), shape: vec![], data: 1f32.to_le_bytes().to_vec() };
    for m in &mut ranks {
        for i in &layers {
            for attn in ["self_attn", "encoder_attn"] {
                for s in ["_k_scale", "_v_scale", "_q_scale", "_prob_scale"] {
                    assert!(m.insert(format!("model.decoder.layers.{i}.{attn}.attn.{s}"), one.clone()).is_none());
                }
            }
        }
    }
    ranks
}

/// BART for the default target: [`bart_weights`] plus the attention scale buffers.
pub fn bart(src: &BTreeMap<String, T>, cfg: &serde_json::Value, tp: usize) -> Ranks {
    with_attention_scales(src, bart_weights(src, cfg, tp))
}

/// Whisper for the default target: [`whisper_weights`] plus the attention scale buffers.
pub fn whisper(src: &BTreeMap<String, T>, cfg: &serde_json::Value, tp: usize) -> Ranks {
    with_attention_scales(src, whisper_weights(src, cfg, tp))
}

/// BART: fused qkv self-attention, cross q (column) + kv, out_proj/fc2 row, fc1 column,
/// tied shared embedding and positions vocab-parallel, the rest replicated.
pub fn bart_weights(src: &BTreeMap<String, T>, cfg: &serde_json::Value, tp: usize) -> Ranks {
    let (enc, dec) = (uint(cfg, "encoder_attention_heads"), uint(cfg, "decoder_attention_heads"));
    let tied = ["model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"];
    let shared = src.get("model.shared.weight").expect("BART fixtures carry model.shared.weight");
    for alias in tied {
        if let Some(t) = src.get(alias) {
            assert_eq!(t, shared, "fixture alias {alias} differs from model.shared.weight");
        }
    }
    (0..tp)
        .map(|r| {
            let mut m = BTreeMap::new();
            for (name, t) in src {
                let put = |m: &mut BTreeMap<String, T>, n: String, v: T| assert!(m.insert(n, v).is_none());
                if tied.contains(&name.as_str()) {
                    continue;
                }
                if name.contains(".self_attn.q_proj.") {
                    let h = heads_for(name, enc, dec);
                    let k = &src[&name.replace("q_proj", "k_proj")];
                    let v = &src[&name.replace("q_proj", "v_proj")];
                    let fused = T::cat(&[t.col_block(r, tp), k.kv_block(h, r, tp), v.kv_block(h, r, tp)]);
                    put(&mut m, name.replace("q_proj", "qkv_proj"), fused);
                } else if name.contains(".self_attn.k_proj.") || name.contains(".self_attn.v_proj.") {
                } else if name.contains(".encoder_attn.q_proj.") {
                    put(&mut m, name.clone(), t.col_block(r, tp));
                } else if name.contains(".encoder_attn.k_proj.") {
                    let v = &src[&name.replace("k_proj", "v_proj")];
                    put(
                        &mut m,
                        name.replace("k_proj", "kv_proj"),
                        T::cat(&[t.kv_block(dec, r, tp), v.kv_block(dec, r, tp)]),
                    );
                } else if name.contains(".encoder_attn.v_proj.") {
                } else if name.contains(".out_proj.") || name.contains(".fc2.") {
                    put(&mut m, name.clone(), t.row_block(r, tp));
                } else if name.contains(".fc1.") {
                    put(&mut m, name.clone(), t.col_block(r, tp));
                } else if name == "model.shared.weight" {
                    for n in tied {
                        put(&mut m, n.to_string(), t.vocab_block(r, tp));
                    }
                } else if name.ends_with("embed_positions.weight") {
                    put(&mut m, name.clone(), t.vocab_block(r, tp));
                } else {
                    put(&mut m, name.clone(), t.clone());
                }
            }
            m
        })
        .collect()
}

/// Whisper: like BART but no k bias (zeros in the fused biases), fc1/fc2 under `mlp.`, and the
/// vocabulary, positions and convs replicated (vLLM 0.10 to 0.13: nothing else).
pub fn whisper_weights(src: &BTreeMap<String, T>, cfg: &serde_json::Value, tp: usize) -> Ranks {
    let (enc, dec) = (uint(cfg, "encoder_attention_heads"), uint(cfg, "decoder_attention_heads"));
    assert!(!src.keys().any(|k| k.ends_with("k_proj.bias")), "HF Whisper has no k_proj.bias");
    (0..tp)
        .map(|r| {
            let mut m = BTreeMap::new();
            let mut put = |n: String, v: T| assert!(m.insert(n, v).is_none());
            for (name, t) in src {
                let h = heads_for(name, enc, dec);
                // The k part: the k weight's kv block, or for a bias zeros shaped like v's block.
                let k_of = |q_name: &str, v: &T| match src.get(&q_name.replace("q_proj", "k_proj")) {
                    Some(k) => k.kv_block(h, r, tp),
                    None => {
                        let vb = v.kv_block(h, r, tp);
                        vb.zero_rows(vb.shape[0])
                    }
                };
                if name.contains(".self_attn.q_proj.") {
                    let v = &src[&name.replace("q_proj", "v_proj")];
                    let fused = T::cat(&[t.col_block(r, tp), k_of(name, v), v.kv_block(h, r, tp)]);
                    put(name.replace("q_proj", "qkv_proj"), fused);
                } else if name.contains(".encoder_attn.q_proj.") {
                    put(name.clone(), t.col_block(r, tp));
                    let v = &src[&name.replace("q_proj", "v_proj")];
                    put(name.replace("q_proj", "kv_proj"), T::cat(&[k_of(name, v), v.kv_block(h, r, tp)]));
                } else if name.contains("_attn.k_proj.") || name.contains("_attn.v_proj.") {
                } else if name.contains(".out_proj.") {
                    put(name.clone(), t.row_block(r, tp));
                } else if name.contains(".fc1.") {
                    put(name.replace(".fc1.", ".mlp.fc1."), t.col_block(r, tp));
                } else if name.contains(".fc2.") {
                    put(name.replace(".fc2.", ".mlp.fc2."), t.row_block(r, tp));
                } else if name == "proj_out.weight" {
                } else {
                    put(name.clone(), t.clone());
                }
            }
            m
        })
        .collect()
}

/// The hub naming of an mllama tensor (newer transformers writes `model.language_model.*`).
pub fn mllama_hub_name(k: &str) -> String {
    for (a, b) in [
        ("model.language_model.", "language_model.model."),
        ("model.vision_model.", "vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("lm_head.", "language_model.lm_head."),
    ] {
        if let Some(rest) = k.strip_prefix(a) {
            return format!("{b}{rest}");
        }
    }
    k.to_string()
}

/// mllama: GQA fused qkv and cross q + kv with kv replication, gate_up merged, vocab-parallel
/// embed_tokens (vocab + 8) and lm_head, vision qkv, patch embedding as a linear, projector column.
pub fn mllama(src: &BTreeMap<String, T>, cfg: &serde_json::Value, tp: usize) -> Ranks {
    let src: BTreeMap<String, T> = src.iter().map(|(k, v)| (mllama_hub_name(k), v.clone())).collect();
    let (kv, v_heads) = (uint(cfg, "text_config.num_key_value_heads"), uint(cfg, "vision_config.attention_heads"));
    assert_eq!(src["language_model.model.embed_tokens.weight"].shape[0], uint(cfg, "text_config.vocab_size") + 8);
    (0..tp)
        .map(|r| {
            let mut m = BTreeMap::new();
            let mut put = |n: String, v: T| assert!(m.insert(n, v).is_none());
            for (name, t) in &src {
                let vision = name.starts_with("vision_model.");
                let kvh = if vision { v_heads } else { kv };
                let other = |from: &str, to: &str| &src[&name.replace(from, to)];
                if name.contains(".self_attn.q_proj.") {
                    let (k, v) = (other("q_proj", "k_proj"), other("q_proj", "v_proj"));
                    let fused = T::cat(&[t.col_block(r, tp), k.kv_block(kvh, r, tp), v.kv_block(kvh, r, tp)]);
                    put(name.replace("q_proj", "qkv_proj"), fused);
                } else if name.contains(".cross_attn.q_proj.") {
                    put(name.clone(), t.col_block(r, tp));
                    let (k, v) = (other("q_proj", "k_proj"), other("q_proj", "v_proj"));
                    put(name.replace("q_proj", "kv_proj"), T::cat(&[k.kv_block(kv, r, tp), v.kv_block(kv, r, tp)]));
                } else if name.contains("attn.k_proj.") || name.contains("attn.v_proj.") || name.contains(".up_proj.") {
                } else if name.contains(".o_proj.") || name.contains(".down_proj.") || name.contains(".mlp.fc2.") {
                    put(name.clone(), t.row_block(r, tp));
                } else if name.contains(".gate_proj.") {
                    let up = other("gate_proj", "up_proj");
                    put(name.replace("gate_proj", "gate_up_proj"), T::cat(&[t.col_block(r, tp), up.col_block(r, tp)]));
                } else if name.contains(".mlp.fc1.") || name.starts_with("multi_modal_projector.") {
                    put(name.clone(), t.col_block(r, tp));
                } else if name.ends_with("embed_tokens.weight") || name == "language_model.lm_head.weight" {
                    put(name.clone(), t.vocab_block(r, tp));
                } else if name == "vision_model.patch_embedding.weight" {
                    let mut flat = t.clone();
                    flat.shape = vec![t.shape[0], t.shape[1..].iter().product()];
                    put("vision_model.patch_embedding._linear.weight".into(), flat.col_block(r, tp));
                } else {
                    put(name.clone(), t.clone());
                }
            }
            m
        })
        .collect()
}
