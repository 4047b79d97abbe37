//! What each message body is: the class it travels in, the request it
//! belongs to, its short name — one table each, beside the bodies in
//! `message.rs`.

use crate::protocol::message::{Body, Class};

impl Body {
    /// The class a message of this type travels in.
    pub fn class(&self) -> Class {
        match self {
            Body::Heartbeat | Body::ServerHeartbeat { .. } => Class::Heartbeat,
            Body::Log { .. }
            | Body::LogLines { .. }
            | Body::LogPacked { .. }
            | Body::LogLinesPacked { .. }
            | Body::LogFull { .. } => Class::Log,
            Body::FileOffer { .. }
            | Body::FileChunk { .. }
            | Body::FileEnd { .. }
            | Body::FileCredit { .. }
            | Body::FileStored { .. }
            | Body::FileRefused { .. }
            | Body::InputOffer { .. }
            | Body::InputChunk { .. }
            | Body::InputEnd { .. }
            | Body::InputCredit { .. } => Class::File,
            Body::ConsoleData { .. } | Body::ConsoleOutput { .. } => Class::Log,
            _ => Class::Control,
        }
    }

    /// A question the server answers from its database's results and
    /// usage series (§5.6).
    pub fn asks_results(&self) -> bool {
        matches!(
            self,
            Body::Compare { .. }
                | Body::GetCaseHistory { .. }
                | Body::ListFlaky { .. }
                | Body::GetReport { .. }
                | Body::GetLabSeries { .. }
                | Body::GetWorkerSeries { .. }
                | Body::GetSeriesMatrix { .. }
        )
    }

    /// The request id of a client request or its reply.
    pub fn request(&self) -> Option<u64> {
        match self {
            Body::Ping { request }
            | Body::Submit { request, .. }
            | Body::GetStatus { request, .. }
            | Body::GetEvents { request, .. }
            | Body::CancelRun { request, .. }
            | Body::ListWorkers { request }
            | Body::ListRuns { request, .. }
            | Body::ListQueue { request }
            | Body::Runs { request, .. }
            | Body::ListCases { request, .. }
            | Body::Cases { request, .. }
            | Body::Compare { request, .. }
            | Body::Comparison { request, .. }
            | Body::GetCaseHistory { request, .. }
            | Body::CaseHistory { request, .. }
            | Body::ListFlaky { request, .. }
            | Body::Flaky { request, .. }
            | Body::Known { request, .. }
            | Body::KnownRules { request, .. }
            | Body::GetReport { request, .. }
            | Body::Report { request, .. }
            | Body::GetLabSeries { request, .. }
            | Body::LabSeries { request, .. }
            | Body::GetWorkerSeries { request, .. }
            | Body::WorkerSeries { request, .. }
            | Body::GetSeriesMatrix { request, .. }
            | Body::SeriesMatrix { request, .. }
            | Body::Queue { request, .. }
            | Body::GetLog { request, .. }
            | Body::GetFile { request, .. }
            | Body::Follow { request, .. }
            | Body::DrainWorker { request, .. }
            | Body::WorkerHealth { request, .. }
            | Body::HealthReport { request, .. }
            | Body::GetLogTail { request, .. }
            | Body::FindInLog { request, .. }
            | Body::LogFound { request, .. }
            | Body::WebLogin { request }
            | Body::WebLink { request, .. }
            | Body::ListNotifications { request, .. }
            | Body::RetryNotification { request, .. }
            | Body::Notifications { request, .. }
            | Body::GetAudit { request, .. }
            | Body::InputOffer { request, .. }
            | Body::InputChunk { request, .. }
            | Body::InputEnd { request, .. }
            | Body::GetInput { request, .. }
            | Body::InputCredit { request, .. }
            | Body::InputStored { request, .. }
            | Body::Following { request, .. }
            | Body::Pong { request, .. }
            | Body::Submitted { request, .. }
            | Body::Status { request, .. }
            | Body::Events { request, .. }
            | Body::Workers { request, .. }
            | Body::Data { request, .. }
            | Body::Reserve { request, .. }
            | Body::ListLeases { request, .. }
            | Body::LeaseAct { request, .. }
            | Body::ConsoleAttach { request, .. }
            | Body::ConsoleInput { request, .. }
            | Body::ConsoleDetach { request, .. }
            | Body::Power { request, .. }
            | Body::Leases { request, .. }
            | Body::ConsoleAttached { request, .. }
            | Body::ConsoleOutput { request, .. }
            | Body::ConsoleInputAck { request, .. }
            | Body::ConsoleClosed { request, .. }
            | Body::PowerResult { request, .. } => Some(*request),
            Body::Error { request, .. } => *request,
            _ => None,
        }
    }

