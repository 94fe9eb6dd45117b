//! Test environment: run the real binary, read safetensors with the reference `safetensors`
//! crate, and a tiny row-major tensor type for computing expected shards independently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// How long one run of the binary may take before the test fails: a run that blocks (on a FIFO
/// opened for reading, say) must fail its test, not hang the suite.
pub const TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `reshard args...`; asserts it did not panic (whatever the exit code) and finished within
/// [`TIMEOUT`].
pub fn reshard(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Out {
    reshard_env(&[], args)
}

/// [`reshard`] with variables added to its environment.
pub fn reshard_env(env: &[(&str, &str)], args: &[&dyn AsRef<std::ffi::OsStr>]) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reshard"));
    cmd.args(args.iter().map(|a| a.as_ref())).envs(env.iter().copied());
    run(cmd, TIMEOUT)
}

/// Runs `cmd` with stdin closed, killing it and failing the test when it takes longer than
/// `limit`; asserts it did not panic.
pub fn run(mut cmd: Command, limit: Duration) -> Out {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let so = drain(Box::new(child.stdout.take().expect("piped")));
    let se = drain(Box::new(child.stderr.take().expect("piped")));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for reshard") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?} (blocked?); stderr: {}", se.join().unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = Out {
        code: status.code().unwrap_or(-1),
        stdout: so.join().expect("stdout reader"),
        stderr: se.join().expect("stderr reader"),
    };
    assert!(!out.stderr.contains("panicked"), "reshard panicked: {}", out.stderr);
    out
}

#[derive(Clone, Debug, PartialEq)]
pub struct T {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl T {
    fn elem(&self) -> usize {
        match self.dtype.as_str() {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "U8" | "I8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
            d => panic!("test helper: dtype {d}"),
        }
    }
    fn row_bytes(&self) -> usize {
        self.shape[1..].iter().product::<usize>() * self.elem()
    }
    /// Rows `a..b` of dim 0.
    pub fn rows(&self, a: usize, b: usize) -> T {
        let rb = self.row_bytes();
        let mut shape = self.shape.clone();
        shape[0] = b - a;
        T { dtype: self.dtype.clone(), shape, data: self.data[a * rb..b * rb].to_vec() }
    }
    /// Columns `a..b` of dim 1 (2-D only).
    pub fn cols(&self, a: usize, b: usize) -> T {
        assert_eq!(self.shape.len(), 2);
        let e = self.elem();
        let mut data = Vec::new();
        for r in 0..self.shape[0] {
            let base = r * self.shape[1] * e;
            data.extend_from_slice(&self.data[base + a * e..base + b * e]);
        }
        T { dtype: self.dtype.clone(), shape: vec![self.shape[0], b - a], data }
    }
    /// Concatenation along dim 0.
    pub fn cat(parts: &[T]) -> T {
        let mut out = parts[0].clone();
        for p in &parts[1..] {
            assert_eq!(p.shape[1..], out.shape[1..]);
            out.shape[0] += p.shape[0];
            out.data.extend_from_slice(&p.data);
        }
        out
    }
    /// Zeros with the trailing shape of `self` and `n` rows.
    pub fn zero_rows(&self, n: usize) -> T {
        let mut shape = self.shape.clone();
        shape[0] = n;
        T { dtype: self.dtype.clone(), shape, data: vec![0; n * self.row_bytes()] }
    }
    /// Rank `r` of `tp` blocks along dim 0.
    pub fn col_block(&self, r: usize, tp: usize) -> T {
        let n = self.shape[0] / tp;
        self.rows(r * n, (r + 1) * n)
    }
    /// Rank `r` of `tp` blocks along dim 1; a 1-D tensor (row-parallel bias) stays whole.
    pub fn row_block(&self, r: usize, tp: usize) -> T {
        if self.shape.len() == 1 {
            return self.clone();
        }
        let n = self.shape[1] / tp;
        self.cols(r * n, (r + 1) * n)
    }
    /// The kv heads of rank `r`: one head, replicated over consecutive ranks, when tp >= kv.
    pub fn kv_block(&self, kv: usize, r: usize, tp: usize) -> T {
        let hd = self.shape[0] / kv;
        if tp >= kv {
            let h = r / (tp / kv);
            self.rows(h * hd, (h + 1) * hd)
        } else {
            self.col_block(r, tp)
        }
    }
    /// Vocab-parallel: pad rows to a multiple of 64, take rank r's block, zero-fill.
    pub fn vocab_block(&self, r: usize, tp: usize) -> T {
        let rows = self.shape[0];
        let per = rows.div_ceil(64) * 64 / tp;
        let (a, b) = ((r * per).min(rows), ((r + 1) * per).min(rows));
        let real = self.rows(a, b);
        let pad = real.zero_rows(per - (b - a));
        T::cat(&[real, pad])
    }
}

/// All tensors of one safetensors file.
pub fn read_file(path: &Path) -> BTreeMap<String, T> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, T { dtype: format!("{:?}", v.dtype()), shape: v.shape().to_vec(), data: v.data().to_vec() }))
        .collect()
}

