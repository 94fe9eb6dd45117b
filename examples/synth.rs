//! Synthetic real-shape checkpoints for the benchmarks: the tensor names and shapes a Hugging Face
//! checkpoint of each family has for a given config.json, filled with random data (or left sparse,
//! for planning-only runs). No download needed.
//!
//!     cargo run --release --example synth -- bart-large OUT_DIR
//!     cargo run --release --example synth -- whisper-large-v3 OUT_DIR
//!     cargo run --release --example synth -- llama-3.2-11b-vision OUT_DIR [--text-layers N --vision-layers N] [--sparse]
//!
//! The configs are the published ones (benches/configs/, copied from the steering repo's
//! shared/reference/configs). `--text-layers`/`--vision-layers` cut mllama's depth while keeping
//! its real widths (the cross-attention layers are re-spread over the kept layers). Files over
//! 5 GB are split into `model-XXXXX-of-YYYYY.safetensors` with an index, like the hub's.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::Path;

type Tensors = Vec<(String, Vec<usize>)>;

fn u(c: &Value, k: &str) -> usize {
    k.split('.').fold(c, |v, k| &v[k]).as_u64().unwrap_or_else(|| panic!("config key {k}")) as usize
}

/// The `n` layers of one side of a BART-style encoder-decoder (Whisper's k_proj has no bias).
fn layers(t: &mut Tensors, side: &str, n: usize, d: usize, ffn: usize, k_bias: bool) {
    for i in 0..n {
        let l = format!("model.{side}.layers.{i}");
        let attns: &[&str] = if side == "encoder" { &["self_attn"] } else { &["self_attn", "encoder_attn"] };
        for a in attns {
            for m in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                t.push((format!("{l}.{a}.{m}.weight"), vec![d, d]));
                if k_bias || m != "k_proj" {
                    t.push((format!("{l}.{a}.{m}.bias"), vec![d]));
                }
            }
            for p in ["weight", "bias"] {
                t.push((format!("{l}.{a}_layer_norm.{p}"), vec![d]));
            }
        }
        t.push((format!("{l}.fc1.weight"), vec![ffn, d]));
        t.push((format!("{l}.fc1.bias"), vec![ffn]));
        t.push((format!("{l}.fc2.weight"), vec![d, ffn]));
        t.push((format!("{l}.fc2.bias"), vec![d]));
        for p in ["weight", "bias"] {
            t.push((format!("{l}.final_layer_norm.{p}"), vec![d]));
        }
    }
}

fn bart(c: &Value) -> Tensors {
    let (d, ffn, v, pos) =
        (u(c, "d_model"), u(c, "encoder_ffn_dim"), u(c, "vocab_size"), u(c, "max_position_embeddings") + 2);
    let mut t: Tensors = vec![("model.shared.weight".into(), vec![v, d]), ("final_logits_bias".into(), vec![1, v])];
    for side in ["encoder", "decoder"] {
        let n = u(c, &format!("{side}_layers"));
        t.push((format!("model.{side}.embed_positions.weight"), vec![pos, d]));
        for p in ["weight", "bias"] {
            t.push((format!("model.{side}.layernorm_embedding.{p}"), vec![d]));
        }
        layers(&mut t, side, n, d, ffn, true);
    }
    t
}

fn whisper(c: &Value) -> Tensors {
    let (d, ffn, v, mel) = (u(c, "d_model"), u(c, "encoder_ffn_dim"), u(c, "vocab_size"), u(c, "num_mel_bins"));
    let mut t: Tensors = vec![
        ("model.encoder.conv1.weight".into(), vec![d, mel, 3]),
        ("model.encoder.conv1.bias".into(), vec![d]),
        ("model.encoder.conv2.weight".into(), vec![d, d, 3]),
        ("model.encoder.conv2.bias".into(), vec![d]),
        ("model.encoder.embed_positions.weight".into(), vec![u(c, "max_source_positions"), d]),
        ("model.decoder.embed_positions.weight".into(), vec![u(c, "max_target_positions"), d]),
        ("model.decoder.embed_tokens.weight".into(), vec![v, d]),
    ];
    for side in ["encoder", "decoder"] {
        for p in ["weight", "bias"] {
            t.push((format!("model.{side}.layer_norm.{p}"), vec![d]));
        }
        layers(&mut t, side, u(c, &format!("{side}_layers")), d, ffn, false);
    }
    t
}

