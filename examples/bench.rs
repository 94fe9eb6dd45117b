//! Conversion benchmark: `cp -r` against `reshard convert`, run alternately on the same disk.
//!
//!     cargo build --release --bins --examples && target/release/examples/bench [--runs 5] [--dir /work/bench]
//!         [--quick] [--only NAME] [--no-full] [--cold] [--disk] [--verify] [--tps 4,8] [--baseline BIN]
//!
//! Generates the synthetic real-shape inputs with `synth` when missing (BART-large fp32 ~1.6 GB,
//! Whisper-large-v3 fp16 ~3.1 GB, a reduced-depth Llama-3.2-11B-Vision bf16 with real widths, and
//! a sparse full-size one for `plan`), warms the page cache, then for each input runs `cp -r`,
//! `cp -r` + `sync`, and `reshard convert --tp N` for every valid N of 1, 2, 4, 8, alternately,
//! `--runs` times each, and prints medians, the ratio to `cp -r`, and the peak anonymous memory
//! (RssAnon, sampled every 2 ms from /proc; file-backed pages of the mapped inputs and the page
//! cache are not counted). Before every timed command an untimed `sync` and a 2 s pause let the
//! previous command's writeback and the discards of deleted outputs finish (this disk is mounted
//! with online `discard`: without the pause, whatever runs after a large delete pays for it), and
//! the order of the commands rotates from one iteration to the next. Also: `--dtype` casting
//! against the uncast time (BART fp32 to bf16 and f16, which halves the bytes written; Whisper fp16
//! to bf16, which keeps them), BART-large at tp 8 with 16 rayon threads (the memory of a 16-core
//! machine), and `plan` on the full-size mllama. `--quick` runs BART-large only;
//! `--only NAME` one input (a directory name below).
//!
//! `--reshard` (issue #16) instead benchmarks resharding from shards, on BART-large and
//! Whisper-large-v3 (`--only NAME` one of them): each is converted to tp 4 once (untimed), then,
//! alternately, `reshard convert SRC --tp 2` (from the checkpoint), `reshard convert TP4 --tp 2`
//! (from the tp-4 shards: byte-identical output), `reshard merge TP4` (back to a Hugging Face
//! checkpoint), and `cp -r TP4` and `cp -r TP4 && sync` (the same bytes read, about as many
//! written), with the sources in the page cache.
//!
//! When the disk has room for it (twice its 21.3 GB plus 2 GB), the full-size Llama-3.2-11B-Vision
//! is converted too, at tp 4 and 8, at most 3 runs each (`--no-full` skips it). Its input does not
//! fit the page cache of a small machine, so it is not warmed: that run reads from the disk, as a
//! real 20-100 GB conversion does.
//!
//! Issue #18 options: `--cold` drops the page cache (`echo 3 > /proc/sys/vm/drop_caches`, as root)
//! after the `sync` before every timed command, so every command reads its input from the disk;
//! `--disk` adds the disk's own figures for the same bytes: `dd iflag=direct bs=4M` of the input's
//! files one after the other, `dd oflag=direct bs=4M conv=fsync` of as many bytes as
//! `reshard --tp 4` writes (from /dev/zero), and both at once; `--verify` times `reshard verify`
//! of each `--tp 4` output right after its conversion (and after a drop of the cache with
//! `--cold`), then `dd iflag=direct` of the files verify reads (the source's and the output's),
//! and adds a `convert --tp 4 --verify` row (its verify phase is that row less `--tp 4`);
//! `--tps` limits the tp list; `--baseline BIN` adds `BIN convert --tp 4` (another build, for
//! A/B); `--lean` leaves out the cast, `--no-fsync` and buffered rows.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Run {
    secs: f64,
    anon_kib: u64,
}

