//! Issue #14, classes 4 and 5: every dtype is cast correctly, kept, or refused with a clear error;
//! the plan and the manifest state the dtypes the files hold; `verify` checks every dtype
//! `convert` accepts; NaN and infinities fail the forward check instead of passing it.

use crate::util::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A copy of fixture `name` whose tensors went through `edit`, in a temp dir: (dir, src).
fn edited(name: &str, edit: impl FnOnce(&mut BTreeMap<String, T>)) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&fixture(name), &src);
    let mut tensors = read_checkpoint(&src);
    edit(&mut tensors);
    write_checkpoint(&src.join("model.safetensors"), &tensors);
    (tmp, src)
}

fn f32s(t: &T) -> Vec<f32> {
    assert_eq!(t.dtype, "F32");
    t.data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn convert(src: &Path, out: &Path, extra: &[&str]) -> Out {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"convert", &src, &"--tp", &"2", &"--out", &out];
    for e in extra {
        args.push(e);
    }
    reshard(&args)
}

fn verify_json(src: &Path, out: &Path) -> (i32, serde_json::Value) {
    let r = reshard(&[&"verify", &src, &out, &"--json"]);
    let v = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {} {}", r.stdout, r.stderr));
    (r.code, v)
}

// The 8-bit floats, decoded from the OCP FP8 definitions (independently of reshard's decoder).

fn e4m3(b: u8) -> f32 {
    let (s, e, m) = (if b & 0x80 != 0 { -1.0 } else { 1.0 }, (b >> 3) & 15, b & 7);
    match (e, m) {
        (15, 7) => f32::NAN,
        (0, _) => s * m as f32 * 2f32.powi(-9),
        _ => s * (8 + m) as f32 * 2f32.powi(e as i32 - 10),
    }
}

fn e5m2(b: u8) -> f32 {
    let (s, e, m) = (if b & 0x80 != 0 { -1.0 } else { 1.0 }, (b >> 2) & 31, b & 3);
    match (e, m) {
        (31, 0) => s * f32::INFINITY,
        (31, _) => f32::NAN,
        (0, _) => s * m as f32 * 2f32.powi(-16),
        _ => s * (4 + m) as f32 * 2f32.powi(e as i32 - 17),
    }
}

/// `v` rounded to the nearest finite code of an 8-bit float (ties to the even code), by search.
fn to_f8(v: f32, decode: fn(u8) -> f32) -> u8 {
    let mut best = (f32::INFINITY, 0u8);
    for b in 0..=255u8 {
        let d = decode(b);
        if !d.is_finite() {
            continue;
        }
        let err = (d - v).abs();
        if err < best.0 || (err == best.0 && b & 1 == 0 && best.1 & 1 == 1) {
            best = (err, b);
        }
    }
    best.1
}

/// Every F32 tensor of `tensors` as the 8-bit float `dtype`.
fn all_to_f8(tensors: &mut BTreeMap<String, T>, dtype: &str) {
    let decode = if dtype == "F8_E4M3" { e4m3 } else { e5m2 };
    for t in tensors.values_mut() {
        t.data = f32s(t).iter().map(|&v| to_f8(v, decode)).collect();
        t.dtype = dtype.into();
    }
}

/// The first source tensor of a manifest tensor's pieces (`None`: a constant).
fn source_of(t: &serde_json::Value) -> Option<String> {
    t["pieces"].as_array().unwrap().iter().find(|p| p["kind"] == "copy").map(|p| p["source"].as_str().unwrap().into())
}

