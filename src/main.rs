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
    bound_malloc_arenas();
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

/// At most two malloc arenas, whatever the number of threads. glibc gives threads arenas of their
/// own, up to 8 per core, and each keeps what its thread freed: `convert --verify` of the full
/// 11B-Vision shape, cold, tp 4, peaked at 31.5 MiB of anonymous memory with ten arenas and
/// 28.3 MiB with two (`MALLOC_ARENA_MAX=2`, one run each). The threads allocate little (the
/// bytes move through reused blocks), so they do not wait for each other here. `MALLOC_ARENA_MAX`
/// in the environment still decides.
fn bound_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: called first in `main`, before any other thread exists; mallopt only sets a
        // limit for arenas created later.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
}
