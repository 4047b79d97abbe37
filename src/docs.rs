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
            crate::errln!("{name}: cannot write into {}: {e}", dir.display());
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
    page.extend_from_slice(extra_sections(&name).as_bytes());
    std::fs::write(man.join(format!("{name}.1")), page)?;
    // The pages the SUBCOMMANDS section points to (`ots-submit-run(1)`…).
    // Built first: the `help` subcommand clap adds is listed too.
    let mut built = cmd.clone();
    built.build();
    for sub in built.get_subcommands().filter(|s| !s.is_hide_set()) {
        let page_name = format!("{name}-{}", sub.get_name());
        let mut page = Vec::new();
        // A one-shot command: leaking a name per page is the simplest way
        // to hand clap the &'static str it wants.
        let leaked: &'static str = Box::leak(page_name.clone().into_boxed_str());
        clap_mangen::Man::new(sub.clone().name(leaked)).render(&mut page)?;
        std::fs::write(man.join(format!("{page_name}.1")), page)?;
    }
    for (shell, sub, file) in [
        (clap_complete::Shell::Bash, "bash", name.clone()),
        (clap_complete::Shell::Zsh, "zsh", format!("_{name}")),
        (clap_complete::Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let out = dir.join("completions").join(sub);
        std::fs::create_dir_all(&out)?;
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut script);
        if shell == clap_complete::Shell::Bash {
            // clap_complete names a hyphenated binary's subcommands two
            // ways in its bash script (`ots__submit__subcmd__run` where it
            // computes the state, `ots__subcmd__submit__subcmd__run` in the
            // case labels), so no subcommand's options ever completed:
            // one spelling.
            let text = String::from_utf8_lossy(&script)
                .replace(&name.replace('-', "__subcmd__"), &name.replace('-', "__"));
            script = text.into_bytes();
        }
        std::fs::write(out.join(file), script)?;
    }
    Ok(())
}

/// FILES, ENVIRONMENT and EXIT STATUS of each binary's man page (roff).
fn extra_sections(name: &str) -> String {
    let (files, env, exit) = match name {
        "ots-server" => (
            "/etc/ots/server.toml (configuration), /etc/ots/server.key (private key, 0600, owned by the ots user), /etc/ots/workers.d/NAME.pub and NAME.device (workers allowed, and the devices each may serve), /etc/ots/users.d/NAME.pub and NAME.role (users allowed, role submit, operator or admin), /var/lib/ots/server (state: ots.db, task logs, result files, inputs, audit.log).",
            "OTS_SERVER_<KEY> sets any configuration key (OTS_SERVER_STATE_DIR, OTS_SERVER_KEY: the server's private key, OTS_SERVER_LIMITS__MAX_OPEN_TASKS…); RUST_LOG overrides log_level.",
            "0 stopped in order; 69 cannot bind or open its state (systemd restarts it); 70 a panic; 74 a state database write failed; 78 configuration, key, allow-list or file ownership error (not restarted).",
        ),
        "ots-worker" => (
            "/etc/ots/worker.toml (configuration), /etc/ots/worker.d/NAME.toml (one instance's device), /etc/ots/worker.d/NAME.key (its private key, 0600, owned by the ots user), /etc/ots/server.pub (the pinned server key), /var/lib/ots/worker/NAME (state: worker.db, task folders, input cache).",
            "OTS_WORKER_<KEY> sets any configuration key (OTS_WORKER_KEY may hold {name}); OTS_SECRET_<NAME> reaches the conductor for each testrun secret; RUST_LOG overrides log_level.",
            "0 stopped in order; 70 a panic; 73 its state directory is unusable or held by another worker (not restarted); 75 another live worker has this name (retried); 78 configuration, key or forbidden registration (its key does not allow this name or device; not restarted).",
        ),
        _ => (
            "~/.config/ots/me.key (your private key), ~/.config/ots/server.pub, else /etc/ots/server.pub (the pinned server key).",
            "OTS_SERVER (control endpoint), OTS_KEY, OTS_PINNED_SERVER_KEY, OTS_SECURITY, OTS_SECRET_<KEY> (for run --secret KEY).",
            "0 PASS, 1 FAIL, 2 ERROR, 3 cancelled, 64 usage error, 65 refused by the server, 69 server unreachable, 70 local lab failed, 74 cannot write fetched files, 76 protocol error, 77 the server refused our key or our role may not do this, 78 our own key files are missing or unusable.",
        ),
    };
    let roff = |t: &str| t.replace('\\', "\\\\").replace('-', "\\-");
    format!(
        ".SH FILES\n{}\n.SH ENVIRONMENT\n{}\n.SH \"EXIT STATUS\"\n{}\n.SH \"SEE ALSO\"\nots\\-server(1), ots\\-worker(1), ots\\-submit(1); /usr/share/doc/ots/README.md and PROTOCOL.md\n",
        roff(files),
        roff(env),
        roff(exit)
    )
}
