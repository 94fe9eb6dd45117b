//! Human and JSON reports on stdout, the progress bar on stderr.

use reshard::plan::{Piece, ShardPlan};
use reshard::progress::{Sink, Unit};
use reshard::text::{q, shape};
use reshard::verify::VerifyReport;
use reshard::write::WriteSummary;
use serde::Serialize;
use std::io::{self, Write};

/// Whether to draw a progress bar: only for a terminal, and not with `--quiet` or `--json`.
pub fn progress_enabled(stderr_is_terminal: bool, quiet: bool, json: bool) -> bool {
    stderr_is_terminal && !quiet && !json
}

/// The bar template of a phase for a terminal `width` columns wide: the label, the bar and as
/// many of the counts, the rate and the eta as fit, so that the line never wraps.
pub fn bar_template(label: &str, unit: Unit, width: usize) -> String {
    // Widest rendering of each field ("1023.9 MiB/1023.9 MiB", "1023.9 MiB/s", "eta 59m").
    let (count, count_w) = match unit {
        Unit::Bytes => ("{bytes}/{total_bytes}", 21),
        Unit::Items => ("{pos}/{len}", 9),
    };
    let mut fields: Vec<(&str, usize)> = vec![(count, count_w)];
    if unit == Unit::Bytes {
        fields.push(("{binary_bytes_per_sec}", 12));
    }
    fields.push(("eta {eta}", 7));
    // One column is kept free: a line that fills the last column wraps on some terminals.
    let room = |fields: &[(&str, usize)]| {
        width.saturating_sub(1 + label.len() + 1 + fields.iter().map(|(_, w)| w + 1).sum::<usize>())
    };
    while room(&fields) < MIN_BAR && fields.len() > 1 {
        // The rate goes first, then the eta; the count stays.
        let drop = if fields.len() == 3 { 1 } else { fields.len() - 1 };
        fields.remove(drop);
    }
    let bar = room(&fields).min(MAX_BAR);
    let mut t = format!("{label} {{bar:{bar}}}");
    for (f, _) in &fields {
        t.push(' ');
        t.push_str(f);
    }
    t
}

const MIN_BAR: usize = 10;
const MAX_BAR: usize = 40;

/// The progress bar of a command on stderr: one bar, restarted for each phase with its label
/// (a hidden bar when [`progress_enabled`] says no).
pub struct Bar {
    bar: indicatif::ProgressBar,
    width: usize,
}

impl Bar {
    /// A bar drawn on stderr when `enabled`.
    pub fn new(enabled: bool) -> Bar {
        let target =
            if enabled { indicatif::ProgressDrawTarget::stderr() } else { indicatif::ProgressDrawTarget::hidden() };
        let width = console::Term::stderr().size_checked().map_or(80, |(_, cols)| usize::from(cols));
        // Styled before it can draw: until the first phase starts, reading the checkpoint's
        // headers and the mapping.
        let bar = Bar { bar: indicatif::ProgressBar::hidden(), width };
        bar.start("reading", 0, Unit::Items);
        bar.bar.set_draw_target(target);
        bar
    }

    /// Clears the bar off the terminal.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Sink for Bar {
    fn start(&self, label: &str, total: u64, unit: Unit) {
        // The style first: a reset redraws, and must not draw the old phase's label.
        if let Ok(style) = indicatif::ProgressStyle::with_template(&bar_template(label, unit, self.width)) {
            self.bar.set_style(style);
        }
        self.bar.set_length(total);
        self.bar.reset();
    }

    fn inc(&self, n: u64) {
        self.bar.inc(n);
    }
}

/// Human-readable byte count.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn sources(pieces: &[Piece]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut zero_rows = 0;
    for p in pieces {
        match p {
            Piece::Copy { source, dim, start, end, source_shape, .. } => {
                let whole = source_shape.get(*dim).is_none_or(|&n| *start == 0 && *end == n);
                if whole {
                    out.push(q(source).to_string());
                } else {
                    out.push(format!("{}[{}{start}..{end}]", q(source), ":, ".repeat(*dim)));
                }
            }
            Piece::Zeros { rows, reason } if reason == "padding" => zero_rows += rows[1] - rows[0],
            Piece::Zeros { rows, reason } => out.push(format!("zeros[{}] ({reason})", rows[1] - rows[0])),
            Piece::Constant { value, .. } => out.push(format!("constant {}", value.0)),
            Piece::Concat { dim, parts, .. } => {
                let shown: Vec<String> = parts
                    .iter()
                    .map(|s| format!("{}[{}{}..{}]", q(&s.source), ":, ".repeat(*dim), s.start, s.end))
                    .collect();
                out.push(format!("concat({})", shown.join(", ")));
            }
        }
    }
    if zero_rows > 0 {
        out.push(format!("+{zero_rows} zero rows"));
    }
    out.join(" + ")
}

