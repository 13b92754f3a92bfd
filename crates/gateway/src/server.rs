//! The listener: connection limits, HTTP/1.1 parsing limits, request ids, error mapping and
//! graceful shutdown.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderValue, RETRY_AFTER};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::ingest::Ingest;
use crate::peers::Offer;
use crate::peers::Peers;
use crate::routes::RouteTable;
use crate::service::{Body, BoxError, Locality, ROUND, Service, ServiceError};

const REQUEST_ID: &str = "x-request-id";

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// A client must send its whole request head within this time (slowloris guard).
    pub header_read_timeout: Duration,
    /// Largest request head (request line plus headers) accepted.
    pub header_bytes_max: usize,
    /// Open connections at once; further clients wait in the listen backlog.
    pub connections_max: usize,
    /// On shutdown, in-flight requests get this long to finish.
    pub shutdown_grace: Duration,
    /// Request bodies held in memory at once across every connection (a body is read whole
    /// before its request is queued). A request whose body does not fit waits, until its
    /// deadline, then gets 503; the node never buffers more than this.
    pub buffered_body_bytes_max: u64,
    /// Proxies in front of the gateway whose `X-Forwarded-For` and `Forwarded` headers are
    /// kept (the connection's address is appended). From anyone else these headers are
    /// replaced by the connection's address, so a client cannot pose as another.
    pub trusted_proxies: Vec<IpAddr>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            header_read_timeout: Duration::from_secs(10),
            header_bytes_max: 16 * 1024,
            connections_max: 10_000,
            shutdown_grace: Duration::from_secs(10),
            buffered_body_bytes_max: 512 << 20,
            trusted_proxies: Vec::new(),
        }
    }
}

pub struct Gateway {
    routes: RwLock<Arc<RouteTable<Service>>>,
    config: GatewayConfig,
    request_id_prefix: String,
    request_id_next: AtomicU64,
    unrouted: AtomicU64,
    ingest: std::sync::OnceLock<Ingest>,
    bodies: BodyBudget,
    peers: Arc<Peers>,
}

/// The node-wide budget for buffered request bodies, in KiB (a semaphore's permits).
struct BodyBudget {
    kib: Arc<tokio::sync::Semaphore>,
    kib_max: u64,
}

impl BodyBudget {
    fn new(bytes: u64) -> Self {
        let kib_max = bytes.div_ceil(1024).max(1);
        BodyBudget {
            kib: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(kib_max).unwrap_or(usize::MAX >> 4),
            )),
            kib_max,
        }
    }

    /// Room for a body of up to `bytes`, waiting until `deadline` at most.
    async fn reserve(
        &self,
        bytes: u64,
        deadline: tokio::time::Instant,
    ) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, (StatusCode, &'static str, String)> {
        if bytes == 0 {
            return Ok(None);
        }
        let kib = bytes.div_ceil(1024).min(self.kib_max);
        let kib = u32::try_from(kib).unwrap_or(u32::MAX);
        match tokio::time::timeout_at(deadline, self.kib.clone().acquire_many_owned(kib)).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            _ => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                format!(
                    "the node is holding as many request bodies as it may ({} KiB); retry",
                    self.kib_max
                ),
            )),
        }
    }
}

/// What a request's body can take: its declared length, or `limit` when it streams.
fn body_reservation(request: &Request<Incoming>, limit: u64) -> u64 {
    use hyper::body::Body as _;
    request
        .body()
        .size_hint()
        .exact()
        .unwrap_or(limit)
        .min(limit)
}

impl Gateway {
    pub fn new(config: GatewayConfig) -> Arc<Self> {
        let mut seed = [0u8; 4];
        // A clash of prefixes only makes two nodes' request ids collide; it is not a
        // security property, so a failure of the OS generator falls back to the pid.
        if getrandom::fill(&mut seed).is_err() {
            seed = std::process::id().to_le_bytes();
        }
        let bodies = BodyBudget::new(config.buffered_body_bytes_max);
        Arc::new(Gateway {
            routes: RwLock::new(Arc::new(RouteTable::default())),
            config: config.normalised(),
            request_id_prefix: seed.iter().map(|b| format!("{b:02x}")).collect(),
            request_id_next: AtomicU64::new(1),
            unrouted: AtomicU64::new(0),
            ingest: std::sync::OnceLock::new(),
            bodies,
            peers: Arc::new(Peers::default()),
        })
    }

