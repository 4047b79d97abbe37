//! One task attempt, from its folders to its final report: recovery
//! before a health check, input files fetched, the console's actions and
//! record, the conductor run, result files collected. Runs in a task of
//! its own per attempt, reporting through its response channel.

pub mod channel;
pub mod conductor;
pub mod console;
pub mod hold;
pub mod power;
pub mod reader;

use crate::protocol::{Outcome, Stream, TaskSpec};
use crate::security::Credentials;
use crate::worker::config::WorkerConfig;
use crate::worker::task::channel::{LogBudget, ResponseChannel, ResultFile, TaskEvent};
use crate::worker::task::conductor::{Stop, TaskContext};
use crate::worker::task::console::Console;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Input files kept in the worker's cache at most (bytes): past it, the
/// files the current task does not use are removed.
const INPUT_CACHE_BYTES: u64 = 4 << 30;

/// Ends the task's channel with `failure`: it could not get as far as
/// the conductor (an infrastructure failure, PROTOCOL.md §7.5).
fn fail_before_conductor(channel: ResponseChannel, failure: String) {
    channel.finish(
        Outcome {
            failure: Some(failure),
            ..Outcome::default()
        },
        Vec::new(),
    );
}

/// Runs the worker's `[recovery] command` before a health check that
/// follows a failure (PROTOCOL.md §5.5): a power cycle, a USB reset. Its
/// output goes into the check's log; it must exit 0 within its timeout,
/// or the check fails saying why.
async fn recover(
    cfg: &WorkerConfig,
    device: &crate::protocol::DeviceProps,
    work_dir: &Path,
    channel: &mut ResponseChannel,
    stop: watch::Receiver<Stop>,
) -> Result<(), String> {
    let r = &cfg.recovery;
    if r.power_cycle {
        channel.log(
            Stream::Worker,
            "recovery: power cycle ([recovery] power_cycle)".into(),
        );
        info!("power cycling the device before a health check");
        let out = power::act(&cfg.power, crate::protocol::PowerAction::Cycle).await;
        channel.log(
            Stream::Worker,
            format!(
                "recovery: power cycle {}, state {} {}",
                if out.ok { "done" } else { "failed" },
                out.state,
                out.message
            ),
        );
        return if out.ok {
            Ok(())
        } else {
            Err(format!(
                "device/host failure: the power cycle ([power] of the worker's configuration, [recovery] power_cycle) failed: {}",
                out.message
            ))
        };
    }
    if r.command.is_empty() {
        channel.log(
            Stream::Worker,
            "health check after a failure: this worker has no [recovery] command; checking the device as it is".into(),
        );
        return Ok(());
    }
    let timeout = Duration::from_secs(r.timeout_secs);
    channel.log(
        Stream::Worker,
        format!(
            "recovery: running {:?} (timeout {})",
            r.command,
            humantime::format_duration(timeout)
        ),
    );
    info!(command = %r.command.join(" "), "running the recovery command before a health check");
    let (line_tx, mut line_rx) = mpsc::channel(4);
    let run = conductor::Run {
        argv: r.command.clone(),
        work_dir: work_dir.to_path_buf(),
        timeout,
        kill_grace: Duration::from_millis(cfg.conductor.kill_grace_ms),
        env: vec![
            ("OTS_WORKER_NAME".into(), cfg.name.clone()),
            ("OTS_DEVICE".into(), device.to_string()),
        ],
        pgid_file: None,
        masker: conductor::Masker::new(&std::collections::BTreeMap::new()),
        log_full: Default::default(),
    };
    let handle = tokio::spawn(conductor::run(run, line_tx, stop));
    while let Some(packed) = line_rx.recv().await {
        channel.wait_for_room().await;
        channel.log_packed(packed);
    }
    let outcome = handle
        .await
        .map_err(|e| format!("worker bug: recovery runner failed: {e}"))?;
    let failed = match (
        &outcome.failure,
        outcome.timed_out,
        outcome.signal,
        outcome.exit_code,
    ) {
        (Some(f), ..) => Some(format!("cannot run it: {f}")),
        (None, true, ..) => Some(format!(
            "still running after {}, killed",
            humantime::format_duration(timeout)
        )),
        (None, false, Some(sig), _) => Some(format!("killed by signal {sig}")),
        (None, false, None, Some(0)) => None,
        (None, false, None, Some(code)) => Some(format!("exit status {code}")),
        (None, false, None, None) => Some("ended without an exit status".into()),
    };
    match failed {
        None => {
            channel.log(Stream::Worker, "recovery: done (exit 0)".into());
            Ok(())
        }
        Some(why) => Err(format!(
            "device/host failure: the recovery command {:?} ([recovery] command in the worker's configuration) failed: {why}",
            r.command
        )),
    }
}

