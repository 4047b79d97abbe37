//! `ots-submit`: submit testruns and watch them. See `ots-submit --help`.

use clap::Parser;
use ots::cli::{self, Cli};
use ots::client::exit;

#[tokio::main]
async fn main() {
    // Like any Unix filter: output into a closed pipe (`| head`) ends the
    // program quietly instead of panicking on a failed write.
    // SAFETY: set once at start, before any other thread writes.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
    let args = cli::hoist_global_options(std::env::args_os().collect());
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    ots::logging::init("warn");
    ots::fatal::exit_on_panic("ots-submit");
    std::process::exit(cli::main(cli).await);
}
