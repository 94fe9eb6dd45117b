//! `reshard convert` on every fixture at every tp that divides: every output tensor equals what
//! the contract (computed independently in `contract.rs`) says, byte for byte.

use crate::contract::{self, Ranks};
use crate::util::*;
use std::collections::BTreeMap;
use std::path::Path;

pub type Contract = fn(&BTreeMap<String, T>, &serde_json::Value, usize) -> Ranks;

/// Converts `name` at `tp` and compares every rank with the contract; returns the output dir.
pub fn check(name: &str, tp: usize, expected: Contract, extra: &[&str]) -> tempfile::TempDir {
    let src = fixture(name);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"convert", &src, &"--tp"];
    let tp_s = tp.to_string();
    args.push(&tp_s);
    args.push(&"--out");
    args.push(&out);
    for e in extra {
        args.push(e);
    }
    let r = reshard(&args);
    assert_eq!(r.code, 0, "{name} tp {tp}: {}", r.stderr);
    assert!(r.stderr.is_empty(), "no terminal noise when stderr is not a terminal: {}", r.stderr);
    let want = expected(&read_checkpoint(&src), &config(&src), tp);
    for (rank, w) in want.iter().enumerate() {
        assert_rank_eq(&format!("{name} tp {tp}"), rank, &read_rank(&out, rank), w);
    }
    assert!(!out.join(format!("model-rank-{tp}-part-0.safetensors")).exists());
    tmp
}

pub fn valid_tps(name: &str) -> Vec<usize> {
    (1..=16).filter(|tp| reshard(&[&"plan", &fixture(name), &"--tp", &tp.to_string()]).code == 0).collect()
}

#[test]
fn bart_tiny_every_tp() {
    assert_eq!(valid_tps("bart-tiny"), [1, 2, 4]);
    for tp in [1, 2, 4] {
        check("bart-tiny", tp, contract::bart, &[]);
    }
}

#[test]
fn bart_awkward_every_tp() {
    // d_model 96, 6 heads; vocab and positions pad to 192 rows, so 3 and 6 divide too.
    assert_eq!(valid_tps("bart-awkward"), [1, 2, 3, 6]);
    for tp in [1, 2, 3, 6] {
        check("bart-awkward", tp, contract::bart, &[]);
    }
}

#[test]
fn bart_mixed_heads_every_tp() {
    // 4 encoder heads, 6 decoder heads.
    assert_eq!(valid_tps("bart-mixed-heads"), [1, 2]);
    for tp in [1, 2] {
        check("bart-mixed-heads", tp, contract::bart, &[]);
    }
}