/// Fetches the task's input files from the server (with this worker's
/// key, over a connection of their own) into the worker's cache, resuming
/// and verifying each, and links them into the task's inputs folder under
/// their names. An error says which file and why: the task then fails
/// before its conductor starts.
async fn fetch_inputs(
    cfg: &WorkerConfig,
    credentials: &Credentials,
    spec: &TaskSpec,
    inputs_dir: &Path,
    channel: &mut ResponseChannel,
) -> Result<(), String> {
    if spec.inputs.is_empty() {
        return Ok(());
    }
    let cache = cfg.state_dir.join("inputs");
    let timeout = Duration::from_millis(cfg.connect_timeout_ms.max(1000) * 5);
    let mut client = crate::client::Client::connect(&cfg.server, timeout, credentials)
        .await
        .map_err(|e| format!("device/host failure: cannot fetch the input files: {e}"))?;
    let total = spec
        .inputs
        .iter()
        .map(|i| i.size)
        .fold(0u64, u64::saturating_add);
    if total > INPUT_CACHE_BYTES {
        return Err(format!(
            "the testrun's input files are {total} bytes, more than this worker's input cache holds ({INPUT_CACHE_BYTES})"
        ));
    }
    for input in &spec.inputs {
        let cached = cache.join(&input.sha256);
        let source = crate::client::transfer::Source::Input {
            sha256: input.sha256.clone(),
        };
        let fetched = client
            .download_to(
                &source,
                input.size,
                &input.sha256,
                &cached,
                &mut crate::client::transfer::Silent,
            )
            .await
            .map_err(|e| format!("input file {} could not be fetched: {e}", input.name))?;
        let rel = crate::protocol::check::relative_path(&input.name)
            .ok_or_else(|| format!("input file name {:?} is not a relative path", input.name))?;
        let target = inputs_dir.join(rel);
        let placed = (|| {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::hard_link(&cached, &target)
                .or_else(|_| std::fs::copy(&cached, &target).map(|_| ()))
        })();
        placed.map_err(|e| {
            format!(
                "input file {} cannot be placed at {}: {e}",
                input.name,
                target.display()
            )
        })?;
        channel.log(
            Stream::Worker,
            format!(
                "input file {} ({} bytes, {}): {}",
                input.name,
                input.size,
                &input.sha256[..12],
                if fetched > 0 { "fetched" } else { "cached" }
            ),
        );
    }
    prune_input_cache(&cache, &spec.inputs);
    Ok(())
}

/// Keeps the input cache under [`INPUT_CACHE_BYTES`], never removing what
/// the current task uses.
fn prune_input_cache(cache: &Path, keep: &[crate::protocol::InputFile]) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    files.sort();
    for (_, len, path) in files {
        if total <= INPUT_CACHE_BYTES {
            return;
        }
        let used = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| keep.iter().any(|i| i.sha256 == n));
        if !used && std::fs::remove_file(&path).is_ok() {
            total -= len;
        }
    }
}

/// Removes the oldest finished task folders beyond `keep`, on a blocking
/// thread (a results folder can hold gigabytes).
pub(super) fn prune_task_dirs(dirs: &mut std::collections::VecDeque<PathBuf>, keep: usize) {
    while dirs.len() > keep {
        let Some(dir) = dirs.pop_front() else { return };
        tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
            Ok(()) => debug!(dir = %dir.display(), "removed a finished task's folder"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot remove a finished task's folder")
            }
        });
    }
}

