//! Issue #5: `validate` without a usable GPU exits 3 with a one-line reason, never a panic.

use crate::util::*;

#[test]
fn validate_without_a_gpu_is_a_clean_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    assert_eq!(reshard(&[&"convert", &fixture("bart-tiny"), &"--tp", &"2", &"--out", &out]).code, 0);
    for args in [
        vec![&"validate" as &dyn AsRef<std::ffi::OsStr>, &fixture("bart-tiny"), &out],
        vec![&"validate", &"--shape", &"mllama-11b", &"--tp", &"16", &"--dtype", &"bf16"],
    ] {
        let r = reshard(&args);
        if r.code == 0 {
            // A GPU machine: the run must have passed (exit 1 would mean a tolerance failure).
            continue;
        }
        assert_eq!(r.code, 3, "{}", r.stderr);
        assert_eq!(r.stderr.trim_end().lines().count(), 1, "one line: {}", r.stderr);
        if cfg!(feature = "cuda") {
            assert!(r.stderr.contains("no usable"), "{}", r.stderr);
        } else {
            assert!(
                r.stderr.contains("built without GPU support") && r.stderr.contains("--features cuda"),
                "{}",
                r.stderr
            );
        }
        assert!(r.stdout.is_empty());
    }
}

#[test]
fn validate_usage_errors() {
    let r = reshard(&[&"validate"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = reshard(&[&"validate", &"--shape", &"gpt-5"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}

/// Issue #15: `validate --device cpu` runs the whole flow (the same paths as on a GPU, on the CPU
/// implementation of the device interface) on every fixture in f32 and bf16, against the f64
/// reference; in every build.
#[test]
fn validate_on_cpu_every_fixture_f32_and_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, tp) in [
        ("bart-tiny", 4),
        ("bart-awkward", 3),
        ("bart-mixed-heads", 2),
        ("bart-legacy", 2),
        ("whisper-tiny", 2),
        ("mllama-gqa", 8),
        ("mllama-awkward", 6),
        ("mllama-sharded", 2),
    ] {
        let out = tmp.path().join(name);
        let c = reshard(&[&"convert", &fixture(name), &"--tp", &tp.to_string(), &"--out", &out]);
        assert_eq!(c.code, 0, "{name}: {}", c.stderr);
        for dtype in ["f32", "bf16"] {
            let r = reshard(&[
                &"validate",
                &fixture(name),
                &out,
                &"--device",
                &"cpu",
                &"--dtype",
                &dtype,
                &"--tokens",
                &"5",
                &"--source-tokens",
                &"7",
                &"--iters",
                &"1",
                &"--json",
            ]);
            assert_eq!(r.code, 0, "{name} {dtype}: {} {}", r.stdout, r.stderr);
            let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
            assert_eq!(v["ok"], true, "{v:#}");
            assert!(v["device"].as_str().unwrap().starts_with("cpu"), "{v:#}");
            let problems = v["problems"].as_array().unwrap();
            assert!(!problems.is_empty(), "{name}: no cross-attention layer checked");
            for p in problems {
                assert_eq!(p["tp"], tp, "{p:#}");
                let rel = p["split_vs_reference"]["max_rel"].as_f64().unwrap();
                let tol = if dtype == "f32" { 1e-5 } else { 2e-2 };
                assert!(rel <= tol, "{name} {dtype}: {p:#}");
                // The paths really computed something (a zero output would be far off).
                assert!(p["fused_vs_reference"]["max_rel"].as_f64().unwrap() < tol);
            }
        }
    }
}

/// The three real shapes at their real head counts (every tp the test lists, with kv replication
/// at mllama tp 16), at head size 4 and a few tokens so the CPU run stays quick.
#[test]
fn validate_on_cpu_real_shapes_at_reduced_size() {
    for (shape, tps) in
        [("bart-large", &[1, 2, 4, 8][..]), ("whisper-large", &[1, 2, 4, 5]), ("mllama-11b", &[1, 2, 8, 16])]
    {
        for &tp in tps {
            for dtype in ["f32", "bf16"] {
                let r = reshard(&[
                    &"validate",
                    &"--device",
                    &"cpu",
                    &"--shape",
                    &shape,
                    &"--tp",
                    &tp.to_string(),
                    &"--head-dim",
                    &"4",
                    &"--tokens",
                    &"3",
                    &"--source-tokens",
                    &"6",
                    &"--iters",
                    &"1",
                    &"--dtype",
                    &dtype,
                    &"--json",
                ]);
                assert_eq!(r.code, 0, "{shape} tp {tp} {dtype}: {} {}", r.stdout, r.stderr);
                let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
                assert_eq!(v["ok"], true, "{v:#}");
                assert_eq!(v["problems"][0]["tp"], tp);
                assert_eq!(v["problems"][0]["head_dim"], 4);
            }
        }
    }
    // An invalid tp or head size is bad input (exit 2), said before any run.
    let r = reshard(&[&"validate", &"--device", &"cpu", &"--shape", &"whisper-large", &"--tp", &"8"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("does not fit"), "{}", r.stderr);
    let r = reshard(&[&"validate", &"--device", &"cpu", &"--shape", &"bart-large", &"--head-dim", &"65"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("from 1 to 64"), "{}", r.stderr);
    let r = reshard(&[&"validate", &"--device", &"tpu", &"--shape", &"bart-large"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}

/// The three shapes at their full real size (d 1024, 1280, 4096), a few tokens each.
#[test]
fn validate_on_cpu_real_shapes_at_full_size() {
    for (shape, tp, hidden, dtypes) in [
        ("bart-large", 2, 1024, &["f32", "bf16"][..]),
        ("whisper-large", 4, 1280, &["f32", "bf16"]),
        ("mllama-11b", 8, 4096, &["bf16"]),
    ] {
        for dtype in dtypes {
            let r = reshard(&[
                &"validate",
                &"--device",
                &"cpu",
                &"--shape",
                &shape,
                &"--tp",
                &tp.to_string(),
                &"--tokens",
                &"2",
                &"--source-tokens",
                &"3",
                &"--iters",
                &"1",
                &"--dtype",
                dtype,
                &"--json",
            ]);
            assert_eq!(r.code, 0, "{shape} {dtype}: {} {}", r.stdout, r.stderr);
            let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
            assert_eq!(v["ok"], true, "{v:#}");
            assert_eq!(v["problems"][0]["hidden"], hidden);
        }
    }
}
