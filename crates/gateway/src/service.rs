//! One deployed service at run time: its bounded request queue, its instances, and the
//! scaler task that sizes the pool by asking an `autopilot` policy.
//!
//! Ownership: a [`Service`] owns one scaler task; the scaler owns the instance tasks in a
//! `JoinSet`. [`Service::shutdown`] stops intake, lets queued and in-flight requests finish
//! (bounded by the request timeout), then stops every instance and waits for them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use autopilot::{InstanceActivity, Observation, Policy, ScalingBounds};
use bytes::Bytes;
use http_body_util::Full;
use runtime::{GuestBody, Instance, InstanceSpec, LoadedComponent, LogStream, Runtime, ServeError};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Gauges, MetricsSnapshot, ServiceMetrics};

/// How often the scaler looks at the pool when nothing wakes it.
const SCALE_TICK: Duration = Duration::from_millis(200);

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
    pub component: LoadedComponent,
    pub instance: InstanceSpec,
}

/// Why the service could not answer a request with a guest response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("the service's queue is full ({0} requests waiting); retry shortly")]
    QueueFull(usize),
    #[error("the request did not complete within the service's timeout of {0:?}")]
    Timeout(Duration),
    #[error("the service failed to handle the request: {0}")]
    GuestFailed(String),
    #[error("the service is shutting down or being replaced; retry shortly")]
    Unavailable,
}

