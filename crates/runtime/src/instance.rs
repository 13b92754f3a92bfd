//! One component instance: a store, its limits, and the `wasi:http` handler it exports.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use tokio::sync::oneshot;
use wasmtime::component::ResourceTable;
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder, Trap, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::Proxy;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::engine::{LoadedComponent, Runtime};
use crate::keyvalue::{KeyValue, KvView};
use crate::logs::{GuestOutput, LogStream, ServiceLog};
use crate::outbound::{Origin, OutboundHooks};

/// The body of a response produced by a guest, streamed while the guest writes it.
pub type GuestBody = HyperOutgoingBody;

/// What every instance of one service gets.
#[derive(Clone)]
pub struct InstanceSpec {
    pub env: Vec<(String, String)>,
    pub memory_bytes_max: u64,
    pub outbound: Arc<[Origin]>,
    pub log: Arc<ServiceLog>,
    /// The app's key-value buckets (`wasi:keyvalue`); `None`: the app declares none.
    pub kv: Option<Arc<dyn KeyValue>>,
}

pub(crate) struct GuestState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    limits: StoreLimits,
    hooks: OutboundHooks,
    kv: Option<Arc<dyn KeyValue>>,
    /// When the current call must stop: guest code is trapped at the first epoch tick past
    /// it (host waits are bounded by the same instant through a timer).
    deadline: Instant,
    /// Since when guest code has run without giving its thread back.
    slice_started: Instant,
}

/// Guest code runs at most about this long (plus one epoch tick) before it yields its
/// worker thread. Calls shorter than this, nearly all of them, never yield, so yielding
/// costs nothing on the common path (a cold start measured 4.5 ms instead of 0.9 ms when
/// every tick yielded through tokio's deferred `yield_now`); one that computes for longer
/// shares the thread, at every tick or every other.
const SLICE: Duration = Duration::from_millis(5);

/// The epoch callback: trap past the deadline, else yield once the slice is used up.
fn on_epoch(state: &mut GuestState) -> UpdateDeadline {
    let now = Instant::now();
    if now >= state.deadline {
        return UpdateDeadline::Interrupt;
    }
    if now.duration_since(state.slice_started) < SLICE {
        return UpdateDeadline::Continue(1);
    }
    state.slice_started = now;
    UpdateDeadline::Yield(1)
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for GuestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// The key-value view of an instance's state, for the linker.
pub(crate) fn kv_view(state: &mut GuestState) -> KvView<'_> {
    KvView {
        table: &mut state.table,
        backend: state.kv.as_ref(),
    }
}

/// Why a request did not get a normal response from a guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    #[error("the request ran past its deadline")]
    Timeout,
    #[error("the guest trapped: {0}")]
    Trap(String),
    #[error("the guest returned without setting a response")]
    NoResponse,
    #[error("the host could not pass the request to the guest: {0}")]
    Host(String),
}

/// A live instance. It serves one request at a time and is reused for the next one; an
/// instance whose call failed is in an unknown state and must be dropped, which returns its
/// slot to the pool.
pub struct Instance {
    store: Store<GuestState>,
    proxy: Proxy,
}

