//! The `reshard` binary: parse arguments, call the library, map the result to an exit code.

mod cli;
mod output;

use clap::Parser;
use cli::{Cli, Command, SourceArgs};
use reshard::{exit_code, write::WriteOptions, Error, Source};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

fn source(a: &SourceArgs) -> Source {
    Source { input: a.input.clone(), config: a.config.clone(), mapping: a.mapping.clone() }
}

fn run(cli: Cli, out: &mut impl Write) -> Result<std::io::Result<()>, Error> {
    match cli.command {
        Command::Plan(a) => {
            let (_, plan) = reshard::make_plan(&source(&a.source), a.source.tp as usize, a.source.max_part_size)?;
            Ok(if a.source.json { output::print_json(out, &plan) } else { output::print_plan(out, &plan) })
        }
        Command::Convert(a) => {
            let s = &a.source;
            let bar = indicatif::ProgressBar::new(0);
            if !output::progress_enabled(std::io::stderr().is_terminal(), a.quiet, s.json) {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .expect("static template"),
            );
            let opts = WriteOptions { out: a.out.clone(), force: a.force, progress: &|n| bar.inc(n) };
            let (meta, plan) = reshard::make_plan(&source(s), s.tp as usize, s.max_part_size)?;
            bar.set_length(plan.output_bytes());
            let summary = reshard::execute(meta, &plan, &opts)?;
            bar.finish_and_clear();
            Ok(if s.json { output::print_json(out, &summary) } else { output::print_written(out, &plan, &summary) })
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    match run(cli, &mut stdout.lock()) {
        Ok(Ok(())) => ExitCode::from(exit_code::OK),
        // A closed pipe (`reshard plan ... | head`) is not an error.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::from(exit_code::OK),
        Ok(Err(e)) => {
            eprintln!("error: writing to stdout: {e}");
            ExitCode::from(exit_code::OUTPUT_FAILED)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