struct Job {
    request: http::Request<Full<Bytes>>,
    deadline: Instant,
    respond: oneshot::Sender<Result<http::Response<GuestBody>, ServeError>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Starting,
    Ready {
        busy: bool,
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
}

impl Pool {
    fn count(&self, want: impl Fn(&SlotState) -> bool) -> u64 {
        self.slots.values().filter(|slot| want(&slot.state)).count() as u64
    }
}

pub struct Service {
    pub config: ServiceConfig,
    runtime: Arc<Runtime>,
    jobs_tx: async_channel::Sender<Job>,
    jobs_rx: async_channel::Receiver<Job>,
    pool: Mutex<Pool>,
    /// Ready instances not serving a request; mirrors `pool` so the hot path need not lock.
    idle: AtomicU64,
    wake: Notify,
    pub metrics: ServiceMetrics,
    origin: Instant,
    intake_closed: CancellationToken,
    scaler: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Service {
    /// Start the service's scaler. With `instances.min > 0`, instances start right away.
    pub fn start(
        config: ServiceConfig,
        runtime: Arc<Runtime>,
        policy: Box<dyn Policy>,
    ) -> Arc<Self> {
        let (jobs_tx, jobs_rx) = async_channel::bounded(config.queue_max.max(1));
        let now = Instant::now();
        let service = Arc::new(Service {
            config,
            runtime,
            jobs_tx,
            jobs_rx,
            pool: Mutex::new(Pool::default()),
            idle: AtomicU64::new(0),
            wake: Notify::new(),
            metrics: ServiceMetrics::new(now),
            origin: now,
            intake_closed: CancellationToken::new(),
            scaler: Mutex::new(None),
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
        self.config.instance.log.push(LogStream::Platform, text);
    }

    fn lock_pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool
            .lock()
            .expect("pool lock is never poisoned: no panics while held")
    }

    /// Queue a request and wait for an instance to answer it.
    pub async fn handle(
        &self,
        request: http::Request<Full<Bytes>>,
        arrival: Instant,
    ) -> Result<http::Response<GuestBody>, ServiceError> {
        if self.intake_closed.is_cancelled() {
            return Err(ServiceError::Unavailable);
        }
        let deadline = arrival + self.config.timeout;
        let (respond, response) = oneshot::channel();
        match self.jobs_tx.try_send(Job {
            request,
            deadline,
            respond,
        }) {
            Ok(()) => {}
            Err(async_channel::TrySendError::Full(_)) => {
                return Err(ServiceError::QueueFull(self.config.queue_max));
            }
            Err(async_channel::TrySendError::Closed(_)) => return Err(ServiceError::Unavailable),
        }
        if self.idle.load(Ordering::Acquire) == 0 {
            self.wake.notify_one();
        }
        match tokio::time::timeout_at(deadline.into(), response).await {
            Err(_elapsed) => Err(ServiceError::Timeout(self.config.timeout)),
            Ok(Err(_dropped)) => Err(ServiceError::Unavailable),
            Ok(Ok(Ok(response))) => Ok(response),
            Ok(Ok(Err(ServeError::Timeout))) => Err(ServiceError::Timeout(self.config.timeout)),
            Ok(Ok(Err(error))) => Err(ServiceError::GuestFailed(error.to_string())),
        }
    }

    pub fn gauges(&self) -> Gauges {
        let pool = self.lock_pool();
        Gauges {
            queued: self.jobs_tx.len() as u64,
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

    async fn scale_loop(self: Arc<Self>, mut policy: Box<dyn Policy>) {
        let mut instances = JoinSet::new();
        loop {
            tokio::select! {
                _ = self.intake_closed.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(SCALE_TICK) => {}
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
        while let Ok(job) = self.jobs_rx.try_recv() {
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
        let queued = self.jobs_tx.len() as u32;
        let mut pool = self.lock_pool();
        let observation = Observation {
            now: now.saturating_duration_since(self.origin),
            in_flight: self.metrics.in_flight.load(Ordering::Acquire) as u32,
            queued,
            starting: pool.count(|s| matches!(s, SlotState::Starting)) as u32,
            ready: pool
                .slots
                .values()
                .filter_map(|slot| match slot.state {
                    SlotState::Ready { busy, idle_since } => Some(InstanceActivity {
                        busy: u32::from(busy),
                        idle_since: idle_since.saturating_duration_since(self.origin),
                    }),
                    _ => None,
                })
                .collect(),
        };
        let current = observation.starting + observation.ready.len() as u32;
        let desired = policy.desired(&self.config.bounds, &observation);
        if desired > current {
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
                        busy: false,
                        idle_since,
                    } => Some((idle_since, *id)),
                    _ => None,
                })
                .collect();
            idle.sort();
            for (_, id) in idle.into_iter().take((current - desired) as usize) {
                if let Some(slot) = pool.slots.get_mut(&id) {
                    slot.state = SlotState::Stopping;
                    slot.stop.cancel();
                    self.idle.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    fn set_state(&self, id: u64, state: SlotState) {
        let mut pool = self.lock_pool();
        if let Some(slot) = pool.slots.get_mut(&id) {
            let was_idle = matches!(slot.state, SlotState::Ready { busy: false, .. });
            let is_idle = matches!(state, SlotState::Ready { busy: false, .. });
            // A slot told to stop stays stopping.
            if slot.state != SlotState::Stopping {
                slot.state = state;
                match (was_idle, is_idle) {
                    (false, true) => _ = self.idle.fetch_add(1, Ordering::AcqRel),
                    (true, false) => _ = self.idle.fetch_sub(1, Ordering::AcqRel),
                    _ => {}
                }
            }
        }
    }

    fn remove(&self, id: u64) {
        let mut pool = self.lock_pool();
        if let Some(slot) = pool.slots.remove(&id)
            && matches!(slot.state, SlotState::Ready { busy: false, .. })
        {
            self.idle.fetch_sub(1, Ordering::AcqRel);
        }
        self.metrics
            .set_instances(Instant::now(), pool.slots.len() as u64);
        drop(pool);
        // Capacity changed: let the scaler replace it if work is waiting.
        self.wake.notify_one();
    }

    async fn run_instance(self: Arc<Self>, id: u64, stop: CancellationToken) {
        let started = Instant::now();
        let instance = tokio::select! {
            _ = stop.cancelled() => None,
            instance = Instance::start(&self.runtime, &self.config.component, &self.config.instance, self.config.startup_timeout) => Some(instance),
        };
        let mut instance = match instance {
            None => return self.remove(id),
            Some(Err(error)) => {
                self.metrics
                    .instance_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.log(&format!("instance {id} failed to start: {error:#}"));
                return self.remove(id);
            }
            Some(Ok(instance)) => instance,
        };
        self.log(&format!(
            "instance {id} ready in {:.1} ms",
            started.elapsed().as_secs_f64() * 1000.0
        ));
        self.set_state(
            id,
            SlotState::Ready {
                busy: false,
                idle_since: Instant::now(),
            },
        );
        loop {
            let job = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                job = self.jobs_rx.recv() => match job { Ok(job) => job, Err(_closed) => break },
            };
            let now = Instant::now();
            if now >= job.deadline || job.respond.is_closed() {
                continue; // the requester has already been told it timed out
            }
            self.set_state(
                id,
                SlotState::Ready {
                    busy: true,
                    idle_since: now,
                },
            );
            self.metrics.in_flight.fetch_add(1, Ordering::AcqRel);
            let outcome = instance
                .serve(job.request, job.deadline - now, job.respond)
                .await;
            self.metrics.in_flight.fetch_sub(1, Ordering::AcqRel);
            match outcome {
                Ok(()) => self.set_state(
                    id,
                    SlotState::Ready {
                        busy: false,
                        idle_since: Instant::now(),
                    },
                ),
                Err(error) => {
                    self.metrics
                        .instance_failures
                        .fetch_add(1, Ordering::Relaxed);
                    self.log(&format!("instance {id} discarded: {error}"));
                    break;
                }
            }
        }
        drop(instance);
        self.remove(id);
    }
}
