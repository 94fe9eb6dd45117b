//! GPU tests (`cargo test --features cuda --test gpu`). On a machine with a GPU they run
//! `validate` on every fixture and on the real-size shapes and require every result within
//! tolerance; on a machine without one they require the clean "no usable ..." error (exit 3).

use std::path::Path;
use std::process::Command;

fn reshard(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_reshard")).args(args).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(!err.contains("panicked"), "{err}");
    (o.status.code().unwrap_or(-1), out, err)
}

fn have_gpu() -> bool {
    match reshard::gpu::Gpu::new() {
        Ok(g) => {
            eprintln!("GPU: {}", g.device_name());
            true
        }
        Err(e) => {
            eprintln!("no GPU here ({e}); checking the clean error path");
            assert!(matches!(e, reshard::gpu::GpuError::Unavailable { .. }), "{e}");
            false
        }
    }
}

#[test]
fn validate_fixtures_and_real_shapes() {
    let gpu = have_gpu();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    for (name, tp) in [
        ("bart-tiny", 4),
        ("bart-awkward", 3),
        ("bart-mixed-heads", 2),
        ("whisper-tiny", 2),
        ("mllama-gqa", 8),
        ("mllama-awkward", 6),
    ] {
        let src = root.join("fixtures").join(name);
        let out = tmp.path().join(name);
        let (code, _, err) =
            reshard(&["convert", src.to_str().unwrap(), "--tp", &tp.to_string(), "--out", out.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        for dtype in ["f32", "bf16"] {
            let (code, stdout, err) = reshard(&[
                "validate",
                src.to_str().unwrap(),
                out.to_str().unwrap(),
                "--dtype",
                dtype,
                "--json",
                "--iters",
                "5",
            ]);
            if !gpu {
                assert_eq!(code, 3, "{err}");
                assert!(err.contains("no usable"), "{err}");
                continue;
            }
            assert_eq!(code, 0, "{name} {dtype}: {stdout} {err}");
            let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            assert_eq!(v["ok"], true, "{v:#}");
        }
    }
    for (shape, tp) in [("bart-large", 2), ("whisper-large", 4), ("mllama-11b", 16)] {
        let (code, stdout, err) =
            reshard(&["validate", "--shape", shape, "--tp", &tp.to_string(), "--json", "--iters", "10"]);
        if !gpu {
            assert_eq!(code, 3, "{err}");
            continue;
        }
        assert_eq!(code, 0, "{shape}: {stdout} {err}");
    }
}

/// `--device cpu` works in a cuda build too, GPU or not.
#[test]
fn validate_device_cpu_in_a_cuda_build() {
    let (code, stdout, err) = reshard(&[
        "validate",
        "--device",
        "cpu",
        "--shape",
        "mllama-11b",
        "--tp",
        "4",
        "--head-dim",
        "8",
        "--tokens",
        "3",
        "--source-tokens",
        "5",
        "--iters",
        "1",
        "--json",
    ]);
    assert_eq!(code, 0, "{stdout} {err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["ok"], true, "{v:#}");
}