/// Asserts that every file's header holds exactly the manifest's tensors, dtypes and shapes,
/// and that `plan --json` with the same options states the same; returns the manifest.
fn headers_agree_with_manifest(src: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("reshard-manifest.json")).unwrap()).unwrap();
    for f in m["files"].as_array().unwrap() {
        let name = f["name"].as_str().unwrap();
        let held = read_file(&out.join(name));
        let listed = f["tensors"].as_array().unwrap();
        assert_eq!(held.len(), listed.len(), "{name}");
        for t in listed {
            let n = t["name"].as_str().unwrap();
            let h = held.get(n).unwrap_or_else(|| panic!("{name}: {n} is in the manifest but not the file"));
            assert_eq!(t["dtype"], h.dtype.as_str(), "{name}: {n}: the manifest's dtype is not the file's");
            assert_eq!(t["shape"], serde_json::json!(h.shape), "{name}: {n}");
            assert_eq!(t["nbytes"], h.data.len(), "{name}: {n}");
        }
    }
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"plan", &src, &"--tp", &"2", &"--json"];
    for e in extra {
        args.push(e);
    }
    let p = reshard(&args);
    assert_eq!(p.code, 0, "{}", p.stderr);
    let plan: serde_json::Value = serde_json::from_str(&p.stdout).unwrap();
    let tensors = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v["files"].as_array().unwrap().iter().map(|f| f["tensors"].clone()).collect()
    };
    assert_eq!(tensors(&plan), tensors(&m), "plan --json and the manifest disagree");
    assert_eq!(plan["dtype"], m["dtype"]);
    m
}

#[test]
fn issue14_f8_sources_keep_their_dtype_and_refuse_a_cast() {
    for dtype in ["F8_E4M3", "F8_E5M2"] {
        let (tmp, src) = edited("bart-tiny", |t| all_to_f8(t, dtype));
        // Without --dtype: bytes as they are, and verify checks them, forward check included.
        let out = tmp.path().join("out");
        let r = convert(&src, &out, &[]);
        assert_eq!(r.code, 0, "{dtype}: {}", r.stderr);
        let m = headers_agree_with_manifest(&src, &out, &[]);
        for t in m["files"].as_array().unwrap().iter().flat_map(|f| f["tensors"].as_array().unwrap()) {
            let want = if source_of(t).is_some() { dtype } else { "F32" };
            assert_eq!(t["dtype"], want, "{t}");
        }
        let (code, v) = verify_json(&src, &out);
        assert_eq!(code, 0, "{dtype}: {v:#}");
        let layers = v["forward"].as_array().unwrap();
        assert_eq!(layers.len(), 2, "{v:#}");
        for l in layers {
            assert_eq!(l["source_dtype"], dtype, "{l}");
            assert_eq!(l["shard_dtype"], dtype, "{l}");
            assert_eq!(l["skipped"], serde_json::Value::Null, "{l}");
            assert!(l["max_rel_err"].as_f64().unwrap() < 1e-12, "{l}");
        }
        assert!(
            v["dtypes"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!({"source": dtype, "output": dtype, "tensors": 74})),
            "{v:#}"
        );
        let human = reshard(&[&"verify", &src, &out]);
        assert!(human.stdout.contains(&format!("{dtype} as is (74)")), "{}", human.stdout);

        // With --dtype: refused before anything is written, naming a tensor and its dtype.
        for to in ["bf16", "f16", "f32"] {
            let out = tmp.path().join(format!("out-{to}"));
            let r = convert(&src, &out, &["--dtype", to]);
            assert_eq!(r.code, 2, "{dtype} --dtype {to}: {}", r.stderr);
            for needle in [
                format!("--dtype {to}: tensor `final_logits_bias` is {dtype}, which --dtype does not cast"),
                "quantized storage".into(),
                "(hint: convert without --dtype".into(),
            ] {
                assert!(r.stderr.contains(&needle), "{needle:?} not in {}", r.stderr);
            }
            assert!(!out.exists(), "a refused cast left {}", out.display());
            let p = reshard(&[&"plan", &src, &"--tp", &"2", &"--dtype", &to]);
            assert_eq!(p.code, 2, "plan --dtype {to}: {}", p.stderr);
            assert!(p.stderr.contains(&format!("is {dtype}, which --dtype does not cast")), "{}", p.stderr);
        }

        // An output of an older reshard, which kept F8 under --dtype bf16 and said BF16.
        let mpath = out.join("reshard-manifest.json");
        let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
        m["dtype"] = "BF16".into();
        std::fs::write(&mpath, m.to_string()).unwrap();
        let (code, v) = verify_json(&src, &out);
        assert_eq!(code, 1, "{v:#}");
        let f = &v["findings"][0];
        assert_eq!(f["kind"], "manifest", "{v:#}");
        assert!(f["message"].as_str().unwrap().contains("says the output was cast to BF16, but"), "{f}");
    }
}

