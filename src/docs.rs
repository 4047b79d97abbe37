//! Man pages and shell completions, generated from each binary's own
//! command-line definition (`ots-server gen-docs DIR`, likewise for
//! ots-worker and ots-submit), so they never disagree with `--help`. The
//! install script puts them in place.

use std::path::Path;

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
