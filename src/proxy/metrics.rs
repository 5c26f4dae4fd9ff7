//! Prometheus metrics, written by hand: a few atomic counters and one latency histogram per
//! route are all the proxy needs, and recording must cost nothing on the hot path (no locks,
//! no allocation).
//!
//! Routes are numbered once at startup ([`RouteId`]); each route has one counter per HTTP
//! status (100-999, every code HTTP can carry) and its own latency buckets, so recording a
//! request is three relaxed atomic adds (status, bucket, sum) reached through one index by
//! route id. Labels come from that fixed set and from `proxy.toml` (route names), never from
//! what a client sends, so no request can add a series.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tracing_appender::non_blocking::ErrorCounter;

use super::error::{ProxyError, REASON_CODES};
use super::reload_check::ReloadParts;
use crate::layer::PacedLog;

/// Index of a route label in [`Metrics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteId(usize);

impl RouteId {
    #[cfg(test)]
    pub(crate) fn default_for_tests() -> Self {
        RouteId(0)
    }
}

/// Fixed route labels of the proxy's own endpoints.
pub mod routes {
    /// `POST /auth/login`.
    pub const LOGIN: &str = "auth/login";
    /// `GET /auth/session`.
    pub const SESSION: &str = "auth/session";
    /// `POST /auth/logout`.
    pub const LOGOUT: &str = "auth/logout";
    /// Static files (or the built-in page).
    pub const STATIC: &str = "static";
    /// Anything that matched no route.
    pub const UNMATCHED: &str = "unmatched";
}

/// The fixed routes come first (ids 0 to 4); upstream routes follow, in config order.
const FIXED_ROUTE_LABELS: [&str; 5] = [
    routes::LOGIN,
    routes::SESSION,
    routes::LOGOUT,
    routes::STATIC,
    routes::UNMATCHED,
];
const FIXED_ROUTES: usize = FIXED_ROUTE_LABELS.len();
/// Route label of an upstream: this prefix and its name.
const UPSTREAM_LABEL_PREFIX: &str = "upstream/";

const STATUS_MIN: u16 = 100;
/// 100 to 999: the three-digit codes an upstream may answer with and the proxy passes through
/// (hyper accepts all of them). Counting only 1xx-5xx left a 6xx-9xx answer out of
/// `countersign_requests_total` while the latency histogram counted it.
const STATUS_SLOTS: usize = 900;
/// Latency bucket upper bounds in microseconds (1ms .. 10s).
const BUCKETS_MICROS: [u64; 13] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// One route's latency histogram: 15 counters, 120 bytes, padded to two cache lines' worth
/// of alignment (128 bytes) so that two routes recorded on different cores never write the
/// same cache line.
#[repr(align(128))]
#[derive(Default)]
struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS_MICROS.len()],
    /// Requests slower than the last bucket. `+Inf` and `_count` are the buckets' sum plus
    /// this, read in the same scrape: a count kept apart, read after the buckets, could be
    /// behind a bucket a request was just added to (a bucket above `+Inf`).
    over: AtomicU64,
    sum_micros: AtomicU64,
}

struct RouteCounters {
    label: String,
    by_status: Box<[AtomicU64]>,
    latency: LatencyHistogram,
}

/// The log writer's count of lines it dropped (queue full), set once by the process that
/// installs the log writer. The writer is process-wide, as the tracing subscriber it serves
/// is, so its count is too: every proxy in the process reports the same one.
static LOG_LINES_DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Makes `/metrics` report `countersign_log_lines_dropped_total` from this counter (the one
/// of the process's non-blocking log writer). The first call wins; later ones are ignored.
pub fn report_log_lines_dropped(counter: ErrorCounter) {
    let _ = LOG_LINES_DROPPED.set(counter);
}

/// Whether the process holds `session.snapshot_file`'s lock
/// (`countersign_session_snapshot_lock_held`), set by the process that takes it (the CLI's
/// `run`): like the log writer, the lock is the process's, not one proxy's.
static SNAPSHOT_LOCK_HELD: AtomicU8 = AtomicU8::new(SNAPSHOT_LOCK_UNSET);
/// No `session.snapshot_file`: the gauge is not reported.
const SNAPSHOT_LOCK_UNSET: u8 = u8::MAX;

/// Makes `/metrics` report `countersign_session_snapshot_lock_held` as `held` (1 or 0), from
/// now until the next call. Never called: not reported.
pub fn report_snapshot_lock_held(held: bool) {
    SNAPSHOT_LOCK_HELD.store(u8::from(held), Ordering::Relaxed);
}

/// How an upstream answer was cut after its head (the `kind` label of
/// `countersign_upstream_body_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamBodyErrorKind {
    /// The upstream sent nothing for `body_idle_timeout` while the proxy waited.
    IdleTimeout,
    /// The upstream connection broke (reset, closed before the body's end, malformed).
    Broken,
}

