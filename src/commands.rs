//! The subcommands: each calls the library and prints its result (bin side).

use crate::cli::{Cli, Command, ConvertArgs, MergeArgs, SourceArgs};
use crate::output;
use reshard::progress::Sink;
use reshard::{exit_code, write::WriteOptions, Error, Source};
use std::io::{IsTerminal, Write};
use std::sync::Arc;

fn source(a: &SourceArgs) -> Source {
    a.read.source(&a.input)
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
            reshard::write::interrupt::set_json_errors(a.source.json);
            if let Err(e) = reshard::write::interrupt::install() {
                eprintln!("warning: SIGINT, SIGTERM and SIGHUP will not remove the staging directory: {e}");
            }
            let result = convert(&a, out);
            // A signal being handled ends the process with its own code and message.
            reshard::write::interrupt::wait_if_interrupted();
            result
        }
        Command::Merge(a) => {
            reshard::write::interrupt::set_json_errors(a.json);
            if let Err(e) = reshard::write::interrupt::install() {
                eprintln!("warning: SIGINT, SIGTERM and SIGHUP will not remove the staging directory: {e}");
            }
            let result = merge(&a, out);
            reshard::write::interrupt::wait_if_interrupted();
            result
        }
        Command::Validate(a) => {
            let (job, json) = a.job()?;
            // The arguments before the GPU: a bad SOURCE or OUT is exit 2 in every build, with or
            // without a GPU (issue #17).
            if let reshard::gpu::ValidateInput::Checkpoint { src, out, .. } = &job.input {
                src.load()?;
                reshard::verify::open_output(out)?;
            }
            let report = reshard::gpu::run(&job)?;
            let printed = if json { output::print_json(out, &report) } else { output::print_validate(out, &report) };
            if !report.ok {
                eprintln!("error: validation on {} failed: a result is outside its tolerance", report.device);
            }
            Ok((printed, if report.ok { exit_code::OK } else { exit_code::CHECK_FAILED }))
        }
        Command::Verify(a) => {
            let src = a.read.source(&a.source);
            let bar =
                Arc::new(output::Bar::new(output::progress_enabled(std::io::stderr().is_terminal(), false, a.json)));
            let progress = reshard::progress::Progress::new(bar.clone());
            let opts = reshard::verify::VerifyOptions { target: a.target, progress, ..a.check.options() };
            let report = reshard::verify::verify(&src, &a.out, &opts);
            bar.finish();
            let report = report?;
            let printed = if a.json { output::print_json(out, &report) } else { output::print_verify(out, &report) };
            if !report.ok {
                eprintln!("error: verification failed: {} finding(s)", report.findings.len());
            }
            Ok((printed, if report.ok { exit_code::OK } else { exit_code::CHECK_FAILED }))
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, "reshard", &mut buf);
            Ok((out.write_all(&buf), exit_code::OK))
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut buf = Vec::new();
            let rendered = clap_mangen::Man::new(cmd).render(&mut buf);
            Ok((rendered.and_then(|()| out.write_all(&buf)), exit_code::OK))
        }
    }
}

/// `convert`: writes the shards (with signal handling installed by the caller).
fn convert(a: &ConvertArgs, out: &mut impl Write) -> Result<(std::io::Result<()>, u8), Error> {
    let s = &a.source;
    let bar = Arc::new(output::Bar::new(output::progress_enabled(std::io::stderr().is_terminal(), a.quiet, s.json)));
    let opts = WriteOptions { out: a.out.clone(), force: a.force, progress: &|n| bar.inc(n), fsync: !a.no_fsync };
    let (input, plan) = reshard::make_plan(&source(s), &s.plan_options())?;
    let vopts = a.check.options();
    write_and_print(&source(s), input, &plan, &opts, a.verify.then_some(vopts), &bar, s.json, out)
}

/// `merge`: writes the Hugging Face checkpoint (with signal handling installed by the caller).
fn merge(a: &MergeArgs, out: &mut impl Write) -> Result<(std::io::Result<()>, u8), Error> {
    let bar = Arc::new(output::Bar::new(output::progress_enabled(std::io::stderr().is_terminal(), a.quiet, a.json)));
    let opts = WriteOptions { out: a.out.clone(), force: a.force, progress: &|n| bar.inc(n), fsync: !a.no_fsync };
    let src = a.read.source(&a.input);
    let input = src.read()?;
    let plan = input.plan_hf(a.max_part_size)?;
    let vopts = reshard::verify::VerifyOptions { forward: false, ..Default::default() };
    write_and_print(&src, input, &plan, &opts, a.verify.then_some(vopts), &bar, a.json, out)
}

/// Writes `plan`, verifying it first with `verify`, and prints what was written.
#[allow(clippy::too_many_arguments)]
fn write_and_print(
    src: &Source,
    input: reshard::Input,
    plan: &reshard::plan::ShardPlan,
    opts: &WriteOptions,
    verify: Option<reshard::verify::VerifyOptions>,
    bar: &Arc<output::Bar>,
    json: bool,
    out: &mut impl Write,
) -> Result<(std::io::Result<()>, u8), Error> {
    bar.start("writing", plan.output_bytes(), reshard::progress::Unit::Bytes);
    let vopts =
        verify.map(|v| reshard::verify::VerifyOptions { progress: reshard::progress::Progress::new(bar.clone()), ..v });
    let result = reshard::execute(input, plan, opts, vopts.as_ref().map(|v| (src, v)));
    bar.finish();
    let (summary, report) = result?;
    let printed = if json {
        output::print_json(out, &output::convert_json(plan, &summary, report.as_ref()))
    } else {
        output::print_written(out, plan, &summary, report.as_ref())
    };
    Ok((printed, exit_code::OK))
}