fn rss_anon(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("RssAnon:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Whether to drop the page cache before every timed command (`--cold`).
static COLD: AtomicBool = AtomicBool::new(false);

/// Runs a command, timing it and sampling the peak RssAnon of the process. An untimed `sync` and
/// a 2 s pause first, so no run pays for the previous one's writeback or for the discards
/// (TRIMs) of the output deleted before it; with `--cold`, the page cache is dropped after the
/// sync.
fn run(cmd: &[&str]) -> Run {
    Command::new("sync").status().unwrap();
    if COLD.load(Ordering::Relaxed) {
        std::fs::write("/proc/sys/vm/drop_caches", "3\n")
            .expect("--cold: cannot write /proc/sys/vm/drop_caches (root?)");
    }
    std::thread::sleep(Duration::from_secs(2));
    let start = Instant::now();
    let mut child =
        Command::new(cmd[0]).args(&cmd[1..]).stdout(Stdio::null()).spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let pid = child.id();
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let (p2, d2) = (peak.clone(), done.clone());
    let sampler = std::thread::spawn(move || {
        while !d2.load(Ordering::Relaxed) {
            if let Some(v) = rss_anon(pid) {
                p2.fetch_max(v, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let status = child.wait().unwrap();
    let secs = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    assert!(status.success(), "{cmd:?} failed: {status}");
    Run { secs, anon_kib: peak.load(Ordering::Relaxed) }
}

/// One benchmark input: its directory under `--dir`, how `synth` makes it, and how it is run.
struct Input {
    name: &'static str,
    model: &'static str,
    synth_args: &'static [&'static str],
    tps: Vec<usize>,
    runs: usize,
    /// Read the input once before timing, so every command finds it in the page cache.
    warm: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// "median (min-max)" of a set of timings.
fn spread(v: &[f64]) -> String {
    let (lo, hi) = v.iter().fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    format!("{:>7.3} ({:.2}-{:.2})", median(v.to_vec()), lo, hi)
}

/// Bytes free for an unprivileged user on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs fills the zeroed struct it is given; `c` is a valid NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    st.f_bavail as u64 * st.f_frsize as u64
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |d| d.map(|e| e.unwrap().metadata().unwrap().len()).sum())
}

fn warm(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let mut f = std::fs::File::open(&p).unwrap();
        std::io::copy(&mut f, &mut std::io::sink()).unwrap();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |f: &str| args.iter().position(|a| a == f).and_then(|i| args.get(i + 1)).cloned();
    let runs: usize = opt("--runs").map_or(5, |v| v.parse().unwrap());
    let dir = PathBuf::from(opt("--dir").unwrap_or_else(|| "/tmp/reshard-bench".into()));
    let usage = "usage: bench [--runs N] [--dir DIR] [--quick] [--only NAME] [--no-full] [--cold] [--disk] [--verify] \
                 [--tps LIST] [--baseline BIN] [--lean] [--reshard]";
    let known = [
        "--runs",
        "--dir",
        "--only",
        "--quick",
        "--no-full",
        "--cold",
        "--disk",
        "--verify",
        "--tps",
        "--baseline",
        "--lean",
        "--reshard",
    ];
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if !known.contains(&a) {
            eprintln!("{usage}\n(unknown argument {a:?}; see the doc comment of examples/bench.rs)");
            std::process::exit(2);
        }
        i += if matches!(a, "--runs" | "--dir" | "--only" | "--tps" | "--baseline") { 2 } else { 1 };
    }
    let flag = |f: &str| args.iter().any(|a| a == f);
    let (cold, disk, verify, lean) = (flag("--cold"), flag("--disk"), flag("--verify"), flag("--lean"));
    COLD.store(cold, Ordering::Relaxed);
    let tps_only: Option<Vec<usize>> = opt("--tps").map(|v| v.split(',').map(|t| t.parse().unwrap()).collect());
    let baseline = opt("--baseline");
    let quick = args.iter().any(|a| a == "--quick");
    let no_full = args.iter().any(|a| a == "--no-full");
    let bin = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf();
    let reshard = bin.join("reshard");
    let synth = bin.join("examples/synth");
    assert!(reshard.exists() && synth.exists(), "build first: cargo build --release --bins --examples");
    std::fs::create_dir_all(&dir).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    if args.iter().any(|a| a == "--reshard") {
        return bench_reshard(&dir, &reshard, &synth, runs, opt("--only"));
    }

    let input = |name, model, synth_args: &'static [&'static str], tps: &[usize], runs, warm| Input {
        name,
        model,
        synth_args,
        tps: tps.to_vec(),
        runs,
        warm,
    };
    let mut inputs = vec![
        input("bart-large", "bart-large", &[], &[1, 2, 4, 8], runs, true),
        input("whisper-large-v3", "whisper-large-v3", &[], &[1, 2, 4], runs, true),
        input(
            "llama-3.2-11b-vision",
            "llama-3.2-11b-vision",
            &["--text-layers", "8", "--vision-layers", "4"],
            &[1, 2, 4, 8],
            runs,
            true,
        ),
    ];
    if quick {
        inputs.truncate(1);
    }
    if let Some(only) = opt("--only") {
        inputs.retain(|i| i.name == only);
    }
    if cold {
        inputs.iter_mut().for_each(|i| i.warm = false);
    }
    const FULL_BYTES: u64 = 21_340_000_000;
    let full_src = dir.join("llama-3.2-11b-vision-full");
    let full_have = dir_bytes(&full_src);
    if !quick && !no_full && opt("--only").is_none_or(|o| o == "llama-3.2-11b-vision-full") {
        let need = (2 * FULL_BYTES + (2 << 30)).saturating_sub(full_have);
        if free_bytes(&dir) >= need {
            inputs.push(input("llama-3.2-11b-vision-full", "llama-3.2-11b-vision", &[], &[4, 8], runs.min(3), false));
            if free_bytes(&dir) < need + FULL_BYTES + (1 << 30) && (disk || verify) {
                println!("full-size Llama-3.2-11B-Vision: the dd write and verify rows run in the space of one output");
            }
        } else {
            println!(
                "full-size Llama-3.2-11B-Vision skipped: {} GB free, {} GB needed",
                free_bytes(&dir) / 1_000_000_000,
                need / 1_000_000_000
            );
        }
    }
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/meminfo").unwrap().lines().next().unwrap()
    );
    println!("runs: {runs} each, alternating; times are medians in seconds; memory is the peak RssAnon\n");
    for Input { name, model, synth_args: extra, tps, runs, warm: warm_first } in &inputs {
        let (name, runs) = (*name, *runs);
        let tps: Vec<usize> =
            tps.iter().copied().filter(|t| tps_only.as_ref().is_none_or(|only| only.contains(t))).collect();
        let src = dir.join(name);
        if !src.join("config.json").exists() {
            let mut cmd = vec![s(&synth), model.to_string(), s(&src)];
            cmd.extend(extra.iter().map(|e| e.to_string()));
            let c: Vec<&str> = cmd.iter().map(String::as_str).collect();
            run(&c);
        }
        let bytes = dir_bytes(&src);
        if *warm_first {
            warm(&src);
        }
        let (cp_dst, out, dd_out) = (dir.join("cp-out"), dir.join("reshard-out"), dir.join("dd-out"));
        let mut cp_t = vec![];
        let mut cps_t = vec![];
        let mut rs: Vec<(String, Vec<f64>, u64)> = tps.iter().map(|t| (format!("--tp {t}"), vec![], 0)).collect();
        // Rows that are not `reshard convert SRC --out OUT FLAGS`: (label, times, peak anon).
        let mut other: Vec<(String, Vec<f64>, u64)> = Vec::new();
        let src_files: Vec<String> = {
            let mut v: Vec<String> = std::fs::read_dir(&src)
                .unwrap()
                .map(|e| s(&e.unwrap().path()))
                .filter(|p| p.ends_with(".safetensors"))
                .collect();
            v.sort();
            v
        };
        // The bytes `--tp 4` writes, for the dd write of the same size.
        let out_bytes = if disk {
            let plan = Command::new(&reshard).args(["plan", &s(&src), "--tp", "4", "--json"]).output().unwrap();
            let v: serde_json::Value = serde_json::from_slice(&plan.stdout).expect("plan --json");
            let sum = v["files"].as_array().map(|f| f.iter().filter_map(|f| f["size"].as_u64()).sum::<u64>());
            sum.filter(|&b| b > 0).unwrap_or(bytes)
        } else {
            0
        };
        let dd_read = |files: &[String]| {
            let cmds: Vec<String> =
                files.iter().map(|f| format!("dd if={f} of=/dev/null bs=4M iflag=direct status=none")).collect();
            cmds.join(" && ")
        };
        let dd_write = format!(
            "dd if=/dev/zero of={} bs=4M count={} oflag=direct conv=fsync status=none",
            s(&dd_out),
            out_bytes.div_ceil(4 << 20)
        );
        if disk {
            other.push((format!("dd iflag=direct (read {:.2} GB)", bytes as f64 / 1e9), vec![], 0));
            other.push((format!("dd oflag=direct (write {:.2} GB)", out_bytes as f64 / 1e9), vec![], 0));
            other.push(("dd read and write at once".into(), vec![], 0));
        }
        if verify {
            other.push(("reshard verify (of the --tp 4 output)".into(), vec![], 0));
            other.push(("dd iflag=direct of source + output".into(), vec![], 0));
        }
        if let Some(b) = &baseline {
            rs.push((format!("BASELINE={b} --tp 4"), vec![], 0));
        }
        if verify {
            // Its verify phase is this row less the `--tp 4` row.
            rs.push(("--tp 4 --verify".into(), vec![], 0));
        }
        // fp32 -> bf16/f16 halves the bytes written; fp16 -> bf16 keeps them, so it shows the cost
        // of the conversion itself.
        let casts: Vec<&str> = match name {
            "bart-large" => vec!["bf16", "f16"],
            "whisper-large-v3" => vec!["bf16"],
            _ => vec![],
        };
        if !lean {
            rs.extend(casts.iter().map(|d| (format!("--tp 4 --dtype {d}"), vec![], 0)));
            rs.push(("--tp 4 --no-fsync".into(), vec![], 0));
            // The default durable output written through the page cache instead of around it.
            rs.push(("RESHARD_WRITE=buffered --tp 4".into(), vec![], 0));
        }
        // As on a 16-core machine: the number of files written at once is capped, so memory does
        // not grow with the cores either.
        if let Some(&top) = tps.iter().max() {
            rs.push((format!("RAYON_NUM_THREADS=16 --tp {top}"), vec![], 0));
        }
        // One job per command; each iteration starts at a different job, so no command always runs
        // right after a large deletion (this disk is mounted with online discard, and the command
        // after a big delete pays for its TRIMs).
        let n_disk = if disk { 3 } else { 0 };
        let jobs = 2 + n_disk + rs.len();
        for it in 0..runs {
            for j in 0..jobs {
                let job = (it + j) % jobs;
                let _ = std::fs::remove_dir_all(&cp_dst);
                let _ = std::fs::remove_dir_all(&out);
                let _ = std::fs::remove_file(&dd_out);
                match job {
                    0 => cp_t.push(run(&["cp", "-r", &s(&src), &s(&cp_dst)]).secs),
                    1 => cps_t.push(run(&["sh", "-c", &format!("cp -r {} {} && sync", s(&src), s(&cp_dst))]).secs),
                    2 if disk => other[0].1.push(run(&["sh", "-c", &dd_read(&src_files)]).secs),
                    3 if disk => other[1].1.push(run(&["sh", "-c", &dd_write]).secs),
                    4 if disk => {
                        let both = format!("({}) & ({}); wait", dd_read(&src_files), dd_write);
                        other[2].1.push(run(&["sh", "-c", &both]).secs)
                    }
                    k => {
                        let (flags, times, mem) = &mut rs[k - 2 - n_disk];
                        // Leading NAME=VALUE words go to the environment (through `env`, which
                        // execs reshard in the same process, so its memory is what is sampled).
                        let (vars, args): (Vec<&str>, Vec<&str>) = flags.split(' ').partition(|w| w.contains('='));
                        // BASELINE=BIN is not for the environment: it names the binary to run.
                        let bin =
                            vars.iter().find_map(|v| v.strip_prefix("BASELINE=")).map_or(s(&reshard), str::to_string);
                        let mut cmd: Vec<String> = vec!["env".into()];
                        cmd.extend(vars.iter().filter(|v| !v.starts_with("BASELINE=")).map(|v| v.to_string()));
                        cmd.extend([bin, "convert".into(), s(&src), "--out".into(), s(&out), "-q".into()]);
                        cmd.extend(args.iter().map(|a| a.to_string()));
                        let c: Vec<&str> = cmd.iter().map(String::as_str).collect();
                        let r = run(&c);
                        times.push(r.secs);
                        *mem = (*mem).max(r.anon_kib);
                        if verify && flags == "--tp 4" {
                            let k = other.len() - 2;
                            let v = run(&[&s(&reshard), "verify", &s(&src), &s(&out)]);
                            other[k].1.push(v.secs);
                            other[k].2 = other[k].2.max(v.anon_kib);
                            let mut files = src_files.clone();
                            let mut outs: Vec<String> = std::fs::read_dir(&out)
                                .unwrap()
                                .map(|e| s(&e.unwrap().path()))
                                .filter(|p| p.ends_with(".safetensors"))
                                .collect();
                            outs.sort();
                            files.extend(outs);
                            other[k + 1].1.push(run(&["sh", "-c", &dd_read(&files)]).secs);
                        }
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&cp_dst);
        let _ = std::fs::remove_dir_all(&out);
        let _ = std::fs::remove_file(&dd_out);
        let (cp, cps) = (median(cp_t.clone()), median(cps_t.clone()));
        let cache = if cold {
            "page cache dropped before every command"
        } else if *warm_first {
            "source in page cache"
        } else {
            "source not warmed"
        };
        println!("{name}: {:.2} GB in {}, {cache}", bytes as f64 / 1e9, s(&src));
        println!("  {:<36} {:>24}  {:>9}  {:>14}  peak anon", "", "median s (min-max)", "x cp -r", "x cp -r && sync");
        println!("  {:<36} {}  {:>9.2}", "cp -r", spread(&cp_t), 1.0);
        println!("  {:<36} {}  {:>9.2}  {:>14.2}", "cp -r && sync", spread(&cps_t), cps / cp, 1.0);
        for (flags, times, mem) in rs {
            let m = median(times.clone());
            println!(
                "  {:<36} {}  {:>9.2}  {:>14.2}  {:.1} MiB",
                format!("reshard {flags}"),
                spread(&times),
                m / cp,
                m / cps,
                mem as f64 / 1024.0
            );
        }
        for (label, times, mem) in other {
            let m = median(times.clone());
            let mem = if mem > 0 { format!("{:.1} MiB", mem as f64 / 1024.0) } else { String::new() };
            println!("  {label:<36} {}  {:>9.2}  {:>14.2}  {mem}", spread(&times), m / cp, m / cps);
        }
        println!("  load after: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
        println!();
    }
    // plan on the full-size mllama, sparse (headers only matter).
    let full = dir.join("llama-3.2-11b-vision-sparse");
    if !full.join("config.json").exists() {
        run(&[&s(&synth), "llama-3.2-11b-vision", &s(&full), "--sparse"]);
    }
    let mut t = vec![];
    for _ in 0..runs.max(5) {
        t.push(run(&[&s(&reshard), "plan", &s(&full), "--tp", "8", "--json"]).secs);
    }
    println!("plan, Llama-3.2-11B-Vision shape (21.3 GB, 906 tensors, 5 files), --tp 8 --json: {:.3} s", median(t));
}

/// `--reshard`: resharding from shards and merging back, against converting the checkpoint and
/// copying the shards (see the module docs).
fn bench_reshard(dir: &Path, reshard: &Path, synth: &Path, runs: usize, only: Option<String>) {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/meminfo").unwrap().lines().next().unwrap()
    );
    println!("runs: {runs} each, alternating; times are medians in seconds; memory is the peak RssAnon\n");
    for name in ["bart-large", "whisper-large-v3"] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let src = dir.join(name);
        if !src.join("config.json").exists() {
            run(&[&s(synth), name, &s(&src)]);
        }
        let tp4 = dir.join(format!("{name}-tp4"));
        if !tp4.join("reshard-manifest.json").exists() {
            let _ = std::fs::remove_dir_all(&tp4);
            run(&[&s(reshard), "convert", &s(&src), "--tp", "4", "--out", &s(&tp4), "-q"]);
        }
        warm(&src);
        warm(&tp4);
        let out = dir.join("reshard-from-shards-out");
        let jobs: Vec<(String, Vec<String>)> = vec![
            (
                "reshard convert SRC --tp 2".into(),
                vec![s(reshard), "convert".into(), s(&src), "--tp".into(), "2".into()],
            ),
            (
                "reshard convert TP4 --tp 2".into(),
                vec![s(reshard), "convert".into(), s(&tp4), "--tp".into(), "2".into()],
            ),
            ("reshard merge TP4".into(), vec![s(reshard), "merge".into(), s(&tp4)]),
            ("cp -r TP4".into(), vec!["cp".into(), "-r".into(), s(&tp4)]),
            ("cp -r TP4 && sync".into(), vec!["sh".into(), "-c".into(), format!("cp -r {} \"$0\" && sync", s(&tp4))]),
        ];
        let mut times: Vec<Vec<f64>> = vec![vec![]; jobs.len()];
        let mut mem = vec![0u64; jobs.len()];
        for it in 0..runs {
            for j in 0..jobs.len() {
                let k = (it + j) % jobs.len();
                let _ = std::fs::remove_dir_all(&out);
                let mut cmd = jobs[k].1.clone();
                if cmd[0].ends_with("reshard") {
                    cmd.extend(["--out".into(), s(&out), "-q".into()]);
                } else {
                    cmd.push(s(&out));
                }
                let c: Vec<&str> = cmd.iter().map(String::as_str).collect();
                let r = run(&c);
                times[k].push(r.secs);
                mem[k] = mem[k].max(r.anon_kib);
            }
        }
        let _ = std::fs::remove_dir_all(&out);
        println!(
            "{name}: checkpoint {:.2} GB, tp-4 shards {:.2} GB, both in the page cache",
            dir_bytes(&src) as f64 / 1e9,
            dir_bytes(&tp4) as f64 / 1e9
        );
        let base = |label: &str| median(times[jobs.iter().position(|(l, _)| l == label).unwrap()].clone());
        let (direct, cp, cps) = (base("reshard convert SRC --tp 2"), base("cp -r TP4"), base("cp -r TP4 && sync"));
        println!(
            "  {:<30} {:>24}  {:>12}  {:>9}  {:>14}  peak anon",
            "", "median s (min-max)", "x SRC->tp 2", "x cp -r", "x cp && sync"
        );
        for (k, (label, _)) in jobs.iter().enumerate() {
            let m = median(times[k].clone());
            let anon =
                if label.starts_with("reshard") { format!("{:.1} MiB", mem[k] as f64 / 1024.0) } else { String::new() };
            println!(
                "  {:<30} {}  {:>12.2}  {:>9.2}  {:>14.2}  {anon}",
                label,
                spread(&times[k]),
                m / direct,
                m / cp,
                m / cps
            );
        }
        println!();
    }
}