impl UpstreamBodyErrorKind {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            UpstreamBodyErrorKind::IdleTimeout => "idle_timeout",
            UpstreamBodyErrorKind::Broken => "broken",
        }
    }
}

/// One upstream's answers cut after their head, by kind, and the pacing of the warning about
/// them. Shared (an `Arc`) by the metrics and every connection pool of that upstream (one per
/// serving thread), and touched only when an answer is cut: the normal path neither counts
/// nor reads anything here.
pub struct UpstreamBodyErrors {
    upstream: String,
    idle_timeout: AtomicU64,
    broken: AtomicU64,
    /// Requests sent again after a stale pooled connection closed under them
    /// (`countersign_upstream_resends_total`; `upstream_pool`, `pool_stale_after`): as rare
    /// and as off the normal path as a cut, so they share this upstream's counters.
    resent: AtomicU64,
    idle_timeout_log: PacedLog,
    broken_log: PacedLog,
}

impl UpstreamBodyErrors {
    /// Counters for the upstream named `upstream` (what the log line calls it). Made by
    /// [`Metrics::new`] for each upstream; one made apart (a pool without metrics) is counted
    /// nowhere, its warnings still logged.
    pub fn new(upstream: impl Into<String>) -> Self {
        UpstreamBodyErrors {
            upstream: upstream.into(),
            idle_timeout: AtomicU64::new(0),
            broken: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            idle_timeout_log: PacedLog::new(),
            broken_log: PacedLog::new(),
        }
    }

    /// The upstream's name.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// Counts one answer cut, and says whether this one gets the warning line:
    /// `Some(cuts of this kind not logged since the last line)`, else `None` (at most one line
    /// per kind and upstream every 10 s, across all threads).
    pub fn record(&self, kind: UpstreamBodyErrorKind) -> Option<u64> {
        let (counter, log) = self.of(kind);
        counter.fetch_add(1, Ordering::Relaxed);
        log.turn()
    }

    /// Answers of this kind cut so far.
    pub fn count(&self, kind: UpstreamBodyErrorKind) -> u64 {
        self.of(kind).0.load(Ordering::Relaxed)
    }

    /// Counts one request sent again on a fresh connection after its stale pooled one closed
    /// without answering.
    pub fn record_resend(&self) {
        self.resent.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests sent again so far ([`UpstreamBodyErrors::record_resend`]).
    pub fn resends(&self) -> u64 {
        self.resent.load(Ordering::Relaxed)
    }

    fn of(&self, kind: UpstreamBodyErrorKind) -> (&AtomicU64, &PacedLog) {
        match kind {
            UpstreamBodyErrorKind::IdleTimeout => (&self.idle_timeout, &self.idle_timeout_log),
            UpstreamBodyErrorKind::Broken => (&self.broken, &self.broken_log),
        }
    }
}

impl std::fmt::Debug for UpstreamBodyErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBodyErrors")
            .field("upstream", &self.upstream)
            .field("idle_timeout", &self.idle_timeout)
            .field("broken", &self.broken)
            .field("resent", &self.resent)
            .finish_non_exhaustive()
    }
}

/// All proxy metrics.
pub struct Metrics {
    routes: Vec<RouteCounters>,
    /// Per upstream, in the order given to [`Metrics::new`].
    upstream_body_errors: Vec<Arc<UpstreamBodyErrors>>,
    logins_ok: AtomicU64,
    logins_failed: AtomicU64,
    logins_throttled: AtomicU64,
    signatures_issued: AtomicU64,
    upstream_errors: AtomicU64,
    /// The proxy's own refusals and failures, by reason code (`REASON_CODES` order).
    refusals: [AtomicU64; REASON_CODES.len()],
    reload: ReloadGauges,
}

/// What the last reload and the last comparison of the config file found (SIGHUP, or a file
/// change with `server.reload_check_interval`): the gauges an operator alerts on, as
/// Prometheus' own `prometheus_config_last_reload_successful`. The logs say what failed; these
/// say that something did, to a tool that does not read logs.
#[derive(Debug, Default)]
struct ReloadGauges {
    /// The file parts ([`ReloadParts::file_bits`]) whose last read failed, a current file kept
    /// (0 before any reload). Kept per part: a file-change reload reads only the parts that
    /// changed, and a keyring still broken must not look mended because the users file, read
    /// next, loaded.
    failing_files: AtomicU8,
    /// Unix seconds of the start's load, then of each reload after which no part is failing.
    last_success_unix: AtomicU64,
    /// `proxy.toml`, when last compared, was valid and differed from the settings running in
    /// a key only a restart applies.
    config_changed: AtomicBool,
    /// `proxy.toml`, when last compared, would not start the proxy.
    config_invalid: AtomicBool,
    /// The `notAfter` of the certificate the main listener serves, in Unix seconds (0: no
    /// TLS, and no series).
    tls_cert_not_after: AtomicI64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

/// Outcome of a login attempt, for the login counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginOutcome {
    /// Credentials accepted.
    Ok,
    /// Credentials rejected.
    Failed,
    /// Refused by the throttle before checking.
    Throttled,
}