/// A folder per attempt: a new attempt never races the cleanup of an old one.
pub(super) fn attempt_dir(cfg: &WorkerConfig, task: &str, attempt: u32) -> PathBuf {
    cfg.state_dir
        .join("tasks")
        .join(format!("{task}-attempt{attempt}"))
}

/// What a task's runner takes from the worker.
pub(super) struct TaskRun {
    pub(super) cfg: WorkerConfig,
    pub(super) credentials: Credentials,
    pub(super) console: Option<Console>,
    pub(super) device: crate::protocol::DeviceProps,
}

/// A task attempt's folders: a fresh one per attempt, so a new attempt
/// never races the cleanup of an old one.
struct TaskDirs {
    task: PathBuf,
    work: PathBuf,
    results: PathBuf,
    inputs: PathBuf,
}

impl TaskDirs {
    fn new(cfg: &WorkerConfig, spec: &TaskSpec) -> TaskDirs {
        let task = attempt_dir(cfg, &spec.task, spec.attempt);
        TaskDirs {
            work: task.join("work"),
            results: task.join("results"),
            inputs: task.join("inputs"),
            task,
        }
    }

    /// Removes what an earlier run left and makes the folders anew.
    fn prepare(&self) -> Result<(), String> {
        let made = (|| {
            if self.task.exists() {
                std::fs::remove_dir_all(&self.task)?;
            }
            std::fs::create_dir_all(&self.work)?;
            std::fs::create_dir_all(&self.inputs)?;
            std::fs::create_dir_all(&self.results)
        })();
        made.map_err(|e| {
            format!(
                "device/host failure: cannot prepare {}: {e}",
                self.task.display()
            )
        })
    }
}

/// Prepares a fresh working folder, runs the conductor, collects result
/// files, and reports through the task's response channel.
pub(super) async fn run_task(
    run: TaskRun,
    spec: TaskSpec,
    events: mpsc::UnboundedSender<TaskEvent>,
    (budget, log_full): (LogBudget, crate::worker::task::channel::LogFull),
    stop: watch::Receiver<Stop>,
    commands: mpsc::Receiver<crate::worker::task::channel::HoldCommand>,
) {
    let TaskRun {
        cfg,
        credentials,
        console,
        device,
    } = run;
    let mut channel = ResponseChannel::open(spec.task.clone(), spec.attempt, events)
        .with_budget(budget)
        .with_log_full(log_full.clone());
    if spec.hold.is_some() {
        hold::hold(&cfg, console, &spec, channel, commands, stop).await;
        return;
    }
    let dirs = TaskDirs::new(&cfg, &spec);
    let before = async {
        dirs.prepare()?;
        if spec.recover {
            recover(&cfg, &device, &dirs.work, &mut channel, stop.clone()).await?;
        }
        fetch_inputs(&cfg, &credentials, &spec, &dirs.inputs, &mut channel).await
    };
    if let Err(failure) = before.await {
        warn!(task = %spec.task, %failure, "task failed before the conductor started");
        fail_before_conductor(channel, failure);
        return;
    }
    let mut console = TaskConsole::begin(console, &spec, &mut channel);
    if let Err((failure, by_testrun)) = console.expect(&spec, &mut channel).await {
        warn!(task = %spec.task, %failure, "task failed before the conductor started");
        console.done(&mut channel, &dirs.results);
        let files = collect_results(&dirs.results, &cfg.conductor, &mut channel);
        channel.finish(
            Outcome {
                failure: Some(failure),
                by_testrun,
                ..Outcome::default()
            },
            files,
        );
        return;
    }
    let outcome = conduct(
        &cfg,
        &device,
        &spec,
        &dirs,
        &mut console,
        &mut channel,
        (log_full, stop, commands),
    )
    .await;
    let outcome = match outcome {
        Ok(outcome) => outcome,
        // No command line: nothing ran, nothing to collect.
        Err(failure) => {
            channel.finish(
                Outcome {
                    failure: Some(failure),
                    ..Outcome::default()
                },
                Vec::new(),
            );
            return;
        }
    };
    console.done(&mut channel, &dirs.results);
    let files = collect_results(&dirs.results, &cfg.conductor, &mut channel);
    channel.finish(outcome, files);
}

