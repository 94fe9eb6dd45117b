//! Issue #16: resharding from shards (tp a to tp b), merging back to a Hugging Face checkpoint,
//! partial outputs (`--ranks`), and the checks on a sharded input.

use crate::util::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every fixture directory.
fn fixtures() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(fixture(""))
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            e.path().join("config.json").exists().then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect();
    v.sort();
    assert!(v.len() >= 11, "{v:?}");
    v
}

fn valid_tps(name: &str, max: usize) -> Vec<usize> {
    reshard::Source::new(fixture(name)).read().unwrap().resolve().unwrap().valid_tps(max)
}

fn convert_to(src: &Path, out: &Path, tp: usize, extra: &[&str]) {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"convert", &src, &"--out", &out, &"--quiet"];
    let tp = tp.to_string();
    args.extend([&"--tp" as &dyn AsRef<std::ffi::OsStr>, &tp]);
    args.extend(extra.iter().map(|e| e as &dyn AsRef<std::ffi::OsStr>));
    let r = reshard(&args);
    assert_eq!(r.code, 0, "convert {} --tp {tp}: {}", src.display(), r.stderr);
}

/// Every file of `a` but the manifest is in `b` with the same bytes, and `b` has no other.
fn assert_same_files(label: &str, a: &Path, b: &Path) {
    let strip = |v: Vec<String>| v.into_iter().filter(|n| n != "reshard-manifest.json").collect::<Vec<_>>();
    let (na, nb) = (strip(names_in(a)), strip(names_in(b)));
    assert_eq!(na, nb, "{label}: file names");
    for n in &na {
        let (x, y) = (std::fs::read(a.join(n)).unwrap(), std::fs::read(b.join(n)).unwrap());
        if x != y {
            let at = x.iter().zip(&y).position(|(p, q)| p != q).unwrap_or(x.len().min(y.len()));
            panic!("{label}: {n} differs from byte {at} ({} vs {} bytes)", x.len(), y.len());
        }
    }
}

fn without_manifest(dir: &Path, to: &Path) -> PathBuf {
    copy_dir(dir, to);
    std::fs::remove_file(to.join("reshard-manifest.json")).unwrap();
    to.to_owned()
}

fn manifest(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("reshard-manifest.json")).unwrap()).unwrap()
}

/// HF -> tp a -> tp b equals HF -> tp b byte for byte, for every pair of valid tps up to 8, read
/// with the manifest and without it (as a vLLM `save_sharded_state` directory would be); and
/// HF -> tp a -> HF equals HF tensor for tensor.
fn round_trips(name: &str) {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let src = fixture(name);
    let tps = valid_tps(name, 8);
    assert!(tps.len() >= 2, "{name}: {tps:?}");
    let direct = |tp: usize| tmp.path().join(format!("hf-tp{tp}"));
    for &tp in &tps {
        convert_to(&src, &direct(tp), tp, &[]);
    }
    let input = reshard::Source::new(&src).read().unwrap();
    let aliases: Vec<String> = input.resolve().unwrap().aliases.iter().map(|(a, _)| a.clone()).collect();
    let original: BTreeMap<String, T> = read_checkpoint(&src)
        .into_iter()
        .filter(|(n, _)| !aliases.contains(n))
        .map(|(n, t)| (input.mapping.hf_name(&n), t))
        .collect();
    for &a in &tps {
        let bare = without_manifest(&direct(a), &tmp.path().join(format!("bare-tp{a}")));
        for &b in &tps {
            for (label, from) in [("with manifest", direct(a)), ("without manifest", bare.clone())] {
                let out = tmp.path().join(format!("tp{a}-tp{b}"));
                convert_to(&from, &out, b, &[]);
                assert_same_files(&format!("{name}: HF -> tp {a} -> tp {b} ({label})"), &direct(b), &out);
                let m = manifest(&out);
                assert_eq!(m["from_shards"]["tp"], a, "{m}");
                // The fingerprint is the checkpoint's: verify against it holds (fingerprint first).
                if b == tps[0] {
                    assert!(verifies(&src, &out), "{name}: verify tp {a} -> tp {b} against the checkpoint");
                }
                std::fs::remove_dir_all(&out).unwrap();
            }
        }
        // Back to Hugging Face, in one file and in parts of at most 50 kB.
        for part in ["5GB", "50KB"] {
            let hf = tmp.path().join(format!("tp{a}-hf-{part}"));
            let r = reshard(&[&"merge", &bare, &"--out", &hf, &"--max-part-size", &part, &"--quiet"]);
            assert_eq!(r.code, 0, "{name} merge tp {a}: {}", r.stderr);
            let got = read_checkpoint(&hf);
            assert_eq!(got.keys().collect::<Vec<_>>(), original.keys().collect::<Vec<_>>(), "{name} tp {a} {part}");
            for (n, t) in &original {
                assert!(got[n] == *t, "{name}: HF -> tp {a} -> HF: tensor {n} differs");
            }
            let parts = names_in(&hf).iter().filter(|n| n.ends_with(".safetensors")).count();
            let indexed = hf.join("model.safetensors.index.json").exists();
            assert_eq!(indexed, parts > 1, "{name}: {:?}", names_in(&hf));
            assert!(hf.join("config.json").exists(), "side files are copied");
            // verify proves it against the original and against the shards.
            assert!(verifies(&src, &hf), "{name}: verify HF merge against the original");
            assert!(verifies(&bare, &hf), "{name}: verify HF merge against the shards");
        }
    }
    // verify takes a sharded source too.
    let (a, b) = (tps[tps.len() - 1], tps[0]);
    assert!(verifies(&direct(a), &direct(b)), "{name}: verify tp {b} against tp {a} shards");
}