/// A bart-tiny with F64, F16, BF16 and I8 tensors beside its F32 ones.
fn mixed_source() -> (tempfile::TempDir, PathBuf) {
    edited("bart-tiny", |t| {
        let mut set = |name: &str, dtype: &str, f: &dyn Fn(f32) -> Vec<u8>| {
            let x = t.get_mut(name).unwrap();
            x.data = f32s(x).into_iter().flat_map(f).collect();
            x.dtype = dtype.into();
        };
        set("model.decoder.layers.0.fc1.weight", "F64", &|v| f64::from(v).to_le_bytes().to_vec());
        set("model.decoder.layers.0.fc2.weight", "F16", &|v| half::f16::from_f32(v).to_le_bytes().to_vec());
        set("model.encoder.layers.0.final_layer_norm.weight", "BF16", &|v| {
            half::bf16::from_f32(v).to_le_bytes().to_vec()
        });
        // An integer cross-attention weight (as quantized data would be): kept, and its layer
        // skipped by the forward check.
        set("model.decoder.layers.1.encoder_attn.q_proj.weight", "I8", &|v| vec![(v * 1000.0) as i8 as u8]);
    })
}

#[test]
fn issue14_manifest_and_plan_state_the_dtypes_the_files_hold() {
    let (tmp, src) = mixed_source();
    let source = read_checkpoint(&src);
    for to in [None, Some("bf16"), Some("f16"), Some("f32")] {
        let out = tmp.path().join(format!("out-{}", to.unwrap_or("none")));
        let extra: Vec<&str> = to.map(|d| vec!["--dtype", d]).unwrap_or_default();
        let r = convert(&src, &out, &extra);
        assert_eq!(r.code, 0, "{to:?}: {}", r.stderr);
        let m = headers_agree_with_manifest(&src, &out, &extra);
        assert_eq!(m["dtype"], serde_json::json!(to.map(str::to_uppercase)));
        // Floats are cast, the integer is kept, constants are written as the mapping says.
        for t in m["files"].as_array().unwrap().iter().flat_map(|f| f["tensors"].as_array().unwrap()) {
            let want = match source_of(t) {
                None => "F32".to_string(),
                Some(s) if source[&s].dtype == "I8" => "I8".into(),
                Some(s) => to.map(str::to_uppercase).unwrap_or_else(|| source[&s].dtype.clone()),
            };
            assert_eq!(t["dtype"], want.as_str(), "--dtype {to:?}: {}", t["name"]);
        }
        let (code, v) = verify_json(&src, &out);
        assert_eq!(code, 0, "--dtype {to:?}: {v:#}");
        assert!(v["dtypes"].as_array().unwrap().iter().any(|d| d["source"] == "I8" && d["output"] == "I8"), "{v:#}");
        let layers = v["forward"].as_array().unwrap();
        assert_eq!(layers[0]["skipped"], serde_json::Value::Null, "{v:#}");
        let why = layers[1]["skipped"].as_str().unwrap_or_else(|| panic!("layer 1 is not skipped: {v:#}"));
        assert!(why.contains("`model.decoder.layers.1.encoder_attn.q_proj.weight` is I8, not a float type"), "{why}");
        assert!(why.contains("bytes were compared"), "{why}");
        let human = reshard(&[&"verify", &src, &out]);
        assert!(
            human.stdout.contains("skipped: `model.decoder.layers.1.encoder_attn.q_proj.weight` is I8"),
            "{}",
            human.stdout
        );
    }
}

/// The f32 values of output tensor `name` over all ranks that are not finite.
fn non_finite_in_output(out: &Path, name: &str) -> Vec<u32> {
    (0..2).flat_map(|r| f32s(&read_rank(out, r)[name])).filter(|v| !v.is_finite()).map(f32::to_bits).collect()
}