/// Runs the conductor: its command line made of the template, the
/// console re-exported to it if it asks, its lines (and the console's)
/// into the task's log until it ends. An error: no command line could be
/// made of the template.
async fn conduct(
    cfg: &WorkerConfig,
    device: &crate::protocol::DeviceProps,
    spec: &TaskSpec,
    dirs: &TaskDirs,
    console: &mut TaskConsole,
    channel: &mut ResponseChannel,
    (log_full, stop, commands): (
        crate::worker::task::channel::LogFull,
        watch::Receiver<Stop>,
        mpsc::Receiver<crate::worker::task::channel::HoldCommand>,
    ),
) -> Result<Outcome, String> {
    let mut tap = hold::LeaseTap::begin(console.console.as_ref(), spec, commands);
    // The console for the conductor, on a pseudo-terminal of its own.
    let export = console.export(cfg, channel);
    let ctx = TaskContext {
        spec,
        device,
        work_dir: &dirs.work,
        results_dir: &dirs.results,
        inputs_dir: &dirs.inputs,
        console: export.as_ref().map(|(p, _)| p.as_path()),
    };
    let argv = match conductor::expand(&cfg.conductor.command, &ctx) {
        Ok(argv) => argv,
        Err(e) => {
            warn!(task = %spec.task, error = %e, "conductor failure: cannot build the command line");
            return Err(e.to_string());
        }
    };
    let masker = conductor::Masker::new(&spec.secrets);
    channel.log(
        Stream::Worker,
        masker.mask(format!(
            "worker {} runs attempt {} of task {}: {:?}",
            cfg.name, spec.attempt, spec.task, argv
        )),
    );
    // Bounded: a conductor printing faster than lines can be numbered
    // and queued waits on its pipe, like any pipe writer. Each item is the
    // lines of one pipe read (at most 64 KiB of text).
    let (line_tx, mut line_rx) = mpsc::channel(4);
    let run = conductor::Run {
        argv,
        work_dir: dirs.work.clone(),
        timeout: Duration::from_secs(spec.timeout_secs),
        kill_grace: Duration::from_millis(cfg.conductor.kill_grace_ms),
        env: [
            ("OTS_TASK_ID".into(), spec.task.clone()),
            ("OTS_RUN_ID".into(), spec.run.clone()),
            ("OTS_RESULTS_DIR".into(), dirs.results.display().to_string()),
            ("OTS_INPUTS_DIR".into(), dirs.inputs.display().to_string()),
            (
                "OTS_CONSOLE".into(),
                export
                    .as_ref()
                    .map_or(String::new(), |(p, _)| p.display().to_string()),
            ),
            ("OTS_WORK_DIR".into(), dirs.work.display().to_string()),
        ]
        .into_iter()
        .chain(conductor::Masker::env(&spec.secrets))
        .collect(),
        pgid_file: Some(dirs.task.join("conductor.pgid")),
        masker: masker.clone(),
        log_full,
    };
    let conductor = tokio::spawn(conductor::run(run, line_tx, stop));
    loop {
        tokio::select! {
            got = line_rx.recv() => match got {
                Some(packed) => {
                    // Delivery behind: wait here, so the conductor waits on its pipe.
                    channel.wait_for_room().await;
                    channel.log_packed(packed);
                }
                None => break,
            },
            Some(line) = console.next_line() => {
                channel.log(Stream::Serial, masker.mask(crate::worker::task::console::escape(&line.bytes)));
            }
            Some(got) = hold::LeaseTap::next(&mut tap) => hold::LeaseTap::pass(&tap, got, channel),
        }
    }
    let outcome = match conductor.await {
        Ok(outcome) => outcome,
        Err(e) => Outcome {
            failure: Some(format!("worker bug: conductor runner failed: {e}")),
            ..Outcome::default()
        },
    };
    if outcome.failure.is_some()
        || outcome.signal.is_some()
        || !matches!(outcome.exit_code, Some(0) | Some(1))
    {
        warn!(task = %spec.task, %outcome, "conductor/device failure: the conductor did not end normally");
    }
    drop(export);
    // Live lines still queued.
    while let Some(line) = console.queued_line() {
        channel.log(
            Stream::Serial,
            masker.mask(crate::worker::task::console::escape(&line.bytes)),
        );
    }
    Ok(outcome)
}

