//! The `reshard` binary: parse arguments, call the library, map the result to an exit code.

mod cli;
mod commands;
mod output;

use clap::Parser;
use cli::Cli;
use reshard::exit_code;
use reshard::failure::Failure;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return cli::usage_error(e),
    };
    let json = cli.json();
    let stdout = std::io::stdout();
    let result = commands::run(cli, &mut stdout.lock());
    if std::env::var_os("RESHARD_CRASH_COUNT").is_some() {
        eprintln!("crash points: {}", reshard::write::crash_points_passed());
    }
    match result {
        Ok((Ok(()), code)) => ExitCode::from(code),
        // A closed pipe (`reshard plan ... | head`) is not an error.
        Ok((Err(e), code)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::from(code),
        Ok((Err(e), _)) => {
            eprintln!("error: writing to stdout: {e}");
            ExitCode::from(exit_code::OUTPUT_FAILED)
        }
        Err(e) => {
            eprintln!("error: {e}");
            if json {
                // Best effort: the error is already on stderr.
                let _ = output::print_json(&mut stdout.lock(), &Failure::new(&e));
            }
            ExitCode::from(e.exit_code())
        }
    }
}