impl Metrics {
    /// Metrics for the proxy's own routes plus one route per upstream name
    /// (labelled `upstream/<name>`).
    pub fn new<'a>(upstream_names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut labels: Vec<String> = FIXED_ROUTE_LABELS.iter().map(|s| (*s).to_owned()).collect();
        let mut upstream_body_errors = Vec::new();
        for name in upstream_names {
            labels.push(format!("{UPSTREAM_LABEL_PREFIX}{name}"));
            upstream_body_errors.push(Arc::new(UpstreamBodyErrors::new(name)));
        }
        Metrics {
            upstream_body_errors,
            routes: labels
                .into_iter()
                .map(|label| RouteCounters {
                    label,
                    by_status: (0..STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
                    latency: LatencyHistogram::default(),
                })
                .collect(),
            logins_ok: AtomicU64::new(0),
            logins_failed: AtomicU64::new(0),
            logins_throttled: AtomicU64::new(0),
            signatures_issued: AtomicU64::new(0),
            upstream_errors: AtomicU64::new(0),
            refusals: std::array::from_fn(|_| AtomicU64::new(0)),
            reload: ReloadGauges::default(),
        }
    }

    /// Records that the files the proxy runs on were loaded at `now_unix` (the start).
    pub fn record_loaded(&self, now_unix: u64) {
        self.reload
            .last_success_unix
            .store(now_unix, Ordering::Relaxed);
    }