#[test]
fn mbart_tiny_every_tp() {
    // Issue #17: a family added as one mapping file. BART's layout plus the final layer norms,
    // replicated; no engine target, so no engine buffers.
    assert_eq!(valid_tps("mbart-tiny"), [1, 2, 4]);
    for tp in [1, 2, 4] {
        check("mbart-tiny", tp, contract::bart_weights, &[]);
    }
    let r = reshard(&[&"plan", &fixture("mbart-tiny"), &"--tp", &"2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("family mbart (built-in mbart.json)"), "{}", r.stdout);
    assert!(r.stdout.contains("target: none. No vLLM target."), "{}", r.stdout);
    assert!(r.stdout.contains("`model.decoder.layer_norm.weight`"), "{}", r.stdout);
}

#[test]
fn copies_non_weight_files_and_writes_a_manifest() {
    let tmp = check("bart-tiny", 2, contract::bart, &[]);
    let out = tmp.path().join("out");
    for f in ["config.json", "tokenizer_config.json"] {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(fixture("bart-tiny").join(f)).unwrap(), "{f}");
    }
    let names: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n == "model.safetensors"));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("reshard-manifest.json")).unwrap()).unwrap();
    assert_eq!(m["format_version"], 1);
    assert_eq!(m["tp"], 2);
    assert_eq!(m["family"], "bart");
    for f in m["files"].as_array().unwrap() {
        let bytes = std::fs::read(out.join(f["name"].as_str().unwrap())).unwrap();
        assert_eq!(f["size"].as_u64().unwrap(), bytes.len() as u64);
        assert_eq!(f["crc32"].as_str().unwrap(), format!("{:08x}", crc32fast::hash(&bytes)));
    }
    // Provenance: the fused qkv of rank 1 names its three sources and exact slices.
    let t = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["rank"] == 1)
        .flat_map(|f| f["tensors"].as_array().unwrap())
        .find(|t| t["name"] == "model.encoder.layers.0.self_attn.qkv_proj.weight")
        .unwrap();
    let srcs: Vec<&str> = t["pieces"].as_array().unwrap().iter().map(|p| p["source"].as_str().unwrap()).collect();
    assert_eq!(
        srcs,
        [
            "model.encoder.layers.0.self_attn.q_proj.weight",
            "model.encoder.layers.0.self_attn.k_proj.weight",
            "model.encoder.layers.0.self_attn.v_proj.weight"
        ]
    );
    assert_eq!(t["pieces"][1]["start"], 16);
    assert_eq!(t["pieces"][1]["end"], 32);
    // No staging directory left behind.
    let leftovers: Vec<_> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n != "out").collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn max_part_size_splits_into_parts() {
    let tmp = check("bart-tiny", 2, contract::bart, &["--max-part-size", "20KiB"]);
    let out = tmp.path().join("out");
    let parts = (0..).take_while(|p| out.join(format!("model-rank-0-part-{p}.safetensors")).exists()).count();
    assert!(parts > 3, "{parts} parts");
    for p in 0..parts {
        let f = out.join(format!("model-rank-0-part-{p}.safetensors"));
        let tensors = read_file(&f);
        let data: usize = tensors.values().map(|t| t.data.len()).sum();
        assert!(data <= 20 * 1024 || tensors.len() == 1, "part {p}: {data} bytes in {} tensors", tensors.len());
    }
}

#[test]
fn output_is_byte_reproducible() {
    let a = check("bart-tiny", 2, contract::bart, &[]);
    let b = check("bart-tiny", 2, contract::bart, &[]);
    for name in ["model-rank-0-part-0.safetensors", "model-rank-1-part-0.safetensors", "reshard-manifest.json"] {
        let read = |d: &Path| std::fs::read(d.join("out").join(name)).unwrap();
        assert_eq!(read(a.path()), read(b.path()), "{name}");
    }
}