#[test]
fn issue14_nan_or_inf_in_a_cross_attention_weight_fails_the_forward_check() {
    let cases = [
        (
            "model.decoder.layers.0.encoder_attn.q_proj.weight",
            f32::NAN,
            "model.decoder.layers.0.encoder_attn.q_proj.weight",
            "model.decoder.layers.0.encoder_attn",
        ),
        (
            "model.decoder.layers.1.encoder_attn.v_proj.weight",
            f32::INFINITY,
            "model.decoder.layers.1.encoder_attn.kv_proj.weight",
            "model.decoder.layers.1.encoder_attn",
        ),
        (
            "model.decoder.layers.0.encoder_attn.out_proj.bias",
            f32::NEG_INFINITY,
            "model.decoder.layers.0.encoder_attn.out_proj.bias",
            "model.decoder.layers.0.encoder_attn",
        ),
    ];
    for (tensor, value, output, module) in cases {
        let (tmp, src) = edited("bart-tiny", |t| {
            let x = t.get_mut(tensor).unwrap();
            x.data[20..24].copy_from_slice(&value.to_le_bytes());
        });
        // convert copies the value bit for bit: it is a byte-level tool.
        let out = tmp.path().join("out");
        let r = convert(&src, &out, &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let found = non_finite_in_output(&out, output);
        assert!(!found.is_empty() && found.iter().all(|&b| b == value.to_bits()), "{tensor}: {found:x?}");
        // verify: the bytes are right, the forward check fails and names the weight.
        let (code, v) = verify_json(&src, &out);
        assert_eq!(code, 1, "{tensor}: {v:#}");
        let findings = v["findings"].as_array().unwrap();
        assert!(findings.iter().all(|f| f["kind"] == "forward"), "{tensor}: only the forward check fails: {v:#}");
        let f = findings.iter().find(|f| f["tensor"] == module).unwrap_or_else(|| panic!("{tensor}: {v:#}"));
        let msg = f["message"].as_str().unwrap();
        assert!(msg.contains("cross-attention output is not finite"), "{msg}");
        assert!(msg.contains(&format!("non-finite weights: `{tensor}`: 1 of")), "{msg}");
        let layer = v["forward"].as_array().unwrap().iter().find(|l| l["module"] == module).unwrap();
        assert_eq!(layer["passed"], false, "{layer}");
        assert!(layer["non_finite_reference"].as_u64().unwrap() > 0, "{layer}");
        assert!(layer["non_finite_shards"].as_u64().unwrap() > 0, "{layer}");
        let human = reshard(&[&"verify", &src, &out]);
        assert_eq!(human.code, 1);
        assert!(human.stdout.contains("FAILED") && !human.stdout.contains("max abs 0.000e0"), "{}", human.stdout);
        // convert --verify does not publish it.
        let out2 = tmp.path().join("out2");
        let r = convert(&src, &out2, &["--verify"]);
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert!(r.stderr.contains("not finite"), "{}", r.stderr);
        assert!(!out2.exists());
    }
}

#[test]
fn issue14_a_cast_that_overflows_to_inf_fails_the_forward_check() {
    // 70000 is finite in F32 and beyond F16's largest value (65504): the cast gives +inf.
    let (tmp, src) = edited("bart-tiny", |t| {
        let x = t.get_mut("model.decoder.layers.0.encoder_attn.v_proj.weight").unwrap();
        x.data[..4].copy_from_slice(&70000f32.to_le_bytes());
    });
    let out = tmp.path().join("out");
    let r = convert(&src, &out, &["--dtype", "f16"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (code, v) = verify_json(&src, &out);
    assert_eq!(code, 1, "{v:#}");
    let findings = v["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 1, "{v:#}");
    let msg = findings[0]["message"].as_str().unwrap();
    assert!(msg.contains("0 value(s) computed from the source and"), "{msg}");
    assert!(msg.contains("rank 0 `model.decoder.layers.0.encoder_attn.kv_proj.weight`: 1 of"), "{msg}");
    assert!(msg.contains("= inf"), "{msg}");
}
