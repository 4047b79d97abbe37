//! Results across testruns, on the scheduler's side: what a result
//! file's cases are stored with (series, worker, device group), the
//! `compare`, `get_case_history` and `list_flaky` questions it hands to
//! the history reader, the known-issue rules, and the triage of a testrun
//! that ended — regressions, fixes, flakes, device-specific failures —
//! before its `testrun_finished` leaves.
//!
//! A finished testrun with test cases is triaged once: it stays loaded
//! (its row `live`) until the answer came, so a restart in between asks
//! again and its event is neither lost nor sent without the triage.

use super::*;
use crate::protocol::results::{KnownRule, MAX_KNOWN_RULES};
use crate::server::files::UploadKey;
use crate::server::results::{KnownRules, Triage};
use crate::server::store::cases::CaseAbout;
use crate::server::store::results::{CompareQuery, FlakyQuery, HistoryQuery, ResultQuery};
use std::sync::Arc;

/// The meta key the known-issue rules added at run time are stored under.
const KNOWN_META: &str = "known_rules";

/// What the scheduler keeps for results.
#[derive(Default)]
pub(super) struct Results {
    /// Rules added at run time, and the next id.
    runtime: Vec<KnownRule>,
    next_id: u64,
    /// The runtime rules changed since the last commit.
    dirty: bool,
    /// Those of `server.toml` and the runtime ones, compiled.
    compiled: Arc<KnownRules>,
}

impl Results {
    /// With the rules of `server.toml` compiled.
    pub(super) fn new(configured: &[KnownRule]) -> Results {
        Results {
            compiled: Arc::new(KnownRules::new(configured.iter().cloned())),
            ..Results::default()
        }
    }
}

impl<S: Store> Scheduler<S> {
    /// What the cases of a result file of `key`'s task are stored with.
    pub(super) fn case_about(&self, key: &UploadKey) -> CaseAbout {
        let UploadKey::Result { task, .. } = key else {
            return CaseAbout::default();
        };
        let Some(t) = self.tasks.get(task) else {
            return CaseAbout::default();
        };
        let run = self.runs.get(&t.run);
        CaseAbout {
            series: run.map(|r| r.request.series_name()),
            worker: t.worker.clone(),
            devicegroup: run
                .and_then(|r| r.request.all_devices().nth(t.spec))
                .map(|d| d.devicegroup.clone()),
        }
    }

    /// Every known-issue rule, those of `server.toml` first.
    fn known_rules(&self) -> Vec<KnownRule> {
        self.cfg
            .results
            .known
            .iter()
            .chain(&self.results.runtime)
            .cloned()
            .collect()
    }

    fn recompile_known(&mut self) {
        self.results.compiled = Arc::new(KnownRules::new(self.known_rules()));
    }

    /// The runtime rules as stored (restored at start).
    pub(super) fn restore_known(&mut self, value: &str) {
        match serde_json::from_str::<Vec<KnownRule>>(value) {
            Ok(rules) => {
                self.results.next_id = rules.iter().map(|r| r.id).max().unwrap_or(0);
                self.results.runtime = rules;
            }
            Err(e) => {
                warn!(error = %e, "state: the stored known-issue rules (meta known_rules) do not decode; starting without them (ots-submit known add adds them again)")
            }
        }
        self.recompile_known();
    }

    /// The runtime rules, for the commit, when they changed.
    pub(super) fn known_changes(&mut self, meta: &mut Vec<(String, String)>) {
        if std::mem::take(&mut self.results.dirty) {
            let json = serde_json::to_string(&self.results.runtime).unwrap_or_default();
            meta.push((KNOWN_META.into(), json));
        }
    }

    pub(super) fn is_known_meta(key: &str) -> bool {
        key == KNOWN_META
    }

