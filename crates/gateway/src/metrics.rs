//! Per-service counters and the latency histogram, exported as Prometheus text and as the
//! figures `maru ps` shows.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Upper bounds (seconds) of the Prometheus latency buckets.
const LATENCY_BUCKETS_SECONDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Seconds of per-second request counts kept for the rate shown by `maru ps`.
const RATE_WINDOW_SECONDS: usize = 10;

#[derive(Debug)]
pub struct ServiceMetrics {
    origin: Instant,
    /// The service's latency objective (manifest `scaling.slo`), if it has one.
    slo: Option<Duration>,
    pub in_flight: Arc<AtomicU64>,
    /// Requests that reached the service (demand), admitted or not.
    pub arrivals: AtomicU64,
    /// Anomalies found, by signal: traffic, latency, errors.
    pub anomalies: [AtomicU64; 3],
    /// `f64` bits of the policy's forecast; `u64::MAX` for none.
    forecast_bits: AtomicU64,
    /// Which of the policy's forecasters made it.
    forecaster: Mutex<Option<&'static str>>,
    pub instance_starts: AtomicU64,
    pub cold_starts: AtomicU64,
    pub instance_failures: AtomicU64,
    /// Requests this node's share could not take, answered by another node of the
    /// service's (overflow, in a cluster).
    pub overflowed: AtomicU64,
    /// How long an instance takes over a request, microseconds, smoothed (0: none yet).
    service_us: Arc<AtomicU64>,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    by_status: BTreeMap<u16, u64>,
    buckets: [u64; LATENCY_BUCKETS_SECONDS.len()],
    latency_sum_seconds: f64,
    latency_count: u64,
    /// Latencies from 1 µs to an hour with two significant figures (p50 and p99 within
    /// 1 %) in 32-bit counts (saturating): about 13 KiB, made at the first completed request
    /// so that an idle service holds none. (Three figures in 64-bit counts took 190 KiB.)
    histogram_us: Option<Histogram<u32>>,
    /// Requests answered with a 2xx or 3xx status within the SLO, and all others.
    slo_met: u64,
    slo_missed: u64,
    /// (second since origin, requests finished in it), a ring.
    per_second: [(u64, u64); RATE_WINDOW_SECONDS],
    /// Instance-milliseconds accumulated up to `instances_since`.
    instance_ms: u128,
    instances: u64,
    instances_since: Instant,
    startup_seconds_sum: f64,
    startup_count: u64,
    startup_last: Option<Duration>,
}

/// Records how long an instance took over a request: an exponentially weighted mean of
/// the last few (weight 1/8), in microseconds (at least 1). Updates may race; the figure
/// guides overflow only.
#[derive(Debug, Clone)]
pub struct ServiceTime(Arc<AtomicU64>);

impl ServiceTime {
    pub fn record(&self, took: Duration) {
        smooth_into(&self.0, took);
    }
}

/// Move `mean` (microseconds, 0 for none yet) an eighth of the way to `sample`, or set it to
/// the first sample; never to 0. Concurrent updates may lose one another (a guide, not a
/// count).
pub(crate) fn smooth_into(mean: &AtomicU64, sample: Duration) {
    let sample = u64::try_from(sample.as_micros()).unwrap_or(u64::MAX).max(1);
    let old = mean.load(Ordering::Relaxed);
    let new = if old == 0 {
        sample
    } else {
        let (old, sample) = (i128::from(old), i128::from(sample));
        u64::try_from(old + (sample - old) / 8).unwrap_or(1).max(1)
    };
    mean.store(new, Ordering::Relaxed);
}

/// A point-in-time copy for `maru ps`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MetricsSnapshot {
    pub requests_total: u64,
    pub requests_per_second: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub cold_starts: u64,
    pub instance_starts: u64,
    pub instance_seconds: f64,
    /// Time the most recent instance took from start to ready.
    pub startup_last_ms: Option<f64>,
    /// With an SLO: it, and the fraction of requests answered successfully within it.
    pub slo_ms: Option<f64>,
    pub slo_met_ratio: Option<f64>,
}

