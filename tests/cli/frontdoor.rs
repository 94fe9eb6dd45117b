//! Issue #17: what users meet first: `--json` error objects, argument errors before the GPU,
//! decimal sizes, mapping-family refusal, `--version`, completions and the man page.

use crate::util::*;
use std::ffi::OsStr;
use std::path::Path;

/// The one error object of a failed `--json` run, checked against the exit code.
fn error_object(r: &Out, code: i32) -> serde_json::Value {
    assert_eq!(r.code, code, "stdout {} stderr {}", r.stdout, r.stderr);
    let v: serde_json::Value =
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("one JSON object on stdout: {e}: {}", r.stdout));
    assert_eq!(v["format_version"], 1, "{v:#}");
    assert_eq!(v["ok"], false, "{v:#}");
    assert_eq!(v["exit_code"], code, "{v:#}");
    assert!(v["kind"].as_str().is_some_and(|k| !k.is_empty()), "{v:#}");
    let message = v["message"].as_str().expect("message");
    assert!(r.stderr.contains(message.lines().next().unwrap_or("")), "message also on stderr: {}", r.stderr);
    for k in ["file", "tensor", "key"] {
        assert!(v["culprit"].get(k).is_some(), "culprit.{k}: {v:#}");
    }
    v
}

#[test]
fn json_errors_name_kind_and_culprit() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    // A bad path, for every command.
    let out = tmp.path().join("o");
    for args in [
        vec![&"plan" as &dyn AsRef<OsStr>, &missing, &"--tp", &"2", &"--json"],
        vec![&"convert", &missing, &"--tp", &"2", &"--out", &out, &"--json"],
        vec![&"verify", &missing, &out, &"--json"],
        vec![&"validate", &missing, &out, &"--json"],
    ] {
        let v = error_object(&reshard(&args), 2);
        assert_eq!(v["culprit"]["file"].as_str(), Some(missing.to_str().unwrap()), "{v:#}");
        assert!(Path::new(v["culprit"]["file"].as_str().unwrap()).is_absolute());
    }
    // A tp the model does not allow: the key is the option.
    let v = error_object(&reshard(&[&"plan", &fixture("bart-tiny"), &"--tp", &"3", &"--json"]), 2);
    assert_eq!((v["kind"].as_str(), v["culprit"]["key"].as_str()), (Some("plan.bad_tp"), Some("--tp")));
    // A bad header: the file and the tensor.
    let src = tmp.path().join("src");
    copy_dir(&fixture("bart-tiny"), &src);
    let st = src.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap().replacen("\"F32\"", "\"Q32\"", 1);
    bytes.splice(8..8 + n, header.into_bytes());
    std::fs::write(&st, bytes).unwrap();
    let v = error_object(&reshard(&[&"plan", &src, &"--tp", &"2", &"--json"]), 2);
    assert_eq!(v["culprit"]["file"].as_str(), Some(st.to_str().unwrap()), "{v:#}");
    assert!(v["culprit"]["tensor"].is_string(), "{v:#}");
    // Command-line usage errors, parsed by clap, get one too.
    let v = error_object(&reshard(&[&"plan", &fixture("bart-tiny"), &"--tp", &"x", &"--json"]), 2);
    assert_eq!((v["kind"].as_str(), v["culprit"]["key"].as_str()), (Some("usage.value_validation"), Some("--tp")));
    // Without --json, stdout stays empty.
    let r = reshard(&[&"plan", &fixture("bart-tiny"), &"--tp", &"3"]);
    assert_eq!(r.code, 2);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
}

#[test]
fn validate_json_without_a_gpu_prints_its_error_object() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    assert_eq!(reshard(&[&"convert", &fixture("bart-tiny"), &"--tp", &"2", &"--out", &out]).code, 0);
    let r = reshard(&[&"validate", &fixture("bart-tiny"), &out, &"--json", &"--iters", &"1"]);
    if r.code == 0 {
        return; // a GPU machine
    }
    let v = error_object(&r, 3);
    assert!(v["kind"].as_str().unwrap().starts_with("gpu."), "{v:#}");
}

