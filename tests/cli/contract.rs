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

/// BART: fused qkv self-attention, cross q (column) + kv, out_proj/fc2 row, fc1 column,
/// tied shared embedding and positions vocab-parallel, the rest replicated.
pub fn bart(src: &BTreeMap<String, T>, cfg: &serde_json::Value, tp: usize) -> Ranks {
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
