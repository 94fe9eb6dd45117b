//! Command-line definition (clap). Core code never sees these types.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Reshard Hugging Face encoder-decoder checkpoints into vLLM tensor-parallel shards.
#[derive(Parser, Debug)]
#[command(name = "reshard", version, long_version = VERSION.as_str(), about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// `reshard --version` (`-V` prints the crate version alone): the crate version and the format
/// versions this build reads and writes.
static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{}\nreads mapping files of format_version {} (mappings/README.md)\n\
         writes plan/manifest format_version {}, verify report {}, validate report {}, convert --json {}, \
         --json error objects {}",
        env!("CARGO_PKG_VERSION"),
        reshard::mapping::FORMAT_VERSION,
        reshard::plan::PLAN_FORMAT_VERSION,
        reshard::verify::REPORT_FORMAT_VERSION,
        reshard::gpu::REPORT_FORMAT_VERSION,
        crate::output::CONVERT_FORMAT_VERSION,
        reshard::failure::ERROR_FORMAT_VERSION,
    )
});

impl Cli {
    /// Whether the command asked for JSON on stdout (also for its error object).
    pub fn json(&self) -> bool {
        match &self.command {
            Command::Plan(a) => a.source.json,
            Command::Convert(a) => a.source.json,
            Command::Merge(a) => a.json,
            Command::Verify(a) => a.json,
            Command::Validate(a) => a.json,
            Command::Completions { .. } | Command::Man => false,
        }
    }
}

/// A command-line error: clap's message on stderr and, when `--json` is among the arguments, its
/// error object on stdout; exit 2 (help and `--version` print and exit 0).
pub fn usage_error(e: clap::Error) -> std::process::ExitCode {
    use clap::error::{ContextKind, ContextValue};
    use reshard::failure::{snake, Culprit, Failure};
    if !e.use_stderr() {
        return match e.print() {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(_) => std::process::ExitCode::from(reshard::exit_code::OUTPUT_FAILED),
        };
    }
    if std::env::args_os().skip(1).any(|a| a == "--json") {
        let key = match e.get(ContextKind::InvalidArg) {
            // `--tp <TP>` -> `--tp`
            Some(ContextValue::String(s)) => s.split_whitespace().next().map(str::to_string),
            _ => None,
        };
        // The first line of clap's message, without its `error: ` (the usage lines follow on stderr).
        let rendered = e.render().to_string();
        let message =
            rendered.lines().next().map_or_else(|| e.kind().to_string(), |l| l.trim_start_matches("error: ").into());
        let f = Failure::other(
            reshard::exit_code::BAD_INPUT,
            format!("usage.{}", snake(&format!("{:?}", e.kind()))),
            message,
            Culprit { key, ..Default::default() },
        );
        let _ = crate::output::print_json(&mut std::io::stdout().lock(), &f);
    }
    let _ = e.print();
    std::process::ExitCode::from(reshard::exit_code::BAD_INPUT)
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show what each rank will get, without writing anything.
    Plan(PlanArgs),
    /// Write the per-rank shards, copied config/tokenizer files and a manifest.
    Convert(ConvertArgs),
    /// Write the Hugging Face checkpoint a sharded directory was made from: the source names,
    /// `model.safetensors` or an index and parts, config and side files copied.
    Merge(MergeArgs),
    /// Prove an output bit-exact and complete against its source, and check the cross-attention
    /// forward numerically (exit 1 on any finding).
    Verify(VerifyArgs),
    /// Run the cross-attention forward on a GPU, fused against split, with timings (needs a build
    /// with `--features cuda`; exit 3 without a GPU), or the same paths on the CPU (`--device cpu`).
    Validate(ValidateArgs),
    /// Print a shell completion script on stdout (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout: `reshard man > reshard.1`.
    #[command(hide = true)]
    Man,
}

