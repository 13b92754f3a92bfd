//! One deployed service at run time: its bounded request queue, its instances (components or
//! processes), and the scaler task that sizes the pool by asking an `autopilot` policy.
//!
//! Ownership: a [`Service`] owns one scaler task; the scaler owns the instance tasks in a
//! `JoinSet`. [`Service::shutdown`] stops intake, lets queued and in-flight requests finish
//! (bounded by the request timeout), then stops every instance and waits for them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use autopilot::anomaly::Detector;
use autopilot::history::{History, Sample};
use autopilot::{InstanceActivity, Observation, Policy, ScalingBounds};
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full};
use runtime::{
    Instance, InstanceSpec, LoadedComponent, LogStream, ProcessInstance, ProcessSpec, Runtime,
    ServeError, ServiceLog,
};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Gauges, MetricsSnapshot, ServiceMetrics};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every response the gateway sends.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// How often the scaler looks at the pool when nothing wakes it.
const SCALE_TICK: Duration = Duration::from_millis(200);
/// The policy's clock starts this far along when the service starts, so that the history
/// it learns from (up to 14 days, see `History::MINUTES_KEPT`) has times on it too.
const POLICY_CLOCK_START: Duration = Duration::from_secs(15 * 24 * 3600);
/// How often a process instance is checked for having exited.
const EXIT_CHECK: Duration = Duration::from_millis(100);
/// Crashes within [`CRASH_WINDOW`] that mark a service failed.
const CRASH_LOOP_COUNT: usize = 5;
const CRASH_WINDOW: Duration = Duration::from_secs(60);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// After every other node declined an overflow, how long this node offers none unless its
/// line grows longer than it was then (so that a cluster busy everywhere does not ask in
/// vain with every request).
const OVERFLOW_QUIET: Duration = Duration::from_millis(100);

/// What an instance of the service is.
#[derive(Clone)]
pub enum Backend {
    Component {
        component: LoadedComponent,
        instance: InstanceSpec,
    },
    Process(ProcessSpec),
}

/// Everything a service needs to run, resolved from its manifest.
#[derive(Clone)]
pub struct ServiceConfig {
    pub app: String,
    pub name: String,
    pub revision: u64,
    pub bounds: ScalingBounds,
    /// Per request, from arrival to response head, including time queued.
    pub timeout: Duration,
    pub queue_max: usize,
    pub body_bytes_max: u64,
    pub startup_timeout: Duration,
    pub backend: Backend,
    pub log: Arc<ServiceLog>,
    /// History carried over from an earlier run or revision of the service.
    pub history: History,
    /// The latency objective: requests answered successfully within it are counted as met.
    pub slo: Option<Duration>,
    /// Seconds of live signals the anomaly detectors learn from before judging.
    pub anomaly_warm_up: Duration,
    /// Components: every request gets an instance no request has used (`isolation =
    /// "request"`). The next instance is made after the answer, off the request's path.
    pub fresh_instance_per_request: bool,
    /// Where the instances run at start ([`Service::set_locality`] changes it).
    pub locality: Locality,
}

/// Why the service could not answer a request with a response from an instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("the service's queue is full ({0} requests waiting); retry shortly")]
    QueueFull(usize),
    #[error("the request did not complete within the service's timeout of {0:?}")]
    Timeout(Duration),
    #[error("the service failed to handle the request: {0}")]
    GuestFailed(String),
    #[error("the service's process did not answer: {0}")]
    BadGateway(String),
    #[error("the service has failed and is not restarted: {0}; fix it and deploy again")]
    Failed(String),
    #[error("the service is shutting down or being replaced; retry shortly")]
    Unavailable,
}

type Reply = Result<http::Response<Body>, ServiceError>;

struct Job {
    request: http::Request<Full<Bytes>>,
    deadline: Instant,
    respond: oneshot::Sender<Reply>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Starting,
    Ready {
        busy: u32,
        idle_since: Instant,
    },
    /// Told to stop; no longer counted as capacity, still counted as cost until gone.
    Stopping,
}

struct Slot {
    state: SlotState,
    stop: CancellationToken,
}

#[derive(Default)]
struct Pool {
    next_id: u64,
    slots: BTreeMap<u64, Slot>,
    /// Recent crashes and failed starts, for backoff and crash-loop detection.
    crashes: VecDeque<Instant>,
    no_start_before: Option<Instant>,
    failed: Option<String>,
}

impl Pool {
    fn count(&self, want: impl Fn(&SlotState) -> bool) -> u64 {
        self.slots.values().filter(|slot| want(&slot.state)).count() as u64
    }
}

pub struct Service {
    pub config: ServiceConfig,
    runtime: Arc<Runtime>,
    /// The request queue. Unbounded as a channel, bounded by `queued` to `queue_max`: a
    /// bounded channel allocates all its slots at once (16 KiB for the default 1,000 boxed
    /// jobs, in every idle service), an unbounded one in blocks as requests come.
    jobs_tx: async_channel::Sender<Box<Job>>,
    jobs_rx: async_channel::Receiver<Box<Job>>,
    /// Jobs admitted to the queue and not yet taken: at most `queue_max`. Taken only
    /// through [`Service::take_job`], which counts them out.
    queued: AtomicUsize,
    pool: Mutex<Pool>,
    /// Requests the ready instances could take right now; mirrors `pool` so the hot path
    /// need not lock.
    free_capacity: AtomicU64,
    wake: Notify,
    pub metrics: ServiceMetrics,
    origin: Instant,
    intake_closed: CancellationToken,
    scaler: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The most recent anomalies, newest last.
    anomalies: Mutex<VecDeque<AnomalyRecord>>,
    history: Mutex<History>,
    /// Idle instances waiting for work, the most recently idle last.
    idle_waiters: Mutex<Vec<(u64, Arc<Notify>)>>,
    locality: Mutex<Locality>,
    /// Requests being offered to other nodes as overflow right now: counted in this node's
    /// line ([`Service::pressure`]) until they are taken or come back.
    offering: AtomicUsize,
    /// When every other node last declined an overflow (milliseconds since `origin`), and
    /// this node's pressure then ([`Service::overflow_pressure`]).
    overflow_declined_ms: AtomicU64,
    overflow_declined_pressure: AtomicU64,
    /// Whether this node delivers the service's triggers (in a cluster whose topics are
    /// shared, one node of those it is placed on does).
    triggers_here: tokio::sync::watch::Sender<bool>,
}