impl ServiceMetrics {
    pub fn new(now: Instant, slo: Option<Duration>) -> Self {
        ServiceMetrics {
            origin: now,
            slo,
            in_flight: Arc::new(AtomicU64::new(0)),
            arrivals: AtomicU64::new(0),
            forecast_bits: AtomicU64::new(u64::MAX),
            forecaster: Mutex::new(None),
            anomalies: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            instance_starts: AtomicU64::new(0),
            cold_starts: AtomicU64::new(0),
            instance_failures: AtomicU64::new(0),
            overflowed: AtomicU64::new(0),
            service_us: Arc::new(AtomicU64::new(0)),
            inner: Mutex::new(Inner {
                by_status: BTreeMap::new(),
                buckets: [0; LATENCY_BUCKETS_SECONDS.len()],
                latency_sum_seconds: 0.0,
                latency_count: 0,
                slo_met: 0,
                slo_missed: 0,
                histogram_us: None,
                per_second: [(u64::MAX, 0); RATE_WINDOW_SECONDS],
                instance_ms: 0,
                instances: 0,
                instances_since: now,
                startup_seconds_sum: 0.0,
                startup_count: 0,
                startup_last: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .expect("metrics lock is never poisoned: no panics while held")
    }

    /// Record a finished request: its status and time from arrival to response head.
    pub fn record(&self, now: Instant, status: u16, latency: Duration) {
        let seconds = latency.as_secs_f64();
        let second = now.saturating_duration_since(self.origin).as_secs();
        let mut inner = self.lock();
        *inner.by_status.entry(status).or_default() += 1;
        for (bucket, bound) in inner.buckets.iter_mut().zip(LATENCY_BUCKETS_SECONDS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
        inner.latency_sum_seconds += seconds;
        inner.latency_count += 1;
        if let Some(slo) = self.slo {
            if (200..400).contains(&status) && latency <= slo {
                inner.slo_met += 1;
            } else {
                inner.slo_missed += 1;
            }
        }
        inner
            .histogram_us
            .get_or_insert_with(|| {
                Histogram::new_with_bounds(1, 3_600_000_000, 2)
                    .expect("static histogram bounds are valid")
            })
            .saturating_record(latency.as_micros().max(1) as u64);
        let slot = &mut inner.per_second[(second as usize) % RATE_WINDOW_SECONDS];
        if slot.0 != second {
            *slot = (second, 0);
        }
        slot.1 += 1;
    }

    /// (requests finished, of them with a 5xx status, sum of their latencies in seconds),
    /// since the service started.
    pub fn totals(&self) -> (u64, u64, f64) {
        let inner = self.lock();
        let server_errors = inner
            .by_status
            .range(500..600)
            .map(|(_, count)| count)
            .sum();
        (
            inner.latency_count,
            server_errors,
            inner.latency_sum_seconds,
        )
    }

    pub fn startup_last(&self) -> Option<Duration> {
        self.lock().startup_last
    }

    /// The policy's latest forecast of the arrival rate, if it forecasts, and which of its
    /// forecasters made it.
    pub fn set_forecast(&self, forecast: Option<f64>, forecaster: Option<&'static str>) {
        self.forecast_bits
            .store(forecast.map_or(u64::MAX, f64::to_bits), Ordering::Relaxed);
        *self
            .forecaster
            .lock()
            .expect("forecaster lock is never poisoned") = forecaster;
    }

    pub fn forecaster(&self) -> Option<&'static str> {
        *self
            .forecaster
            .lock()
            .expect("forecaster lock is never poisoned")
    }

    pub fn forecast(&self) -> Option<f64> {
        let bits = self.forecast_bits.load(Ordering::Relaxed);
        (bits != u64::MAX).then(|| f64::from_bits(bits))
    }

    pub fn in_flight_counter(&self) -> Arc<AtomicU64> {
        self.in_flight.clone()
    }

    /// The smoothed time an instance takes over a request (see [`ServiceTime`]), if any
    /// request was served yet.
    pub fn service_time(&self) -> Option<Duration> {
        match self.service_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Record how long an instance took over a request.
    pub fn record_service_time(&self, took: Duration) {
        smooth_into(&self.service_us, took);
    }

    /// Where instances record how long they took over each request, for a task of its own.
    pub fn service_time_recorder(&self) -> ServiceTime {
        ServiceTime(self.service_us.clone())
    }

    /// Record how long an instance took from start to ready (the autopilot's lead time).
    pub fn record_startup(&self, startup: Duration) {
        let mut inner = self.lock();
        inner.startup_seconds_sum += startup.as_secs_f64();
        inner.startup_count += 1;
        inner.startup_last = Some(startup);
    }

    /// Note that the number of live instances (starting or ready) changed to `instances`.
    pub fn set_instances(&self, now: Instant, instances: u64) {
        let mut inner = self.lock();
        inner.instance_ms += inner.instances as u128
            * now
                .saturating_duration_since(inner.instances_since)
                .as_millis();
        inner.instances = instances;
        inner.instances_since = now;
    }

    pub fn instance_seconds(&self, now: Instant) -> f64 {
        let inner = self.lock();
        let ms = inner.instance_ms
            + inner.instances as u128
                * now
                    .saturating_duration_since(inner.instances_since)
                    .as_millis();
        ms as f64 / 1000.0
    }

    pub fn snapshot(&self, now: Instant) -> MetricsSnapshot {
        let instance_seconds = self.instance_seconds(now);
        let inner = self.lock();
        let current = now.saturating_duration_since(self.origin).as_secs();
        // The rate over the last five whole seconds; the current second is still filling.
        let window = 5u64;
        let recent: u64 = inner
            .per_second
            .iter()
            .filter(|(second, _)| {
                *second != u64::MAX && *second < current && current - second <= window
            })
            .map(|(_, count)| count)
            .sum();
        let quantile_ms = |q| match &inner.histogram_us {
            Some(histogram) if inner.latency_count > 0 => {
                histogram.value_at_quantile(q) as f64 / 1000.0
            }
            _ => 0.0,
        };
        MetricsSnapshot {
            requests_total: inner.latency_count,
            requests_per_second: recent as f64 / window.min(current.max(1)) as f64,
            latency_p50_ms: quantile_ms(0.5),
            latency_p99_ms: quantile_ms(0.99),
            cold_starts: self.cold_starts.load(Ordering::Relaxed),
            instance_starts: self.instance_starts.load(Ordering::Relaxed),
            instance_seconds,
            startup_last_ms: inner.startup_last.map(|d| d.as_secs_f64() * 1000.0),
            slo_ms: self.slo.map(|slo| slo.as_secs_f64() * 1000.0),
            slo_met_ratio: self.slo.and_then(|_| {
                let all = inner.slo_met + inner.slo_missed;
                (all > 0).then(|| inner.slo_met as f64 / all as f64)
            }),
        }
    }

    /// Append this service's series in Prometheus text format. `labels` is the rendered
    /// label set without braces, e.g. `app="a",service="b"`.
    pub fn render(&self, out: &mut String, labels: &str, gauges: &Gauges, now: Instant) {
        let instance_seconds = self.instance_seconds(now);
        let inner = self.lock();
        for (status, count) in &inner.by_status {
            _ = writeln!(
                out,
                "maru_requests_total{{{labels},status=\"{status}\"}} {count}"
            );
        }
        for (bound, count) in LATENCY_BUCKETS_SECONDS.iter().zip(inner.buckets) {
            _ = writeln!(
                out,
                "maru_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {count}"
            );
        }
        _ = writeln!(
            out,
            "maru_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
            inner.latency_count
        );
        _ = writeln!(
            out,
            "maru_request_duration_seconds_sum{{{labels}}} {}",
            inner.latency_sum_seconds
        );
        _ = writeln!(
            out,
            "maru_request_duration_seconds_count{{{labels}}} {}",
            inner.latency_count
        );
        if let Some(slo) = self.slo {
            _ = writeln!(out, "maru_slo_seconds{{{labels}}} {:.6}", slo.as_secs_f64());
            for (outcome, count) in [("met", inner.slo_met), ("missed", inner.slo_missed)] {
                _ = writeln!(
                    out,
                    "maru_slo_requests_total{{{labels},outcome=\"{outcome}\"}} {count}"
                );
            }
        }
        for (signal, count) in ["traffic", "latency", "errors"].iter().zip(&self.anomalies) {
            _ = writeln!(
                out,
                "maru_anomalies_total{{{labels},signal=\"{signal}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        if let Some(forecast) = self.forecast() {
            _ = writeln!(
                out,
                "maru_forecast_requests_per_second{{{labels}}} {forecast:.3}"
            );
        }
        _ = writeln!(
            out,
            "maru_instance_startup_seconds_sum{{{labels}}} {:.6}",
            inner.startup_seconds_sum
        );
        _ = writeln!(
            out,
            "maru_instance_startup_seconds_count{{{labels}}} {}",
            inner.startup_count
        );
        if let Some(last) = inner.startup_last {
            _ = writeln!(
                out,
                "maru_instance_startup_last_seconds{{{labels}}} {:.6}",
                last.as_secs_f64()
            );
        }
        drop(inner);
        _ = writeln!(
            out,
            "maru_requests_in_flight{{{labels}}} {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        _ = writeln!(out, "maru_requests_queued{{{labels}}} {}", gauges.queued);
        _ = writeln!(
            out,
            "maru_instances{{{labels},state=\"ready\"}} {}",
            gauges.ready
        );
        _ = writeln!(
            out,
            "maru_instances{{{labels},state=\"starting\"}} {}",
            gauges.starting
        );
        _ = writeln!(
            out,
            "maru_instance_starts_total{{{labels}}} {}",
            self.instance_starts.load(Ordering::Relaxed)
        );
        _ = writeln!(
            out,
            "maru_cold_starts_total{{{labels}}} {}",
            self.cold_starts.load(Ordering::Relaxed)
        );
        _ = writeln!(
            out,
            "maru_instance_failures_total{{{labels}}} {}",
            self.instance_failures.load(Ordering::Relaxed)
        );
        _ = writeln!(
            out,
            "maru_requests_overflowed_total{{{labels}}} {}",
            self.overflowed.load(Ordering::Relaxed)
        );
        _ = writeln!(
            out,
            "maru_instance_seconds_total{{{labels}}} {instance_seconds:.3}"
        );
    }
}

/// Gauges that live in the pool rather than in the metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub queued: u64,
    pub ready: u64,
    pub starting: u64,
}

/// Writes `samples` (what [`ServiceMetrics::render`] appended for each service, one service
/// after another) grouped by metric family, each family's `# HELP` and `# TYPE` lines
/// first: the exposition format asks for every family's lines as one group.
pub fn render_families(out: &mut String, samples: &str) {
    let family_of = |line: &str| {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        FAMILIES.iter().position(|(family, _, _)| {
            name.strip_prefix(family)
                .is_some_and(|rest| ["", "_bucket", "_sum", "_count"].contains(&rest))
        })
    };
    let lines: Vec<(Option<usize>, &str)> = samples
        .lines()
        .map(|line| (family_of(line), line))
        .collect();
    for (index, (name, kind, help)) in FAMILIES.iter().enumerate() {
        _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (_, line) in lines.iter().filter(|(family, _)| *family == Some(index)) {
            _ = writeln!(out, "{line}");
        }
    }
    // A sample of no listed family (a test checks there are none) is still not lost.
    for (_, line) in lines.iter().filter(|(family, _)| family.is_none()) {
        _ = writeln!(out, "{line}");
    }
}

/// Every family [`ServiceMetrics::render`] writes: (name, type, help).
const FAMILIES: [(&str, &str, &str); 16] = [
    (
        "maru_slo_seconds",
        "gauge",
        "The service's latency objective (manifest scaling.slo); only for services with one.",
    ),
    (
        "maru_slo_requests_total",
        "counter",
        "Requests answered with a 2xx or 3xx status within the SLO (met), and all others (missed).",
    ),
    (
        "maru_requests_total",
        "counter",
        "Requests answered, by HTTP status.",
    ),
    (
        "maru_request_duration_seconds",
        "histogram",
        "Time from request arrival to response head.",
    ),
    (
        "maru_requests_in_flight",
        "gauge",
        "Requests executing in an instance.",
    ),
    (
        "maru_requests_queued",
        "gauge",
        "Requests admitted and waiting for an instance.",
    ),
    ("maru_instances", "gauge", "Instances by state."),
    (
        "maru_instance_starts_total",
        "counter",
        "Instances started.",
    ),
    (
        "maru_cold_starts_total",
        "counter",
        "Instances started while work waited and no instance was ready (scale from zero).",
    ),
    (
        "maru_instance_failures_total",
        "counter",
        "Instances discarded after a trap, timeout or failed start.",
    ),
    (
        "maru_requests_overflowed_total",
        "counter",
        "Requests this node's share of the service could not take now, answered by another node holding a share (cluster).",
    ),
    (
        "maru_instance_seconds_total",
        "counter",
        "Seconds of instance lifetime (starting or ready), the cost measure of scaling.",
    ),
    (
        "maru_instance_startup_seconds",
        "summary",
        "Time from starting an instance to it being ready (the scaling lead time).",
    ),
    (
        "maru_instance_startup_last_seconds",
        "gauge",
        "Startup time of the most recently started instance.",
    ),
    (
        "maru_anomalies_total",
        "counter",
        "Anomalies found in the service's traffic (against the forecast or its baseline), latency and error rate.",
    ),
    (
        "maru_forecast_requests_per_second",
        "gauge",
        "The scaling policy's forecast of the arrival rate one start-up lead ahead (forecasting policies only).",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_seconds_integrate_over_changes() {
        let t0 = Instant::now();
        let metrics = ServiceMetrics::new(t0, None);
        metrics.set_instances(t0, 2);
        metrics.set_instances(t0 + Duration::from_secs(3), 1);
        assert_eq!(metrics.instance_seconds(t0 + Duration::from_secs(5)), 8.0);
    }

    #[test]
    fn snapshot_quantiles_and_rate() {
        let t0 = Instant::now();
        let metrics = ServiceMetrics::new(t0, None);
        for i in 0..100u64 {
            metrics.record(
                t0 + Duration::from_millis(1000 + i * 10),
                200,
                Duration::from_millis(if i < 98 { 2 } else { 100 }),
            );
        }
        let snap = metrics.snapshot(t0 + Duration::from_secs(3));
        assert_eq!(snap.requests_total, 100);
        assert!((snap.latency_p50_ms - 2.0).abs() < 0.02, "{snap:?}");
        assert!((snap.latency_p99_ms - 100.0).abs() < 1.0, "{snap:?}");
        assert!(
            (snap.requests_per_second - 100.0 / 3.0).abs() < 0.01,
            "{snap:?}"
        );
        let mut out = String::new();
        metrics.render(&mut out, "app=\"a\",service=\"s\"", &Gauges::default(), t0);
        assert!(
            out.contains("maru_requests_total{app=\"a\",service=\"s\",status=\"200\"} 100"),
            "{out}"
        );
        assert!(out.contains("le=\"0.0025\"} 98"), "{out}");
    }

    #[test]
    fn families_are_grouped_across_services_and_all_described() {
        let t0 = Instant::now();
        let mut samples = String::new();
        for service in ["a", "b"] {
            let metrics = ServiceMetrics::new(t0, Some(Duration::from_millis(5)));
            metrics.record(t0, 200, Duration::from_millis(3));
            metrics.record(t0, 503, Duration::from_millis(9));
            metrics.record_startup(Duration::from_millis(40));
            metrics.set_forecast(Some(2.0), Some("mstl"));
            metrics.render(
                &mut samples,
                &format!("service=\"{service}\""),
                &Gauges::default(),
                t0,
            );
        }
        let mut out = String::new();
        render_families(&mut out, &samples);
        // Every sample line of both services is kept, each after its family's TYPE line,
        // and no family's lines are split by another family's.
        let mut seen: Vec<&str> = Vec::new();
        let mut current = "";
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap_or_default();
                assert!(!seen.contains(&current), "{current} twice:\n{out}");
                seen.push(current);
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let in_family = ["", "_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| name == format!("{current}{suffix}"));
            assert!(
                in_family,
                "{name} outside its family (under {current}):\n{out}"
            );
        }
        let sample_lines = |text: &str| text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(sample_lines(&out), sample_lines(&samples));
        assert_eq!(seen.len(), FAMILIES.len());
        // The 200 in 3 ms met the 5 ms SLO; the 503 did not.
        assert!(
            out.contains("maru_slo_requests_total{service=\"b\",outcome=\"met\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("maru_slo_requests_total{service=\"b\",outcome=\"missed\"} 1"),
            "{out}"
        );
    }
}