/// All tensors of a Hugging Face checkpoint directory (single file or index).
pub fn read_checkpoint(dir: &Path) -> BTreeMap<String, T> {
    let idx = dir.join("model.safetensors.index.json");
    if idx.exists() {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&idx).unwrap()).unwrap();
        let mut files: Vec<&str> = v["weight_map"].as_object().unwrap().values().map(|f| f.as_str().unwrap()).collect();
        files.sort();
        files.dedup();
        let mut out = BTreeMap::new();
        for f in files {
            out.extend(read_file(&dir.join(f)));
        }
        out
    } else {
        read_file(&dir.join("model.safetensors"))
    }
}

/// All tensors of one rank of an output directory, asserting no name is in two parts.
pub fn read_rank(out: &Path, rank: usize) -> BTreeMap<String, T> {
    let mut all = BTreeMap::new();
    for part in 0.. {
        let p = out.join(format!("model-rank-{rank}-part-{part}.safetensors"));
        if !p.exists() {
            assert!(part > 0, "rank {rank} has no part 0 in {}", out.display());
            break;
        }
        let tensors = read_file(&p);
        assert!(!tensors.is_empty(), "{} is an empty part", p.display());
        for (n, t) in tensors {
            assert!(all.insert(n.clone(), t).is_none(), "{n} appears in two parts of rank {rank}");
        }
    }
    all
}

/// Asserts that a rank's tensors equal the expected ones exactly, names, dtypes, shapes and bytes.
pub fn assert_rank_eq(label: &str, rank: usize, got: &BTreeMap<String, T>, want: &BTreeMap<String, T>) {
    let g: Vec<&String> = got.keys().collect();
    let w: Vec<&String> = want.keys().collect();
    let missing: Vec<_> = w.iter().filter(|n| !got.contains_key(**n)).collect();
    let extra: Vec<_> = g.iter().filter(|n| !want.contains_key(**n)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "{label} rank {rank}: missing {missing:?}, extra {extra:?}");
    for (name, w) in want {
        let g = &got[name];
        assert_eq!((&g.dtype, &g.shape), (&w.dtype, &w.shape), "{label} rank {rank} tensor {name}: dtype/shape");
        if g.data != w.data {
            let first = g.data.iter().zip(&w.data).position(|(a, b)| a != b).unwrap_or(0);
            panic!("{label} rank {rank} tensor {name}: bytes differ, first at byte {first}");
        }
    }
}

pub fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

pub fn uint(v: &serde_json::Value, key: &str) -> usize {
    key.split('.').fold(v, |v, k| &v[k]).as_u64().unwrap_or_else(|| panic!("config key {key}")) as usize
}

/// Writes tensors as a safetensors file (independent of reshard's writer).
pub fn write_checkpoint(path: &Path, tensors: &BTreeMap<String, T>) {
    let mut header = serde_json::Map::new();
    let mut off = 0;
    for (n, t) in tensors {
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, off + t.data.len()]}),
        );
        off += t.data.len();
    }
    let mut h = serde_json::Value::Object(header).to_string();
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(h.as_bytes());
    for t in tensors.values() {
        bytes.extend_from_slice(&t.data);
    }
    std::fs::write(path, bytes).unwrap();
}