#[test]
fn argument_errors_come_before_the_gpu() {
    let tmp = tempfile::tempdir().unwrap();
    // SOURCE fine, OUT missing: exit 2 in every build, GPU or not.
    let r = reshard(&[&"validate", &fixture("bart-tiny"), &"nope"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("`nope`"), "{}", r.stderr);
    // OUT is not an output.
    let r = reshard(&[&"validate", &fixture("bart-tiny"), &tmp.path()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = reshard(&[&"validate", &"nope", &tmp.path()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    // Bad --layers and a --tp the preset does not allow.
    let r = reshard(&[&"validate", &"--shape", &"bart-large", &"--tp", &"7"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--tp 7"), "{}", r.stderr);
    let out = tmp.path().join("out");
    assert_eq!(reshard(&[&"convert", &fixture("bart-tiny"), &"--tp", &"2", &"--out", &out]).code, 0);
    let r = reshard(&[&"validate", &fixture("bart-tiny"), &out, &"--layers", &"x"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}

#[test]
fn decimal_part_sizes() {
    let r = reshard(&[&"plan", &fixture("bart-tiny"), &"--tp", &"2", &"--max-part-size", &"0.1MB", &"--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["max_part_size"], 100_000, "{}", r.stdout);
    let r = reshard(&[&"plan", &fixture("bart-tiny"), &"--tp", &"2", &"--max-part-size", &"1.5GB"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = reshard(&[&"plan", &fixture("bart-tiny"), &"--tp", &"2", &"--max-part-size", &"1.5 parsecs"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("unknown unit `parsecs`"), "{}", r.stderr);
}

#[test]
fn a_mapping_for_another_model_type_is_refused_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&fixture("bart-tiny"), &src);
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap().replace("\"bart\"", "\"mbart\"");
    std::fs::write(src.join("config.json"), cfg).unwrap();
    let bart = Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings/bart.json");
    let r = reshard(&[&"plan", &src, &"--tp", &"2", &"--mapping", &bart]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("`mbart`") && r.stderr.contains("--force-mapping"), "{}", r.stderr);
    let r = reshard(&[&"plan", &src, &"--tp", &"2", &"--mapping", &bart, &"--force-mapping"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The bundled mapping is found by model_type; an mbart config without --mapping is not bart.
    let out = tmp.path().join("out");
    let r = reshard(&[&"convert", &src, &"--tp", &"2", &"--out", &out, &"--mapping", &bart]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(!out.exists());
    let r = reshard(&[&"verify", &src, &out, &"--mapping", &bart]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--force-mapping"), "{}", r.stderr);
}

#[test]
fn convert_json_has_a_format_version_and_absolute_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().canonicalize().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_reshard"));
    cmd.current_dir(&dir).args(["convert"]).arg(fixture("bart-tiny")).args(["--tp", "2", "--out", "rel", "--json"]);
    let r = run(cmd, TIMEOUT);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!((v["format_version"].as_u64(), v["ok"].as_bool()), (Some(1), Some(true)), "{v:#}");
    assert_eq!(v["out"].as_str(), Some(dir.join("rel").to_str().unwrap()), "{v:#}");
    assert_eq!(v["manifest"].as_str(), Some(dir.join("rel/reshard-manifest.json").to_str().unwrap()));
    for f in v["written"]["files"].as_array().unwrap() {
        assert!(Path::new(f["path"].as_str().unwrap()).is_file(), "{f}");
    }
}

#[test]
fn verify_without_forward_does_not_claim_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let r = reshard(&[&"convert", &fixture("bart-tiny"), &"--tp", &"2", &"--out", &out, &"--verify", &"--no-forward"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stdout.contains("0 cross-attention layer(s) within tolerance"), "{}", r.stdout);
    assert!(r.stdout.contains("cross-attention forward not checked"), "{}", r.stdout);
    assert!(r.stderr.is_empty(), "no bar off a terminal: {}", r.stderr);
    let r = reshard(&[&"convert", &fixture("bart-tiny"), &"--tp", &"2", &"--out", &out, &"--force", &"--verify"]);
    assert!(r.stdout.contains("2 cross-attention layer(s) within tolerance"), "{}", r.stdout);
    let r = reshard(&[&"verify", &fixture("bart-tiny"), &out]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.is_empty(), "no bar off a terminal: {}", r.stderr);
}

#[test]
fn version_completions_and_man_page() {
    let r = reshard(&[&"--version"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.starts_with(&format!("reshard {}", env!("CARGO_PKG_VERSION"))), "{}", r.stdout);
    assert!(r.stdout.contains("mapping files of format_version 1"), "{}", r.stdout);
    for shell in ["bash", "zsh", "fish"] {
        let r = reshard(&[&"completions", &shell]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(r.stdout.contains("convert") && r.stdout.contains("max-part-size"), "{shell}");
    }
    assert_eq!(reshard(&[&"completions", &"tcsh"]).code, 2);
    let r = reshard(&[&"man"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.starts_with(".ie") || r.stdout.contains(".TH reshard 1"),
        "{}",
        &r.stdout[..200.min(r.stdout.len())]
    );
    assert!(r.stdout.contains("convert"));
    // Hidden from the help: tools, not part of the daily interface.
    let r = reshard(&[&"--help"]);
    assert!(!r.stdout.contains("completions"), "{}", r.stdout);
}

/// Runs `reshard args` with stderr on a pseudo-terminal `cols` columns wide; returns the exit code
/// and everything written to the terminal.
#[cfg(target_os = "linux")]
fn on_a_terminal(cols: u16, args: &[&dyn AsRef<OsStr>]) -> (i32, String) {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize { ws_row: 24, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: openpty writes two descriptors into the given ints; the name pointer may be null.
    let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned here alone.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_reshard"));
    cmd.args(args.iter().map(|a| a.as_ref()))
        .env_remove("NO_COLOR")
        .env("TERM", "xterm")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(slave));
    let mut child = cmd.spawn().unwrap();
    // The parent's copy of the slave went into the Command and is closed when it is dropped.
    drop(cmd);
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::from(master);
        let mut v = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the child, the slave's last holder, has exited.
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            v.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&v).into_owned()
    });
    let status = child.wait().unwrap();
    (status.code().unwrap_or(-1), reader.join().unwrap())
}

#[cfg(target_os = "linux")]
#[test]
fn progress_bar_on_a_terminal_is_labelled_and_fits_50_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let (code, screen) =
        on_a_terminal(50, &[&"convert", &fixture("bart-awkward"), &"--tp", &"2", &"--out", &out, &"--verify"]);
    assert_eq!(code, 0, "{screen}");
    assert!(screen.contains("writing"), "a labelled bar: {screen:?}");
    // Each drawn line, escape sequences removed, fits in 50 columns.
    let plain: String = {
        let mut s = String::new();
        let mut chars = screen.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // CSI: ESC [ params final-byte
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                continue;
            }
            s.push(c);
        }
        s
    };
    // (indicatif pads a line with spaces to the width, to overwrite the last one: never beyond it.)
    for line in plain.split(['\r', '\n']) {
        assert!(line.trim_end().chars().count() < 50, "{} columns: {line:?}", line.chars().count());
        assert!(line.chars().count() <= 50, "{} columns: {line:?}", line.chars().count());
    }
    assert!(plain.contains("verifying") || plain.contains("forward check"), "{plain:?}");
    // --quiet and --json: nothing on the terminal.
    let (code, screen) =
        on_a_terminal(50, &[&"convert", &fixture("bart-tiny"), &"--tp", &"2", &"--out", &out, &"--force", &"--quiet"]);
    assert_eq!(code, 0);
    assert!(screen.is_empty(), "{screen:?}");
    let (code, screen) = on_a_terminal(50, &[&"verify", &fixture("bart-awkward"), &tmp.path().join("none"), &"--json"]);
    assert_eq!(code, 2);
    assert!(screen.starts_with("error: ") && !screen.contains("verifying"), "{screen:?}");
}
