use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use gpuflow::cli::{Cli, Command, LogFormat, run};

fn main() -> ExitCode {
    // reqwest is built without a default TLS provider; install ring before any client exists.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. }) {
        // A client command piped into `head` should end quietly when the reader goes away, as
        // Unix tools do, instead of panicking in `println!`. The engine keeps Rust's default
        // (SIGPIPE ignored): a write to a dead worker's stdin must be an error, not its death.
        // SAFETY: restoring a signal's default disposition before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The log on stderr: colours only on a terminal (a file or journald gets plain text), or
/// one JSON object per line for log collectors.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GPUFLOW_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