/// The device's console during one task: its record from `pre_task`
/// before the task goes into serial.log; its lines go to the task's log
/// live; the testrun's console actions (`console.send`,
/// `console.expect`) run before the conductor.
struct TaskConsole {
    console: Option<Console>,
    /// From when (Unix ms) the console's record belongs to the task.
    since_ms: u64,
    lines: Option<mpsc::Receiver<crate::worker::task::console::ConsoleLine>>,
}

impl TaskConsole {
    fn begin(console: Option<Console>, spec: &TaskSpec, channel: &mut ResponseChannel) -> Self {
        let since_ms = crate::protocol::limits::unix_ms_now().saturating_sub(
            console
                .as_ref()
                .map_or(0, |c| c.pre_task().as_millis() as u64),
        );
        let lines = console.as_ref().map(|c| c.tap());
        if let Some(c) = &console {
            if let Err(why) = c.available() {
                channel.log(
                    Stream::Worker,
                    format!("the device's console is unavailable: {why}"),
                );
            }
            let send = spec
                .options
                .get("console.send")
                .map(String::as_str)
                .unwrap_or(c.actions().0);
            if !send.is_empty() {
                c.send(crate::worker::task::console::unescape(send));
            }
        }
        TaskConsole {
            console,
            since_ms,
            lines,
        }
    }

    /// Waits for the expected pattern, if the testrun or the worker set
    /// one. The error says what was not seen, and whether the pattern was
    /// the testrun's own (then it is the user's failure; the worker's
    /// configured one, the device's).
    async fn expect(
        &mut self,
        spec: &TaskSpec,
        channel: &mut ResponseChannel,
    ) -> Result<(), (String, bool)> {
        let configured = self.console.as_ref().map(|c| c.actions());
        let by_testrun = spec
            .options
            .get("console.expect")
            .is_some_and(|p| !p.is_empty());
        let expect = spec
            .options
            .get("console.expect")
            .cloned()
            .or_else(|| configured.map(|a| a.1.to_string()))
            .filter(|p| !p.is_empty());
        let Some(pattern) = expect else {
            return Ok(());
        };
        let limit = spec
            .options
            .get("console.expect_timeout")
            .and_then(|t| humantime::parse_duration(t).ok())
            .or(configured.map(|a| a.2))
            .unwrap_or(Duration::from_secs(60))
            // A testrun's option cannot hold the device longer than its
            // own execution timeout.
            .min(Duration::from_secs(spec.timeout_secs));
        let Some(rx) = self.lines.as_mut() else {
            return Err((
                "the worker has no console configured ([serial] port)".to_string(),
                by_testrun,
            ));
        };
        let deadline = tokio::time::Instant::now() + limit;
        let mut text = String::new();
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(line)) => {
                    let shown = crate::worker::task::console::escape(&line.bytes);
                    text.push_str(&shown);
                    if line.complete {
                        text.push('\n');
                    }
                    channel.log(Stream::Serial, shown);
                    if text.contains(pattern.as_str()) {
                        return Ok(());
                    }
                    // Only the recent output matters for a match.
                    if text.len() > 64 * 1024 {
                        text.drain(..text.len() - 8 * 1024);
                    }
                }
                Ok(None) | Err(_) => {
                    return Err((
                        format!(
                            "console: expected {pattern:?} within {}, not seen",
                            humantime::format_duration(limit)
                        ),
                        by_testrun,
                    ))
                }
            }
        }
    }

    /// The console re-exported on a pseudo-terminal, when the conductor's
    /// command line asks for `{console}`.
    fn export(
        &self,
        cfg: &WorkerConfig,
        channel: &mut ResponseChannel,
    ) -> Option<(PathBuf, crate::worker::task::console::ExportGuard)> {
        let c = self.console.as_ref()?;
        if !cfg
            .conductor
            .command
            .iter()
            .any(|a| a.contains("{console}"))
        {
            return None;
        }
        match c.export() {
            Ok(e) => Some(e),
            Err(e) => {
                channel.log(Stream::Worker, format!("cannot re-export the console: {e}"));
                None
            }
        }
    }

    /// The next live line (pending forever without a console).
    async fn next_line(&mut self) -> Option<crate::worker::task::console::ConsoleLine> {
        match self.lines.as_mut() {
            Some(rx) => rx.recv().await,
            None => std::future::pending().await,
        }
    }

    /// A live line already queued, if any.
    fn queued_line(&mut self) -> Option<crate::worker::task::console::ConsoleLine> {
        self.lines.as_mut()?.try_recv().ok()
    }

    /// The task's window of the console's record into its results.
    fn done(&self, channel: &mut ResponseChannel, results_dir: &Path) {
        let Some(c) = &self.console else { return };
        let dropped = c.untap();
        if dropped > 0 {
            channel.log(
                Stream::Worker,
                format!(
                    "{dropped} console lines were not shown live (the task's serial.log has them)"
                ),
            );
        }
        let name = if results_dir.join("serial.log").exists() {
            "ots-serial.log"
        } else {
            "serial.log"
        };
        if let Err(e) = c.extract(self.since_ms, &results_dir.join(name)) {
            channel.log(
                Stream::Worker,
                format!("cannot write the console record {name}: {e}"),
            );
        }
    }
}

