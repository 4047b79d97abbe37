//! `ots-submit`: submit testruns and watch them. See `ots-submit --help`.

use clap::Parser;
use ots::client::commands::{self, Cli};
use ots::client::exit;

#[tokio::main]
async fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    ots::logging::init("warn");
    ots::fatal::exit_on_panic("ots-submit");
    std::process::exit(commands::main(cli).await);
}
