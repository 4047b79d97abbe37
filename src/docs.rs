//! Man pages and shell completions, generated from each binary's own
//! command-line definition (`ots-server gen-docs DIR`, likewise for
//! ots-worker and ots-submit), so they never disagree with `--help`. The
//! install script puts them in place.

use std::path::Path;

/// Parses a daemon's command line: `--help`/`--version` print and exit 0;
/// a bad flag is a configuration error and exits 78 (EX_CONFIG), which
/// systemd does not restart (clap's own status, 2, it would).
pub fn parse_daemon_args<T: clap::Parser>() -> Result<T, std::process::ExitCode> {
    match T::try_parse() {
        Ok(a) => Ok(a),
        Err(e) => {
            let _ = e.print();
            Err(if e.use_stderr() {
                std::process::ExitCode::from(78)
            } else {
                std::process::ExitCode::SUCCESS
            })
        }
    }
}

/// The hidden `gen-docs DIR` of a binary: writes its docs, exit status.
pub fn gen_docs_command(cmd: clap::Command, dir: &Path) -> std::process::ExitCode {
    let name = cmd.get_name().to_string();
    match generate(cmd, dir) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: cannot write into {}: {e}", dir.display());
            std::process::ExitCode::from(73)
        }
    }
}

/// Writes `DIR/man/man1/NAME.1` and `DIR/completions/{bash,zsh,fish}/…`.
pub fn generate(mut cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    let name = cmd.get_name().to_string();
    let man = dir.join("man/man1");
    std::fs::create_dir_all(&man)?;
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    std::fs::write(man.join(format!("{name}.1")), page)?;
    for (shell, sub, file) in [
        (clap_complete::Shell::Bash, "bash", name.clone()),
        (clap_complete::Shell::Zsh, "zsh", format!("_{name}")),
        (clap_complete::Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let out = dir.join("completions").join(sub);
        std::fs::create_dir_all(&out)?;
        let mut f = std::fs::File::create(out.join(file))?;
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut f);
    }
    Ok(())
}
