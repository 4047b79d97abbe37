//! Result files fetched to a folder, verified as they arrive, with a
//! progress bar on a terminal and lines elsewhere.

use crate::cli::conn::Conn;
use crate::client::transfer::{Progress, Silent, Source};
use crate::client::{exit, Client, ClientError};
use crate::protocol::RunStatus;
use std::path::Path;

pub(crate) async fn fetch_cmd(conn: &Conn, run: &str, dir: &Path) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let status = client.status(&run.to_string()).await?;
    let report = if conn.json {
        FetchReport::Json
    } else {
        FetchReport::Text
    };
    fetch(&mut client, &status, dir, report).await?;
    Ok(exit::PASS)
}

/// Downloads every result file of `status` into `dir/<task>/<name>`,
/// verifying each against its SHA-256.
pub(crate) async fn fetch(
    client: &mut Client,
    status: &RunStatus,
    dir: &Path,
    report: FetchReport,
) -> Result<(), ClientError> {
    let mut count = 0;
    let mut bytes = 0u64;
    let mut downloaded = 0u64;
    let started = std::time::Instant::now();
    for t in &status.tasks {
        for f in &t.files {
            let rel = crate::protocol::check::relative_path(&f.name).ok_or_else(|| {
                ClientError::Protocol(format!(
                    "result file name {:?} is not a safe relative path; not fetched",
                    f.name
                ))
            })?;
            let path = dir.join(&t.task).join(rel);
            let source = Source::Result {
                task: t.task.clone(),
                name: f.name.clone(),
            };
            let mut progress = progress_for(!matches!(report, FetchReport::Text), "fetching");
            downloaded += client
                .download_to(&source, f.size, &f.sha256, &path, progress.as_mut())
                .await?;
            count += 1;
            bytes += f.size;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    match report {
        FetchReport::Json => {
            let summary = serde_json::json!({
                "files": count,
                "bytes": bytes,
                "downloaded": downloaded,
                "seconds": secs,
                "dir": dir,
            });
            crate::outln!("{summary}");
        }
        FetchReport::Text => crate::outln!(
            "fetched {count} result file(s), {bytes} bytes ({downloaded} downloaded now, {:.1} MB/s), verified, into {}",
            downloaded as f64 / secs.max(1e-6) / 1e6,
            dir.display()
        ),
        FetchReport::Quiet => {}
    }
    Ok(())
}

/// A progress bar on a terminal, plain lines on stderr otherwise, nothing
/// with `--json`.
pub(crate) fn progress_for(quiet: bool, verb: &'static str) -> Box<dyn Progress + Send> {
    use std::io::IsTerminal;
    if quiet {
        Box::new(Silent)
    } else if std::io::stderr().is_terminal() {
        Box::new(Bar { bar: None, verb })
    } else {
        Box::new(Lines {
            verb,
            what: String::new(),
            started: std::time::Instant::now(),
            bytes: 0,
            from: 0,
        })
    }
}

/// An indicatif bar with bytes, rate and ETA.
pub(crate) struct Bar {
    bar: Option<indicatif::ProgressBar>,
    verb: &'static str,
}

impl Progress for Bar {
    fn start(&mut self, what: &str, size: u64, from: u64) {
        let bar = indicatif::ProgressBar::new(size);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_message(format!("{} {what}", self.verb));
        bar.set_position(from);
        self.bar = Some(bar);
    }
    fn advance(&mut self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }
    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
}

/// One line when a transfer starts and one when it ends (not a terminal).
pub(crate) struct Lines {
    verb: &'static str,
    what: String,
    started: std::time::Instant,
    bytes: u64,
    from: u64,
}

impl Progress for Lines {
    fn start(&mut self, what: &str, size: u64, from: u64) {
        self.what = what.to_string();
        self.started = std::time::Instant::now();
        self.bytes = 0;
        self.from = from;
        if from > 0 {
            crate::errln!("{} {what}: {size} bytes, resuming at {from}", self.verb);
        } else {
            crate::errln!("{} {what}: {size} bytes", self.verb);
        }
    }
    fn advance(&mut self, bytes: u64) {
        self.bytes += bytes;
    }
    fn finish(&mut self) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-6);
        crate::errln!(
            "{} {}: done, {} bytes in {secs:.2} s ({:.1} MB/s)",
            self.verb,
            self.what,
            self.bytes,
            self.bytes as f64 / secs / 1e6
        );
    }
}

/// How `fetch` reports what it downloaded.
#[derive(Clone, Copy)]
pub(crate) enum FetchReport {
    Text,
    Json,
    Quiet,
}