/// Writes the human plan report.
pub fn print_plan(w: &mut impl Write, plan: &ShardPlan) -> io::Result<()> {
    let first = plan.files.first().map_or(0, |f| f.rank);
    let parts = plan.files.iter().filter(|f| f.rank == first).count();
    if plan.output == reshard::plan::OutputKind::HuggingFace {
        writeln!(
            w,
            "family {} ({}): {} of source tensors -> a Hugging Face checkpoint in {} file(s)",
            plan.family,
            plan.mapping,
            bytes(plan.source_bytes),
            plan.files.len()
        )?;
    } else {
        writeln!(
            w,
            "family {} ({}), tp {}: {} of source tensors -> {} file(s) per rank, {} in all",
            plan.family,
            plan.mapping,
            plan.tp,
            bytes(plan.source_bytes),
            parts,
            bytes(plan.output_bytes())
        )?;
        print_target(w, plan)?;
    }
    print_provenance(w, plan)?;
    writeln!(w)?;
    writeln!(w, "{:<40} {:>5} {:>12} {:>8}", "FILE", "RANK", "SIZE", "TENSORS")?;
    for f in &plan.files {
        writeln!(w, "{:<40} {:>5} {:>12} {:>8}", f.name, f.rank, bytes(f.size), f.tensors.len())?;
    }
    for [alias, primary] in &plan.aliases {
        writeln!(w, "alias {} = {} (checked identical, not written)", q(alias), q(primary))?;
    }
    let mut shown: Vec<usize> = plan.files.iter().map(|f| f.rank).collect();
    shown.dedup();
    if shown.len() > 2 {
        shown = vec![shown[0], shown[shown.len() - 1]];
    }
    for rank in shown {
        writeln!(w)?;
        writeln!(w, "rank {rank}:")?;
        let tensors = plan.files.iter().filter(|f| f.rank == rank).flat_map(|f| &f.tensors);
        let width = plan.files.iter().flat_map(|f| &f.tensors).map(|t| t.name.len() + 2).max().unwrap_or(10).min(74);
        writeln!(w, "  {:<width$} {:<13} {:<5} {:<14} FROM", "TENSOR", "SPLIT", "DTYPE", "SHAPE")?;
        for t in tensors {
            writeln!(
                w,
                "  {:<width$} {:<13} {:<5} {:<14} {}",
                q(&t.name).to_string(),
                t.split,
                t.dtype.name(),
                shape(&t.shape),
                sources(&t.pieces)
            )?;
        }
    }
    Ok(())
}

/// Where a plan reads a sharded input, and which ranks it writes.
fn print_provenance(w: &mut impl Write, plan: &ShardPlan) -> io::Result<()> {
    if let Some(s) = &plan.from_shards {
        writeln!(w, "input: shards at tp {} ({}); each source byte read from the first rank holding it", s.tp, s.how)?;
        if let Some(d) = s.cast {
            writeln!(
                w,
                "  note: the input was cast to {d} when it was written; the original dtypes are not recoverable"
            )?;
        }
    }
    if let Some(r) = &plan.ranks {
        writeln!(
            w,
            "ranks written: {} of tp {} (a partial output; the manifest says so)",
            reshard::text::ranges(r),
            plan.tp
        )?;
    }
    Ok(())
}

/// Which engine releases load the output, and what proves it.
fn print_target(w: &mut impl Write, plan: &ShardPlan) -> io::Result<()> {
    match (&plan.target, &plan.engine_status) {
        (Some(t), _) => {
            writeln!(w, "target {}, model code: {}", t.describe(), t.model_code)?;
            writeln!(w, "  evidence: {}", t.evidence)
        }
        (None, Some(status)) => writeln!(w, "target: none. {status}"),
        (None, None) => writeln!(w, "target: none declared by the mapping"),
    }
}