    /// `known`: lists the rules, adding or removing one first (role
    /// operator with security).
    pub(super) fn on_known(
        &mut self,
        now: Instant,
        peer: &PeerId,
        request: u64,
        add: Option<KnownRule>,
        remove: Option<u64>,
    ) -> Result<Body, (ErrorCode, String)> {
        if (add.is_some() || remove.is_some())
            && self.cfg.secure
            && self
                .caller_role(peer)
                .is_none_or(|r| r < crate::security::Role::Operator)
        {
            return Err((
                ErrorCode::Forbidden,
                "changing known-issue rules needs role operator or admin (users.d/NAME.role)"
                    .into(),
            ));
        }
        if let Some(id) = remove {
            let before = self.results.runtime.len();
            self.results.runtime.retain(|r| r.id != id);
            if self.results.runtime.len() == before {
                return Err((
                    ErrorCode::BadRequest,
                    format!("no known-issue rule {id} added at run time (rules of server.toml have id 0 and are changed there)"),
                ));
            }
            self.results.dirty = true;
        }
        if let Some(mut rule) = add {
            crate::server::results::compile_pattern(&rule.pattern)
                .map_err(|why| (ErrorCode::BadRequest, why))?;
            if self.results.runtime.len() >= MAX_KNOWN_RULES {
                self.count("known_rules_refused", 1);
                return Err((
                    ErrorCode::LimitReached,
                    format!("{MAX_KNOWN_RULES} known-issue rules exist already; remove one first (ots-submit known remove ID)"),
                ));
            }
            self.results.next_id = self.results.next_id.saturating_add(1);
            rule.id = self.results.next_id;
            rule.by = self.owner(peer).unwrap_or_else(|| "anonymous".into());
            rule.added_ms = self.wall_ms(now);
            self.results.runtime.push(rule);
            self.results.dirty = true;
        }
        self.recompile_known();
        Ok(Body::KnownRules {
            request,
            rules: self.known_rules(),
        })
    }

    /// Only the caller's own testruns count for a user of role submit.
    fn owner_filter(&self, peer: &PeerId) -> Option<String> {
        match self.caller_role(peer) {
            Some(role) if role < crate::security::Role::Operator => self.owner(peer),
            _ => None,
        }
    }

    /// The question a results request asks, or why it is refused.
    pub(super) fn results_query(
        &self,
        peer: &PeerId,
        body: &Body,
    ) -> Result<ResultQuery, (ErrorCode, String)> {
        let owner = self.owner_filter(peer);
        match body {
            Body::Compare { run, base, .. } => {
                for r in std::iter::once(run).chain(base) {
                    match self.runs.get(r) {
                        Some(t) if t.request.lease.is_some() => {
                            return Err((
                                ErrorCode::BadRequest,
                                format!("{r} is a lease, not a testrun"),
                            ))
                        }
                        Some(_) => {}
                        None => {
                            return Err((
                                ErrorCode::UnknownRun,
                                format!("no testrun {r:?} on this server"),
                            ))
                        }
                    }
                }
                Ok(ResultQuery::Compare(CompareQuery {
                    run: run.clone(),
                    base: base.clone(),
                    owner,
                    window_runs: self.cfg.results.window_runs,
                    known: self.results.compiled.clone(),
                }))
            }
            Body::GetCaseHistory {
                case,
                series,
                devicegroup,
                limit,
                ..
            } => Ok(ResultQuery::History(HistoryQuery {
                case: case.clone(),
                series: series.clone(),
                devicegroup: devicegroup.clone(),
                owner,
                limit: *limit,
            })),
            Body::ListFlaky { devicegroup, .. } => Ok(ResultQuery::Flaky(FlakyQuery {
                devicegroup: devicegroup.clone(),
                owner,
                window_runs: self.cfg.results.flaky_runs,
            })),
            Body::GetReport {
                since_ms,
                devicegroup,
                ..
            } => Ok(ResultQuery::Report {
                since_ms: self.report_since(*since_ms),
                devicegroup: devicegroup.clone(),
                owner,
            }),
            Body::GetLabSeries {
                since_ms,
                step_ms,
                devicegroup,
                ..
            } => Ok(ResultQuery::Lab {
                since_ms: self.report_since(*since_ms),
                step_ms: *step_ms,
                devicegroup: devicegroup.clone(),
            }),
            Body::GetWorkerSeries {
                worker, since_ms, ..
            } => Ok(ResultQuery::Worker {
                worker: worker.clone(),
                since_ms: self.report_since(*since_ms),
            }),
            Body::GetSeriesMatrix { series, runs, .. } => Ok(ResultQuery::Matrix {
                series: series.clone(),
                runs: *runs,
                owner,
            }),
            other => Err((
                ErrorCode::Malformed,
                format!("{} is not a results request", other.kind()),
            )),
        }
    }