/// Copies the files of a fixture directory (flat) into `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A `reshard` run in the background, for the signal and race tests: its stderr is read as it
/// comes, so a test can wait until the run pauses (`RESHARD_PAUSE_AT=N`: it waits at the N-th
/// step until its stdin is closed), then act while it is paused.
pub struct Running {
    child: Option<std::process::Child>,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Running {
    /// Starts `cmd` with piped stdin, stdout and stderr.
    pub fn spawn(mut cmd: Command) -> Running {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (err, all) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                all.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = tx.send(line);
            }
        });
        Running { stdin: child.stdin.take(), child: Some(child), lines, stderr }
    }

    /// The run's process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Waits (at most two minutes) until the run says it paused; returns that line.
    pub fn paused(&mut self) -> String {
        match self.paused_within(std::time::Duration::from_secs(120)) {
            Some(line) => line,
            None => panic!("the run did not pause: {}", self.stderr.lock().unwrap()),
        }
    }

    /// The pause line, if the run pauses within `wait`.
    pub fn paused_within(&mut self, wait: std::time::Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + wait;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with("reshard: paused at step") => return Some(l),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        None
    }

    /// Lets a paused run go on (closes its stdin).
    pub fn resume(&mut self) {
        self.stdin = None;
    }

    /// Sends `sig` to the run.
    pub fn signal(&self, sig: i32) {
        // SAFETY: a signal to our own child, whose process we have not reaped yet.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Lets a paused run go on and waits for its end.
    pub fn run_to_end(mut self) -> Out {
        self.resume();
        self.finish()
    }

    /// Waits for the end of the run (a paused run stays paused until [`Running::resume`] or a
    /// signal); `code` is -1 when a signal ended it.
    pub fn finish(mut self) -> Out {
        let _stdin = self.stdin.take();
        let o = self.child.take().unwrap().wait_with_output().unwrap();
        // The reader ends with the process's stderr.
        while self.lines.recv_timeout(std::time::Duration::from_secs(10)).is_ok() {}
        let out = Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: self.stderr.lock().unwrap().clone(),
        };
        assert!(!out.stderr.contains("panicked"), "reshard panicked: {}", out.stderr);
        out
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `reshard convert` command of `src` into `out` at `--tp tp`, with small parts (many steps).
pub fn convert_cmd(src: &Path, out: &Path, tp: usize, extra: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_reshard"));
    c.arg("convert").arg(src).args(["--tp", &tp.to_string(), "--max-part-size", "64KiB", "--out"]).arg(out);
    c.args(extra).envs(env.iter().copied());
    c
}

/// The number of steps (crash points) a run of `cmd` passes, which must succeed.
pub fn count_steps(mut cmd: Command) -> u64 {
    let o = cmd.env("RESHARD_CRASH_COUNT", "1").output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    e.lines().find_map(|l| l.strip_prefix("crash points: ")).and_then(|n| n.parse().ok()).expect("step count")
}

/// The names in a directory, sorted.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Whether `reshard verify SRC OUT` (bytes only) accepts `out`.
pub fn verifies(src: &Path, out: &Path) -> bool {
    reshard(&[&"verify", &src, &out, &"--no-forward"]).code == 0
}

/// The `tp` recorded in an output's manifest.
pub fn manifest_tp(out: &Path) -> u64 {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("reshard-manifest.json")).unwrap()).unwrap();
    v["tp"].as_u64().unwrap()
}

/// A writable copy of a fixture in a temp dir; returns (tempdir, src, out).
pub fn scratch(fixture_name: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&fixture(fixture_name), &src);
    let out = tmp.path().join("out");
    (tmp, src, out)
}

/// A temp dir on the checkout's disk (O_DIRECT works there) and the `--out` inside it.
pub fn scratch_out() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = tmp.path().join("out");
    (tmp, out)
}
