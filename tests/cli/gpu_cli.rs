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
