//! The `gpumem` command.
//!
//! Exit codes: 0 success; 1 the work failed (out of memory, device error); 2 bad input or
//! usage. Errors are one line on stderr.

mod args;
mod bench;
mod demo;
mod info;
mod leaks;
mod replay;
mod report;
mod units;

use clap::Parser;
use std::process::ExitCode;

/// A failure, with the exit code it maps to.
pub(crate) enum Failure {
    /// Bad input or usage: exit 2.
    Input(String),
    /// The work failed: exit 1.
    Work(String),
}

impl Failure {
    /// Bad input or usage, from any error.
    pub(crate) fn input(e: impl std::fmt::Display) -> Failure {
        Failure::Input(e.to_string())
    }

    /// Failed work, from any error.
    pub(crate) fn work(e: impl std::fmt::Display) -> Failure {
        Failure::Work(e.to_string())
    }
}

impl From<gpumem_trace::TraceError> for Failure {
    fn from(e: gpumem_trace::TraceError) -> Self {
        Failure::input(e)
    }
}

/// An error for the terminal: one line, escaped (a file name or an option may hold any
/// character) and cut where it runs long.
fn one_line(m: &str) -> String {
    gpumem::escape_for_message(m, 2000)
}

fn main() -> ExitCode {
    // Like any Unix tool, end quietly when the reader of our output goes away (`| head`),
    // instead of failing to print.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = args::Cli::parse();
    let result = match cli.command {
        args::Command::Demo(a) => demo::run(&a),
        args::Command::Replay(a) => replay::run_replay(&a),
        args::Command::Summary(a) => replay::run_summary(&a),
        args::Command::Info(a) => info::run(a.json),
        args::Command::Bench(a) => bench::run(&a),
        args::Command::Leaks(a) => leaks::run(&a),
        args::Command::Report(a) => report::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Input(m)) => {
            eprintln!("gpumem: {}", one_line(&m));
            ExitCode::from(2)
        }
        Err(Failure::Work(m)) => {
            eprintln!("gpumem: {}", one_line(&m));
            ExitCode::from(1)
        }
    }
}
