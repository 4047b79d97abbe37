//! Shell completion of what only the server knows: run ids, task ids,
//! worker names and leases. The completion scripts (`gen-docs`) call the
//! hidden `ots-submit complete KIND PREFIX`, which asks the server as the
//! user (the same key and `OTS_SERVER` as any command) and prints one
//! candidate per line — or nothing, quickly, when the server cannot be
//! asked: a shell's Tab never hangs or prints an error.

use super::Conn;
use crate::client::exit;
use std::time::Duration;

/// Candidates printed at most.
const MAX_CANDIDATES: usize = 200;

/// What a subcommand's first argument names, for the scripts (bash, zsh,
/// fish) to ask `complete` about; the second `logs` argument is a task.
pub const KINDS: [(&str, &[&str]); 4] = [
    (
        "runs",
        &[
            "wait",
            "status",
            "cancel",
            "cases",
            "compare",
            "logs",
            "fetch",
            "notifications",
        ],
    ),
    (
        "workers",
        &[
            "drain",
            "undrain",
            "health",
            "check",
            "maintenance",
            "retire",
        ],
    ),
    ("leases", &["release", "renew", "power", "console"]),
    ("tasks", &[]),
];

pub(crate) async fn complete(mut conn: Conn, kind: &str, prefix: &str) -> i32 {
    conn.connect_timeout = conn.connect_timeout.min(Duration::from_secs(1));
    let found = tokio::time::timeout(Duration::from_secs(2), candidates(&conn, kind, prefix)).await;
    if let Ok(Some(mut names)) = found {
        names.retain(|n| n.starts_with(prefix));
        names.sort();
        names.dedup();
        for n in names.iter().take(MAX_CANDIDATES) {
            crate::outln!("{}", crate::text::escape_controls(n));
        }
    }
    exit::PASS
}

async fn candidates(conn: &Conn, kind: &str, prefix: &str) -> Option<Vec<String>> {
    let mut client = conn.connect().await.ok()?;
    Some(match kind {
        "runs" => client
            .runs(None, None, 100)
            .await
            .ok()?
            .into_iter()
            .map(|r| r.run)
            .collect(),
        "workers" => client
            .workers()
            .await
            .ok()?
            .into_iter()
            .map(|w| w.name)
            .collect(),
        "leases" => client
            .leases(false)
            .await
            .ok()?
            .into_iter()
            .map(|l| l.lease)
            .collect(),
        "tasks" => {
            // `r12.` → r12's tasks; a bare prefix → the tasks of the
            // newest testruns it matches.
            let runs: Vec<String> = match prefix.split_once('.') {
                Some((run, _)) => vec![run.to_string()],
                None => client
                    .runs(None, None, 100)
                    .await
                    .ok()?
                    .into_iter()
                    .map(|r| r.run)
                    .filter(|r| r.starts_with(prefix))
                    .take(10)
                    .collect(),
            };
            let mut tasks = Vec::new();
            for run in runs {
                if let Ok(s) = client.status(&run).await {
                    tasks.extend(s.tasks.into_iter().map(|t| t.task));
                }
            }
            tasks
        }
        _ => return None,
    })
}

/// The shell functions that ask `complete`, added to the generated
/// completion scripts of `ots-submit` (bash, zsh, fish) under `dir`.
pub fn add_to_scripts(dir: &std::path::Path) -> std::io::Result<()> {
    let cases = |sep: &str| {
        KINDS
            .iter()
            .filter(|(_, subs)| !subs.is_empty())
            .map(|(kind, subs)| format!("({}) kind={kind} ;;", subs.join(sep)))
            .collect::<Vec<_>>()
            .join("\n        ")
    };
    let bash = format!(
        r#"
# Run ids, task ids, workers and leases: asked of the server (ots-submit complete).
_ots_submit_ids() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" sub="" pos=0 i kind=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            --server|--key|--server-key|--security|--connect-timeout) ((i++)) ;;
            -*) ;;
            *) if [[ -z "$sub" ]]; then sub="${{COMP_WORDS[i]}}"; else ((pos++)); fi ;;
        esac
    done
    case "$sub" in
        {}
    esac
    if [[ "$sub" == logs && $pos -eq 1 ]]; then kind=tasks; elif [[ $pos -ne 0 ]]; then kind=""; fi
    if [[ -n "$kind" && "$cur" != -* ]]; then
        COMPREPLY=( $(ots-submit complete "$kind" "$cur" 2>/dev/null) )
        return 0
    fi
    _ots__submit "$@"
}}
complete -F _ots_submit_ids -o nosort -o bashdefault -o default ots-submit
"#,
        cases("|")
    );
    let fish: String = KINDS
        .iter()
        .filter(|(_, subs)| !subs.is_empty())
        .map(|(kind, subs)| {
            format!(
                "complete -c ots-submit -n \"__fish_seen_subcommand_from {}\" -f -a \"(ots-submit complete {kind} (commandline -ct) 2>/dev/null)\"\n",
                subs.join(" ")
            )
        })
        .chain(std::iter::once(
            "complete -c ots-submit -n \"__fish_seen_subcommand_from logs\" -f -a \"(ots-submit complete tasks (commandline -ct) 2>/dev/null)\"\n".to_string(),
        ))
        .collect();
    let zsh_fn = format!(
        r#"
# Run ids, task ids, workers and leases: asked of the server (ots-submit complete).
_ots_submit_ids() {{
    local kind=""
    case ${{words[2]}} in
        {}
    esac
    if [[ ${{words[2]}} == logs && $CURRENT -eq 4 ]]; then kind=tasks; elif (( CURRENT != 3 )); then kind=""; fi
    if [[ -n $kind && $PREFIX != -* ]]; then
        local -a ids
        ids=(${{(f)"$(ots-submit complete $kind $PREFIX 2>/dev/null)"}})
        compadd -a ids
        return
    fi
    _ots-submit "$@"
}}
"#,
        cases("|")
    );
    let completions = dir.join("completions");
    let append = |path: std::path::PathBuf, text: &str| -> std::io::Result<()> {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)?
            .write_all(text.as_bytes())
    };
    append(completions.join("bash/ots-submit"), &bash)?;
    append(completions.join("fish/ots-submit.fish"), &fish)?;
    // zsh: the dispatch at the file's end goes through the ids first.
    let zsh = completions.join("zsh/_ots-submit");
    let text = std::fs::read_to_string(&zsh)?;
    let tail = "if [ \"$funcstack[1]\" = \"_ots-submit\" ]; then";
    let text = match text.rfind(tail) {
        Some(at) => format!(
            "{}{zsh_fn}\n{}",
            &text[..at],
            text[at..]
                .replace("    _ots-submit \"$@\"", "    _ots_submit_ids \"$@\"")
                .replace(
                    "compdef _ots-submit ots-submit",
                    "compdef _ots_submit_ids ots-submit"
                )
        ),
        None => text,
    };
    std::fs::write(zsh, text)
}