    /// Records a reload at `now_unix` that read the file parts `read`, of which those in
    /// `failed` were not swapped in (a current file kept). A part not read keeps its state:
    /// a file that failed before and has not changed since still fails, and the success
    /// timestamp moves only when no part is failing.
    pub(crate) fn record_reload(&self, read: ReloadParts, failed: ReloadParts, now_unix: u64) {
        let read = read.file_bits();
        let failed = failed.file_bits() & read;
        let update = |failing: u8| Some((failing & !read) | failed);
        // Reloads run one at a time; the update is whole all the same.
        let before = (self.reload.failing_files)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, update)
            .unwrap_or_else(|unchanged| unchanged);
        if (before & !read) | failed == 0 {
            self.record_loaded(now_unix);
        }
    }

    /// Records the `notAfter` (Unix seconds) of the certificate the main listener serves now:
    /// at start, and at each reload that swapped in a new one.
    pub fn record_tls_cert(&self, not_after_unix: i64) {
        self.reload
            .tls_cert_not_after
            .store(not_after_unix, Ordering::Relaxed);
    }

    /// Records a comparison of the config file with the settings running: `changed` when it
    /// differs in a key only a restart applies (after a reload applied the live keys),
    /// `invalid` when it would not start the proxy (never both: a restart would then fail).
    pub fn record_config_file(&self, changed: bool, invalid: bool) {
        self.reload.config_changed.store(changed, Ordering::Relaxed);
        self.reload.config_invalid.store(invalid, Ordering::Relaxed);
    }

    /// The id of a fixed route label (see [`routes`]) or `upstream/<name>`.
    pub fn route_id(&self, label: &str) -> Option<RouteId> {
        self.routes
            .iter()
            .position(|r| r.label == label)
            .map(RouteId)
    }

    /// The id of the `index`-th upstream as passed to [`Metrics::new`].
    pub fn upstream_route(&self, index: usize) -> RouteId {
        RouteId(FIXED_ROUTES + index)
    }

    /// The answers-cut counters of the upstream of `route` (an id from
    /// [`Metrics::upstream_route`]), for that upstream's connection pools; None for the
    /// proxy's own routes.
    pub fn upstream_body_errors(&self, route: RouteId) -> Option<Arc<UpstreamBodyErrors>> {
        route
            .0
            .checked_sub(FIXED_ROUTES)
            .and_then(|i| self.upstream_body_errors.get(i))
            .cloned()
    }

    /// The label of a route id.
    pub fn route_label(&self, id: RouteId) -> &str {
        self.routes
            .get(id.0)
            .map(|r| r.label.as_str())
            .unwrap_or("unknown")
    }

    /// Records one finished request.
    pub fn record_request(&self, route: RouteId, status: u16, latency: Duration) {
        // Route ids come from this set (`route_id`, `upstream_route`); one that does not is a
        // bug, and is then not counted at all rather than counted under another route.
        let Some(r) = self.routes.get(route.0) else {
            return;
        };
        let slot = usize::from(status.saturating_sub(STATUS_MIN));
        if let Some(counter) = r.by_status.get(slot) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        match BUCKETS_MICROS.iter().position(|&b| micros <= b) {
            Some(i) => r.latency.buckets[i].fetch_add(1, Ordering::Relaxed),
            None => r.latency.over.fetch_add(1, Ordering::Relaxed),
        };
        r.latency.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Records a login attempt.
    pub fn record_login(&self, outcome: LoginOutcome) {
        let counter = match outcome {
            LoginOutcome::Ok => &self.logins_ok,
            LoginOutcome::Failed => &self.logins_failed,
            LoginOutcome::Throttled => &self.logins_throttled,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one signature issued on an upstream request.
    pub fn record_signature(&self) {
        self.signatures_issued.fetch_add(1, Ordering::Relaxed);
    }

    /// Records an upstream failure (refused, broken, timed out).
    pub fn record_upstream_error(&self) {
        self.upstream_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a request the proxy refused or failed itself, under its reason code (the
    /// answer's `{"error":…}`). Only the error path pays for it: one relaxed atomic add.
    pub fn record_refusal(&self, error: &ProxyError) {
        if let Some(counter) = self.refusals.get(error.reason_index()) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests counted for `route` with `status` (tests, diagnostics).
    pub fn requests(&self, route: RouteId, status: u16) -> u64 {
        self.routes
            .get(route.0)
            .and_then(|r| {
                r.by_status
                    .get(usize::from(status.saturating_sub(STATUS_MIN)))
            })
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// The Prometheus text exposition (format 0.0.4).
    ///
    /// `active_sessions` is the session store's count for this scrape, `None` when the store
    /// did not answer (Redis down or slow). Then `countersign_session_store_up` is 0 and
    /// `countersign_active_sessions` is left out rather than reported with a value that is no
    /// longer known (the exporter convention for a failed collection: the series goes stale,
    /// and the up-gauge, always present, says why). `upstream_up[i]` is whether the `i`-th
    /// upstream (as passed to [`Metrics::new`]) accepted the readiness check's TCP connect:
    /// `countersign_upstream_up`, left out when `upstream_up` is empty.
    pub fn render(&self, active_sessions: Option<usize>, upstream_up: &[bool]) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP countersign_requests_total Requests handled, by route and status.\n");
        out.push_str("# TYPE countersign_requests_total counter\n");
        for r in &self.routes {
            for (slot, counter) in r.by_status.iter().enumerate() {
                let n = counter.load(Ordering::Relaxed);
                if n > 0 {
                    let status = usize::from(STATUS_MIN) + slot;
                    let _ = writeln!(
                        out,
                        "countersign_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                        escape_label(&r.label)
                    );
                }
            }
        }
        out.push_str(
            "# HELP countersign_request_duration_seconds Time to the response head, by route.\n",
        );
        out.push_str("# TYPE countersign_request_duration_seconds histogram\n");
        for r in &self.routes {
            let label = escape_label(&r.label);
            // `+Inf` and `_count` are the sum of the same loads the buckets were built from.
            let counts: [u64; BUCKETS_MICROS.len()] =
                std::array::from_fn(|i| r.latency.buckets[i].load(Ordering::Relaxed));
            let over = r.latency.over.load(Ordering::Relaxed);
            let count = counts.iter().sum::<u64>() + over;
            // As `countersign_requests_total`: a route appears once it has answered a request.
            if count == 0 {
                continue;
            }
            let mut cumulative = 0;
            for (bound, n) in BUCKETS_MICROS.iter().zip(counts) {
                cumulative += n;
                let _ = writeln!(
                    out,
                    "countersign_request_duration_seconds_bucket{{route=\"{label}\",le=\"{}\"}} \
                     {cumulative}",
                    *bound as f64 / 1e6
                );
            }
            let _ = writeln!(
                out,
                "countersign_request_duration_seconds_bucket{{route=\"{label}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "countersign_request_duration_seconds_sum{{route=\"{label}\"}} {}",
                r.latency.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "countersign_request_duration_seconds_count{{route=\"{label}\"}} {count}"
            );
        }

        out.push_str("# HELP countersign_logins_total Login attempts by outcome.\n");
        out.push_str("# TYPE countersign_logins_total counter\n");
        for (outcome, counter) in [
            ("ok", &self.logins_ok),
            ("failed", &self.logins_failed),
            ("throttled", &self.logins_throttled),
        ] {
            let _ = writeln!(
                out,
                "countersign_logins_total{{outcome=\"{outcome}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        for (name, help, counter) in [
            (
                "countersign_signatures_issued_total",
                "Upstream requests signed.",
                &self.signatures_issued,
            ),
            (
                "countersign_upstream_errors_total",
                "Upstream requests that failed (refused, broken or timed out).",
                &self.upstream_errors,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", counter.load(Ordering::Relaxed));
        }
        // Every reason, 0 included (as the body errors below): the status of a refusal (403)
        // cannot tell the proxy's own `csrf` from an upstream's 403, this can. Labels from the
        // fixed list of codes only.
        out.push_str(
            "# HELP countersign_refusals_total Requests the proxy refused or failed itself, by \
             the reason code of its answer ({\"error\":reason}); upstream answers are not \
             counted here.\n",
        );
        out.push_str("# TYPE countersign_refusals_total counter\n");
        for (reason, counter) in REASON_CODES.iter().zip(&self.refusals) {
            let _ = writeln!(
                out,
                "countersign_refusals_total{{reason=\"{reason}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        if !self.upstream_body_errors.is_empty() {
            out.push_str(
                "# HELP countersign_upstream_body_errors_total Upstream answers cut after their \
                 head: the upstream sent nothing for body_idle_timeout (idle_timeout) or its \
                 connection broke (broken).\n",
            );
            out.push_str("# TYPE countersign_upstream_body_errors_total counter\n");
            // Every upstream and kind, 0 included: a series that appears only at the first cut
            // hides that first cut from `increase()`.
            for errors in &self.upstream_body_errors {
                let upstream = escape_label(errors.upstream());
                for kind in [
                    UpstreamBodyErrorKind::IdleTimeout,
                    UpstreamBodyErrorKind::Broken,
                ] {
                    let _ = writeln!(
                        out,
                        "countersign_upstream_body_errors_total{{upstream=\"{upstream}\",kind=\"{}\"}} {}",
                        kind.label(),
                        errors.count(kind)
                    );
                }
            }
            out.push_str(
                "# HELP countersign_upstream_resends_total Idempotent requests signed again and \
                 sent on a new connection after a pooled one idle for pool_stale_after closed \
                 without answering.\n",
            );
            out.push_str("# TYPE countersign_upstream_resends_total counter\n");
            for errors in &self.upstream_body_errors {
                let _ = writeln!(
                    out,
                    "countersign_upstream_resends_total{{upstream=\"{}\"}} {}",
                    escape_label(errors.upstream()),
                    errors.resends()
                );
            }
        }
        out.push_str(
            "# HELP countersign_session_store_up Whether the session store answered at this \
             scrape (1) or not (0: Redis down or slow; countersign_active_sessions is then \
             absent).\n",
        );
        out.push_str("# TYPE countersign_session_store_up gauge\n");
        let _ = writeln!(
            out,
            "countersign_session_store_up {}",
            u8::from(active_sessions.is_some())
        );
        if let Some(active) = active_sessions {
            out.push_str(
                "# HELP countersign_active_sessions Sessions held by the store, as \
                 session.max_sessions counts them: live ones plus expired ones not yet swept.\n",
            );
            out.push_str("# TYPE countersign_active_sessions gauge\n");
            let _ = writeln!(out, "countersign_active_sessions {active}");
        }
        if !upstream_up.is_empty() {
            out.push_str(
                "# HELP countersign_upstream_up Whether the upstream accepted a TCP connection \
                 at the last readiness check (1) or not (0), required for readiness or not.\n",
            );
            out.push_str("# TYPE countersign_upstream_up gauge\n");
            for (i, up) in upstream_up.iter().enumerate() {
                let Some(r) = self.routes.get(FIXED_ROUTES + i) else {
                    break;
                };
                let name = r
                    .label
                    .strip_prefix(UPSTREAM_LABEL_PREFIX)
                    .unwrap_or(&r.label);
                let _ = writeln!(
                    out,
                    "countersign_upstream_up{{upstream=\"{}\"}} {}",
                    escape_label(name),
                    u8::from(*up)
                );
            }
        }
        self.render_reload(&mut out);
        out.push_str(
            "# HELP countersign_log_lines_dropped_total Log lines dropped because the log \
             writer's queue (server.log_queue_lines) was full.\n",
        );
        out.push_str("# TYPE countersign_log_lines_dropped_total counter\n");
        let _ = writeln!(
            out,
            "countersign_log_lines_dropped_total {}",
            LOG_LINES_DROPPED
                .get()
                .map_or(0, ErrorCounter::dropped_lines)
        );
        let lock = SNAPSHOT_LOCK_HELD.load(Ordering::Relaxed);
        if lock != SNAPSHOT_LOCK_UNSET {
            out.push_str(
                "# HELP countersign_session_snapshot_lock_held 1 while this proxy holds the lock \
                 of session.snapshot_file (<file>.lock); 0 while it serves without it (not \
                 taken at the start, or its file removed and not taken again).\n",
            );
            out.push_str("# TYPE countersign_session_snapshot_lock_held gauge\n");
            let _ = writeln!(out, "countersign_session_snapshot_lock_held {lock}");
        }
        out
    }
}

impl Metrics {
    /// The reload and config-file gauges ([`ReloadGauges`]).
    fn render_reload(&self, out: &mut String) {
        let r = &self.reload;
        let gauges: [(&str, &str, u64); 4] = [
            (
                "countersign_reload_last_successful",
                "Whether every file the proxy reloads loaded when it was last read (1, also \
                 before any reload) or one was kept after its new content failed and has not \
                 loaded since (0).",
                u64::from(r.failing_files.load(Ordering::Relaxed) == 0),
            ),
            (
                "countersign_reload_last_success_timestamp_seconds",
                "When the keyring, users and certificate files were last all loaded (the start, \
                 or the last reload after which none was failing), in Unix seconds.",
                r.last_success_unix.load(Ordering::Relaxed),
            ),
            (
                "countersign_config_file_changed",
                "Whether proxy.toml, when last compared (SIGHUP or a file change), differed from \
                 the settings running in a key that waits for a restart (1); keys a reload \
                 applies live (headers, throttle, timeouts, limits) no longer differ once \
                 applied; 0 while the file would not start the proxy (see \
                 countersign_config_file_invalid).",
                u64::from(r.config_changed.load(Ordering::Relaxed)),
            ),
            (
                "countersign_config_file_invalid",
                "Whether proxy.toml, when last compared, would not start the proxy.",
                u64::from(r.config_invalid.load(Ordering::Relaxed)),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        // Only with TLS: what an operator alerts on before browsers refuse the certificate
        // (`countersign_tls_cert_expiry_timestamp_seconds - time() < 14 * 86400`).
        let not_after = r.tls_cert_not_after.load(Ordering::Relaxed);
        if not_after != 0 {
            let name = "countersign_tls_cert_expiry_timestamp_seconds";
            let _ = writeln!(
                out,
                "# HELP {name} When the certificate the public listener serves (server.tls_cert, \
                 as last loaded) expires (its notAfter), in Unix seconds.\n# TYPE {name} gauge\n\
                 {name} {not_after}"
            );
        }
    }
}

/// Escapes a label value (backslash, double quote, newline) per the text format.
pub(crate) fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders() {
        let m = Metrics::new(["api", "we\"ird"]);
        let api = m.route_id("upstream/api").unwrap();
        assert_eq!(api, m.upstream_route(0));
        m.record_request(api, 200, Duration::from_millis(3));
        m.record_request(api, 200, Duration::from_millis(3));
        m.record_request(m.upstream_route(1), 502, Duration::from_secs(20));
        m.record_request(api, 999, Duration::from_millis(3));
        m.record_login(LoginOutcome::Throttled);
        m.record_signature();
        assert_eq!(m.requests(api, 200), 2);
        let text = m.render(Some(7), &[]);
        assert!(
            text.contains("countersign_requests_total{route=\"upstream/api\",status=\"200\"} 2")
        );
        assert!(text.contains("route=\"upstream/we\\\"ird\",status=\"502\"} 1"));
        // A code outside 1xx-5xx that an upstream answered with is counted like any other.
        assert!(
            text.contains("{route=\"upstream/api\",status=\"999\"} 1\n"),
            "{text}"
        );
        assert!(text.contains(
            "countersign_request_duration_seconds_bucket{route=\"upstream/api\",le=\"0.005\"} 3\n"
        ));
        assert!(text.contains(
            "countersign_request_duration_seconds_bucket{route=\"upstream/api\",le=\"+Inf\"} 3\n"
        ));
        // 20 s: above the last bound, counted in +Inf only; the label escaped as elsewhere.
        assert!(text.contains(
            "countersign_request_duration_seconds_bucket{route=\"upstream/we\\\"ird\",le=\"10\"} 0\n"
        ));
        assert!(text.contains(
            "countersign_request_duration_seconds_bucket{route=\"upstream/we\\\"ird\",le=\"+Inf\"} 1\n"
        ));
        assert!(text.contains(
            "countersign_request_duration_seconds_count{route=\"upstream/we\\\"ird\"} 1\n"
        ));
        assert!(text.contains(
            "countersign_request_duration_seconds_sum{route=\"upstream/we\\\"ird\"} 20\n"
        ));
        assert!(text.contains("countersign_logins_total{outcome=\"throttled\"} 1"));
        assert!(text.contains("countersign_signatures_issued_total 1"));
        assert!(text.contains("countersign_active_sessions 7"));
        assert!(text.contains("countersign_session_store_up 1\n"));
    }

    #[test]
    fn a_store_that_did_not_answer_is_up_0_without_a_session_count() {
        let m = Metrics::new(["api"]);
        let text = m.render(None, &[]);
        assert!(text.contains("# TYPE countersign_session_store_up gauge\n"));
        assert!(
            text.contains("\ncountersign_session_store_up 0\n"),
            "{text}"
        );
        assert!(!text.contains("\ncountersign_active_sessions "), "{text}");
        assert!(
            !text.contains("# TYPE countersign_active_sessions"),
            "{text}"
        );
        // Every sample line belongs to a family declared with # TYPE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| text.contains(&format!("# TYPE {base} histogram")))
                .unwrap_or(name);
            assert!(text.contains(&format!("# TYPE {family} ")), "{line}");
        }
    }

    /// Each route has its own buckets, `_sum` and `_count`: login's tens of milliseconds are
    /// not mixed into an upstream's 1 ms; a route that answered nothing has no series; and
    /// `+Inf` equals `_count` per route, with the slow ones counted only there.
    #[test]
    fn latency_is_kept_per_route() {
        let m = Metrics::new(["api", "reports"]);
        let login = m.route_id(routes::LOGIN).unwrap();
        let api = m.upstream_route(0);
        for _ in 0..4 {
            m.record_request(login, 200, Duration::from_millis(40));
        }
        m.record_request(api, 200, Duration::from_micros(800));
        m.record_request(api, 504, Duration::from_secs(11));
        let text = m.render(None, &[]);
        let line = |route: &str, rest: &str| {
            format!("countersign_request_duration_seconds_{rest}")
                .replace("ROUTE", &format!("route=\"{route}\""))
        };
        for (route, wanted) in [
            ("auth/login", "bucket{ROUTE,le=\"0.025\"} 0\n"),
            ("auth/login", "bucket{ROUTE,le=\"0.05\"} 4\n"),
            ("auth/login", "bucket{ROUTE,le=\"+Inf\"} 4\n"),
            ("auth/login", "sum{ROUTE} 0.16\n"),
            ("auth/login", "count{ROUTE} 4\n"),
            ("upstream/api", "bucket{ROUTE,le=\"0.001\"} 1\n"),
            ("upstream/api", "bucket{ROUTE,le=\"10\"} 1\n"),
            ("upstream/api", "bucket{ROUTE,le=\"+Inf\"} 2\n"),
            ("upstream/api", "sum{ROUTE} 11.0008\n"),
            ("upstream/api", "count{ROUTE} 2\n"),
        ] {
            let wanted = line(route, wanted);
            assert!(text.contains(&wanted), "{wanted} missing in\n{text}");
        }
        for quiet in ["upstream/reports", "static", "unmatched", "auth/session"] {
            assert!(
                !text.contains(&format!("duration_seconds_count{{route=\"{quiet}\"}}")),
                "{quiet}: {text}"
            );
        }
        // Buckets are cumulative within each route, in increasing `le` order.
        for route in ["auth/login", "upstream/api"] {
            let counts: Vec<u64> = text
                .lines()
                .filter(|l| {
                    l.starts_with(&format!(
                        "countersign_request_duration_seconds_bucket{{route=\"{route}\""
                    ))
                })
                .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
                .collect();
            assert_eq!(counts.len(), BUCKETS_MICROS.len() + 1, "{route}");
            assert!(
                counts.windows(2).all(|w| w[0] <= w[1]),
                "{route}: {counts:?}"
            );
        }
    }

    /// What docs/OPERATIONS.md ("Memory") says a route costs besides its status counters.
    #[test]
    fn a_route_entry_is_256_bytes() {
        assert_eq!(std::mem::size_of::<LatencyHistogram>(), 128);
        assert_eq!(std::mem::size_of::<RouteCounters>(), 256);
        assert_eq!(STATUS_SLOTS * std::mem::size_of::<AtomicU64>(), 7200);
    }

    /// `countersign_upstream_body_errors_total`: every upstream and kind from the start (0),
    /// each cut counted under its own upstream and kind, the name escaped; the counters are
    /// the ones handed to the pools (by route id), none for the proxy's own routes; the first
    /// cut of a kind gets the warning turn, the next ones within 10 s do not.
    #[test]
    fn body_errors_are_counted_per_upstream_and_kind() {
        let m = Metrics::new(["api", "we\"ird"]);
        let text = m.render(None, &[]);
        for line in [
            "countersign_upstream_body_errors_total{upstream=\"api\",kind=\"idle_timeout\"} 0\n",
            "countersign_upstream_body_errors_total{upstream=\"api\",kind=\"broken\"} 0\n",
            "countersign_upstream_body_errors_total{upstream=\"we\\\"ird\",kind=\"broken\"} 0\n",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(text.contains("# TYPE countersign_upstream_body_errors_total counter\n"));
        assert!(m
            .upstream_body_errors(m.route_id(routes::LOGIN).unwrap())
            .is_none());
        let weird = m.upstream_body_errors(m.upstream_route(1)).unwrap();
        assert_eq!(weird.upstream(), "we\"ird");
        assert_eq!(weird.record(UpstreamBodyErrorKind::Broken), Some(0));
        assert_eq!(weird.record(UpstreamBodyErrorKind::Broken), None);
        assert_eq!(weird.record(UpstreamBodyErrorKind::IdleTimeout), Some(0));
        let api = m.upstream_body_errors(m.upstream_route(0)).unwrap();
        assert_eq!(api.record(UpstreamBodyErrorKind::IdleTimeout), Some(0));
        let text = m.render(None, &[]);
        for line in [
            "countersign_upstream_body_errors_total{upstream=\"api\",kind=\"idle_timeout\"} 1\n",
            "countersign_upstream_body_errors_total{upstream=\"api\",kind=\"broken\"} 0\n",
            "countersign_upstream_body_errors_total{upstream=\"we\\\"ird\",kind=\"idle_timeout\"} 1\n",
            "countersign_upstream_body_errors_total{upstream=\"we\\\"ird\",kind=\"broken\"} 2\n",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        // No upstreams, no family (nothing to declare).
        assert!(!Metrics::new([]).render(None, &[]).contains("body_errors"));
    }

    /// `countersign_upstream_up` names each upstream (escaped) with the state it is given, in
    /// config order; without states the family is left out. The log drop counter is always
    /// there (0 until a log writer reports its count).
    #[test]
    fn upstream_states_and_dropped_log_lines_are_rendered() {
        let m = Metrics::new(["api", "we\"ird"]);
        let text = m.render(Some(0), &[true, false]);
        assert!(
            text.contains("# TYPE countersign_upstream_up gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("\ncountersign_upstream_up{upstream=\"api\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("\ncountersign_upstream_up{upstream=\"we\\\"ird\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE countersign_log_lines_dropped_total counter\n"));
        assert!(
            text.contains("\ncountersign_log_lines_dropped_total "),
            "{text}"
        );
        assert!(!m.render(Some(0), &[]).contains("countersign_upstream_up"));
    }

    /// The reload gauges keep each file part's last outcome: a reload that reads only the
    /// users file does not clear a keyring that failed and has not changed since (a
    /// `reload_check_interval` reload reads only the parts that changed).
    #[test]
    fn a_part_still_failing_is_not_hidden_by_a_reload_of_another() {
        let gauges = |m: &Metrics| {
            let text = m.render(None, &[]);
            let value = |name: &str| {
                text.lines().find_map(|line| {
                    line.strip_prefix(name)?
                        .strip_prefix(' ')?
                        .parse::<u64>()
                        .ok()
                })
            };
            (
                value("countersign_reload_last_successful"),
                value("countersign_reload_last_success_timestamp_seconds"),
            )
        };
        let keyring = ReloadParts {
            keyring: true,
            ..ReloadParts::NONE
        };
        let users = ReloadParts {
            users: true,
            ..ReloadParts::NONE
        };
        let m = Metrics::new(["api"]);
        m.record_loaded(100);
        assert_eq!(gauges(&m), (Some(1), Some(100)));
        // The keyring's new content fails.
        m.record_reload(keyring, keyring, 200);
        assert_eq!(gauges(&m), (Some(0), Some(100)));
        // The users file changes and loads: the keyring is still the old one.
        m.record_reload(users, ReloadParts::NONE, 300);
        assert_eq!(gauges(&m), (Some(0), Some(100)));
        // The users file fails too, then loads again: the keyring still fails.
        m.record_reload(users, users, 400);
        m.record_reload(users, ReloadParts::NONE, 500);
        assert_eq!(gauges(&m), (Some(0), Some(100)));
        // A part reported failed but not read is not counted.
        m.record_reload(keyring, ReloadParts::NONE, 600);
        assert_eq!(gauges(&m), (Some(1), Some(600)));
        m.record_reload(users, ReloadParts::ALL, 700);
        assert_eq!(gauges(&m), (Some(0), Some(600)));
        // SIGHUP reads every part: all load, all mended.
        m.record_reload(ReloadParts::ALL, ReloadParts::NONE, 800);
        assert_eq!(gauges(&m), (Some(1), Some(800)));
    }
}
