//! Prometheus metrics, written by hand: a few atomic counters and one histogram are all the
//! proxy needs, and recording must cost nothing on the hot path (no locks, no allocation).
//!
//! Routes are numbered once at startup ([`RouteId`]); each route has one counter per HTTP
//! status (100-999, every code HTTP can carry), so recording a request is two relaxed atomic
//! adds. Labels come from that fixed set and from `proxy.toml` (route names), never from what a
//! client sends, so no request can add a series.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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

struct RouteCounters {
    label: String,
    by_status: Box<[AtomicU64]>,
}

/// All proxy metrics.
pub struct Metrics {
    routes: Vec<RouteCounters>,
    latency_buckets: [AtomicU64; BUCKETS_MICROS.len()],
    /// Requests slower than the last bucket. `+Inf` and `_count` are the buckets' sum plus
    /// this, read in the same scrape: a count kept apart, read after the buckets, could be
    /// behind a bucket a request was just added to (a bucket above `+Inf`).
    latency_over: AtomicU64,
    latency_sum_micros: AtomicU64,
    logins_ok: AtomicU64,
    logins_failed: AtomicU64,
    logins_throttled: AtomicU64,
    signatures_issued: AtomicU64,
    upstream_errors: AtomicU64,
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
        let mut labels: Vec<String> = [
            routes::LOGIN,
            routes::SESSION,
            routes::LOGOUT,
            routes::STATIC,
            routes::UNMATCHED,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        labels.extend(upstream_names.into_iter().map(|n| format!("upstream/{n}")));
        Metrics {
            routes: labels
                .into_iter()
                .map(|label| RouteCounters {
                    label,
                    by_status: (0..STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
                })
                .collect(),
            latency_buckets: Default::default(),
            latency_over: AtomicU64::new(0),
            latency_sum_micros: AtomicU64::new(0),
            logins_ok: AtomicU64::new(0),
            logins_failed: AtomicU64::new(0),
            logins_throttled: AtomicU64::new(0),
            signatures_issued: AtomicU64::new(0),
            upstream_errors: AtomicU64::new(0),
        }
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
        RouteId(5 + index)
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
        if let Some(r) = self.routes.get(route.0) {
            let slot = usize::from(status.saturating_sub(STATUS_MIN));
            if let Some(counter) = r.by_status.get(slot) {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        match BUCKETS_MICROS.iter().position(|&b| micros <= b) {
            Some(i) => self.latency_buckets[i].fetch_add(1, Ordering::Relaxed),
            None => self.latency_over.fetch_add(1, Ordering::Relaxed),
        };
        self.latency_sum_micros.fetch_add(micros, Ordering::Relaxed);
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
    /// and the up-gauge, always present, says why).
    pub fn render(&self, active_sessions: Option<usize>) -> String {
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
        out.push_str("# HELP countersign_request_duration_seconds Request latency.\n");
        out.push_str("# TYPE countersign_request_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (bound, counter) in BUCKETS_MICROS.iter().zip(&self.latency_buckets) {
            cumulative += counter.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "countersign_request_duration_seconds_bucket{{le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        let count = cumulative + self.latency_over.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "countersign_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "countersign_request_duration_seconds_sum {}",
            self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "countersign_request_duration_seconds_count {count}");

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
            out.push_str("# HELP countersign_active_sessions Live sessions in the store.\n");
            out.push_str("# TYPE countersign_active_sessions gauge\n");
            let _ = writeln!(out, "countersign_active_sessions {active}");
        }
        out
    }
}

/// Escapes a label value (backslash, double quote, newline) per the text format.
fn escape_label(value: &str) -> String {
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
        let text = m.render(Some(7));
        assert!(
            text.contains("countersign_requests_total{route=\"upstream/api\",status=\"200\"} 2")
        );
        assert!(text.contains("route=\"upstream/we\\\"ird\",status=\"502\"} 1"));
        // A code outside 1xx-5xx that an upstream answered with is counted like any other.
        assert!(
            text.contains("{route=\"upstream/api\",status=\"999\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("countersign_request_duration_seconds_bucket{le=\"0.005\"} 3"));
        assert!(text.contains("countersign_request_duration_seconds_bucket{le=\"+Inf\"} 4"));
        assert!(text.contains("countersign_logins_total{outcome=\"throttled\"} 1"));
        assert!(text.contains("countersign_signatures_issued_total 1"));
        assert!(text.contains("countersign_active_sessions 7"));
        assert!(text.contains("countersign_session_store_up 1\n"));
    }

    #[test]
    fn a_store_that_did_not_answer_is_up_0_without_a_session_count() {
        let m = Metrics::new(["api"]);
        let text = m.render(None);
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
}