/// Lists the result files below `dir` that match any glob (names, sizes,
/// modification times; nothing is read here). Symlinks, devices, FIFOs
/// and sockets are skipped with a line in the task's log, so a conductor
/// cannot make the worker upload anything from outside its results
/// folder.
fn collect_results(
    dir: &Path,
    conductor: &crate::worker::config::ConductorConfig,
    channel: &mut ResponseChannel,
) -> Vec<ResultFile> {
    let globs = &conductor.result_globs;
    let mut total = 0u64;
    let patterns: Vec<glob::Pattern> = globs
        .iter()
        .filter_map(|g| glob::Pattern::new(g).ok())
        .collect();
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) => {
                channel.log(
                    Stream::Worker,
                    format!("cannot list results folder {}: {e}", d.display()),
                );
                continue;
            }
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
                continue;
            }
            if !kind.is_file() {
                channel.log(
                    Stream::Worker,
                    format!("not uploading {} (not a regular file)", path.display()),
                );
                continue;
            }
            let Ok(rel) = path.strip_prefix(dir) else {
                continue;
            };
            let Some(name) = rel.to_str().map(str::to_string) else {
                channel.log(
                    Stream::Worker,
                    format!("not uploading {} (name is not UTF-8)", path.display()),
                );
                continue;
            };
            let options = glob::MatchOptions {
                require_literal_separator: false,
                ..Default::default()
            };
            if !patterns.iter().any(|p| p.matches_with(&name, options)) {
                continue;
            }
            // The server would refuse the name (PROTOCOL.md §14): say so here.
            if let Err(e) = crate::protocol::check::check_file_name("file_chunk", &name) {
                channel.log(Stream::Worker, format!("not uploading a result file: {e}"));
                continue;
            }
            // Bounded before anything is sent; the server checks its own
            // limits at the offer.
            let size = entry.metadata().map_or(0, |m| m.len());
            if size > conductor.max_result_file_bytes
                || total.saturating_add(size) > conductor.max_result_bytes
            {
                channel.log(
                    Stream::Worker,
                    format!(
                        "not uploading {name}: {size} bytes would exceed conductor.max_result_file_bytes ({}) or max_result_bytes ({})",
                        conductor.max_result_file_bytes, conductor.max_result_bytes
                    ),
                );
                continue;
            }
            total = total.saturating_add(size);
            let mtime_ns = entry
                .metadata()
                .map_or(0, |m| crate::worker::task::reader::mtime_ns(&m));
            files.push(ResultFile {
                name,
                size,
                mtime_ns,
            });
        }
    }
    files
}