#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// The source checkpoint (with OUT; or use --shape).
    #[arg(required_unless_present = "shape")]
    pub source: Option<PathBuf>,
    /// The output directory of `reshard convert`.
    #[arg(required_unless_present = "shape")]
    pub out: Option<PathBuf>,
    /// A real model size with synthetic weights instead of a checkpoint.
    #[arg(long, value_parser = ["bart-large", "whisper-large", "mllama-11b"], conflicts_with_all = ["source", "out"])]
    pub shape: Option<String>,
    /// Ranks of the split path for --shape.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub tp: u32,
    /// Cross-attention layers to check: `all` or a comma-separated list of indices.
    #[arg(long, default_value = "all")]
    pub layers: String,
    /// GEMM element type.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub dtype: String,
    /// Decoder tokens T.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub tokens: u32,
    /// Encoder tokens S.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub source_tokens: u32,
    /// Timed iterations after 5 warm-up runs (the median is reported).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100000))]
    pub iters: u32,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Where the paths run: `cuda` (cuBLAS and NVRTC kernels; exit 3 without a GPU) or `cpu` (the
    /// same paths on the host: a GEMM that follows the cuBLAS specification and the kernels
    /// transcribed line for line; works in every build).
    #[arg(long, default_value = "cuda", value_parser = ["cuda", "cpu"])]
    pub device: String,
    /// For --shape: a smaller head size than the model's (at most its own), same head counts (a quick check).
    #[arg(long, requires = "shape", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub head_dim: Option<u32>,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// Parses `all` or `1,3,5`.
pub fn parse_layers(s: &str) -> Result<Option<Vec<usize>>, String> {
    if s == "all" {
        return Ok(None);
    }
    s.split(',')
        .map(|p| {
            p.trim().parse::<usize>().map_err(|_| format!("--layers: `{p}` is not a layer index (use `all` or `1,3`)"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// A sharded directory (`model-rank-*-part-*.safetensors` and config.json), or a Hugging Face
    /// checkpoint (re-saved without tied copies, in parts of --max-part-size).
    pub input: PathBuf,
    /// Output directory (must not exist or be empty, unless --force; a symbolic link is refused).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub read: ReadArgs,
    /// Cap on tensor data per file, as transformers' `max_shard_size` (its default: 5GB).
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub max_part_size: u64,
    /// Replace an existing --out directory (in one atomic swap, once the new output is complete).
    #[arg(long)]
    pub force: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
    /// Verify the output against the input before publishing it (exit 1 if it fails).
    #[arg(long)]
    pub verify: bool,
    /// Skip fsync (see `convert --no-fsync`).
    #[arg(long)]
    pub no_fsync: bool,
    /// Print JSON on stdout instead of a human report.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The source: a checkpoint directory, one .safetensors file with --config, or a sharded
    /// directory the output was made from.
    pub source: PathBuf,
    /// The output directory of `reshard convert` (every rank, or those its manifest lists) or of
    /// `reshard merge`.
    pub out: PathBuf,
    #[command(flatten)]
    pub read: ReadArgs,
    /// The target to verify against when OUT has no manifest (with one, the manifest's target
    /// is used): a target name or ENGINE==VERSION [default: the newest tested]
    #[arg(long, value_name = "TARGET")]
    pub target: Option<String>,
    #[command(flatten)]
    pub check: CheckArgs,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// How an input is read: its config.json and its mapping (every command that reads one).
#[derive(Args, Debug)]
pub struct ReadArgs {
    /// config.json to use (required when the input is a single .safetensors file; for a sharded
    /// directory, instead of the one beside the shards).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Mapping file to use instead of the bundled one for config.json's model_type.
    #[arg(long)]
    pub mapping: Option<PathBuf>,
    /// Use --mapping even when its `model_types` does not list config.json's `model_type`.
    #[arg(long, requires = "mapping")]
    pub force_mapping: bool,
}

impl ReadArgs {
    /// The library's source for `input`.
    pub fn source(&self, input: &std::path::Path) -> reshard::Source {
        reshard::Source {
            input: input.to_owned(),
            config: self.config.clone(),
            mapping: self.mapping.clone(),
            force_mapping: self.force_mapping,
        }
    }
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Skip the cross-attention forward check (bytes only).
    #[arg(long)]
    pub no_forward: bool,
    /// Decoder tokens of the forward check's random inputs.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub tokens: u32,
    /// Encoder tokens of the forward check's random inputs.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub source_tokens: u32,
}

impl CheckArgs {
    pub fn options(&self) -> reshard::verify::VerifyOptions {
        reshard::verify::VerifyOptions {
            forward: !self.no_forward,
            tokens: self.tokens as usize,
            source_tokens: self.source_tokens as usize,
            ..Default::default()
        }
    }
}

#[derive(Args, Debug)]
pub struct SourceArgs {
    /// Checkpoint directory (config.json + model.safetensors or an index), one .safetensors file,
    /// or a sharded directory (`model-rank-*-part-*.safetensors` and config.json: a reshard output
    /// or a vLLM save_sharded_state), read back into the checkpoint it was made from.
    pub input: PathBuf,
    /// Tensor-parallel size.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub tp: u32,
    #[command(flatten)]
    pub read: ReadArgs,
    /// Cap on tensor data per output file, e.g. 5GiB, 500MB, 1048576.
    #[arg(long, default_value = "5GiB", value_parser = parse_size)]
    pub max_part_size: u64,
    /// Cast floating-point tensors to this dtype while converting (integer tensors are kept).
    #[arg(long, value_parser = ["bf16", "f16", "f32"])]
    pub dtype: Option<String>,
    /// The engine release range to lay the output out for: a target name of the mapping
    /// (`reshard plan` lists them) or ENGINE==VERSION, e.g. vllm==0.20.1 [default: the newest tested]
    #[arg(long, value_name = "TARGET")]
    pub target: Option<String>,
    /// Write (and verify) only these ranks, e.g. `8-15` or `0,2,4-5`: everything is planned, and
    /// the manifest records that the output is partial (one node of a multi-node deployment).
    #[arg(long, value_name = "RANKS", value_parser = parse_ranks)]
    pub ranks: Option<RankList>,
    /// Print JSON on stdout instead of a human report.
    #[arg(long)]
    pub json: bool,
}

/// Rank numbers, sorted (`--ranks`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankList(pub Vec<usize>);

/// Parses `8-15`, `3` or `0,2,4-5` into sorted rank numbers.
pub fn parse_ranks(s: &str) -> Result<RankList, String> {
    let mut out = Vec::new();
    for item in s.split(',') {
        let item = item.trim();
        let num = |t: &str| {
            t.trim().parse::<usize>().map_err(|_| format!("`{t}` is not a rank number (use e.g. 8-15 or 0,2,4-5)"))
        };
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("`{item}`: the range is empty ({a} > {b})"));
                }
                if b - a > 1 << 16 {
                    return Err(format!("`{item}`: too many ranks"));
                }
                out.extend(a..=b);
            }
            None => out.push(num(item)?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(RankList(out))
}

impl SourceArgs {
    pub fn plan_options(&self) -> reshard::plan::PlanOptions {
        use reshard::dtype::Dtype;
        let dtype = self.dtype.as_deref().map(|d| match d {
            "bf16" => Dtype::BF16,
            "f16" => Dtype::F16,
            _ => Dtype::F32,
        });
        reshard::plan::PlanOptions {
            tp: self.tp as usize,
            max_part_size: self.max_part_size,
            dtype,
            target: self.target.clone(),
            ranks: self.ranks.clone().map(|r| r.0),
        }
    }
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub source: SourceArgs,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Output directory (must not exist or be empty, unless --force; a symbolic link is refused).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out directory (in one atomic swap, once the new output is complete).
    #[arg(long)]
    pub force: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
    /// Verify the output against the source before publishing it (exit 1 if it fails).
    #[arg(long)]
    pub verify: bool,
    /// Skip fsync: faster, still renamed into place atomically (a killed process leaves no partial
    /// --out), but a power loss or kernel crash soon after can leave incomplete files.
    #[arg(long)]
    pub no_fsync: bool,
    #[command(flatten)]
    pub check: CheckArgs,
}

/// Parses a byte size with an optional unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB); the number may
/// have a decimal fraction (`1.5GB`, `0.5GiB`), rounded down to whole bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "tib" | "t" => 1 << 40,
        u => return Err(format!("unknown unit `{u}` in `{s}` (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)")),
    };
    let bad = || format!("`{s}` is not a size like 5GiB, 1.5GB or 1048576");
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err(bad());
    }
    let whole: u64 = if int.is_empty() { 0 } else { int.parse().map_err(|_| bad())? };
    let too_large = || format!("`{s}` is too large");
    let mut v = whole.checked_mul(mult).ok_or_else(too_large)?;
    // The fraction in exact integer arithmetic: digits * mult / 10^len, rounded down.
    if !frac.is_empty() {
        if frac.len() > 18 {
            return Err(format!("`{s}`: at most 18 decimal places"));
        }
        let digits: u128 = frac.parse().map_err(|_| bad())?;
        let part = digits * mult as u128 / 10u128.pow(frac.len() as u32);
        v = v.checked_add(part as u64).ok_or_else(too_large)?;
    }
    if v == 0 {
        return Err("must be at least 1 byte".into());
    }
    Ok(v)
}

impl ValidateArgs {
    /// The library job, and whether to print JSON.
    pub fn job(self) -> Result<(reshard::gpu::ValidateJob, bool), reshard::Error> {
        use reshard::gpu::{
            problem::Preset, DeviceKind, GpuDtype, GpuError, ValidateInput, ValidateJob, ValidateOptions,
        };
        let a = self;
        let layers = parse_layers(&a.layers).map_err(GpuError::Setup)?;
        let input = match (a.shape.as_deref().and_then(Preset::parse), a.source, a.out) {
            // Checked here, before any GPU is looked for: a bad argument is exit 2 in every build.
            (Some(preset), _, _) if !preset.valid_tp(a.tp as usize) => {
                return Err(GpuError::Setup(format!(
                    "--tp {} does not fit {} (heads and kv heads must divide or replicate evenly)",
                    a.tp,
                    preset.name()
                ))
                .into())
            }
            (Some(preset), _, _) => {
                ValidateInput::Synthetic { preset, tp: a.tp as usize, head_dim: a.head_dim.map(|h| h as usize) }
            }
            (None, Some(input), Some(out)) => ValidateInput::Checkpoint { src: a.read.source(&input), out, layers },
            _ => return Err(GpuError::Setup("give SOURCE and OUT, or --shape".into()).into()),
        };
        let dtype = if a.dtype == "bf16" { GpuDtype::Bf16 } else { GpuDtype::F32 };
        let options = ValidateOptions { dtype, iters: a.iters as usize };
        let job = ValidateJob {
            input,
            options,
            tokens: a.tokens as usize,
            source_tokens: a.source_tokens as usize,
            seed: 0x5eed,
            device: if a.device == "cpu" { DeviceKind::Cpu } else { DeviceKind::Cuda },
        };
        Ok((job, a.json))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks() {
        assert_eq!(parse_ranks("8-11"), Ok(RankList(vec![8, 9, 10, 11])));
        assert_eq!(parse_ranks("3,0-1,3"), Ok(RankList(vec![0, 1, 3])));
        assert!(parse_ranks("5-2").unwrap_err().contains("empty"));
        assert!(parse_ranks("x").unwrap_err().contains("`x` is not a rank number"));
        assert!(parse_ranks("0-99999999").unwrap_err().contains("too many"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GiB"), Ok(5 << 30));
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_size("0.5GiB"), Ok(1 << 29));
        assert_eq!(parse_size("1.5"), Ok(1));
        assert!(parse_size("1.2.3GB").is_err());
        assert!(parse_size(".GB").is_err());
        assert!(parse_size("0.1B").is_err());
        assert!(parse_size("5 parsecs").unwrap_err().contains("`parsecs`"));
    }
}
