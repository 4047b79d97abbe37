//! Results across testruns from the client's side (PROTOCOL.md §5.6):
//! `compare`, `get_case_history`, `list_flaky` and the known-issue rules.

use super::*;
use crate::protocol::results::{CaseHistory, Comparison, FlakyCase, KnownRule};

impl Client {
    /// `run`'s cases against `base` (default: its series' last finished
    /// testrun before it).
    pub async fn compare(
        &mut self,
        run: &RunId,
        base: Option<RunId>,
    ) -> Result<Comparison, ClientError> {
        let run = run.clone();
        match self
            .request(|request| Body::Compare { request, run, base })
            .await?
        {
            (Body::Comparison { comparison, .. }, _) => Ok(*comparison),
            (other, _) => Err(unexpected("comparison", &other)),
        }
    }

    /// One case's results, newest first.
    pub async fn case_history(
        &mut self,
        case: &str,
        series: Option<String>,
        devicegroup: Option<String>,
        limit: u32,
    ) -> Result<CaseHistory, ClientError> {
        let case = case.to_string();
        match self
            .request(|request| Body::GetCaseHistory {
                request,
                case,
                series,
                devicegroup,
                limit,
            })
            .await?
        {
            (Body::CaseHistory { history, .. }, _) => Ok(history),
            (other, _) => Err(unexpected("case_history", &other)),
        }
    }

    /// Cases that passed and failed on one series and image lately.
    pub async fn flaky(
        &mut self,
        devicegroup: Option<String>,
    ) -> Result<Vec<FlakyCase>, ClientError> {
        match self
            .request(|request| Body::ListFlaky {
                request,
                devicegroup,
            })
            .await?
        {
            (Body::Flaky { cases, .. }, _) => Ok(cases),
            (other, _) => Err(unexpected("flaky", &other)),
        }
    }

    /// The known-issue rules, after adding or removing one.
    pub async fn known(
        &mut self,
        add: Option<KnownRule>,
        remove: Option<u64>,
    ) -> Result<Vec<KnownRule>, ClientError> {
        match self
            .request(|request| Body::Known {
                request,
                add,
                remove,
            })
            .await?
        {
            (Body::KnownRules { rules, .. }, _) => Ok(rules),
            (other, _) => Err(unexpected("known_rules", &other)),
        }
    }

    /// The utilisation report since `since_ms`.
    pub async fn report(
        &mut self,
        since_ms: u64,
        devicegroup: Option<String>,
    ) -> Result<crate::protocol::results::Report, ClientError> {
        match self
            .request(|request| Body::GetReport {
                request,
                since_ms,
                devicegroup,
            })
            .await?
        {
            (Body::Report { report, .. }, _) => Ok(report),
            (other, _) => Err(unexpected("report", &other)),
        }
    }
}