macro_rules! round_trip_tests {
    ($($f:ident: $name:literal),*) => {$(
        #[test]
        fn $f() {
            round_trips($name);
        }
    )*};
}

round_trip_tests!(
    round_trip_bart_tiny: "bart-tiny",
    round_trip_bart_awkward: "bart-awkward",
    round_trip_bart_legacy: "bart-legacy",
    round_trip_bart_mixed_heads: "bart-mixed-heads",
    round_trip_mbart_tiny: "mbart-tiny",
    round_trip_whisper_tiny: "whisper-tiny",
    round_trip_whisper_turbo_tiny: "whisper-turbo-tiny",
    round_trip_whisper_distil_tiny: "whisper-distil-tiny",
    round_trip_mllama_gqa: "mllama-gqa",
    round_trip_mllama_awkward: "mllama-awkward",
    round_trip_mllama_sharded: "mllama-sharded"
);

#[test]
fn every_fixture_is_round_tripped() {
    let tested = [
        "bart-awkward",
        "bart-legacy",
        "bart-mixed-heads",
        "bart-tiny",
        "mbart-tiny",
        "mllama-awkward",
        "mllama-gqa",
        "mllama-sharded",
        "whisper-distil-tiny",
        "whisper-tiny",
        "whisper-turbo-tiny",
    ];
    assert_eq!(fixtures(), tested, "add a round_trip test for the new fixture");
}

/// A tp-`tp` conversion of `name` in a temp dir, with or without its manifest.
fn shards(name: &str, tp: usize, keep_manifest: bool) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = tmp.path().join("shards");
    convert_to(&fixture(name), &out, tp, &[]);
    if !keep_manifest {
        std::fs::remove_file(out.join("reshard-manifest.json")).unwrap();
    }
    (tmp, out)
}

/// Changes the data of tensor `tensor` of `rank` in place with `f` (the file keeps its size, so
/// only the checks on the data can see it).
fn edit_rank(dir: &Path, rank: usize, tensor: &str, f: impl FnOnce(&mut T)) {
    for part in 0.. {
        let p = dir.join(format!("model-rank-{rank}-part-{part}.safetensors"));
        assert!(p.exists(), "{tensor} not found on rank {rank}");
        let mut t = read_file(&p);
        if let Some(x) = t.get_mut(tensor) {
            f(x);
            let mut bytes = std::fs::read(&p).unwrap();
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
            let start = 8 + n + h[tensor]["data_offsets"][0].as_u64().unwrap() as usize;
            bytes[start..start + x.data.len()].copy_from_slice(&x.data);
            std::fs::write(&p, bytes).unwrap();
            return;
        }
    }
}