impl Instance {
    /// Instantiate a component. Start functions are bounded by `startup_timeout`.
    pub async fn start(
        runtime: &Runtime,
        component: &LoadedComponent,
        spec: &InstanceSpec,
        startup_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.envs(&spec.env)
            .stdout(GuestOutput {
                log: spec.log.clone(),
                stream: LogStream::Stdout,
            })
            .stderr(GuestOutput {
                log: spec.log.clone(),
                stream: LogStream::Stderr,
            })
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let memory_bytes_max = spec
            .memory_bytes_max
            .min(runtime.config.memory_bytes_max_per_instance);
        let limits = StoreLimitsBuilder::new()
            .memory_size(usize::try_from(memory_bytes_max).unwrap_or(usize::MAX))
            .trap_on_grow_failure(true)
            .build();
        let state = GuestState {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            limits,
            hooks: OutboundHooks {
                allowed: spec.outbound.clone(),
            },
            kv: spec.kv.clone(),
            deadline: Instant::now() + startup_timeout,
            slice_started: Instant::now(),
        };
        let deadline = state.deadline;
        let mut store = Store::new(&runtime.engine, state);
        store.limiter(|state| &mut state.limits);
        // Guest code that computes for longer than a slice yields to the executor (see
        // `on_epoch`), so it shares its worker thread with the node's other work and never
        // holds it for its whole timeout; past its deadline it is trapped.
        store.epoch_deadline_callback(|mut store| Ok(on_epoch(store.data_mut())));
        store.set_epoch_deadline(1);
        let proxy =
            tokio::time::timeout_at(deadline.into(), component.pre.instantiate_async(&mut store))
                .await
                .map_err(|_| anyhow::anyhow!("instantiation took longer than {startup_timeout:?}"))?
                .map_err(|e| anyhow::anyhow!("instantiate component: {e:#}"))?;
        Ok(Instance { store, proxy })
    }

    /// Serve one request. The response head is passed to `respond` as soon as the guest sets
    /// it, while the guest goes on writing the body. Returns `Err` if the instance must be
    /// discarded; in that case `respond` has received the error unless a response was
    /// already sent.
    pub async fn serve(
        &mut self,
        request: http::Request<Full<Bytes>>,
        timeout: Duration,
        respond: impl FnOnce(Result<http::Response<GuestBody>, ServeError>) + Send,
    ) -> Result<(), ServeError> {
        let (response_tx, mut response_rx) = oneshot::channel();
        let resources = {
            let mut http = self.store.data_mut().http();
            http.new_incoming_request(Scheme::Http, request)
                .and_then(|request| Ok((request, http.new_response_outparam(response_tx)?)))
        };
        let (request, outparam) = match resources {
            Ok(resources) => resources,
            Err(error) => {
                let error = ServeError::Host(format!("{error:#}"));
                respond(Err(error.clone()));
                // The store itself is untouched; the instance stays usable.
                return Ok(());
            }
        };
        // The one deadline of this call, for guest code and host waits alike.
        let now = Instant::now();
        let deadline = now + timeout;
        self.store.data_mut().deadline = deadline;
        self.store.data_mut().slice_started = now;
        self.store.set_epoch_deadline(1);
        let handler = self.proxy.wasi_http_incoming_handler();
        let mut respond = Some(respond);
        let outcome = {
            let call = tokio::time::timeout_at(
                deadline.into(),
                handler.call_handle(&mut self.store, request, outparam),
            );
            tokio::pin!(call);
            loop {
                tokio::select! {
                    response = &mut response_rx, if respond.is_some() => {
                        let reply = match response {
                            Ok(Ok(response)) => Ok(response),
                            Ok(Err(code)) => Err(ServeError::Trap(format!("the guest answered with an error: {code:?}"))),
                            Err(_) => Err(ServeError::NoResponse),
                        };
                        if let Some(respond) = respond.take() {
                            respond(reply);
                        }
                    }
                    outcome = &mut call => break outcome,
                }
            }
        };
        let result = match outcome {
            Err(_elapsed) => Err(ServeError::Timeout),
            Ok(Err(error)) if error.downcast_ref::<Trap>() == Some(&Trap::Interrupt) => {
                Err(ServeError::Timeout)
            }
            Ok(Err(error)) => Err(ServeError::Trap(format!("{error:#}"))),
            Ok(Ok(())) => Ok(()),
        };
        // Park the deadline far away so no stray tick lands on an idle instance.
        self.store.set_epoch_deadline(u64::MAX / 2);
        if let Some(respond) = respond.take() {
            let reply = match (&result, response_rx.try_recv()) {
                (_, Ok(Ok(response))) => Ok(response),
                (Err(error), _) => Err(error.clone()),
                (Ok(()), _) => Err(ServeError::NoResponse),
            };
            respond(reply);
        }
        result
    }
}