    /// No further back than the series are kept.
    fn report_since(&self, since_ms: u64) -> u64 {
        let now_ms = self.wall_ms(self.latest);
        since_ms.max(
            now_ms.saturating_sub(crate::protocol::results::MAX_REPORT_DAYS * 24 * 3600 * 1000),
        )
    }

    /// A results answer, to whoever asked.
    pub(super) fn answer_results(
        &mut self,
        peer: &PeerId,
        request: u64,
        found: crate::server::store::results::ResultFound,
    ) {
        use crate::server::store::results::ResultFound;
        let body = match found {
            ResultFound::NoRun(run) => {
                return self.send_error(
                    peer,
                    Some(request),
                    ErrorCode::UnknownRun,
                    format!("testrun {run} is not in the state database"),
                )
            }
            ResultFound::Compared(t) => Body::Comparison {
                request,
                comparison: Box::new(t.comparison),
            },
            ResultFound::History(history) => Body::CaseHistory { request, history },
            ResultFound::Flaky(cases) => Body::Flaky { request, cases },
            ResultFound::Report(report) => Body::Report { request, report },
            ResultFound::Lab(points) => Body::LabSeries { request, points },
            ResultFound::Worker(worker, hours) => Body::WorkerSeries {
                request,
                worker,
                hours,
            },
            ResultFound::Matrix(matrix) => Body::SeriesMatrix { request, matrix },
        };
        self.send(peer, None, body, None);
    }

    /// A testrun ended: triaged first when it has test cases (its event
    /// waits for the answer), told at once otherwise.
    pub(super) fn run_ended(&mut self, now: Instant, run: &RunId) {
        let Some(r) = self.runs.get_mut(run) else {
            return;
        };
        let worth = r.state == RunState::Finished
            && r.request.owner.as_deref() != Some(health::CHECK_OWNER)
            && r.request.lease.is_none()
            && r.tasks
                .iter()
                .any(|t| self.tasks.get(t).is_some_and(|t| t.cases.is_some()));
        if !worth {
            return self.notify_run_finished(now, run, None);
        }
        r.awaiting_triage = true;
        self.pending.runs.insert(run.clone());
        self.ask_triage(run);
    }

    pub(super) fn ask_triage(&mut self, run: &RunId) {
        let query = ResultQuery::Compare(CompareQuery {
            run: run.clone(),
            base: None,
            owner: None,
            window_runs: self.cfg.results.window_runs,
            known: self.results.compiled.clone(),
        });
        self.count("triages_asked", 1);
        self.ask_triage_query(run.clone(), query);
    }

    /// A device-specific failure counts against the worker's health.
    fn device_specific_failure(&mut self, now: Instant, worker: &str, case: &str, run: &str) {
        self.count("device_specific_failures", 1);
        self.health_event(
            now,
            worker,
            crate::server::health::Event::DeviceSpecific { case, run },
        );
    }

    /// The triage of a testrun that ended came back (or could not be
    /// read: its event leaves without it, saying why).
    pub(super) fn on_triaged(&mut self, now: Instant, run: &RunId, triage: Result<Triage, String>) {
        let Some(r) = self.runs.get_mut(run) else {
            return;
        };
        if !std::mem::take(&mut r.awaiting_triage) {
            return;
        }
        self.pending.runs.insert(run.clone());
        match triage {
            Ok(t) => {
                for (worker, case) in &t.suspects {
                    self.device_specific_failure(now, worker, case, run);
                }
                self.count("regressions_found", t.comparison.totals.regressions);
                self.notify_run_finished(now, run, Some(&t.comparison));
            }
            Err(e) => {
                self.count("triages_failed", 1);
                warn!(run = %run, error = %e, "triage: cannot compare the testrun with its series; its testrun_finished leaves without regressions");
                self.notify_run_finished(now, run, None);
            }
        }
    }
}