fn set_f32(t: &mut T, index: usize, v: f32) {
    t.data[index * 4..index * 4 + 4].copy_from_slice(&v.to_le_bytes());
}

/// Converting `dir` fails with exit 2, a message containing every one of `want`, and no output.
fn refused(dir: &Path, tp: usize, want: &[&str]) -> String {
    let out = dir.parent().unwrap().join("out");
    let r = reshard(&[&"convert", &dir, &"--tp", &tp.to_string(), &"--out", &out]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    for w in want {
        assert!(r.stderr.contains(w), "missing {w:?} in: {}", r.stderr);
    }
    assert!(!out.exists(), "nothing may be written");
    let leftovers: Vec<String> =
        names_in(dir.parent().unwrap()).into_iter().filter(|n| n.contains("reshard-tmp")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    r.stderr
}

#[test]
fn padding_rows_must_be_zero() {
    // 42 position rows pad to 64: at tp 4, rank 3 holds only padding.
    let (_t, dir) = shards("bart-tiny", 4, false);
    edit_rank(&dir, 3, "model.encoder.embed_positions.weight", |t| set_f32(t, 2 * 32 + 5, 1.5));
    refused(
        &dir,
        2,
        &["rank 3: tensor `model.encoder.embed_positions.weight`: element [2, 5] should be zero (padding) but is 1.5"],
    );
}

#[test]
fn kv_head_replicas_must_be_identical() {
    // mllama-gqa: 2 kv heads at tp 4, so ranks 0 and 1 hold the same kv head; rows 16..24 of
    // the fused qkv are k (2 q heads of 8 rows first).
    let (_t, dir) = shards("mllama-gqa", 4, true);
    let name = "language_model.model.layers.0.self_attn.qkv_proj.weight";
    edit_rank(&dir, 1, name, |t| set_f32(t, 17 * 64 + 3, 7.0));
    refused(
        &dir,
        2,
        &[&format!("rank 1: tensor `{name}`: element [17, 3] differs from rank 0's copy of `language_model.model.layers.0.self_attn.k_proj.weight`: 7 where it has")],
    );
}

#[test]
fn synthesized_parts_must_be_zero() {
    // Whisper has no k_proj bias: the fused bias's k rows (16..32 at tp 2) are zeros.
    let (_t, dir) = shards("whisper-tiny", 2, false);
    let name = "model.decoder.layers.1.self_attn.qkv_proj.bias";
    edit_rank(&dir, 0, name, |t| set_f32(t, 20, -0.25));
    refused(&dir, 1, &[&format!("rank 0: tensor `{name}`: element [20] should be zero (synthesized k) but is -0.25")]);
}

#[test]
fn tied_copies_must_be_identical() {
    let (_t, dir) = shards("bart-tiny", 2, true);
    let name = "model.encoder.embed_tokens.weight";
    edit_rank(&dir, 1, name, |t| set_f32(t, 5 * 32 + 1, 9.0));
    refused(
        &dir,
        4,
        &[&format!("rank 1: tensor `{name}`: element [5, 1] differs from its tied copy `lm_head.weight`: 9 where")],
    );
}

#[test]
fn replicated_tensors_and_constants_are_checked() {
    let (_t, dir) = shards("bart-tiny", 2, true);
    edit_rank(&dir, 1, "model.decoder.layers.1.final_layer_norm.weight", |t| set_f32(t, 4, 0.0));
    refused(
        &dir,
        1,
        &["rank 1: tensor `model.decoder.layers.1.final_layer_norm.weight`: element [4] differs from rank 0's copy"],
    );
    let (_t, dir) = shards("bart-tiny", 2, true);
    edit_rank(&dir, 1, "model.decoder.layers.0.encoder_attn.attn._k_scale", |t| set_f32(t, 0, 2.0));
    refused(&dir, 2, &["rank 1: tensor `model.decoder.layers.0.encoder_attn.attn._k_scale`: element [] should be the mapping's constant 1 but is 2"]);
}

#[test]
fn a_tp_that_cannot_be_determined_is_refused() {
    // Without a manifest: a gap in the ranks.
    let (_t, dir) = shards("bart-tiny", 4, false);
    std::fs::remove_file(dir.join("model-rank-2-part-0.safetensors")).unwrap();
    refused(
        &dir,
        2,
        &["the tensor-parallel size cannot be determined: files for rank(s) 0-1, 3; rank(s) 2 have no files"],
    );
    // With one: the manifest and the files disagree.
    let (_t, dir) = shards("bart-tiny", 4, true);
    std::fs::remove_file(dir.join("model-rank-3-part-0.safetensors")).unwrap();
    refused(&dir, 2, &["files for rank(s) 0-2, but reshard-manifest.json says tp 4; rank(s) 3 have no files"]);
    // Without one, the last rank missing: the files say tp 3, and the shapes do not fit it.
    let (_t, dir) = shards("bart-tiny", 4, false);
    std::fs::remove_file(dir.join("model-rank-3-part-0.safetensors")).unwrap();
    refused(&dir, 2, &["read as tp 3 (tp 3 from the file names (ranks 0-2; no reshard-manifest.json)"]);
    // A rank number no machine has.
    let (_t, dir) = shards("bart-tiny", 2, false);
    std::fs::write(dir.join(format!("model-rank-{}-part-0.safetensors", usize::MAX)), b"x").unwrap();
    refused(&dir, 1, &[&format!("files for rank(s) 0-1, {}; rank(s) 2-65, ... have no files", usize::MAX)]);
    // Parts with a gap.
    let (_t, dir) = shards("bart-tiny", 2, false);
    std::fs::rename(dir.join("model-rank-1-part-0.safetensors"), dir.join("model-rank-1-part-1.safetensors")).unwrap();
    refused(&dir, 1, &["rank 1 has part 1 where part 0 was expected"]);
    // A weight file that is not a rank file.
    let (_t, dir) = shards("bart-tiny", 2, false);
    std::fs::write(dir.join("extra.safetensors"), b"x").unwrap();
    refused(&dir, 1, &["weight file `extra.safetensors` is not a rank file"]);
}

#[test]
fn shards_that_are_not_a_layout_are_refused() {
    // A tensor removed from one rank.
    let (_t, dir) = shards("whisper-tiny", 2, false);
    let p = dir.join("model-rank-1-part-0.safetensors");
    let mut t = read_file(&p);
    t.remove("model.encoder.layers.0.mlp.fc2.bias").unwrap();
    write_checkpoint(&p, &t);
    refused(&dir, 1, &["rank 1: tensor `model.encoder.layers.0.mlp.fc2.bias` (F32 [32]) is missing"]);
    // A tensor no rule or constant produces.
    let (_t, dir) = shards("whisper-tiny", 2, false);
    let p = dir.join("model-rank-0-part-0.safetensors");
    let mut t = read_file(&p);
    let x = t["model.encoder.layers.0.mlp.fc2.bias"].clone();
    t.insert("model.encoder.layers.0.adapter.bias".into(), x);
    write_checkpoint(&p, &t);
    refused(
        &dir,
        1,
        &["1 rank-0 tensor(s) are neither a target nor a constant", "`model.encoder.layers.0.adapter.bias`"],
    );
    // Shapes that do not fit config.json.
    let (_t, dir) = shards("bart-tiny", 2, false);
    let mut c = config(&dir);
    c["encoder_ffn_dim"] = 96.into();
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    // (the mapping's shape checks give the sources' shapes, so the plan at tp 2 expects 48 rows)
    refused(
        &dir,
        1,
        &[
            "does not hold what a conversion at tp 2 writes",
            "rank 0: tensor `model.encoder.layers.0.fc1.weight` is F32 [32, 32], expected F32 [48, 32]",
        ],
    );
}

#[test]
fn a_vllm_sharded_state_without_manifest_gets_its_target_from_the_buffers() {
    // vllm-0.14 writes the attention scale buffers, vllm-0.10 does not.
    for (target, other) in [("vllm-0.10", "vllm-0.14"), ("vllm-0.14", "vllm-0.10")] {
        let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let a = tmp.path().join("a");
        convert_to(&fixture("whisper-tiny"), &a, 2, &["--target", target]);
        std::fs::remove_file(a.join("reshard-manifest.json")).unwrap();
        let r = reshard(&[&"plan", &a, &"--tp", &"1", &"--json", &"--target", &other]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(v["from_shards"]["target"], target, "{v:#}");
        assert!(v["from_shards"]["how"].as_str().unwrap().contains("from the constant tensors present"), "{v:#}");
        // Converting to the other target gives what converting the checkpoint to it gives.
        let (b, direct) = (tmp.path().join("b"), tmp.path().join("direct"));
        convert_to(&a, &b, 1, &["--target", other]);
        convert_to(&fixture("whisper-tiny"), &direct, 1, &["--target", other]);
        assert_same_files(&format!("{target} -> {other}"), &direct, &b);
    }
}

#[test]
fn partial_outputs_hold_only_their_ranks() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (full, part) = (tmp.path().join("full"), tmp.path().join("part"));
    convert_to(&fixture("mllama-gqa"), &full, 4, &[]);
    let r =
        reshard(&[&"convert", &fixture("mllama-gqa"), &"--tp", &"4", &"--ranks", &"2-3", &"--out", &part, &"--verify"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("ranks written: 2-3 of tp 4"), "{}", r.stdout);
    let files: Vec<String> = names_in(&part).into_iter().filter(|n| n.ends_with(".safetensors")).collect();
    assert_eq!(files, ["model-rank-2-part-0.safetensors", "model-rank-3-part-0.safetensors"]);
    for f in &files {
        assert_eq!(std::fs::read(part.join(f)).unwrap(), std::fs::read(full.join(f)).unwrap(), "{f}");
    }
    let m = manifest(&part);
    assert_eq!(m["ranks"], serde_json::json!([2, 3]), "{m}");
    assert_eq!(m["files"].as_array().unwrap().len(), 2);
    // verify checks those ranks and says so; a missing one is a finding.
    let r = reshard(&[&"verify", &fixture("mllama-gqa"), &part, &"--json"]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["ranks"], serde_json::json!([2, 3]));
    assert!(v["notes"].to_string().contains("a partial output"), "{v:#}");
    std::fs::remove_file(part.join("model-rank-3-part-0.safetensors")).unwrap();
    let r = reshard(&[&"verify", &fixture("mllama-gqa"), &part, &"--json", &"--no-forward"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stdout.contains("\"kind\": \"missing\""), "{}", r.stdout);
    // A partial output is not an input.
    let r = reshard(&[&"convert", &part, &"--tp", &"2", &"--out", &tmp.path().join("x")]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("holds only rank(s) 2-3 of tp 4 (written with --ranks)"), "{}", r.stderr);
    // From shards too, and a rank beyond tp is refused before anything is read.
    let r = reshard(&[&"convert", &full, &"--tp", &"2", &"--ranks", &"1", &"--out", &tmp.path().join("y"), &"--quiet"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let direct = tmp.path().join("direct2");
    convert_to(&fixture("mllama-gqa"), &direct, 2, &[]);
    assert_eq!(
        std::fs::read(tmp.path().join("y/model-rank-1-part-0.safetensors")).unwrap(),
        std::fs::read(direct.join("model-rank-1-part-0.safetensors")).unwrap()
    );
    let r = reshard(&[
        &"convert",
        &fixture("mllama-gqa"),
        &"--tp",
        &"4",
        &"--ranks",
        &"3-4",
        &"--out",
        &tmp.path().join("z"),
    ]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("--ranks: rank 4 is not below tp 4"), "{}", r.stderr);
    assert!(!tmp.path().join("z").exists());
}

#[test]
fn verify_with_a_sharded_source_finds_a_changed_output() {
    let (_t, a) = shards("bart-tiny", 4, true);
    let b = a.parent().unwrap().join("b");
    convert_to(&a, &b, 2, &[]);
    edit_rank(&b, 1, "model.decoder.layers.0.fc2.weight", |t| set_f32(t, 3 * 32 + 20, 5.0));
    let r = reshard(&[&"verify", &a, &b, &"--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let f = v["findings"].as_array().unwrap().iter().find(|f| f["kind"] == "mismatch").expect("a mismatch");
    assert_eq!(f["rank"], 1);
    assert_eq!(f["tensor"], "model.decoder.layers.0.fc2.weight");
    assert_eq!(f["element"], serde_json::json!([3, 20]));
    assert!(f["message"].as_str().unwrap().contains("@rank3"), "{f}");
    // Without findings the forward check runs, with the tp-4 shards as the reference.
    let (_t, a) = shards("mllama-gqa", 4, true);
    let b = a.parent().unwrap().join("b");
    convert_to(&a, &b, 2, &[]);
    let r = reshard(&[&"verify", &a, &b, &"--json"]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["forward"].as_array().unwrap().len(), 2, "cross-attention layers 1 and 3: {v:#}");
    assert!(v["forward"].as_array().unwrap().iter().all(|l| l["passed"] == true), "{v:#}");
    assert!(v["notes"].to_string().contains("reference was computed from the sharded source's own ranks"), "{v:#}");
}

#[test]
fn the_plan_of_a_sharded_input_says_where_it_reads() {
    let (_t, a) = shards("bart-tiny", 4, false);
    let r = reshard(&[&"plan", &a, &"--tp", &"2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("input: shards at tp 4 (tp 4 from the file names"), "{}", r.stdout);
    // A row-parallel weight at tp 2 is gathered from two tp-4 ranks.
    assert!(r.stdout.contains("concat(`model.decoder.layers.0.fc2.weight@rank0`[:, 0..16], `model.decoder.layers.0.fc2.weight@rank1`[:, 0..16])"), "{}", r.stdout);
}

#[test]
fn validate_asks_for_the_checkpoint_not_shards() {
    let (_t, a) = shards("bart-tiny", 2, true);
    let r = reshard(&[&"validate", &a, &a, &"--device", &"cpu"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("is a sharded directory (rank files), which this command does not take"), "{}", r.stderr);
    assert!(r.stderr.contains("reshard merge"), "{}", r.stderr);
}

#[test]
fn casts_from_shards_are_those_of_the_checkpoint() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let p = |n: &str| tmp.path().join(n);
    convert_to(&fixture("bart-tiny"), &p("tp4"), 4, &[]);
    convert_to(&fixture("bart-tiny"), &p("direct-bf16"), 2, &["--dtype", "bf16"]);
    // Cast while resharding ...
    convert_to(&p("tp4"), &p("resharded-bf16"), 2, &["--dtype", "bf16"]);
    assert_same_files("tp 4 -> tp 2 --dtype bf16", &p("direct-bf16"), &p("resharded-bf16"));
    assert!(verifies(&fixture("bart-tiny"), &p("resharded-bf16")));
    // ... or reshard a cast output: the same bytes, and the plan says the original dtypes are gone.
    convert_to(&fixture("bart-tiny"), &p("tp4-bf16"), 4, &["--dtype", "bf16"]);
    convert_to(&p("tp4-bf16"), &p("from-cast"), 2, &[]);
    assert_same_files("tp 4 bf16 -> tp 2", &p("direct-bf16"), &p("from-cast"));
    assert_eq!(manifest(&p("from-cast"))["from_shards"]["cast"], "BF16");
    let r = reshard(&[&"plan", &p("tp4-bf16"), &"--tp", &"2"]);
    assert!(r.stdout.contains("the input was cast to BF16 when it was written"), "{}", r.stdout);
}