    /// Other nodes' gateways, for services placed elsewhere (in a cluster).
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// Replace the routing table in one step.
    pub fn install(&self, table: RouteTable<Service>) {
        *self.routes.write().expect("route lock is never poisoned") = Arc::new(table);
    }

    pub fn routes(&self) -> Arc<RouteTable<Service>> {
        self.routes
            .read()
            .expect("route lock is never poisoned")
            .clone()
    }

    /// Take events at `/events/TOPIC` for `events`' topics from producers holding `token`.
    /// Without this call, `/events/` answers 404.
    pub fn enable_ingest(&self, events: Arc<events::Events>, gate: events::Gate) {
        _ = self.ingest.set(Ingest { events, gate });
    }

    /// Requests that matched no route since start.
    pub fn unrouted(&self) -> u64 {
        self.unrouted.load(Ordering::Relaxed)
    }

    /// Accept connections until `shutdown` fires, then stop accepting and give open
    /// connections `shutdown_grace` to finish their requests.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<crate::tls::TlsAcceptor>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let limits = ConnectionLimits {
            connections_max: self.config.connections_max,
            header_read_timeout: self.config.header_read_timeout,
            header_bytes_max: self.config.header_bytes_max,
            shutdown_grace: self.config.shutdown_grace,
        };
        serve_connections(listener, limits, tls, shutdown, |peer| {
            let gateway = self.clone();
            hyper::service::service_fn(move |request| {
                let gateway = gateway.clone();
                async move { Ok::<_, Infallible>(gateway.handle(request, peer).await) }
            })
        })
        .await;
        Ok(())
    }

    fn request_id(&self, request: &Request<Incoming>) -> String {
        if let Some(given) = request
            .headers()
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            && !given.is_empty()
            && given.len() <= 128
            && given
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            return given.to_string();
        }
        format!(
            "{}-{:x}",
            self.request_id_prefix,
            self.request_id_next.fetch_add(1, Ordering::Relaxed)
        )
    }

    async fn handle(&self, mut request: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let arrival = Instant::now();
        // Forwarded by another node (with the cluster's key), or a client's: the forwarding
        // headers are removed either way (gateway::peers).
        let forwarded = self.peers.accept(request.headers_mut());
        let request_id = self.request_id(&request);
        let hosts = request.headers().get_all(HOST).iter().count();
        if hosts > 1 {
            // RFC 9112 §3.2: a request with more than one Host is answered 400; routing by
            // one of them would let a client reach a service the other names.
            let mut response = error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("the request has {hosts} Host headers; send exactly one"),
                &request_id,
            );
            set_request_id(&mut response, &request_id);
            return response;
        }
        let host = request
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .or(request.uri().host())
            .map(str::to_string);
        if let Some(forwarded) = forwarded {
            // Dispatched by the service the sending node named, whatever Host and path say.
            let named = self.routes().named(&forwarded.service).cloned();
            let mut response = match named {
                Some(service) => {
                    let answer = self
                        .forward(
                            &service,
                            request,
                            host,
                            peer,
                            &request_id,
                            arrival,
                            match forwarded.overflow {
                                Some(pressure) => Via::Overflow { pressure },
                                None => Via::Node,
                            },
                        )
                        .await;
                    self.answer(&service, answer, &request_id, arrival)
                }
                None => refuse_forwarded(&request_id, "this node does not run the service"),
            };
            set_request_id(&mut response, &request_id);
            return response;
        }
        let path = request.uri().path();
        if path == "/events" || path.starts_with("/events/") {
            let mut response = match self.ingest.get() {
                None => error_response(
                    StatusCode::NOT_FOUND,
                    "no_route",
                    "this node takes no events",
                    &request_id,
                ),
                Some(ingest) => {
                    let reserve =
                        body_reservation(&request, crate::ingest::INGEST_BODY_BYTES_MAX as u64);
                    // One deadline for room to buffer the body and for reading it.
                    let deadline =
                        tokio::time::Instant::from_std(arrival) + crate::ingest::BODY_TIMEOUT;
                    let answer = match self.bodies.reserve(reserve, deadline).await {
                        Ok(_room) => ingest.handle(request, deadline).await,
                        Err(busy) => Err(busy),
                    };
                    match answer {
                        Ok(answer) => json_response(StatusCode::ACCEPTED, &answer),
                        Err((status, code, message)) => {
                            error_response(status, code, &message, &request_id)
                        }
                    }
                }
            };
            set_request_id(&mut response, &request_id);
            return response;
        }
        let routes = self.routes();
        let Some(service) = routes
            .lookup(host.as_deref(), request.uri().path())
            .cloned()
        else {
            self.unrouted.fetch_add(1, Ordering::Relaxed);
            let message = format!("no service is routed at {}", request.uri().path());
            let mut response =
                error_response(StatusCode::NOT_FOUND, "no_route", &message, &request_id);
            set_request_id(&mut response, &request_id);
            return response;
        };
        drop(routes);
        let answer = self
            .forward(
                &service,
                request,
                host,
                peer,
                &request_id,
                arrival,
                Via::Client,
            )
            .await;
        let mut response = self.answer(&service, answer, &request_id, arrival);
        set_request_id(&mut response, &request_id);
        response
    }

    /// The response to a routed request, recorded in the service's metrics.
    fn answer(
        &self,
        service: &Service,
        answer: Result<Response<Body>, (StatusCode, &'static str, String)>,
        request_id: &str,
        arrival: Instant,
    ) -> Response<Body> {
        let response = match answer {
            Ok(mut response) => {
                // Only a gateway refuses a forwarded request; a service's answer never
                // carries the mark out (else it could make a node send a request twice).
                response.headers_mut().remove(crate::peers::NOT_PLACED_HERE);
                response
            }
            // Nothing was done: not the service's answer, so not in its metrics (the
            // sending node tries another, or serves it itself).
            Err((_, code, message)) if code == crate::peers::NOT_PLACED_HERE => {
                return refuse_forwarded(request_id, &message);
            }
            Err((status, code, message)) => {
                if status.is_server_error() {
                    service.log(&format!("request {request_id}: {status} {message}"));
                }
                error_response(status, code, &message, request_id)
            }
        };
        service.metrics.record(
            Instant::now(),
            response.status().as_u16(),
            arrival.elapsed(),
        );
        response
    }

    /// Read the request's body, then serve it here or forward it to the nodes that run the
    /// service. `via`: a client, or another node (with the cluster's key).
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        service: &Service,
        request: Request<Incoming>,
        host: Option<String>,
        peer: SocketAddr,
        request_id: &str,
        arrival: Instant,
        via: Via,
    ) -> Result<Response<Body>, (StatusCode, &'static str, String)> {
        let forwarded = !matches!(via, Via::Client);
        // Overflow is taken where a ready instance has room, or where its line is shorter
        // than at its sender by a whole round of the share at least (what a hop to another
        // node is worth; near a tie the sender keeps it). Decided before the body is read.
        if let Via::Overflow { pressure } = via
            && !service.has_room()
            && service.pressure().saturating_add(ROUND) > pressure
        {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                crate::peers::NOT_PLACED_HERE,
                "this node's share is as busy as the sender's".into(),
            ));
        }
        let limit = service.config.body_bytes_max;
        let too_large = || {
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the request body exceeds this service's limit of {limit} bytes"),
            )
        };
        let declared = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > limit) {
            return Err(too_large());
        }
        // The one deadline of this request: for room to buffer its body, for reading it,
        // and (in the service, or another node's) for the answer.
        let deadline = arrival + service.config.timeout;
        let _room = self
            .bodies
            .reserve(body_reservation(&request, limit), deadline.into())
            .await?;
        let (mut parts, body) = request.into_parts();
        // The body is read whole before the request is queued, so an instance is never held
        // by a slow upload; reading it is bounded in size and in time.
        let body = read_body(
            body,
            usize::try_from(limit).unwrap_or(usize::MAX),
            deadline.into(),
        )
        .await
        .map_err(|error| error.failure(too_large(), "the service's timeout"))?;
        if host.is_none() {
            parts
                .headers
                .insert(HOST, HeaderValue::from_static("localhost"));
        }
        if let Ok(value) = HeaderValue::from_str(request_id) {
            parts.headers.insert(REQUEST_ID, value);
        }
        strip_hop_by_hop(&mut parts.headers);
        // A node that forwarded the request already named the client (with its own
        // trusted proxies); its addition is kept as it is.
        if !forwarded {
            let trusted = self.config.trusted_proxies.contains(&peer.ip());
            set_forwarded(&mut parts.headers, peer.ip(), trusted);
        }
        let mut request = Request::from_parts(parts, Full::new(body));
        match service.locality() {
            Locality::Alone => {}
            // What this node's share cannot take now goes to a node of the others that
            // has room (each scales its own share by what reaches it); when none has, it
            // waits here.
            Locality::Here { others, .. } if !forwarded && !others.is_empty() => {
                // Offered only when the wait here is worth the hop (`margin`), marked with
                // this node's line less that margin (plus the one round every receiver
                // asks for): a receiver takes it only where the hop saves time.
                let margin = service.overflow_margin(self.peers.hop());
                if let Some(pressure) = service
                    .overflow_pressure()
                    .filter(|pressure| pressure.saturating_sub(ROUND) >= margin)
                {
                    let offering = service.offering();
                    let marked = pressure - margin + ROUND;
                    let offered = self
                        .peers
                        .offer(&others, &service.id(), request, marked, deadline, &|| {
                            offering.settle();
                        })
                        .await;
                    drop(offering);
                    match offered {
                        Ok(response) => {
                            service
                                .metrics
                                .overflowed
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            return Ok(response);
                        }
                        Err(Offer::Failed(error)) => return Err(crate::peers::failure(&error)),
                        Err(Offer::Declined(back)) => {
                            service.overflow_declined(pressure);
                            request = back;
                        }
                    }
                }
            }
            Locality::Here { .. } => {}
            Locality::Elsewhere(nodes) if !forwarded => {
                return self
                    .peers
                    .forward(&nodes, &service.id(), request, deadline)
                    .await
                    .map_err(|error| crate::peers::failure(&error));
            }
            // Sent here by a node whose placement is older or newer than this one's: the
            // sender tries another node (this one did nothing).
            Locality::Elsewhere(_) | Locality::Unplaced(_) if forwarded => {
                return Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    crate::peers::NOT_PLACED_HERE,
                    "this node does not run the service now".into(),
                ));
            }
            Locality::Elsewhere(_) | Locality::Unplaced(_) => {
                let why = match service.locality() {
                    Locality::Unplaced(why) => why,
                    _ => "its nodes are not known yet".into(),
                };
                return Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unplaced",
                    format!("no node of the cluster runs the service: {why}; retry shortly"),
                ));
            }
        }
        match service.handle(request, arrival).await {
            Ok(response) => Ok(response),
            Err(error @ ServiceError::QueueFull(_)) => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_full",
                error.to_string(),
            )),
            // Sent by another node: it tries the next one, since nothing was done here
            // (this node is stopping, or the revision is being replaced).
            Err(ServiceError::Unavailable) if forwarded => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                crate::peers::NOT_PLACED_HERE,
                "this node is stopping or replacing the service".into(),
            )),
            Err(error @ ServiceError::Unavailable) => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                error.to_string(),
            )),
            Err(error @ ServiceError::Timeout(_)) => {
                Err((StatusCode::GATEWAY_TIMEOUT, "timeout", error.to_string()))
            }
            Err(error @ ServiceError::GuestFailed(_)) => Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                "guest_failed",
                error.to_string(),
            )),
            Err(error @ ServiceError::BadGateway(_)) => {
                Err((StatusCode::BAD_GATEWAY, "bad_gateway", error.to_string()))
            }
            Err(error @ ServiceError::Failed(_)) => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "service_failed",
                error.to_string(),
            )),
        }
    }
}