/// Where a service's instances run, as this node's gateway sees it (set by the control
/// plane from the cluster's placement).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locality {
    /// A node alone: every instance here, within the manifest's bounds.
    Alone,
    /// Placed on this node with this share of the service's instances. `others`: the other
    /// nodes holding a share, which take what this node's share cannot (overflow,
    /// [`crate::peers`]).
    Here {
        min: u32,
        max: u32,
        others: Arc<[String]>,
    },
    /// Placed on these other nodes only: requests are forwarded to them.
    Elsewhere(Vec<String>),
    /// No node runs it (not placed yet, or none may): why.
    Unplaced(String),
}

/// One request per slot of a share in [`Service::pressure`]'s units (thousandths): the
/// wait one instance's request adds to the line.
pub const ROUND: u64 = 1000;

/// [`Service::overflow_margin`], from the hop's round trip and the time an instance takes
/// over a request.
fn overflow_margin(hop: Duration, service_time: Option<Duration>) -> u64 {
    let Some(service) = service_time.filter(|s| !s.is_zero()) else {
        return ROUND;
    };
    let rounds = hop.as_micros().saturating_mul(u128::from(ROUND)) / service.as_micros().max(1);
    u64::try_from(rounds).unwrap_or(u64::MAX).max(ROUND)
}

/// A request being offered as overflow ([`Service::offering`]), counted in this node's
/// line until settled: taken by another node, or back.
pub struct Offering<'a> {
    count: &'a AtomicUsize,
    counted: std::sync::atomic::AtomicBool,
}

impl Offering<'_> {
    /// No longer counted (idempotent).
    pub fn settle(&self) {
        if self.counted.swap(false, Ordering::AcqRel) {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Offering<'_> {
    fn drop(&mut self) {
        self.settle();
    }
}

/// An anomaly found in one of a service's signals.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyRecord {
    /// `traffic` (requests per second), `latency` (mean ms) or `errors` (5xx fraction).
    pub signal: &'static str,
    pub unix_ms: u64,
    pub value: f64,
    pub expected: f64,
    pub high: bool,
}