fn mllama(c: &Value) -> Tensors {
    let tc = |k: &str| u(c, &format!("text_config.{k}"));
    let vc = |k: &str| u(c, &format!("vision_config.{k}"));
    let (h, heads, kv, inter, vocab) = (
        tc("hidden_size"),
        tc("num_attention_heads"),
        tc("num_key_value_heads"),
        tc("intermediate_size"),
        tc("vocab_size"),
    );
    let hd = h / heads;
    let cross: Vec<u64> =
        c["text_config"]["cross_attention_layers"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let mut t: Tensors = vec![
        ("language_model.model.embed_tokens.weight".into(), vec![vocab + 8, h]),
        ("language_model.model.norm.weight".into(), vec![h]),
        ("language_model.lm_head.weight".into(), vec![vocab, h]),
    ];
    for i in 0..tc("num_hidden_layers") {
        let l = format!("language_model.model.layers.{i}");
        if cross.contains(&(i as u64)) {
            let a = format!("{l}.cross_attn");
            t.push((format!("{a}.q_proj.weight"), vec![heads * hd, h]));
            t.push((format!("{a}.k_proj.weight"), vec![kv * hd, h]));
            t.push((format!("{a}.v_proj.weight"), vec![kv * hd, h]));
            t.push((format!("{a}.o_proj.weight"), vec![h, heads * hd]));
            t.push((format!("{a}.q_norm.weight"), vec![hd]));
            t.push((format!("{a}.k_norm.weight"), vec![hd]));
            t.push((format!("{l}.cross_attn_attn_gate"), vec![1]));
            t.push((format!("{l}.cross_attn_mlp_gate"), vec![1]));
        } else {
            let a = format!("{l}.self_attn");
            t.push((format!("{a}.q_proj.weight"), vec![heads * hd, h]));
            t.push((format!("{a}.k_proj.weight"), vec![kv * hd, h]));
            t.push((format!("{a}.v_proj.weight"), vec![kv * hd, h]));
            t.push((format!("{a}.o_proj.weight"), vec![h, heads * hd]));
        }
        t.push((format!("{l}.mlp.gate_proj.weight"), vec![inter, h]));
        t.push((format!("{l}.mlp.up_proj.weight"), vec![inter, h]));
        t.push((format!("{l}.mlp.down_proj.weight"), vec![h, inter]));
        t.push((format!("{l}.input_layernorm.weight"), vec![h]));
        t.push((format!("{l}.post_attention_layernorm.weight"), vec![h]));
    }
    let (vh, vi, ch, p) = (vc("hidden_size"), vc("intermediate_size"), vc("num_channels"), vc("patch_size"));
    let patches = (vc("image_size") / p).pow(2) + 1;
    let tiles = vc("max_num_tiles");
    let ratios = c["vision_config"]["supported_aspect_ratios"].as_array().unwrap().len() + 1;
    let v = "vision_model";
    t.extend([
        (format!("{v}.patch_embedding.weight"), vec![vh, ch, p, p]),
        (format!("{v}.class_embedding"), vec![vh]),
        (format!("{v}.gated_positional_embedding.embedding"), vec![patches, vh]),
        (format!("{v}.gated_positional_embedding.gate"), vec![1]),
        (format!("{v}.gated_positional_embedding.tile_embedding.weight"), vec![ratios, tiles * patches * vh]),
        (format!("{v}.pre_tile_positional_embedding.embedding.weight"), vec![ratios, tiles * vh]),
        (format!("{v}.pre_tile_positional_embedding.gate"), vec![1]),
        (format!("{v}.post_tile_positional_embedding.embedding.weight"), vec![ratios, tiles * vh]),
        (format!("{v}.post_tile_positional_embedding.gate"), vec![1]),
        (format!("{v}.layernorm_pre.weight"), vec![vh]),
        (format!("{v}.layernorm_pre.bias"), vec![vh]),
        (format!("{v}.layernorm_post.weight"), vec![vh]),
        (format!("{v}.layernorm_post.bias"), vec![vh]),
        ("multi_modal_projector.weight".into(), vec![h, vc("vision_output_dim")]),
        ("multi_modal_projector.bias".into(), vec![h]),
    ]);
    for (stack, n) in [("transformer", vc("num_hidden_layers")), ("global_transformer", vc("num_global_layers"))] {
        for i in 0..n {
            let l = format!("{v}.{stack}.layers.{i}");
            for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                t.push((format!("{l}.self_attn.{m}.weight"), vec![vh, vh]));
            }
            t.push((format!("{l}.mlp.fc1.weight"), vec![vi, vh]));
            t.push((format!("{l}.mlp.fc1.bias"), vec![vi]));
            t.push((format!("{l}.mlp.fc2.weight"), vec![vh, vi]));
            t.push((format!("{l}.mlp.fc2.bias"), vec![vh]));
            for n in ["input_layernorm", "post_attention_layernorm"] {
                t.push((format!("{l}.{n}.weight"), vec![vh]));
                t.push((format!("{l}.{n}.bias"), vec![vh]));
            }
            if stack == "global_transformer" {
                t.push((format!("{l}.gate_attn"), vec![1]));
                t.push((format!("{l}.gate_ffn"), vec![1]));
            }
        }
    }
    t
}

