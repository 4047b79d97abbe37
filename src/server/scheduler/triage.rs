//! Results across testruns, on the scheduler's side: what a result
//! file's cases are stored with (series, worker, device group), the
//! `compare` and `case_history` questions it hands to the history reader,
//! and the triage of a testrun that ended — regressions, fixes, flakes,
//! device-specific failures — before its `testrun_finished` leaves.

use super::*;
use crate::server::files::UploadKey;
use crate::server::store::cases::CaseAbout;

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
}