const ANOMALIES_KEPT: usize = 100;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The history's one-minute arrival rates at their times on the policy's clock (which
/// reads [`POLICY_CLOCK_START`] when the service starts at `now_unix_s`), oldest first;
/// minutes older than the clock's start are left out.
fn past_rates(history: &History, now_unix_s: u64) -> Vec<(Duration, f64)> {
    history
        .minutes()
        .filter_map(|sample| {
            let age = Duration::from_secs(now_unix_s.checked_sub(sample.unix_s)?);
            Some((POLICY_CLOCK_START.checked_sub(age)?, sample.arrivals))
        })
        .collect()
}

/// The three signals' detectors and the counters they were last fed from.
struct AnomalyWatch {
    detectors: [Detector; 3],
    last: (u64, u64, u64, f64),
    last_cold_starts: u64,
}

/// How an instance task ended.
enum End {
    Stopped,
    Crashed(String),
}

impl Service {
    /// Start the service's scaler. With `instances.min > 0`, instances start right away.
    pub fn start(
        mut config: ServiceConfig,
        runtime: Arc<Runtime>,
        mut policy: Box<dyn Policy>,
    ) -> Arc<Self> {
        let (jobs_tx, jobs_rx) = async_channel::unbounded();
        let history = std::mem::take(&mut config.history);
        policy.learn(&past_rates(&history, unix_now()));
        let slo = config.slo;
        let locality = config.locality.clone();
        let now = Instant::now();
        let service = Arc::new(Service {
            config,
            runtime,
            jobs_tx,
            jobs_rx,
            queued: AtomicUsize::new(0),
            pool: Mutex::new(Pool::default()),
            free_capacity: AtomicU64::new(0),
            wake: Notify::new(),
            metrics: ServiceMetrics::new(now, slo),
            origin: now,
            intake_closed: CancellationToken::new(),
            scaler: Mutex::new(None),
            anomalies: Mutex::new(VecDeque::new()),
            history: Mutex::new(history),
            idle_waiters: Mutex::new(Vec::new()),
            locality: Mutex::new(locality),
            offering: AtomicUsize::new(0),
            overflow_declined_ms: AtomicU64::new(0),
            overflow_declined_pressure: AtomicU64::new(0),
            triggers_here: tokio::sync::watch::Sender::new(true),
        });
        let scaler = tokio::spawn(service.clone().scale_loop(policy));
        *service
            .scaler
            .lock()
            .expect("scaler lock is never poisoned") = Some(scaler);
        service.log(&format!("revision {} started", service.config.revision));
        service
    }

    pub fn id(&self) -> String {
        format!("{}/{}", self.config.app, self.config.name)
    }

    pub fn log(&self, text: &str) {
        self.config.log.push(LogStream::Platform, text);
    }

    fn lock_pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool
            .lock()
            .expect("pool lock is never poisoned: no panics while held")
    }

    fn concurrency(&self) -> u32 {
        self.config.bounds.concurrency.max(1)
    }

    /// Where the service's instances run; the scaler keeps this node's within its share.
    pub fn set_locality(&self, locality: Locality) {
        let mut current = self.locality.lock().expect("never poisoned");
        if *current != locality {
            *current = locality;
            drop(current);
            self.wake.notify_one();
        }
    }

    pub fn locality(&self) -> Locality {
        self.locality.lock().expect("never poisoned").clone()
    }

    /// Whether this node delivers the service's triggers (the control plane decides; a
    /// node alone always does).
    pub fn set_triggers_here(&self, here: bool) {
        self.triggers_here.send_if_modified(|current| {
            let changed = *current != here;
            *current = here;
            changed
        });
    }

    /// Watch whether this node delivers the service's triggers.
    pub fn triggers_here(&self) -> tokio::sync::watch::Receiver<bool> {
        self.triggers_here.subscribe()
    }

    /// The bounds the scaler keeps to: the manifest's alone, this node's share in a cluster.
    fn bounds(&self) -> ScalingBounds {
        let mut bounds = self.config.bounds;
        match &*self.locality.lock().expect("never poisoned") {
            Locality::Alone => {}
            Locality::Here { min, max, .. } => {
                bounds.instances_min = *min;
                bounds.instances_max = *max;
            }
            Locality::Elsewhere(_) | Locality::Unplaced(_) => {
                bounds.instances_min = 0;
                bounds.instances_max = 0;
            }
        }
        bounds
    }

    /// Whether a ready instance has room for a request now.
    pub fn has_room(&self) -> bool {
        self.free_capacity.load(Ordering::Acquire) > 0
    }

    /// Whether a request arriving now would wait for an instance that is not there yet: no
    /// ready instance has room, and the pool is at the most instances it may have here (so
    /// none is about to be started for it). Cheap while an instance has room (no lock).
    pub fn saturated(&self) -> bool {
        if self.has_room() {
            return false;
        }
        let most = u64::from(self.bounds().instances_max);
        let live = self
            .lock_pool()
            .count(|s| matches!(s, SlotState::Ready { .. } | SlotState::Starting));
        live >= most
    }

    /// Whether a request arriving now should be offered to the other nodes holding a
    /// share, and this node's [`Service::pressure`] to offer it with: this node's share is
    /// [`Service::saturated`], and unless its line is longer by a whole round of the share
    /// than when they last all declined, that was more than [`OVERFLOW_QUIET`] ago.
    pub fn overflow_pressure(&self) -> Option<u64> {
        if !self.saturated() {
            return None;
        }
        let pressure = self.pressure();
        let now = self.origin.elapsed().as_millis() as u64;
        let declined_ms = self.overflow_declined_ms.load(Ordering::Relaxed);
        let quiet = u64::try_from(OVERFLOW_QUIET.as_millis()).unwrap_or(u64::MAX);
        // Longer by a whole round of the share: what the others ask before taking one.
        let longer = self
            .overflow_declined_pressure
            .load(Ordering::Relaxed)
            .saturating_add(ROUND);
        (pressure >= longer || now >= declined_ms.saturating_add(quiet)).then_some(pressure)
    }

    /// How much shorter, in [`Service::pressure`]'s units, another node's line must be for
    /// a request to be worth the hop there: the rounds of this share that `hop` (a
    /// round trip to another node) is worth, one at least. A round is one request per
    /// slot, taking [`crate::metrics::ServiceMetrics::service_time`]; before any request
    /// was served, one round.
    pub fn overflow_margin(&self, hop: Duration) -> u64 {
        overflow_margin(hop, self.metrics.service_time())
    }

    /// Every other node declined an overflow offered with `pressure`.
    pub fn overflow_declined(&self, pressure: u64) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.overflow_declined_ms.store(now, Ordering::Relaxed);
        self.overflow_declined_pressure
            .store(pressure, Ordering::Relaxed);
    }

    /// How long the line is for a request arriving now, in thousandths of what the share
    /// serves at once: (queued + in flight + being offered / nodes holding a share + 1) ×
    /// 1000 / (most instances × concurrency). Compared between nodes, so that overflow
    /// goes where the line is shorter. A request being offered counts until a node has had
    /// it for a moment without refusing ([`crate::peers::OVERFLOW_GRACE`]), as the part of
    /// it that ends up here when it is as likely to end up at any node holding a share:
    /// many arriving at once would otherwise all see the line as it was before any of them
    /// (and be refused everywhere), or count in full here (and all be sent away).
    pub fn pressure(&self) -> u64 {
        let slots = u64::from(self.bounds().instances_max.max(1)) * u64::from(self.concurrency());
        let holders = match &*self.locality.lock().expect("never poisoned") {
            Locality::Here { others, .. } => others.len() as u64 + 1,
            _ => 1,
        };
        let waiting = self.queued.load(Ordering::Acquire) as u64
            + self.metrics.in_flight.load(Ordering::Acquire);
        let offering = self.offering.load(Ordering::Acquire) as u64;
        ((waiting + 1) * ROUND + offering * ROUND / holders) / slots
    }

    /// Count a request as being offered to other nodes until the guard is settled or
    /// dropped.
    pub fn offering(&self) -> Offering<'_> {
        self.offering.fetch_add(1, Ordering::AcqRel);
        Offering {
            count: &self.offering,
            counted: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// Why the service no longer starts instances, if it has failed.
    pub fn failure(&self) -> Option<String> {
        self.lock_pool().failed.clone()
    }

    /// Queue a request and wait for an instance to answer it.
    pub async fn handle(&self, request: http::Request<Full<Bytes>>, arrival: Instant) -> Reply {
        self.metrics.arrivals.fetch_add(1, Ordering::Relaxed);
        if self.intake_closed.is_cancelled() {
            return Err(ServiceError::Unavailable);
        }
        if let Some(reason) = self.failure() {
            return Err(ServiceError::Failed(reason));
        }
        let deadline = arrival + self.config.timeout;
        let (respond, response) = oneshot::channel();
        let queue_max = self.config.queue_max.max(1);
        if self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued < queue_max).then_some(queued + 1)
            })
            .is_err()
        {
            return Err(ServiceError::QueueFull(self.config.queue_max));
        }
        let job = Box::new(Job {
            request,
            deadline,
            respond,
        });
        if self.jobs_tx.try_send(job).is_err() {
            // Closed: the service is stopping.
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(ServiceError::Unavailable);
        }
        if !self.wake_an_idle_instance() && self.free_capacity.load(Ordering::Acquire) == 0 {
            self.wake.notify_one();
        }
        match tokio::time::timeout_at(deadline.into(), response).await {
            Err(_elapsed) => Err(ServiceError::Timeout(self.config.timeout)),
            Ok(Err(_dropped)) => Err(self
                .failure()
                .map(ServiceError::Failed)
                .unwrap_or(ServiceError::Unavailable)),
            Ok(Ok(Err(ServiceError::Timeout(_)))) => {
                Err(ServiceError::Timeout(self.config.timeout))
            }
            Ok(Ok(reply)) => reply,
        }
    }

    pub fn gauges(&self) -> Gauges {
        let pool = self.lock_pool();
        Gauges {
            queued: self.queued.load(Ordering::Acquire) as u64,
            ready: pool.count(|s| matches!(s, SlotState::Ready { .. })),
            starting: pool.count(|s| matches!(s, SlotState::Starting)),
        }
    }

    pub fn snapshot(&self) -> (Gauges, MetricsSnapshot) {
        (self.gauges(), self.metrics.snapshot(Instant::now()))
    }

    /// Stop taking requests, finish what was admitted, stop every instance.
    pub async fn shutdown(&self) {
        self.intake_closed.cancel();
        self.wake.notify_one();
        let scaler = self
            .scaler
            .lock()
            .expect("scaler lock is never poisoned")
            .take();
        if let Some(scaler) = scaler
            && let Err(error) = scaler.await
        {
            tracing::error!(service = %self.id(), %error, "scaler task failed");
        }
    }

    /// The history as text, for persistence (closes the minute being filled).
    pub fn history_text(&self) -> String {
        self.history
            .lock()
            .expect("history lock is never poisoned")
            .encode()
    }

    /// (the last hour by second, 14 days by minute).
    pub fn history(&self) -> (Vec<Sample>, Vec<Sample>) {
        let history = self.history.lock().expect("history lock is never poisoned");
        (history.seconds().collect(), history.minutes().collect())
    }

    pub fn anomalies(&self) -> Vec<AnomalyRecord> {
        self.anomalies
            .lock()
            .expect("anomaly lock is never poisoned")
            .iter()
            .cloned()
            .collect()
    }

    /// Once a second: feed each signal's detector, record and log what it finds.
    fn watch(&self, watch: &mut AnomalyWatch, forecast: Option<f64>) {
        let arrivals = self.metrics.arrivals.load(Ordering::Relaxed);
        let (finished, errors, latency_sum) = self.metrics.totals();
        let (last_arrivals, last_finished, last_errors, last_latency) = watch.last;
        watch.last = (arrivals, finished, errors, latency_sum);
        let done = finished.saturating_sub(last_finished);
        let rate = arrivals.saturating_sub(last_arrivals) as f64;
        let mean_latency_ms = if done > 0 {
            (latency_sum - last_latency) / done as f64 * 1000.0
        } else {
            f64::NAN
        };
        let error_rate = if done > 0 {
            errors.saturating_sub(last_errors) as f64 / done as f64
        } else {
            0.0
        };
        let cold_starts = self.metrics.cold_starts.load(Ordering::Relaxed);
        let gauges = self.gauges();
        let unix_s = unix_now();
        self.history
            .lock()
            .expect("history lock is never poisoned")
            .record(Sample {
                unix_s,
                arrivals: rate,
                completions: done as f64,
                in_flight: self.metrics.in_flight.load(Ordering::Relaxed) as f64,
                queued: gauges.queued as f64,
                latency_ms: if mean_latency_ms.is_finite() {
                    mean_latency_ms
                } else {
                    0.0
                },
                instances: (gauges.ready + gauges.starting) as f64,
                cold_starts: cold_starts.saturating_sub(watch.last_cold_starts) as f64,
                startup_ms: self
                    .metrics
                    .startup_last()
                    .map_or(0.0, |startup| startup.as_secs_f64() * 1000.0),
            });
        watch.last_cold_starts = cold_starts;
        let values = [
            (rate, forecast),
            (mean_latency_ms, None),
            (error_rate, None),
        ];
        for (index, ((value, expected), signal)) in values
            .into_iter()
            .zip(["traffic", "latency", "errors"])
            .enumerate()
        {
            let Some(anomaly) = watch.detectors[index].observe(value, expected) else {
                continue;
            };
            self.metrics.anomalies[index].fetch_add(1, Ordering::Relaxed);
            let unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let direction = if anomaly.high { "above" } else { "below" };
            self.log(&format!(
                "anomaly: {signal} {:.3} is {direction} the expected {:.3} (σ {:.3})",
                anomaly.value, anomaly.expected, anomaly.sigma
            ));
            tracing::warn!(service = %self.id(), signal, value = anomaly.value, expected = anomaly.expected, "anomaly");
            let mut records = self
                .anomalies
                .lock()
                .expect("anomaly lock is never poisoned");
            if records.len() == ANOMALIES_KEPT {
                records.pop_front();
            }
            records.push_back(AnomalyRecord {
                signal,
                unix_ms,
                value: anomaly.value,
                expected: anomaly.expected,
                high: anomaly.high,
            });
        }
    }

    async fn scale_loop(self: Arc<Self>, mut policy: Box<dyn Policy>) {
        let mut instances = JoinSet::new();
        let mut watch = AnomalyWatch {
            detectors: {
                let warm_up =
                    u32::try_from(self.config.anomaly_warm_up.as_secs()).unwrap_or(u32::MAX);
                [
                    Detector::with_warm_up(1.0, warm_up),
                    Detector::with_warm_up(5.0, warm_up),
                    Detector::with_warm_up(0.02, warm_up),
                ]
            },
            last: (0, 0, 0, 0.0),
            last_cold_starts: 0,
        };
        let mut every_second = tokio::time::interval(Duration::from_secs(1));
        every_second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            // A service with no instances and nothing queued is looked at once a second (a
            // request wakes it at once): thousands of idle services would otherwise wake
            // five times as often for nothing.
            let idle = instances.is_empty() && self.queued.load(Ordering::Acquire) == 0;
            tokio::select! {
                _ = self.intake_closed.cancelled() => break,
                _ = every_second.tick() => self.watch(&mut watch, policy.forecast()),
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(SCALE_TICK), if !idle => {}
                Some(joined) = instances.join_next(), if !instances.is_empty() => {
                    if let Err(error) = joined {
                        tracing::error!(service = %self.id(), %error, "instance task failed");
                    }
                }
            }
            self.reconcile(policy.as_mut(), &mut instances);
        }
        // Drain: keep scaling for what was admitted before intake closed, for at most one
        // request timeout (nothing admitted can outlive its deadline anyway).
        let drain_until = Instant::now() + self.config.timeout;
        while Instant::now() < drain_until
            && (!self.jobs_tx.is_empty() || self.metrics.in_flight.load(Ordering::Acquire) > 0)
        {
            self.reconcile(policy.as_mut(), &mut instances);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.jobs_rx.close();
        while let Ok(job) = self.take_job() {
            drop(job); // its requester sees `Unavailable`
        }
        for slot in self.lock_pool().slots.values() {
            slot.stop.cancel();
        }
        while let Some(joined) = instances.join_next().await {
            if let Err(error) = joined {
                tracing::error!(service = %self.id(), %error, "instance task failed");
            }
        }
        self.log(&format!("revision {} stopped", self.config.revision));
    }

    fn reconcile(self: &Arc<Self>, policy: &mut dyn Policy, instances: &mut JoinSet<()>) {
        let now = Instant::now();
        let queued = self.queued.load(Ordering::Acquire) as u32;
        let mut pool = self.lock_pool();
        if pool.failed.is_some() {
            while let Ok(job) = self.take_job() {
                drop(job); // its requester sees the failure
            }
            return;
        }
        let on_policy_clock =
            |at: Instant| at.saturating_duration_since(self.origin) + POLICY_CLOCK_START;
        let observation = Observation {
            now: on_policy_clock(now),
            in_flight: self.metrics.in_flight.load(Ordering::Acquire) as u32,
            queued,
            starting: pool.count(|s| matches!(s, SlotState::Starting)) as u32,
            ready: pool
                .slots
                .values()
                .filter_map(|slot| match slot.state {
                    SlotState::Ready { busy, idle_since } => Some(InstanceActivity {
                        busy,
                        idle_since: on_policy_clock(idle_since),
                    }),
                    _ => None,
                })
                .collect(),
            arrivals_total: self.metrics.arrivals.load(Ordering::Relaxed),
            startup_last: self.metrics.startup_last(),
        };
        let current = observation.starting + observation.ready.len() as u32;
        let bounds = self.bounds();
        let mut desired = policy.desired(&bounds, &observation);
        if bounds.instances_max == 0 && queued > 0 {
            // Placed elsewhere meanwhile (drained, moved): the instances it has finish what
            // was queued here before they stop; new requests go to the other nodes.
            desired = desired.max(observation.starting + observation.ready.len() as u32);
        }
        self.metrics
            .set_forecast(policy.forecast(), policy.forecaster());
        if desired > current {
            if pool
                .no_start_before
                .is_some_and(|not_before| now < not_before)
            {
                return; // backing off after a crash; the next tick tries again
            }
            if observation.ready.is_empty() && queued > 0 {
                self.metrics.cold_starts.fetch_add(1, Ordering::Relaxed);
            }
            for _ in current..desired {
                let id = pool.next_id;
                pool.next_id += 1;
                let stop = CancellationToken::new();
                pool.slots.insert(
                    id,
                    Slot {
                        state: SlotState::Starting,
                        stop: stop.clone(),
                    },
                );
                self.metrics.instance_starts.fetch_add(1, Ordering::Relaxed);
                instances.spawn(self.clone().run_instance(id, stop));
            }
            self.metrics.set_instances(now, pool.slots.len() as u64);
        } else if desired < current {
            let mut idle: Vec<(Instant, u64)> = pool
                .slots
                .iter()
                .filter_map(|(id, slot)| match slot.state {
                    SlotState::Ready {
                        busy: 0,
                        idle_since,
                    } => Some((idle_since, *id)),
                    _ => None,
                })
                .collect();
            idle.sort();
            let concurrency = u64::from(self.concurrency());
            for (_, id) in idle.into_iter().take((current - desired) as usize) {
                if let Some(slot) = pool.slots.get_mut(&id) {
                    slot.state = SlotState::Stopping;
                    slot.stop.cancel();
                    self.free_capacity.fetch_sub(concurrency, Ordering::AcqRel);
                }
            }
        }
    }

    /// Free request slots an instance in `state` offers.
    fn capacity_of(&self, state: &SlotState) -> u64 {
        match state {
            SlotState::Ready { busy, .. } => u64::from(self.concurrency().saturating_sub(*busy)),
            _ => 0,
        }
    }

    fn set_state(&self, id: u64, state: SlotState) {
        let mut pool = self.lock_pool();
        if let Some(slot) = pool.slots.get_mut(&id)
            && slot.state != SlotState::Stopping
        {
            let (before, after) = (self.capacity_of(&slot.state), self.capacity_of(&state));
            slot.state = state;
            if after > before {
                self.free_capacity
                    .fetch_add(after - before, Ordering::AcqRel);
            } else {
                self.free_capacity
                    .fetch_sub(before - after, Ordering::AcqRel);
            }
        }
    }

    fn remove(&self, id: u64) {
        let mut pool = self.lock_pool();
        if let Some(slot) = pool.slots.remove(&id) {
            self.free_capacity
                .fetch_sub(self.capacity_of(&slot.state), Ordering::AcqRel);
        }
        self.metrics
            .set_instances(Instant::now(), pool.slots.len() as u64);
        drop(pool);
        // Capacity changed: let the scaler replace it if work is waiting.
        self.wake.notify_one();
    }

    /// Count a crash or failed start: back off before the next start, and after
    /// [`CRASH_LOOP_COUNT`] within [`CRASH_WINDOW`], mark the service failed.
    fn note_crash(&self, reason: &str) {
        self.metrics
            .instance_failures
            .fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut pool = self.lock_pool();
        pool.crashes.push_back(now);
        while pool
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > CRASH_WINDOW)
        {
            pool.crashes.pop_front();
        }
        let recent = pool.crashes.len();
        if recent >= CRASH_LOOP_COUNT && pool.failed.is_none() {
            let failure = format!(
                "crash loop: {recent} crashes within {}s, the last: {reason}",
                CRASH_WINDOW.as_secs()
            );
            pool.failed = Some(failure.clone());
            drop(pool);
            self.log(&format!("service failed: {failure}"));
            tracing::error!(service = %self.id(), %failure, "service failed");
            return;
        }
        let backoff = Duration::from_millis(100)
            .saturating_mul(1 << recent.min(10))
            .min(BACKOFF_MAX);
        pool.no_start_before = Some(now + backoff);
    }

    async fn run_instance(self: Arc<Self>, id: u64, stop: CancellationToken) {
        let end = match &self.config.backend {
            Backend::Component {
                component,
                instance,
            } => self.run_component(id, &stop, component, instance).await,
            Backend::Process(spec) => self.run_process(id, &stop, spec).await,
        };
        if let End::Crashed(reason) = end {
            self.note_crash(&reason);
        }
        self.remove(id);
    }

    /// Take the next job this instance should serve, or `None` when it must stop.
    ///
    /// Idle instances wait on a stack and a new request wakes the one that became idle most
    /// recently, so work packs onto as few instances as it needs and the rest stay idle long
    /// enough to be stopped. (Waiting on the queue itself would hand requests out in turn to
    /// every instance, and none would ever be idle for `idle_timeout`.)
    async fn next_job(&self, id: u64, stop: &CancellationToken) -> Option<(Job, Instant)> {
        let waker = Arc::new(Notify::new());
        loop {
            let job = match self.take_job() {
                Ok(job) => job,
                Err(async_channel::TryRecvError::Closed) => return None,
                Err(async_channel::TryRecvError::Empty) => {
                    self.wait_for_job(id, stop, &waker).await?
                }
            };
            let now = Instant::now();
            if now < job.deadline && !job.respond.is_closed() {
                return Some((*job, now));
            }
            // Otherwise its requester has already been told it timed out.
        }
    }

    /// Wait on the idle stack until a job can be taken (or `None`: stop).
    async fn wait_for_job(
        &self,
        id: u64,
        stop: &CancellationToken,
        waker: &Arc<Notify>,
    ) -> Option<Box<Job>> {
        self.idle_waiters
            .lock()
            .expect("waiter lock is never poisoned")
            .push((id, waker.clone()));
        loop {
            // Checked after registering, so a request queued just before is not missed.
            match self.take_job() {
                Ok(job) => {
                    if !self.leave_waiters(id) {
                        // Woken for another request while taking this one: pass that on.
                        self.wake_an_idle_instance();
                    }
                    return Some(job);
                }
                Err(async_channel::TryRecvError::Closed) => {
                    _ = self.leave_waiters(id);
                    return None;
                }
                Err(async_channel::TryRecvError::Empty) => {}
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    _ = self.leave_waiters(id);
                    // If this instance was woken for a request it will not take, pass it on.
                    if !self.jobs_rx.is_empty() {
                        self.wake_an_idle_instance();
                    }
                    return None;
                }
                _ = waker.notified() => {
                    // Taken off the stack to be woken: back on top unless a job is there.
                    match self.take_job() {
                        Ok(job) => return Some(job),
                        Err(async_channel::TryRecvError::Closed) => return None,
                        Err(async_channel::TryRecvError::Empty) => {
                            self.idle_waiters.lock().expect("waiter lock is never poisoned").push((id, waker.clone()));
                        }
                    }
                }
                // A safety net against a lost wake-up; the instance keeps its place.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Take the next queued job, counting it out of the queue's bound.
    fn take_job(&self) -> Result<Box<Job>, async_channel::TryRecvError> {
        let job = self.jobs_rx.try_recv()?;
        let before = self.queued.fetch_sub(1, Ordering::AcqRel);
        assert!(before > 0, "a job taken was counted in");
        Ok(job)
    }

    /// Leave the waiters; false if someone already took this instance off to wake it.
    fn leave_waiters(&self, id: u64) -> bool {
        let mut waiters = self
            .idle_waiters
            .lock()
            .expect("waiter lock is never poisoned");
        let before = waiters.len();
        waiters.retain(|(waiting, _)| *waiting != id);
        waiters.len() != before
    }

    /// Wake the most recently idle instance, if any is waiting; true if one was.
    fn wake_an_idle_instance(&self) -> bool {
        let waiter = self
            .idle_waiters
            .lock()
            .expect("waiter lock is never poisoned")
            .pop();
        match waiter {
            Some((_, waker)) => {
                waker.notify_one();
                true
            }
            None => false,
        }
    }

    async fn run_component(
        &self,
        id: u64,
        stop: &CancellationToken,
        component: &LoadedComponent,
        spec: &InstanceSpec,
    ) -> End {
        let started = Instant::now();
        let instance = tokio::select! {
            _ = stop.cancelled() => return End::Stopped,
            instance = Instance::start(&self.runtime, component, spec, self.config.startup_timeout) => instance,
        };
        let mut instance = match instance {
            Ok(instance) => instance,
            Err(error) => {
                let reason = format!("failed to start: {error:#}");
                self.log(&format!("instance {id} {reason}"));
                return End::Crashed(reason);
            }
        };
        self.metrics.record_startup(started.elapsed());
        self.log(&format!(
            "instance {id} ready in {:.1} ms",
            started.elapsed().as_secs_f64() * 1000.0
        ));
        self.set_state(
            id,
            SlotState::Ready {
                busy: 0,
                idle_since: Instant::now(),
            },
        );
        while let Some((job, now)) = self.next_job(id, stop).await {
            self.set_state(
                id,
                SlotState::Ready {
                    busy: 1,
                    idle_since: now,
                },
            );
            self.metrics.in_flight.fetch_add(1, Ordering::AcqRel);
            let respond = job.respond;
            let serving = Instant::now();
            let outcome = instance
                .serve(job.request, job.deadline - now, move |reply| {
                    _ = respond.send(
                        reply
                            .map(|response| {
                                response.map(|body| {
                                    body.map_err(|error| -> BoxError {
                                        format!("{error:?}").into()
                                    })
                                    .boxed_unsync()
                                })
                            })
                            .map_err(guest_error),
                    );
                })
                .await;
            self.metrics.in_flight.fetch_sub(1, Ordering::AcqRel);
            if outcome.is_ok() {
                self.metrics.record_service_time(serving.elapsed());
            }
            if outcome.is_ok() && self.config.fresh_instance_per_request {
                // Nothing of this request may reach the next: a new store and instance.
                // The slot stays busy meanwhile, so waiting work goes to ready instances.
                drop(instance);
                let replacement = tokio::select! {
                    _ = stop.cancelled() => return End::Stopped,
                    replacement = Instance::start(&self.runtime, component, spec, self.config.startup_timeout) => replacement,
                };
                instance = match replacement {
                    Ok(instance) => instance,
                    Err(error) => {
                        let reason = format!("failed to start a fresh instance: {error:#}");
                        self.log(&format!("instance {id} {reason}"));
                        return End::Crashed(reason);
                    }
                };
            }
            match outcome {
                Ok(()) => self.set_state(
                    id,
                    SlotState::Ready {
                        busy: 0,
                        idle_since: Instant::now(),
                    },
                ),
                Err(error) => {
                    // A discarded instance is not a crash of the service: the request failed,
                    // the next one gets a fresh instance without backoff.
                    self.metrics
                        .instance_failures
                        .fetch_add(1, Ordering::Relaxed);
                    self.log(&format!("instance {id} discarded: {error}"));
                    return End::Stopped;
                }
            }
        }
        End::Stopped
    }

    async fn run_process(&self, id: u64, stop: &CancellationToken, spec: &ProcessSpec) -> End {
        let instance = tokio::select! {
            _ = stop.cancelled() => return End::Stopped,
            instance = ProcessInstance::start(spec) => instance,
        };
        let mut instance = match instance {
            Ok(instance) => instance,
            Err(error) => {
                let reason = format!("failed to start: {error}");
                self.log(&format!("instance {id} {reason}"));
                return End::Crashed(reason);
            }
        };
        let startup = instance.startup_time();
        self.metrics.record_startup(startup);
        self.log(&format!(
            "instance {id} (pid {}) ready in {:.1} ms",
            instance.pid(),
            startup.as_secs_f64() * 1000.0
        ));
        self.set_state(
            id,
            SlotState::Ready {
                busy: 0,
                idle_since: Instant::now(),
            },
        );
        let concurrency = self.concurrency() as usize;
        let mut in_flight: JoinSet<()> = JoinSet::new();
        let mut exit_check = tokio::time::interval(EXIT_CHECK);
        let liveness_interval = spec
            .liveness
            .as_ref()
            .map(|l| l.interval)
            .unwrap_or(Duration::from_secs(3600));
        let mut liveness = tokio::time::interval_at(
            tokio::time::Instant::now() + liveness_interval,
            liveness_interval,
        );
        let mut liveness_failures = 0u32;
        let end = loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break End::Stopped,
                _ = exit_check.tick() => {
                    if let Some(status) = instance.try_exited() {
                        let reason = format!("pid {} exited ({status})", instance.pid());
                        self.log(&format!("instance {id} {reason}"));
                        break End::Crashed(reason);
                    }
                }
                _ = liveness.tick(), if spec.liveness.is_some() => {
                    let probe = spec.liveness.as_ref().expect("guarded by the branch condition");
                    if instance.probe(&probe.probe, probe.timeout).await {
                        liveness_failures = 0;
                    } else {
                        liveness_failures += 1;
                        if liveness_failures >= probe.failures {
                            let reason = format!("pid {} failed its liveness probe {liveness_failures} times in a row; killed", instance.pid());
                            self.log(&format!("instance {id} {reason}"));
                            break End::Crashed(reason);
                        }
                    }
                }
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {
                    self.set_state(id, SlotState::Ready { busy: in_flight.len() as u32, idle_since: Instant::now() });
                }
                job = self.next_job(id, stop), if in_flight.len() < concurrency => {
                    let Some((job, now)) = job else { break End::Stopped };
                    let forward = instance.forward(job.request);
                    let remaining = job.deadline - now;
                    let respond = job.respond;
                    self.metrics.in_flight.fetch_add(1, Ordering::AcqRel);
                    let metrics_in_flight = self.in_flight_guard();
                    let service_time = self.metrics.service_time_recorder();
                    in_flight.spawn(async move {
                        let _guard = metrics_in_flight;
                        let serving = Instant::now();
                        let reply = match tokio::time::timeout(remaining, forward).await {
                            Err(_elapsed) => Err(ServiceError::Timeout(remaining)),
                            Ok(Err(error)) => Err(ServiceError::BadGateway(error)),
                            Ok(Ok(response)) => {
                                service_time.record(serving.elapsed());
                                Ok(response.map(|body| body.map_err(|error| -> BoxError { Box::new(error) }).boxed_unsync()))
                            }
                        };
                        _ = respond.send(reply);
                    });
                    self.set_state(id, SlotState::Ready { busy: in_flight.len() as u32, idle_since: now });
                }
            }
        };
        let status = if matches!(end, End::Stopped) {
            // Draining: requests already forwarded finish (each is bounded by its deadline).
            while in_flight.join_next().await.is_some() {}
            instance.stop(spec.stop_signal, spec.stop_timeout).await
        } else {
            // Dead or hung: kill it first, so requests still in flight fail at once (502)
            // instead of waiting out their deadlines.
            let status = instance
                .stop(runtime::Signal::SIGKILL, spec.stop_timeout)
                .await;
            while in_flight.join_next().await.is_some() {}
            status
        };
        if matches!(end, End::Stopped) {
            self.log(&format!(
                "instance {id} stopped ({})",
                status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "status unknown".into())
            ));
        }
        end
    }

    fn in_flight_guard(&self) -> InFlight {
        InFlight(self.metrics.in_flight_counter())
    }
}