/// Writes the human verify report.
pub fn print_verify(w: &mut impl Write, r: &VerifyReport) -> io::Result<()> {
    writeln!(w, "family {} ({}), tp {}, target {}", r.family, r.mapping, r.tp, r.target.as_deref().unwrap_or("none"))?;
    writeln!(
        w,
        "bytes: {} tensors in {} files checked against the source, {} compared",
        r.tensors_checked,
        r.files_checked,
        bytes(r.bytes_compared)
    )?;
    if !r.dtypes.is_empty() {
        let pairs: Vec<String> = r
            .dtypes
            .iter()
            .map(|d| match d.source {
                None => format!("{} constants ({})", d.output, d.tensors),
                Some(s) if s == d.output => format!("{s} as is ({})", d.tensors),
                Some(s) => format!("{s} cast to {} ({}, the cast recomputed)", d.output, d.tensors),
            })
            .collect();
        writeln!(w, "dtypes (rank 0 tensors, compared bit for bit): {}", pairs.join(", "))?;
    }
    let manifest = if r.manifest_checked {
        "sizes and crc32 checked"
    } else if r.findings.iter().any(|f| f.kind == reshard::verify::FindingKind::Source) {
        "not checked: the source differs"
    } else {
        "none found"
    };
    writeln!(w, "manifest: {manifest}")?;
    if r.source_checked {
        writeln!(w, "source: the manifest's fingerprint of the source matches")?;
    }
    if !r.forward.is_empty() {
        writeln!(
            w,
            "cross-attention forward, shards vs source (f64, tolerance {:.0e} relative):",
            r.forward[0].tolerance
        )?;
        for l in &r.forward {
            let dtypes = if l.source_dtype == l.shard_dtype {
                l.source_dtype.to_string()
            } else {
                format!("{}->{}", l.source_dtype, l.shard_dtype)
            };
            if let Some(why) = &l.skipped {
                writeln!(w, "  layer {:<3} {:<48} {dtypes:<11} skipped: {why}", l.layer, l.module)?;
                continue;
            }
            let status = if l.passed { "ok" } else { "FAILED" };
            writeln!(
                w,
                "  layer {:<3} {:<48} {dtypes:<11} max abs {:.3e}  max rel {:.3e}  {status}",
                l.layer, l.module, l.max_abs_err, l.max_rel_err
            )?;
        }
    }
    for n in &r.notes {
        writeln!(w, "note: {n}")?;
    }
    if r.ok {
        writeln!(w, "OK: every byte is where the layout puts it")
    } else {
        writeln!(w, "FAILED: {} finding(s)", r.findings.len())?;
        for f in &r.findings {
            writeln!(
                w,
                "  [{}] {f}",
                serde_json::to_value(f.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
            )?;
        }
        Ok(())
    }
}

/// Writes the human validate report.
pub fn print_validate(w: &mut impl Write, r: &reshard::gpu::ValidateReport) -> io::Result<()> {
    let tol = r.problems.first().map_or(0.0, |p| p.tolerance);
    writeln!(
        w,
        "device {}, GEMMs in {:?}, tolerance {tol:.0e} (max abs error / max |f64 reference|)",
        r.device, r.dtype
    )?;
    writeln!(
        w,
        "{:<46} {:>3} {:>5} {:>5} {:>10} {:>10} {:>10} {:>9} {:>9} {:>6} {:>6}  result",
        "problem", "tp", "T", "S", "fused/ref", "split/ref", "fused/split", "fused ms", "split ms", "time", "flops"
    )?;
    for p in &r.problems {
        writeln!(
            w,
            "{:<46} {:>3} {:>5} {:>5} {:>10.2e} {:>10.2e} {:>10.2e} {:>9.4} {:>9.4} {:>6.3} {:>6.3}  {}",
            p.label,
            p.tp,
            p.tokens,
            p.source_tokens,
            p.fused_vs_reference.max_rel,
            p.split_vs_reference.max_rel,
            p.fused_vs_split.max_rel,
            p.fused_ms,
            p.split_ms,
            p.time_ratio,
            p.flop_ratio,
            if p.passed { "ok" } else { "FAILED" }
        )?;
    }
    writeln!(w, "time = split/fused median projection GEMM time; flops = split/fused projection FLOPs")
}

/// Writes the human summary of a conversion.
pub fn print_written(
    w: &mut impl Write,
    plan: &ShardPlan,
    s: &WriteSummary,
    verified: Option<&VerifyReport>,
) -> io::Result<()> {
    if plan.output == reshard::plan::OutputKind::HuggingFace {
        writeln!(
            w,
            "wrote {} ({} files, {}): a Hugging Face checkpoint",
            s.out.display(),
            s.files.len(),
            bytes(s.bytes)
        )?;
    } else {
        writeln!(w, "wrote {} ({} files, {}) for tp {}", s.out.display(), s.files.len(), bytes(s.bytes), plan.tp)?;
        print_target(w, plan)?;
    }
    print_provenance(w, plan)?;
    for f in &s.files {
        writeln!(w, "  {:<40} {:>12}  crc32 {}", f.name, bytes(f.size), f.crc32)?;
    }
    if !s.copied.is_empty() {
        writeln!(w, "  copied: {}", s.copied.join(", "))?;
    }
    writeln!(w, "  manifest: {}", reshard::write::MANIFEST_NAME)?;
    if let Some(r) = verified {
        write!(w, "verified: {} tensors, {} compared", r.tensors_checked, bytes(r.bytes_compared))?;
        let checked = r.forward.iter().filter(|l| l.skipped.is_none()).count();
        let skipped = r.forward.len() - checked;
        match (r.forward.is_empty(), skipped) {
            (true, _) => writeln!(w, "; cross-attention forward not checked")?,
            (false, 0) => writeln!(w, ", {checked} cross-attention layer(s) within tolerance")?,
            (false, _) => {
                writeln!(w, ", {checked} cross-attention layer(s) within tolerance, {skipped} skipped (not float)")?
            }
        }
    }
    Ok(())
}

/// Version of the `convert --json` document's fields.
pub const CONVERT_FORMAT_VERSION: u32 = 1;

/// The `convert --json` document: what was written, every path absolute.
pub fn convert_json(plan: &ShardPlan, s: &WriteSummary, verified: Option<&VerifyReport>) -> serde_json::Value {
    use reshard::failure::abs;
    let out = abs(&s.out);
    let files: Vec<serde_json::Value> = s
        .files
        .iter()
        .map(|f| {
            let mut v = serde_json::to_value(f).unwrap_or_default();
            v["path"] = abs(&s.out.join(&f.name)).into();
            v
        })
        .collect();
    serde_json::json!({
        "format_version": CONVERT_FORMAT_VERSION,
        "ok": true,
        "family": plan.family,
        "tp": plan.tp,
        "out": out,
        "manifest": abs(&s.out.join(reshard::write::MANIFEST_NAME)),
        "written": {
            "out": out,
            "files": files,
            "copied": s.copied,
            "bytes": s.bytes,
        },
        "target": plan.target,
        "output": plan.output,
        "ranks": plan.ranks,
        "from_shards": plan.from_shards,
        "verify": verified,
    })
}

/// Writes a value as JSON and a newline.
pub fn print_json(w: &mut impl Write, v: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *w, v)?;
    writeln!(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_policy() {
        assert!(progress_enabled(true, false, false));
        assert!(!progress_enabled(false, false, false));
        assert!(!progress_enabled(true, true, false));
        assert!(!progress_enabled(true, false, true));
    }

    #[test]
    fn bar_fits_the_terminal() {
        for unit in [Unit::Bytes, Unit::Items] {
            for width in 0..200 {
                let t = bar_template("forward check", unit, width);
                // The longest line the template can draw, each field at its widest.
                let bar: usize = t
                    .split("{bar:")
                    .nth(1)
                    .and_then(|r| r.split('}').next())
                    .and_then(|n| n.parse().ok())
                    .expect("a bar");
                let widest = t
                    .replace(&format!("{{bar:{bar}}}"), &"#".repeat(bar))
                    .replace("{bytes}/{total_bytes}", &"x".repeat(21))
                    .replace("{binary_bytes_per_sec}", &"x".repeat(12))
                    .replace("{pos}/{len}", &"x".repeat(9))
                    .replace("{eta}", "59m");
                // Only a terminal too narrow for the label and the count gets no bar, and wraps.
                assert!(widest.len() < width || bar == 0, "{width}: {widest}");
                if width >= 50 {
                    assert!(bar >= MIN_BAR, "{width}: {t}");
                }
                assert!(bar <= MAX_BAR);
            }
        }
        assert!(bar_template("writing", Unit::Bytes, 120).contains("{binary_bytes_per_sec}"));
        let narrow = bar_template("writing", Unit::Bytes, 50);
        assert!(!narrow.contains("per_sec") && narrow.contains("{total_bytes}"), "{narrow}");
    }

    #[test]
    fn human_bytes() {
        assert_eq!(bytes(12), "12 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
    }
}