pub(crate) enum BodyError {
    TimedOut,
    TooLarge,
    Broken(String),
}

impl BodyError {
    /// The answer to a request whose body could not be read: `too_large` over the limit,
    /// and a timeout that says how long the body had (`within`).
    pub(crate) fn failure(
        self,
        too_large: (StatusCode, &'static str, String),
        within: &str,
    ) -> (StatusCode, &'static str, String) {
        match self {
            BodyError::TimedOut => (
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("the request body did not arrive within {within}"),
            ),
            BodyError::TooLarge => too_large,
            BodyError::Broken(why) => (StatusCode::BAD_REQUEST, "bad_body", why),
        }
    }
}

/// Read a whole request body of at most `limit` bytes, arriving before `deadline`.
pub(crate) async fn read_body(
    body: Incoming,
    limit: usize,
    deadline: tokio::time::Instant,
) -> Result<Bytes, BodyError> {
    match tokio::time::timeout_at(deadline, Limited::new(body, limit).collect()).await {
        Err(_elapsed) => Err(BodyError::TimedOut),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
            Err(BodyError::TooLarge)
        }
        Ok(Err(error)) => Err(BodyError::Broken(format!(
            "the request body could not be read: {error}"
        ))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// The guards of an HTTP/1.1 listener: how many connections at once, how long and how
/// large a request head may be, and how long requests get at shutdown.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub connections_max: usize,
    pub header_read_timeout: Duration,
    pub header_bytes_max: usize,
    pub shutdown_grace: Duration,
}

/// Accept HTTP/1.1 connections until `shutdown` fires, each served by the service
/// `service_for` makes for its peer, under `limits`; then stop accepting and give open
/// connections `shutdown_grace` to finish. With `tls`, each connection's handshake must
/// finish within `header_read_timeout`. The gateway, the control API and S3 all listen
/// through this.
pub async fn serve_connections<S, B>(
    listener: TcpListener,
    limits: ConnectionLimits,
    tls: Option<crate::tls::TlsAcceptor>,
    shutdown: CancellationToken,
    mut service_for: impl FnMut(SocketAddr) -> S,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.connections_max.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.header_bytes_max)
        .keep_alive(true);
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        _ = stream.set_nodelay(true);
        let service = service_for(peer);
        match &tls {
            None => {
                let connection =
                    graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                connections.spawn(async move {
                    // Errors here are clients going away or breaking the protocol; hyper
                    // has already answered what could be answered.
                    _ = connection.await;
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let (acceptor, watcher, http) =
                    (acceptor.clone(), graceful.watcher(), http.clone());
                let deadline = limits.header_read_timeout;
                connections.spawn(async move {
                    match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            _ = watcher
                                .watch(http.serve_connection(TokioIo::new(stream), service))
                                .await;
                        }
                        // A client that offers only old protocols or weak ciphers, speaks
                        // plain HTTP to a TLS port, or stalls: closed.
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?limits.shutdown_grace, "connections still open after the shutdown grace period; closing them");
    }
    connections.shutdown().await;
}

/// Who sent a routed request to [`Gateway::forward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Client,
    /// Another node, for a service it does not run (or runs no longer).
    Node,
    /// Another node holding a share, whose share could not take it now; its
    /// [`Service::pressure`].
    Overflow {
        pressure: u64,
    },
}

/// A forwarded request this node does not serve: the sending node tries another (nothing
/// was done here).
fn refuse_forwarded(request_id: &str, message: &str) -> Response<Body> {
    let mut response = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        crate::peers::NOT_PLACED_HERE,
        message,
        request_id,
    );
    response
        .headers_mut()
        .insert(crate::peers::NOT_PLACED_HERE, HeaderValue::from_static("1"));
    response
}

/// Headers that concern one connection only (RFC 9110 §7.6.1): never forwarded to a service.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Remove hop-by-hop headers, and every header the client's `Connection` names.
fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in named
        .iter()
        .map(String::as_str)
        .chain(HOP_BY_HOP.iter().copied())
    {
        headers.remove(name);
    }
}

/// Say who the client is: `X-Forwarded-For` and `Forwarded` name the connection's address.
/// A trusted proxy's values are kept and the address appended; anyone else's are replaced.
fn set_forwarded(headers: &mut http::HeaderMap, peer: IpAddr, trusted: bool) {
    let joined = |name: &str| -> Option<String> {
        let values: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    };
    let node = match peer {
        IpAddr::V4(ip) => format!("for={ip}"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    let (forwarded_for, forwarded) = match (trusted, joined("x-forwarded-for"), joined("forwarded"))
    {
        (true, xff, fwd) => (
            xff.map_or_else(|| peer.to_string(), |v| format!("{v}, {peer}")),
            fwd.map_or_else(|| node.clone(), |v| format!("{v}, {node}")),
        ),
        (false, _, _) => (peer.to_string(), node),
    };
    headers.remove("x-forwarded-for");
    headers.remove("forwarded");
    if let (Ok(xff), Ok(fwd)) = (
        HeaderValue::from_str(&forwarded_for),
        HeaderValue::from_str(&forwarded),
    ) {
        headers.insert("x-forwarded-for", xff);
        headers.insert("forwarded", fwd);
    }
}

impl GatewayConfig {
    fn normalised(mut self) -> Self {
        // hyper refuses read buffers under 8 KiB.
        self.header_bytes_max = self.header_bytes_max.max(8192);
        self.connections_max = self.connections_max.max(1);
        self
    }
}

fn set_request_id(response: &mut Response<Body>, request_id: &str) {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
    request_id: &str,
) -> Response<Body> {
    let body = serde_json::json!({
        "error": { "status": status.as_u16(), "code": code, "message": message, "request_id": request_id }
    });
    let mut response = json_response(status, &body);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}