/// Decrements the in-flight gauge when a forwarded request ends, however it ends.
struct InFlight(Arc<AtomicU64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn guest_error(error: ServeError) -> ServiceError {
    match error {
        ServeError::Timeout => ServiceError::Timeout(Duration::ZERO),
        other => ServiceError::GuestFailed(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_is_worth_a_hop_only_when_the_wait_saved_is_longer() {
        let ms = Duration::from_millis;
        let us = Duration::from_micros;
        // Nothing served yet, or requests slower than the hop: one round, the least.
        assert_eq!(overflow_margin(ms(1), None), 1000);
        assert_eq!(overflow_margin(ms(1), Some(Duration::from_secs(1))), 1000);
        assert_eq!(overflow_margin(ms(1), Some(ms(20))), 1000);
        assert_eq!(overflow_margin(ms(1), Some(Duration::ZERO)), 1000);
        // A request of 50 µs against a hop of 1 ms: another line must be 20 rounds shorter.
        assert_eq!(overflow_margin(ms(1), Some(us(50))), 20_000);
        assert_eq!(overflow_margin(us(300), Some(us(100))), 3000);
        // Huge figures saturate instead of wrapping.
        assert_eq!(
            overflow_margin(Duration::from_secs(u64::MAX / 4), Some(us(1))),
            u64::MAX
        );
    }

    #[test]
    fn the_service_time_is_a_smoothed_mean_of_the_latest_requests() {
        let metrics = ServiceMetrics::new(Instant::now(), None);
        assert_eq!(metrics.service_time(), None);
        let recorder = metrics.service_time_recorder();
        recorder.record(Duration::from_millis(8));
        assert_eq!(metrics.service_time(), Some(Duration::from_millis(8)));
        // One eighth of the way to each new sample.
        recorder.record(Duration::from_millis(16));
        assert_eq!(metrics.service_time(), Some(Duration::from_millis(9)));
        for _ in 0..200 {
            recorder.record(Duration::from_micros(100));
        }
        let settled = metrics.service_time().expect("recorded");
        assert!(settled <= Duration::from_micros(110), "{settled:?}");
        // Never zero (zero means none yet).
        recorder.record(Duration::ZERO);
        assert!(metrics.service_time().expect("recorded") >= Duration::from_micros(1));
    }

    #[test]
    fn history_minutes_land_on_the_policy_clock_before_its_start() {
        let mut history = History::default();
        // Minutes starting at unix 600 (rate 2/s) and 660 (4/s); a sample at 720 closes 660.
        for (unix_s, arrivals) in [(600, 1.0), (601, 3.0), (660, 4.0), (720, 9.0)] {
            history.record(Sample {
                unix_s,
                arrivals,
                ..Sample::default()
            });
        }
        // Started at unix 780: the minute of 600 is 180 s before the clock's start.
        assert_eq!(
            past_rates(&history, 780),
            vec![
                (POLICY_CLOCK_START - Duration::from_secs(180), 2.0),
                (POLICY_CLOCK_START - Duration::from_secs(120), 4.0),
            ]
        );
        // Minutes older than the clock's start, or from the future (a clock stepped back),
        // are left out.
        let long_after = POLICY_CLOCK_START.as_secs() + 650;
        assert_eq!(
            past_rates(&history, long_after),
            vec![(Duration::from_secs(10), 4.0)]
        );
        assert_eq!(past_rates(&history, 500), vec![]);
    }
}