/// Writes one safetensors file; random data from a xorshift stream, or a sparse hole.
fn write_file(path: &Path, tensors: &[(String, Vec<usize>)], dtype: &str, elem: usize, sparse: bool, seed: &mut u64) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0usize;
    for (n, s) in tensors {
        let bytes = s.iter().product::<usize>() * elem;
        header.insert(n.clone(), json!({"dtype": dtype, "shape": s, "data_offsets": [off, off + bytes]}));
        off += bytes;
    }
    let mut h = Value::Object(header).to_string();
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    let f = File::create(path).unwrap();
    let mut w = BufWriter::with_capacity(1 << 22, f);
    w.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    w.write_all(h.as_bytes()).unwrap();
    if sparse {
        let mut f = w.into_inner().unwrap();
        let end = f.stream_position().unwrap() + off as u64;
        f.set_len(end).unwrap();
        return;
    }
    let mut buf = vec![0u8; 1 << 22];
    let mut left = off;
    while left > 0 {
        let n = left.min(buf.len());
        for c in buf[..n].chunks_mut(8) {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            // Keep float values finite and small: clear the top exponent bits of every 16-bit word.
            let v = (*seed & 0x3fff_3fff_3fff_3fff).to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
        w.write_all(&buf[..n]).unwrap();
        left -= n;
    }
    w.flush().unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: synth bart-large|whisper-large-v3|llama-3.2-11b-vision OUT_DIR [--text-layers N] [--vision-layers N] [--sparse]";
    let (Some(name), Some(out)) = (args.first(), args.get(1)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let flag = |f: &str| {
        args.iter().position(|a| a == f).and_then(|i| args.get(i + 1)).map(|v| v.parse::<usize>().expect("number"))
    };
    let sparse = args.iter().any(|a| a == "--sparse");
    let cfg_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/configs").join(format!("{name}.json"));
    let mut c: Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap_or_else(|e| panic!("{}: {e}", cfg_path.display())))
            .unwrap();
    let (tensors, dtype, elem) = match c["model_type"].as_str().unwrap() {
        "bart" => (bart(&c), "F32", 4),
        "whisper" => (whisper(&c), "F16", 2),
        "mllama" => {
            if let Some(n) = flag("--text-layers") {
                let orig = c["text_config"]["cross_attention_layers"].as_array().unwrap().len();
                let cross: Vec<usize> =
                    (0..orig.min(n / 2).max(1)).map(|k| (k * n / orig.min(n / 2).max(1) + 1).min(n - 1)).collect();
                c["text_config"]["num_hidden_layers"] = json!(n);
                c["text_config"]["cross_attention_layers"] = json!(cross);
            }
            if let Some(n) = flag("--vision-layers") {
                c["vision_config"]["num_hidden_layers"] = json!(n);
                c["vision_config"]["num_global_layers"] = json!(n.div_ceil(4));
                c["vision_config"]["intermediate_layers_indices"] = json!((0..n.min(5)).collect::<Vec<_>>());
            }
            (mllama(&c), "BF16", 2)
        }
        t => panic!("unknown model_type {t}"),
    };
    let out = Path::new(out);
    std::fs::create_dir_all(out).unwrap();
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&c).unwrap()).unwrap();
    std::fs::write(out.join("generation_config.json"), "{}\n").unwrap();
    // Split into <= 5 GB files in order, as the hub does.
    let cap = 5_000_000_000usize;
    let mut groups: Vec<Tensors> = vec![vec![]];
    let mut size = 0;
    for (n, s) in tensors {
        let b = s.iter().product::<usize>() * elem;
        if size + b > cap && !groups.last().unwrap().is_empty() {
            groups.push(vec![]);
            size = 0;
        }
        size += b;
        groups.last_mut().unwrap().push((n, s));
    }
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let total: usize = groups.iter().flatten().map(|(_, s)| s.iter().product::<usize>() * elem).sum();
    if groups.len() == 1 {
        write_file(&out.join("model.safetensors"), &groups[0], dtype, elem, sparse, &mut seed);
    } else {
        let mut map = BTreeMap::new();
        for (i, g) in groups.iter().enumerate() {
            let f = format!("model-{:05}-of-{:05}.safetensors", i + 1, groups.len());
            write_file(&out.join(&f), g, dtype, elem, sparse, &mut seed);
            for (n, _) in g {
                map.insert(n.clone(), f.clone());
            }
        }
        let idx = json!({"metadata": {"total_size": total}, "weight_map": map});
        std::fs::write(out.join("model.safetensors.index.json"), serde_json::to_string_pretty(&idx).unwrap()).unwrap();
    }
    eprintln!(
        "{}: {} tensors, {:.2} GB of {dtype}{}",
        out.display(),
        groups.iter().map(Vec::len).sum::<usize>(),
        total as f64 / 1e9,
        if sparse { " (sparse)" } else { "" }
    );
}