#[test]
fn force_replaces_only_with_force() {
    let tmp = check("bart-tiny", 1, contract::bart, &[]);
    let out = tmp.path().join("out");
    let r = reshard(&[&"convert", &fixture("bart-tiny"), &"--tp", &"2", &"--out", &out]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains("already exists") && r.stderr.contains("--force"), "{}", r.stderr);
    assert!(
        out.join("model-rank-0-part-0.safetensors").exists() && !out.join("model-rank-1-part-0.safetensors").exists()
    );
    let r = reshard(&[&"convert", &fixture("bart-tiny"), &"--tp", &"2", &"--out", &out, &"--force"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(out.join("model-rank-1-part-0.safetensors").exists());
}

#[test]
fn json_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let r = reshard(&[&"convert", &fixture("bart-tiny"), &"--tp", &"2", &"--out", &out, &"--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["written"]["files"].as_array().unwrap().len(), 2);
    assert!(v["written"]["copied"].as_array().unwrap().iter().any(|c| c == "config.json"));
    assert!(v["verify"].is_null());
}

/// The two write paths (through the page cache, and around it with O_DIRECT, the default when
/// output is fsynced) give the same files: casts (gathers), vocabulary padding and synthesized
/// zeros, files split into parts that end off the 4 KiB grid, and files of several 4 MiB blocks.
/// Issue #18: long runs read around the page cache (`RESHARD_READ=direct`, into aligned blocks, by
/// a read-ahead thread) give the same bytes as reads through it, uncast and cast, at every tp. The
/// input is bart-tiny with a vocabulary of 40001, so that the embeddings and the LM head are runs
/// of over 1 MiB that start off the 4 KiB grid (the engine's long-run path), and the file ends off
/// it too.
#[test]
fn direct_and_cached_reads_agree() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let src = tmp.path().join("bart-big-vocab");
    copy_dir(&fixture("bart-tiny"), &src);
    let mut cfg = config(&src);
    let old = uint(&cfg, "vocab_size");
    let vocab = 40_001;
    cfg["vocab_size"] = vocab.into();
    std::fs::write(src.join("config.json"), serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let mut tensors = read_checkpoint(&src);
    for (name, t) in tensors.iter_mut() {
        if let Some(d) = t.shape.iter().position(|&d| d == old) {
            t.shape[d] = vocab;
            let n = t.shape.iter().product::<usize>() * 4;
            let seed = name.len();
            t.data = (0..n).map(|i| (i * 131 + i / 4093 + seed) as u8).collect();
        }
    }
    write_checkpoint(&src.join("model.safetensors"), &tensors);
    for (tp, extra) in [("1", None), ("2", None), ("4", Some("bf16")), ("2", Some("f16"))] {
        let outs = ["direct", "cached"].map(|mode| {
            let out = tmp.path().join(format!("{mode}-{tp}-{}", extra.unwrap_or("same")));
            let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"convert", &src, &"--tp", &tp, &"--out", &out];
            if let Some(d) = &extra {
                args.extend([&"--dtype" as &dyn AsRef<std::ffi::OsStr>, d]);
            }
            let r = reshard_env(&[("RESHARD_READ", mode), ("RESHARD_WRITE", "direct")], &args);
            assert_eq!(r.code, 0, "tp {tp} {mode}: {}", r.stderr);
            out
        });
        let names = names_in(&outs[0]);
        assert_eq!(names, names_in(&outs[1]), "tp {tp}: the same files");
        for n in &names {
            let read = |d: &Path| std::fs::read(d.join(n)).unwrap();
            assert!(read(&outs[0]) == read(&outs[1]), "tp {tp} {extra:?}: {n} differs between direct and cached reads");
        }
        let v = reshard(&[&"verify", &src, &outs[0], &"--no-forward"]);
        assert_eq!(v.code, 0, "tp {tp}: {}", v.stdout);
    }
}

#[test]
fn direct_and_buffered_writes_agree() {
    let cases: [(&str, &str, &[&str]); 4] = [
        ("bart-tiny", "2", &[]),
        ("whisper-tiny", "2", &["--dtype", "bf16"]),
        ("mllama-gqa", "4", &["--max-part-size", "100KiB"]),
        ("mllama-sharded", "1", &["--dtype", "f32"]),
    ];
    for (name, tp, extra) in cases {
        // On the checkout's disk, where O_DIRECT works (a tmpfs /tmp may refuse it).
        let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let outs = ["direct", "buffered"].map(|mode| {
            let (src, out) = (fixture(name), tmp.path().join(mode));
            let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"convert", &src, &"--tp", &tp, &"--out", &out];
            args.extend(extra.iter().map(|e| e as &dyn AsRef<std::ffi::OsStr>));
            let r = reshard_env(&[("RESHARD_WRITE", mode)], &args);
            assert_eq!(r.code, 0, "{name} {mode}: {}", r.stderr);
            out
        });
        let list = |d: &Path| {
            let mut names: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
            names.sort();
            names
        };
        let names = list(&outs[0]);
        assert_eq!(names, list(&outs[1]), "{name}: the same files");
        assert!(names.len() > 2, "{name}: {names:?}");
        for n in &names {
            let read = |d: &Path| std::fs::read(d.join(n)).unwrap();
            assert!(read(&outs[0]) == read(&outs[1]), "{name}: {n:?} differs between direct and buffered writes");
        }
        let v = reshard(&[&"verify", &fixture(name), &outs[0], &"--no-forward"]);
        assert_eq!(v.code, 0, "{name}: {}", v.stdout);
    }
}

#[test]
fn no_fsync_writes_the_same_bytes() {
    let a = check("bart-tiny", 2, contract::bart, &["--no-fsync"]);
    let b = check("bart-tiny", 2, contract::bart, &[]);
    for name in ["model-rank-0-part-0.safetensors", "model-rank-1-part-0.safetensors", "reshard-manifest.json"] {
        let read = |d: &Path| std::fs::read(d.join("out").join(name)).unwrap();
        assert_eq!(read(a.path()), read(b.path()), "{name}");
    }
}
