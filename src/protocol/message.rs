//! Headers and bodies of every message. Field names are the wire names:
//! bodies are MessagePack maps (`rmp_serde::to_vec_named`) with a `type`
//! key, so a peer in another language can read them without our structs.

use crate::protocol::device::{DeviceProps, DeviceSpec};
use crate::protocol::leasing::*;
use crate::protocol::status::*;
use crate::protocol::testrun::*;
use serde::{Deserialize, Serialize};

pub use crate::protocol::header::{Class, ErrorCode, Header, RefuseReason};

/// Every message body. `type` names the variant on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Body {
    // ---- worker → server -------------------------------------------------
    /// Registers a worker on a new connection.
    Hello {
        /// Logical worker name; unique per server.
        worker: String,
        /// Changes each time the worker process starts; with `seq` it forms
        /// the dedup key of the worker's mandatory messages.
        session: String,
        device: DeviceProps,
        /// Tasks the worker is still running or still has results for.
        running: Vec<TaskId>,
        /// The worker's software version (shown by `workers`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
    },
    /// The worker is idle and asks for one task; the server answers with a
    /// dispatch as soon as matching work exists.
    Ready,
    /// The worker is alive and otherwise silent.
    Heartbeat,
    /// The state of the device's serial console changed (or is told at
    /// registration): `ok`, or why it is unavailable. Shown by `workers`.
    ConsoleStatus {
        status: String,
    },
    /// The worker stops on purpose (its task, if any, is finished and
    /// reported, or was stopped and reported interrupted): the server
    /// records a clean stop, not a loss.
    Bye {
        #[serde(default)]
        reason: String,
    },
    /// The worker accepted a dispatch and started the conductor: the task's
    /// response channel is open.
    TaskAccepted {
        task: TaskId,
        /// Which attempt of the task: each attempt is a channel of its own.
        attempt: u32,
    },
    /// The worker refused a dispatch and did not start it.
    TaskRefused {
        task: TaskId,
        reason: RefuseReason,
        message: String,
    },
    /// A batch of log lines of one task (class `log`).
    Log {
        task: TaskId,
        attempt: u32,
        lines: Vec<LogLine>,
    },
    /// Log lines of one task packed (class `log`): the raw frame holds the
    /// parts' text one after the other, in the stored form.
    LogPacked {
        task: TaskId,
        attempt: u32,
        parts: Vec<LogPart>,
    },
    /// Offers a result file (class `file`): "here is `name`, `size` bytes;
    /// how much of it do you have?" Answered with `file_credit` (resume
    /// from `have`), `file_stored` or `file_refused`.
    FileOffer {
        task: TaskId,
        attempt: u32,
        name: String,
        size: u64,
    },
    /// Bytes of an offered result file at `offset` (class `file`); the
    /// bytes are the third frame. Only inside the credit the server gave.
    FileChunk {
        task: TaskId,
        attempt: u32,
        name: String,
        offset: u64,
    },
    /// Every byte of the file was sent: its whole-file SHA-256.
    FileEnd {
        task: TaskId,
        attempt: u32,
        name: String,
        size: u64,
        sha256: String,
    },
    /// The task's final report: the last message on its channel.
    TaskFinished {
        task: TaskId,
        attempt: u32,
        outcome: Outcome,
        /// Log lines the task produced, whether or not they arrived.
        log_lines: u64,
        files: Vec<FileInfo>,
        /// Result files the worker could not deliver, with why (changed on
        /// disk while uploading, unreadable, refused by the server).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        file_problems: Vec<FileProblem>,
    },
    /// Raw console output of a leased device (the raw frame) at byte
    /// `offset` of the hold (class `log`, best effort: a gap is output lost).
    ConsoleData {
        task: TaskId,
        attempt: u32,
        offset: u64,
    },
    /// What a `power_request` did (mandatory).
    PowerDone {
        task: TaskId,
        attempt: u32,
        id: u64,
        action: PowerAction,
        /// `on`, `off` or `unknown`: the state read back.
        state: String,
        ok: bool,
        message: String,
    },
    /// Acknowledges the mandatory message `seq` of the peer (both directions).
    Ack {
        seq: u64,
    },

    // ---- server → worker ---------------------------------------------------
    /// Registration accepted.
    Welcome {
        server: String,
        heartbeat_ms: u64,
        liveness: u32,
        /// Server wall clock (Unix ms) when sent: the worker's first clock
        /// sample (see `server_heartbeat.sent_ms`); 0 if unknown.
        #[serde(default)]
        sent_ms: u64,
        /// With security: the Ed25519 public key (64 hex digits) that
        /// signs this server incarnation's broadcasts on the events port
        /// (PROTOCOL.md §15.4). Only a peer the server authenticated
        /// learns it, inside the sealed welcome.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        events_key: Option<String>,
        /// With security: the server's current beat (heartbeat intervals
        /// since it started), the anchor for judging broadcasts fresh.
        #[serde(default)]
        beat: u64,
    },
    /// Run this task.
    Dispatch {
        spec: TaskSpec,
    },
    /// How much of an offered result file the server has (`have`, from 0,
    /// contiguous) and up to which byte it accepts chunks now (`until`).
    /// `resume` answers an offer or an end: the worker continues from
    /// `have` (chunks it sent beyond it were lost); otherwise it is a
    /// window update and `have` may lag behind chunks in flight.
    FileCredit {
        task: TaskId,
        attempt: u32,
        name: String,
        have: u64,
        until: u64,
        resume: bool,
    },
    /// The file is stored, verified and durable.
    FileStored {
        task: TaskId,
        attempt: u32,
        name: String,
        size: u64,
        sha256: String,
    },
    /// The server will not take this file; the worker stops sending it.
    FileRefused {
        task: TaskId,
        attempt: u32,
        name: String,
        code: ErrorCode,
        message: String,
    },
    /// The attempt's log on the server is full (`limits.max_task_log_bytes`
    /// stored): no further line of it will be stored, so the worker stops
    /// sending them and counts them lost itself (stored + lost = produced
    /// still holds: the final report's `log_lines` counts them). Best
    /// effort: said again, at most once a second per task, while lines of
    /// it keep arriving.
    LogFull {
        task: TaskId,
        attempt: u32,
        /// Which limit, in words, for the worker's log.
        reason: String,
    },
    /// Stop this task (TERM, grace, KILL) and report it.
    Cancel {
        task: TaskId,
    },
    /// The task's channel is closed; anything further for it is an orphan.
    /// Also the nack of a mandatory message for a closed or unknown task.
    TaskClosed {
        task: TaskId,
        /// The attempt closed; nil closes every attempt the worker has.
        attempt: Option<u32>,
        reason: String,
    },

    /// Bytes typed into a leased device's console (the raw frame), in
    /// order; mandatory (exactly once).
    LeaseInput {
        task: TaskId,
        attempt: u32,
        /// Who typed them, for the transcript.
        by: String,
        /// The client's input stream and where these bytes start in it:
        /// the worker writes only bytes of a stream it has not written
        /// (PROTOCOL.md §18.4), so a resend after any loss types nothing
        /// twice.
        stream: String,
        offset: u64,
    },
    /// Runs the worker's `[power]` command for `action`; answered with
    /// `power_done` carrying `id`. Mandatory.
    PowerRequest {
        task: TaskId,
        attempt: u32,
        id: u64,
        action: PowerAction,
        by: String,
    },

    // ---- server → anyone ---------------------------------------------------
    /// The server could not handle a message.
    Error {
        request: Option<u64>,
        code: ErrorCode,
        message: String,
        /// The seq of the mandatory message this error answers, if any: the
        /// sender stops resending it.
        #[serde(default)]
        seq: Option<u64>,
    },

    // ---- client → server ---------------------------------------------------
    Ping {
        request: u64,
    },
    Submit {
        request: u64,
        testrun: TestrunRequest,
    },
    GetStatus {
        request: u64,
        run: RunId,
    },
    GetEvents {
        request: u64,
        run: RunId,
        from: u64,
    },
    CancelRun {
        request: u64,
        run: RunId,
    },
    ListWorkers {
        request: u64,
    },
    /// Reads up to `max` bytes of a task's log from byte `offset`.
    GetLog {
        request: u64,
        task: TaskId,
        offset: u64,
        max: u64,
    },
    /// Reads the last `max` bytes at most of a task's log: answered with
    /// `data` whose `offset` says where they start in the log.
    GetLogTail {
        request: u64,
        task: TaskId,
        max: u64,
    },
    /// Finds a line, a byte's line or a text in a task's log (§5.7):
    /// answered with `log_found`.
    FindInLog {
        request: u64,
        task: TaskId,
        find: crate::protocol::logfind::LogFind,
    },
    /// Asks for a single-use sign-in link to the web dashboard for this
    /// connection's user (PROTOCOL.md §16). Answered with `web_link`.
    WebLogin {
        request: u64,
    },
    /// Notification deliveries, newest first (at most 500), of one
    /// testrun or all; `failed`: only failed ones. A `submit` user sees
    /// those of its own testruns. Answered with `notifications`.
    ListNotifications {
        request: u64,
        #[serde(default)]
        run: Option<RunId>,
        #[serde(default)]
        failed: bool,
    },
    /// Sends a delivery again, now, with a fresh `max_age` (operator,
    /// admin). Answered with `notifications` listing it.
    RetryNotification {
        request: u64,
        id: String,
    },
    /// Reads up to `max` bytes of a result file from `offset`.
    GetFile {
        request: u64,
        task: TaskId,
        name: String,
        offset: u64,
        max: u64,
    },

    /// Sends this connection the testrun's progress (and log lines, if
    /// `logs`) as they happen, until the run ends or the connection closes.
    Follow {
        request: u64,
        run: RunId,
        #[serde(default)]
        logs: bool,
    },
    /// Drains (`drain: true`) or undrains a worker (operator, admin).
    DrainWorker {
        request: u64,
        worker: String,
        drain: bool,
    },
    /// A worker's health and its history; with `action`, an operator's
    /// action first (operator, admin). Answered with `health_report`.
    WorkerHealth {
        request: u64,
        worker: String,
        #[serde(default)]
        action: Option<HealthAction>,
        #[serde(default)]
        reason: String,
    },
    /// Recent testruns, newest first (`limit` at most 1000), optionally of
    /// one state, owner, verdict or device group, and only those numbered
    /// below `before` (the next page); a `submit` user sees only its own.
    ListRuns {
        request: u64,
        #[serde(default)]
        state: Option<RunState>,
        #[serde(default)]
        owner: Option<String>,
        limit: u32,
        #[serde(default)]
        verdict: Option<Verdict>,
        #[serde(default)]
        devicegroup: Option<String>,
        /// A testrun number (`r17` is 17): only older testruns.
        #[serde(default)]
        before: Option<u64>,
    },
    /// The queued tasks per routing key.
    ListQueue {
        request: u64,
    },
    /// Reads up to `max` bytes of the audit log from `offset` (admin);
    /// with `before`, the whole lines of up to `max` bytes that end
    /// there (past the end: the newest), `data.offset` saying where they
    /// start.
    GetAudit {
        request: u64,
        offset: u64,
        max: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
    },
    /// Offers an input file, named by its content (class `file`): "how
    /// much of it do you have?" Answered with `input_credit` or an error.
    InputOffer {
        request: u64,
        sha256: String,
        size: u64,
    },
    /// Bytes of an offered input file at `offset` (the raw frame), inside
    /// the credit; `request` is the offer's. No answer per chunk.
    InputChunk {
        request: u64,
        sha256: String,
        offset: u64,
    },
    /// Every byte was sent: answered `input_stored` once verified.
    InputEnd {
        request: u64,
        sha256: String,
        size: u64,
    },
    /// Reads up to `max` bytes of a stored input file (clients with role
    /// operator, and the worker running a task of a testrun that has it).
    GetInput {
        request: u64,
        sha256: String,
        offset: u64,
        max: u64,
    },
    /// How much of an offered input the server has, and up to which byte
    /// it accepts chunks now (as `file_credit`).
    InputCredit {
        request: u64,
        sha256: String,
        have: u64,
        until: u64,
        resume: bool,
    },
    /// Answer to `list_runs`.
    Runs {
        request: u64,
        runs: Vec<RunSummary>,
    },
    /// A testrun's test cases, as its JUnit result files say them (of
    /// each task's last attempt), in task, file and file order; `failed`:
    /// only failing ones (fail, error). `limit` at most 1000; `offset`
    /// skips that many. Answered with `cases`.
    ListCases {
        request: u64,
        run: RunId,
        #[serde(default)]
        failed: bool,
        #[serde(default)]
        offset: u64,
        limit: u32,
    },
    /// Answer to `list_cases`: fewer than `limit` means the last page.
    Cases {
        request: u64,
        run: RunId,
        cases: Vec<TestCase>,
    },
    /// A testrun's cases against `base` (default: its series' last
    /// finished testrun before it, §5.6). Answered with `comparison`.
    Compare {
        request: u64,
        run: RunId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        base: Option<RunId>,
    },
    /// Answer to `compare`.
    Comparison {
        request: u64,
        comparison: Box<crate::protocol::results::Comparison>,
    },
    /// One case's results, newest first (§5.6): `case` as `list_cases`
    /// names it; only those of `series` and `devicegroup` if given;
    /// `limit` 1–500. Answered with `case_history`.
    GetCaseHistory {
        request: u64,
        case: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        series: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        devicegroup: Option<String>,
        limit: u32,
    },
    /// Answer to `get_case_history`.
    CaseHistory {
        request: u64,
        history: crate::protocol::results::CaseHistory,
    },
    /// Cases that passed and failed on one series and image among the
    /// newest finished testruns (§5.6). Answered with `flaky`.
    ListFlaky {
        request: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        devicegroup: Option<String>,
    },
    /// Answer to `list_flaky`.
    Flaky {
        request: u64,
        cases: Vec<crate::protocol::results::FlakyCase>,
    },
    /// Lists the known-issue rules, adding one (`add`) or removing one
    /// (`remove`, a rule's id) first; changing them needs role operator
    /// (§5.6). Answered with `known`.
    Known {
        request: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        add: Option<crate::protocol::results::KnownRule>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remove: Option<u64>,
    },
    /// Answer to `known`: every rule, those of `server.toml` (id 0) first.
    KnownRules {
        request: u64,
        rules: Vec<crate::protocol::results::KnownRule>,
    },
    /// The utilisation report since `since_ms` (§5.6). Answered with
    /// `report`.
    GetReport {
        request: u64,
        since_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        devicegroup: Option<String>,
    },
    /// Answer to `get_report`.
    Report {
        request: u64,
        report: crate::protocol::results::Report,
    },
    /// The device groups' minutes since `since_ms`, one point per
    /// `step_ms` (§5.6). Answered with `lab_series`.
    GetLabSeries {
        request: u64,
        since_ms: u64,
        step_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        devicegroup: Option<String>,
    },
    /// Answer to `get_lab_series`.
    LabSeries {
        request: u64,
        points: Vec<crate::protocol::results::LabPoint>,
    },
    /// A worker's hours since `since_ms` (§5.6). Answered with
    /// `worker_series`.
    GetWorkerSeries {
        request: u64,
        worker: String,
        since_ms: u64,
    },
    /// Answer to `get_worker_series`.
    WorkerSeries {
        request: u64,
        worker: String,
        hours: Vec<crate::protocol::results::WorkerHour>,
    },
    /// Cases × workers over a series' newest `runs` finished testruns
    /// (§5.6). Answered with `series_matrix`.
    GetSeriesMatrix {
        request: u64,
        series: String,
        runs: u32,
    },
    /// Answer to `get_series_matrix`.
    SeriesMatrix {
        request: u64,
        matrix: crate::protocol::results::SeriesMatrix,
    },
    /// Answer to `list_queue`.
    Queue {
        request: u64,
        queues: Vec<QueueInfo>,
    },
    /// The input file is stored and verified.
    InputStored {
        request: u64,
        sha256: String,
        size: u64,
    },

    /// Asks for one device matching `device` for `duration_ms` (PROTOCOL.md
    /// §18.1): queued like a task; answered with `leases` naming it.
    Reserve {
        request: u64,
        device: DeviceSpec,
        duration_ms: u64,
        #[serde(default)]
        reason: String,
        #[serde(default)]
        priority: Priority,
        #[serde(default)]
        queue_anyway: bool,
    },
    /// The caller's leases (`all`: everyone's, and ended ones; a submit
    /// user sees its own). Answered with `leases`.
    ListLeases {
        request: u64,
        #[serde(default)]
        all: bool,
    },
    /// Releases, renews, keeps or shares a lease. Answered with `leases`.
    LeaseAct {
        request: u64,
        lease: LeaseId,
        action: LeaseAction,
        /// Release someone else's lease (operator, admin).
        #[serde(default)]
        force: bool,
        #[serde(default)]
        duration_ms: Option<u64>,
        /// `share`/`unshare`: whom.
        #[serde(default)]
        user: Option<String>,
    },
    /// Attaches this connection to the lease's console: answered with
    /// `console_attached`, then `console_output` with what the device
    /// printed in the last `since_ms`, and everything after.
    ConsoleAttach {
        request: u64,
        lease: LeaseId,
        #[serde(default)]
        since_ms: u64,
    },
    /// Bytes typed (the raw frame) at `offset` of the client's input
    /// `stream`: applied once, in order; answered `console_input_ack`.
    ConsoleInput {
        request: u64,
        lease: LeaseId,
        stream: String,
        offset: u64,
    },
    ConsoleDetach {
        request: u64,
        lease: LeaseId,
    },
    /// Powers the leased device on, off, cycles it or reads its state.
    Power {
        request: u64,
        lease: LeaseId,
        action: PowerAction,
    },
    /// Answer to `reserve`, `list_leases` and `lease_act`.
    Leases {
        request: u64,
        leases: Vec<DeviceLease>,
    },
    /// The console is attached; `writer`: this connection may type.
    ConsoleAttached {
        request: u64,
        lease: LeaseId,
        writer: bool,
        worker: String,
        /// Where the lease's output offsets stand (the replay's bytes
        /// come below it): a client that saw more before (the server
        /// restarted, numbering anew) starts counting afresh.
        #[serde(default)]
        next: u64,
    },
    /// Console bytes (the raw frame) at `offset` of the lease's output;
    /// `dropped`: bytes lost before these (counted, never hidden).
    ConsoleOutput {
        request: u64,
        lease: LeaseId,
        offset: u64,
        #[serde(default)]
        dropped: u64,
    },
    /// Input of `stream` the server has applied, up to byte `have`.
    ConsoleInputAck {
        request: u64,
        lease: LeaseId,
        stream: String,
        have: u64,
    },
    /// The console is closed, and why (the lease ended, detach, revoked).
    ConsoleClosed {
        request: u64,
        lease: LeaseId,
        reason: String,
    },
    /// What a power action did: `state` is `on`, `off` or `unknown`.
    PowerResult {
        request: u64,
        lease: LeaseId,
        action: PowerAction,
        state: String,
        message: String,
        ok: bool,
    },

    // ---- server → client ---------------------------------------------------
    /// The connection follows `run` from now on.
    Following {
        request: u64,
        run: RunId,
    },
    Pong {
        request: u64,
        server: String,
        /// With PostgreSQL: the lease this server leads under (absent
        /// for a lone server on SQLite). A standby binds nothing, so it
        /// never answers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lease: Option<LeaseInfo>,
    },
    Submitted {
        request: u64,
        run: RunId,
        tasks: Vec<TaskId>,
    },
    Status {
        request: u64,
        status: RunStatus,
    },
    Events {
        request: u64,
        run: RunId,
        events: Vec<ProgressEvent>,
    },
    Workers {
        request: u64,
        workers: Vec<WorkerInfo>,
    },
    /// Answer to `worker_health`: the worker as `workers` shows it and
    /// its health changes, oldest first (the last 100).
    HealthReport {
        request: u64,
        worker: WorkerInfo,
        history: Vec<HealthChange>,
        /// The worker's last tasks that ended, newest first (at most 20;
        /// a `submit` user sees only those of its own testruns).
        #[serde(default)]
        recent: Vec<RecentTask>,
    },
    /// Answer to `list_notifications` and `retry_notification`.
    Notifications {
        request: u64,
        deliveries: Vec<NotificationInfo>,
        /// Each target's standing (not for `retry_notification`).
        #[serde(default)]
        targets: Vec<NotifyTargetInfo>,
    },
    /// Answer to `web_login`: open `url` within `expires_ms` (once).
    WebLink {
        request: u64,
        url: String,
        expires_ms: u64,
    },
    /// Answer to `find_in_log`.
    LogFound {
        request: u64,
        found: crate::protocol::logfind::LogFinding,
    },
    /// Bytes of a log or file are the third frame.
    Data {
        request: u64,
        offset: u64,
        eof: bool,
    },

    // ---- server PUB ----------------------------------------------------------
    /// Sent on `events` every heartbeat interval. `server` changes at each
    /// server start, so a worker notices a restart even without a gap.
    ServerHeartbeat {
        server: String,
        heartbeat_ms: u64,
        /// Server wall clock (Unix ms) when sent; lets a worker estimate
        /// the offset between the two clocks (0 if unknown).
        #[serde(default)]
        sent_ms: u64,
    },
    /// Progress of a testrun, on topic `run/<id>`.
    Progress {
        run: RunId,
        event: ProgressEvent,
    },
    /// Log lines of a task, on topic `log/<run id>`.
    LogLines {
        run: RunId,
        task: TaskId,
        lines: Vec<LogLine>,
    },
    /// Log lines of a task, packed as workers send them (raw frame), on
    /// topic `log/<run id>`.
    LogLinesPacked {
        run: RunId,
        task: TaskId,
        parts: Vec<LogPart>,
    },
    /// The server is shutting down in an orderly way.
    Shutdown {
        server: String,
    },
}