    /// Short name for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Hello { .. } => "hello",
            Body::Ready => "ready",
            Body::Heartbeat => "heartbeat",
            Body::Bye { .. } => "bye",
            Body::ConsoleStatus { .. } => "console_status",
            Body::TaskAccepted { .. } => "task_accepted",
            Body::TaskRefused { .. } => "task_refused",
            Body::Log { .. } => "log",
            Body::LogPacked { .. } => "log_packed",
            Body::FileOffer { .. } => "file_offer",
            Body::FileChunk { .. } => "file_chunk",
            Body::FileEnd { .. } => "file_end",
            Body::FileCredit { .. } => "file_credit",
            Body::FileStored { .. } => "file_stored",
            Body::FileRefused { .. } => "file_refused",
            Body::LogFull { .. } => "log_full",
            Body::TaskFinished { .. } => "task_finished",
            Body::Ack { .. } => "ack",
            Body::Welcome { .. } => "welcome",
            Body::Dispatch { .. } => "dispatch",
            Body::Cancel { .. } => "cancel",
            Body::TaskClosed { .. } => "task_closed",
            Body::Error { .. } => "error",
            Body::Ping { .. } => "ping",
            Body::Submit { .. } => "submit",
            Body::GetStatus { .. } => "get_status",
            Body::GetEvents { .. } => "get_events",
            Body::CancelRun { .. } => "cancel_run",
            Body::ListWorkers { .. } => "list_workers",
            Body::GetLog { .. } => "get_log",
            Body::GetFile { .. } => "get_file",
            Body::GetLogTail { .. } => "get_log_tail",
            Body::FindInLog { .. } => "find_in_log",
            Body::LogFound { .. } => "log_found",
            Body::WebLogin { .. } => "web_login",
            Body::WebLink { .. } => "web_link",
            Body::ListNotifications { .. } => "list_notifications",
            Body::RetryNotification { .. } => "retry_notification",
            Body::Notifications { .. } => "notifications",
            Body::Follow { .. } => "follow",
            Body::DrainWorker { .. } => "drain_worker",
            Body::WorkerHealth { .. } => "worker_health",
            Body::HealthReport { .. } => "health_report",
            Body::GetAudit { .. } => "get_audit",
            Body::ListRuns { .. } => "list_runs",
            Body::ListQueue { .. } => "list_queue",
            Body::Runs { .. } => "runs",
            Body::ListCases { .. } => "list_cases",
            Body::Cases { .. } => "cases",
            Body::Compare { .. } => "compare",
            Body::Comparison { .. } => "comparison",
            Body::GetCaseHistory { .. } => "get_case_history",
            Body::CaseHistory { .. } => "case_history",
            Body::ListFlaky { .. } => "list_flaky",
            Body::Flaky { .. } => "flaky",
            Body::Known { .. } => "known",
            Body::KnownRules { .. } => "known_rules",
            Body::GetReport { .. } => "get_report",
            Body::Report { .. } => "report",
            Body::GetLabSeries { .. } => "get_lab_series",
            Body::LabSeries { .. } => "lab_series",
            Body::GetWorkerSeries { .. } => "get_worker_series",
            Body::WorkerSeries { .. } => "worker_series",
            Body::GetSeriesMatrix { .. } => "get_series_matrix",
            Body::SeriesMatrix { .. } => "series_matrix",
            Body::Queue { .. } => "queue",
            Body::InputOffer { .. } => "input_offer",
            Body::InputChunk { .. } => "input_chunk",
            Body::InputEnd { .. } => "input_end",
            Body::GetInput { .. } => "get_input",
            Body::InputCredit { .. } => "input_credit",
            Body::InputStored { .. } => "input_stored",
            Body::Following { .. } => "following",
            Body::Pong { .. } => "pong",
            Body::Submitted { .. } => "submitted",
            Body::Status { .. } => "status",
            Body::Events { .. } => "events",
            Body::Workers { .. } => "workers",
            Body::Data { .. } => "data",
            Body::ServerHeartbeat { .. } => "server_heartbeat",
            Body::Progress { .. } => "progress",
            Body::LogLines { .. } => "log_lines",
            Body::LogLinesPacked { .. } => "log_lines_packed",
            Body::Shutdown { .. } => "shutdown",
            Body::Reserve { .. } => "reserve",
            Body::ListLeases { .. } => "list_leases",
            Body::LeaseAct { .. } => "lease_act",
            Body::ConsoleAttach { .. } => "console_attach",
            Body::ConsoleInput { .. } => "console_input",
            Body::ConsoleDetach { .. } => "console_detach",
            Body::Power { .. } => "power",
            Body::Leases { .. } => "leases",
            Body::ConsoleAttached { .. } => "console_attached",
            Body::ConsoleOutput { .. } => "console_output",
            Body::ConsoleInputAck { .. } => "console_input_ack",
            Body::ConsoleClosed { .. } => "console_closed",
            Body::PowerResult { .. } => "power_result",
            Body::LeaseInput { .. } => "lease_input",
            Body::PowerRequest { .. } => "power_request",
            Body::ConsoleData { .. } => "console_data",
            Body::PowerDone { .. } => "power_done",
        }
    }
}
