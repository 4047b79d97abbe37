//! Checks of the results requests (§5.6) against their limits
//! ([`crate::protocol::results`], PROTOCOL.md §14).

/// Checks a results request against its limits (PROTOCOL.md §14).
pub(super) fn check(
    kind: &'static str,
    body: &crate::protocol::Body,
) -> Result<(), crate::protocol::ProtocolError> {
    use crate::protocol::fields::*;
    use crate::protocol::Body;
    match body {
        Body::Compare { run, base, .. } => {
            check_id(kind, "run", run)?;
            if let Some(b) = base {
                check_id(kind, "base", b)?;
            }
        }
        Body::GetCaseHistory {
            case,
            series,
            devicegroup,
            limit,
            ..
        } => {
            check_text(
                kind,
                "case",
                case,
                crate::protocol::limits::MAX_CASE_NAME_BYTES,
            )?;
            if let Some(s) = series {
                check_id(kind, "series", s)?;
            }
            if let Some(g) = devicegroup {
                check_id(kind, "devicegroup", g)?;
            }
            check_range(
                kind,
                "limit",
                *limit,
                1..=crate::protocol::results::MAX_HISTORY_ROWS,
            )?;
        }
        Body::ListFlaky { devicegroup, .. } | Body::GetReport { devicegroup, .. } => {
            if let Some(g) = devicegroup {
                check_id(kind, "devicegroup", g)?;
            }
        }
        Body::GetLabSeries {
            devicegroup,
            step_ms,
            ..
        } => {
            if let Some(g) = devicegroup {
                check_id(kind, "devicegroup", g)?;
            }
            check_range(kind, "step_ms", *step_ms, 60_000..=86_400_000)?;
        }
        Body::GetWorkerSeries { worker, .. } => check_id(kind, "worker", worker)?,
        Body::GetSeriesMatrix { series, runs, .. } => {
            check_id(kind, "series", series)?;
            check_range(
                kind,
                "runs",
                *runs,
                1..=crate::protocol::results::MAX_MATRIX_RUNS,
            )?;
        }
        Body::Known {
            add: Some(rule), ..
        } => {
            check_text(
                kind,
                "add.pattern",
                &rule.pattern,
                crate::protocol::results::MAX_KNOWN_PATTERN_BYTES,
            )?;
            check_text(
                kind,
                "add.label",
                &rule.label,
                crate::protocol::results::MAX_KNOWN_LABEL_BYTES,
            )?;
        }
        _ => {}
    }
    Ok(())
}
