//! The subcommands: each calls the library and prints its result (bin side).

use crate::cli::{Cli, Command, ConvertArgs, SourceArgs};
use crate::output;
use reshard::{exit_code, write::WriteOptions, Error, Source};
use std::io::{IsTerminal, Write};

fn source(a: &SourceArgs) -> Source {
    Source { input: a.input.clone(), config: a.config.clone(), mapping: a.mapping.clone() }
}

/// Runs a command: the result of printing to stdout, and the exit code when it went through.
pub fn run(cli: Cli, out: &mut impl Write) -> Result<(std::io::Result<()>, u8), Error> {
    match cli.command {
        Command::Plan(a) => {
            let (_, plan) = reshard::make_plan(&source(&a.source), &a.source.plan_options())?;
            let printed = if a.source.json { output::print_json(out, &plan) } else { output::print_plan(out, &plan) };
            Ok((printed, exit_code::OK))
        }
        Command::Convert(a) => {
            // First, before any thread starts: every thread inherits the blocked signals.
            if let Err(e) = reshard::write::interrupt::install() {
                eprintln!("warning: SIGINT, SIGTERM and SIGHUP will not remove the staging directory: {e}");
            }
            let result = convert(&a, out);
            // A signal being handled ends the process with its own code and message.
            reshard::write::interrupt::wait_if_interrupted();
            result
        }
        Command::Validate(a) => {
            let job = a.job()?;
            let json = job.1;
            let report = reshard::gpu::run(&job.0)?;
            let printed = if json { output::print_json(out, &report) } else { output::print_validate(out, &report) };
            if !report.ok {
                eprintln!("error: validation on {} failed: a result is outside its tolerance", report.device);
            }
            Ok((printed, if report.ok { exit_code::OK } else { exit_code::CHECK_FAILED }))
        }
        Command::Verify(a) => {
            let src = Source { input: a.source, config: a.config, mapping: a.mapping };
            let opts = reshard::verify::VerifyOptions { target: a.target, ..a.check.options() };
            let report = reshard::verify::verify(&src, &a.out, &opts)?;
            let printed = if a.json { output::print_json(out, &report) } else { output::print_verify(out, &report) };
            if !report.ok {
                eprintln!("error: verification failed: {} finding(s)", report.findings.len());
            }
            Ok((printed, if report.ok { exit_code::OK } else { exit_code::CHECK_FAILED }))
        }
    }
}

/// `convert`: writes the shards (with signal handling installed by the caller).
fn convert(a: &ConvertArgs, out: &mut impl Write) -> Result<(std::io::Result<()>, u8), Error> {
    let s = &a.source;
    let bar = indicatif::ProgressBar::new(0);
    if !output::progress_enabled(std::io::stderr().is_terminal(), a.quiet, s.json) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
            .expect("static template"),
    );
    let opts = WriteOptions { out: a.out.clone(), force: a.force, progress: &|n| bar.inc(n), fsync: !a.no_fsync };
    let (meta, plan) = reshard::make_plan(&source(s), &s.plan_options())?;
    bar.set_length(plan.output_bytes());
    let vopts = a.check.options();
    let src = source(s);
    let (summary, report) = reshard::execute(meta, &plan, &opts, a.verify.then_some((&src, &vopts)))?;
    bar.finish_and_clear();
    let printed = if s.json {
        output::print_json(out, &serde_json::json!({"written": summary, "target": plan.target, "verify": report}))
    } else {
        output::print_written(out, &plan, &summary, report.as_ref())
    };
    Ok((printed, exit_code::OK))
}
