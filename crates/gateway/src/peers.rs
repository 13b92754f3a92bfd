//! Forwarding to other nodes' gateways, for services placed elsewhere in a cluster.
//!
//! The node tells its gateway where the other nodes' gateways are ([`Peers::set`], after
//! every heartbeat) and, for each service, which nodes run it
//! ([`crate::Service::set_locality`]). A request for a service that runs only elsewhere is
//! sent whole (its body was read within the service's limit) to one of those nodes, in
//! turn, marked with [`FORWARDED`] (the sending node), [`FORWARD_SERVICE`] (`app/service`)
//! and [`FORWARD_KEY`] (the cluster's forwarding key, shared through JetStream). The
//! receiving node checks the key ([`Peers::accept`]); with it, it dispatches by the service
//! named (not by Host and path, which may route elsewhere there, or nowhere for a trigger's
//! delivery), trusts the sender's `X-Forwarded-For`, and serves the request itself or
//! refuses it (`503` with the header [`NOT_PLACED_HERE`], when placement moved meanwhile),
//! never forwards it again. Without a valid key the three headers are removed and the
//! request is an ordinary client's: a client cannot pass for a node, and the key never
//! reaches a service. A service's own answer never carries [`NOT_PLACED_HERE`] out of its
//! gateway (removed there), so a refusal is always a gateway's, and a service cannot make
//! its caller's node send a request twice.
//!
//! Overflow: a node holding a share of a service serves its requests itself while its
//! share has room. When none of its instances has room and its share is at its most
//! ([`crate::Service::saturated`]), and the wait here is longer than the hop to another
//! node is worth ([`crate::Service::overflow_margin`] with [`Peers::hop`]), a request is
//! offered to the other nodes holding a share ([`Peers::offer`]), marked [`OVERFLOW`] with
//! this node's line ([`crate::Service::pressure`]) less that margin: only to nodes that
//! announced themselves lately and have not failed lately, each given 100 ms to connect.
//! A node without a ready instance with room, and without a line a whole round of its
//! share shorter, refuses it before reading its body, as one that does not run it. When
//! every one refuses, the request waits in this node's queue (join the shortest line,
//! judged as each request arrives), and for a moment the node offers again only once its
//! line is longer ([`crate::Service::overflow_pressure`]). So demand entering at one node
//! reaches the instances of every node's share, and each node's scaler sizes its share by
//! what reaches it. An overflowed request is never offered again.
//!
//! Failures: a node that cannot be connected to (dead, cut off), or that refuses with
//! `not_placed_here`, had nothing done: the next node is tried; when all have failed so,
//! the request waits [`RETRY_PAUSE`] and tries them again, until its one deadline. A connection that breaks after the request was sent may have been served:
//! retried on another node only for idempotent methods (RFC 9110 §9.2.2), else answered
//! `502` saying so. A node that failed is tried after the others for [`SUSPECT_FOR`]: a
//! paused node accepts connections (the kernel does) but never answers, and only the
//! request's deadline tells.
//!
//! Connections: HTTP/1.1, kept open and reused (at most [`IDLE_PER_PEER`] idle per peer);
//! TLS when the peer's gateway speaks it, trusting the CA certificates the nodes announce
//! to the cluster (and nothing else).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::service::{Body, BoxError};

/// The header marking a request forwarded by another node's gateway (its name).
pub const FORWARDED: &str = "maru-forwarded-by";
/// The header naming the service (`app/service`) a forwarded request is for.
pub const FORWARD_SERVICE: &str = "maru-forward-service";
/// The header carrying the cluster's forwarding key, which only nodes know.
pub const FORWARD_KEY: &str = "maru-forward-key";
/// The header marking a forwarded request as overflow ([`Peers::offer`]), with the
/// sender's line less what the hop is worth: the receiving node serves it only if a ready
/// instance has room or its own line is a round shorter.
pub const OVERFLOW: &str = "maru-overflow";
/// How recent a node's last announcement must be (by this node's clock) for it to be
/// offered overflow: two and a half heartbeats. A paused or cut-off node stops announcing;
/// overflow, unlike a request only it can serve, is not worth waiting on it for.
pub const OVERFLOW_FRESH: std::time::Duration = std::time::Duration::from_millis(2500);
/// How long an offer waits for a connection to a node: overflow is served here rather than
/// wait on a node that does not answer.
pub const OVERFLOW_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(100);
/// What a hop to another node is taken to cost before a refused offer has measured it.
pub const HOP_ASSUMED: std::time::Duration = std::time::Duration::from_millis(1);
/// How long a node must have had an overflowed request without refusing it for the
/// sender to count it as taken (a refusal comes back within a round trip).
pub const OVERFLOW_GRACE: std::time::Duration = std::time::Duration::from_millis(20);
/// The error code a node answers a forwarded request with when it does not run the service.
pub const NOT_PLACED_HERE: &str = "not_placed_here";
/// The pause between rounds when every node failed without doing anything.
pub const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);
/// Idle connections kept per peer.
pub const IDLE_PER_PEER: usize = 32;
/// How long a peer that failed (no connection, broken, no answer by the deadline) is tried
/// only after the others.
pub const SUSPECT_FOR: std::time::Duration = std::time::Duration::from_secs(5);
/// How long connecting to a peer may take (TCP and TLS) before the next one is tried: a
/// node cut off by a partition does not refuse, it just never answers.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Another node's gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddress {
    /// `http://HOST:PORT` or `https://HOST:PORT`.
    pub url: String,
    /// The PEM of the CA that signed its TLS certificate, if it speaks TLS.
    pub ca_pem: Option<String>,
}

/// Why a forwarded request got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    #[error("no node that runs the service can be reached ({0})")]
    NoPeer(String),
    #[error(
        "node {node} failed while handling the request ({reason}); not retried elsewhere because {method} is not idempotent"
    )]
    BrokenMidway {
        node: String,
        method: String,
        reason: String,
    },
    #[error("the request did not complete within the service's timeout")]
    Timeout,
}

/// How one round of tries ended without an answer.
enum Round {
    /// Every node refused or could not be reached: nothing was done, trying again is safe.
    NothingDone(String),
    /// The request may have been served, or its deadline passed: answered as it is.
    Failed(ForwardError),
}

#[derive(Default)]
struct Book {
    peers: BTreeMap<String, PeerAddress>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// A request another node forwarded, with the cluster's key ([`Peers::accept`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// The node that sent it.
    pub by: String,
    /// The service it is for: `app/service`.
    pub service: String,
    /// Offered as overflow, with the sender's [`crate::Service::pressure`] less what the
    /// hop is worth: served only where the line is shorter, else refused (the sender serves
    /// it itself).
    pub overflow: Option<u64>,
}

/// Why [`Peers::offer`] did not get an answer from another node.
#[derive(Debug)]
pub enum Offer {
    /// No node took it and nothing was done: the request, as given, to serve here.
    Declined(Request<Full<Bytes>>),
    /// A node may have done something (timed out, broke after sending): answer this.
    Failed(ForwardError),
}

/// The other nodes' gateways, and kept-open connections to them.
#[derive(Default)]
pub struct Peers {
    this: RwLock<String>,
    /// The cluster's forwarding key; none alone (then no request counts as forwarded).
    key: RwLock<Option<Arc<str>>>,
    book: RwLock<Arc<Book>>,
    idle: Mutex<BTreeMap<String, Vec<SendRequest<Full<Bytes>>>>>,
    next: AtomicUsize,
    /// Peers that failed recently, until when they are tried last.
    suspect: Mutex<BTreeMap<String, Instant>>,
    /// When each node last announced itself (unix ms, its clock), for overflow.
    seen: RwLock<BTreeMap<String, u64>>,
    /// How long a refused offer took, there and back, microseconds, smoothed (0: none yet).
    hop_us: AtomicU64,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").finish_non_exhaustive()
    }
}

impl Peers {
    /// What a hop to another node costs: the smoothed round trip of offers refused (nothing
    /// done there, so all of it is the hop), or [`HOP_ASSUMED`] before any was.
    pub fn hop(&self) -> std::time::Duration {
        match self.hop_us.load(Ordering::Relaxed) {
            0 => HOP_ASSUMED,
            us => std::time::Duration::from_micros(us),
        }
    }

    /// When each node last announced itself (unix ms): only those seen within
    /// [`OVERFLOW_FRESH`] are offered overflow.
    pub fn set_seen(&self, seen: BTreeMap<String, u64>) {
        *self.seen.write().expect("never poisoned") = seen;
    }

    /// This node's name and the other nodes' gateways, replacing what was known. Connections
    /// to nodes no longer listed are dropped.
    pub fn set(&self, this: &str, peers: BTreeMap<String, PeerAddress>) {
        this.clone_into(&mut self.this.write().expect("never poisoned"));
        let current = self.book.read().expect("never poisoned").clone();
        if current.peers == peers {
            return;
        }
        let cas: Vec<&str> = peers.values().filter_map(|p| p.ca_pem.as_deref()).collect();
        let tls = if cas.is_empty() {
            None
        } else {
            let mut roots = rustls::RootCertStore::empty();
            for pem in cas {
                for certificate in CertificateDer::pem_slice_iter(pem.as_bytes()).flatten() {
                    if let Err(error) = roots.add(certificate) {
                        tracing::warn!(%error, "cluster: a node's announced CA certificate is not usable");
                    }
                }
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            match rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
            {
                Ok(builder) => Some(Arc::new(
                    builder.with_root_certificates(roots).with_no_client_auth(),
                )),
                Err(error) => {
                    tracing::error!(%error, "cluster: no TLS client for forwarding");
                    None
                }
            }
        };
        self.idle
            .lock()
            .expect("never poisoned")
            .retain(|name, _| peers.get(name) == current.peers.get(name));
        *self.book.write().expect("never poisoned") = Arc::new(Book { peers, tls });
    }

    /// This node's name in the cluster (empty alone).
    pub fn this(&self) -> String {
        self.this.read().expect("never poisoned").clone()
    }

    /// The cluster's forwarding key: sent with every forwarded request, and required of
    /// every request that claims to be forwarded.
    pub fn set_key(&self, key: &str) {
        assert!(key.len() >= 32, "a forwarding key has at least 128 bits");
        *self.key.write().expect("never poisoned") = Some(Arc::from(key));
    }

    /// Remove the forwarding headers from a request arriving at this gateway, and say whether
    /// another node sent it: only if it carries the cluster's key and names a service.
    pub fn accept(&self, headers: &mut http::HeaderMap) -> Option<Forwarded> {
        let by = headers.remove(FORWARDED);
        let service = headers.remove(FORWARD_SERVICE);
        // Unreadable: as if the sender's line were empty (taken only with room to spare).
        let overflow = headers.remove(OVERFLOW).map(|value| {
            value
                .to_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        });
        let given = headers.remove(FORWARD_KEY)?;
        let key = self.key.read().expect("never poisoned").clone()?;
        if !same(given.as_bytes(), key.as_bytes()) {
            return None;
        }
        Some(Forwarded {
            by: by?.to_str().ok()?.to_string(),
            service: service?.to_str().ok()?.to_string(),
            overflow,
        })
    }

    /// Offer `request` to one of `nodes` as overflow: what this node's share cannot take
    /// now, with this node's `pressure` ([`crate::Service::pressure`]). One try of each
    /// node that announced itself lately ([`OVERFLOW_FRESH`]) and has not failed lately,
    /// marked [`OVERFLOW`], connecting within [`OVERFLOW_CONNECT_TIMEOUT`]: a node without
    /// a much shorter line refuses it, as one that does not run the service. When none
    /// takes it and nothing was done, the request comes back to be served here. `taken` is
    /// called once a node has had it for [`OVERFLOW_GRACE`] without refusing.
    pub async fn offer(
        &self,
        nodes: &[String],
        service: &str,
        request: Request<Full<Bytes>>,
        pressure: u64,
        deadline: Instant,
        taken: &(dyn Fn() + Sync),
    ) -> Result<Response<Body>, Offer> {
        let healthy: Vec<String> = {
            let now = Instant::now();
            let now_ms = unix_ms();
            let fresh = u64::try_from(OVERFLOW_FRESH.as_millis()).unwrap_or(u64::MAX);
            let suspect = self.suspect.lock().expect("never poisoned");
            let seen = self.seen.read().expect("never poisoned");
            nodes
                .iter()
                .filter(|node| suspect.get(*node).is_none_or(|until| *until <= now))
                .filter(|node| {
                    seen.get(*node)
                        .is_some_and(|at| now_ms.saturating_sub(*at) < fresh)
                })
                .cloned()
                .collect()
        };
        if healthy.is_empty() {
            return Err(Offer::Declined(request));
        }
        let key = self.key.read().expect("never poisoned").clone();
        let Some(key) = key else {
            return Err(Offer::Declined(request));
        };
        let (parts, body) = request.into_parts();
        let mut marked = parts.clone();
        marked.headers.insert(OVERFLOW, HeaderValue::from(pressure));
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if self.mark(&mut marked, service, &key).is_err() {
            // Not sendable (a name unfit for a header): served here.
            return Err(Offer::Declined(Request::from_parts(parts, Full::new(body))));
        }
        let idempotent = idempotent(&marked.method);
        let how = Try {
            connect_timeout: OVERFLOW_CONNECT_TIMEOUT,
            taken: Some(taken),
        };
        match self
            .round(&healthy, &marked, &body, idempotent, deadline, how)
            .await
        {
            Ok(response) => Ok(response),
            Err(Round::Failed(error)) => Err(Offer::Failed(error)),
            Err(Round::NothingDone(_)) => {
                Err(Offer::Declined(Request::from_parts(parts, Full::new(body))))
            }
        }
    }

    /// Add the headers that make `parts` a request forwarded by this node for `service`.
    fn mark(
        &self,
        parts: &mut http::request::Parts,
        service: &str,
        key: &str,
    ) -> Result<(), ForwardError> {
        for (name, value) in [
            (FORWARDED, &*self.this()),
            (FORWARD_SERVICE, service),
            (FORWARD_KEY, key),
        ] {
            let value = HeaderValue::from_str(value).map_err(|_| {
                ForwardError::NoPeer(format!("`{value}` cannot be sent in the {name} header"))
            })?;
            parts.headers.insert(name, value);
        }
        Ok(())
    }

    /// Send `request` to one of `nodes` (module docs), before `deadline`. While every one of
    /// them fails without having done anything (restarting, not yet known at its new
    /// address, placement moving), the request waits and tries again, until its deadline.
    pub async fn forward(
        &self,
        nodes: &[String],
        service: &str,
        request: Request<Full<Bytes>>,
        deadline: Instant,
    ) -> Result<Response<Body>, ForwardError> {
        let idempotent = idempotent(request.method());
        let (mut parts, body) = request.into_parts();
        let key = self.key.read().expect("never poisoned").clone();
        let Some(key) = key else {
            return Err(ForwardError::NoPeer(
                "this node has no forwarding key (it is not in a cluster)".into(),
            ));
        };
        self.mark(&mut parts, service, &key)?;
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        loop {
            let failures = match self
                .round(nodes, &parts, &body, idempotent, deadline, Try::FORWARD)
                .await
            {
                Ok(response) => return Ok(response),
                Err(Round::Failed(error)) => return Err(error),
                Err(Round::NothingDone(failures)) => failures,
            };
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(ForwardError::NoPeer(failures));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// One try of each node that runs the service, in turn.
    async fn round(
        &self,
        nodes: &[String],
        parts: &http::request::Parts,
        body: &Bytes,
        idempotent: bool,
        deadline: Instant,
        how: Try<'_>,
    ) -> Result<Response<Body>, Round> {
        let Try {
            connect_timeout,
            taken,
        } = how;
        let book = self.book.read().expect("never poisoned").clone();
        let this = self.this();
        let mut reachable: Vec<(&String, &PeerAddress)> = nodes
            .iter()
            .filter(|n| **n != this)
            .filter_map(|n| book.peers.get(n).map(|p| (n, p)))
            .collect();
        if reachable.is_empty() {
            return Err(Round::NothingDone(format!(
                "it runs on {}, none of which is up",
                nodes.join(", ")
            )));
        }
        // In turn, those that failed recently last.
        let start = self.next.fetch_add(1, Ordering::Relaxed) % reachable.len();
        reachable.rotate_left(start);
        let now = Instant::now();
        {
            let mut suspect = self.suspect.lock().expect("never poisoned");
            suspect.retain(|_, until| *until > now);
            reachable.sort_by_key(|(name, _)| suspect.contains_key(*name));
        }
        let mut failures = Vec::new();
        for (name, peer) in reachable {
            let mut attempt: Request<Full<Bytes>> =
                Request::from_parts(parts.clone(), Full::new(body.clone()));
            let Ok(uri) = format!(
                "{}{}",
                peer.url.trim_end_matches('/'),
                parts.uri.path_and_query().map_or("/", |p| p.as_str())
            )
            .parse::<http::Uri>() else {
                failures.push(format!("{name}: bad address {}", peer.url));
                continue;
            };
            // HTTP/1.1 on the wire: the request line carries the path, Host the route's host.
            *attempt.uri_mut() = uri.path_and_query().map_or_else(
                || http::Uri::from_static("/"),
                |p| p.as_str().parse().unwrap_or_default(),
            );
            // A kept-open connection the peer closed meanwhile hands the request back
            // unsent: tried once more on a new connection.
            let mut fresh = false;
            // When the request went out on its connection: a refusal's round trip from then
            // is the hop's cost.
            let mut sending = Instant::now();
            let sent = loop {
                let connect_by = deadline.min(Instant::now() + connect_timeout);
                let connected = tokio::time::timeout_at(
                    connect_by.into(),
                    self.connection(name, &uri, &book, fresh),
                )
                .await;
                let mut sender = match connected {
                    Err(_) if Instant::now() >= deadline => break Sent::TimedOut,
                    Err(_) => {
                        break Sent::Unsent(format!("no connection within {connect_timeout:?}"));
                    }
                    Ok(Err(reason)) => break Sent::Unsent(reason),
                    Ok(Ok(sender)) => sender,
                };
                sending = Instant::now();
                let answer = tokio::time::timeout_at(deadline.into(), async {
                    let mut answer = std::pin::pin!(sender.try_send_request(attempt));
                    if let Some(taken) = taken {
                        tokio::select! {
                            answer = &mut answer => return answer,
                            () = tokio::time::sleep(OVERFLOW_GRACE) => taken(),
                        }
                    }
                    answer.await
                })
                .await;
                match answer {
                    Err(_) => break Sent::TimedOut,
                    Ok(Ok(response)) => break Sent::Answered(sender, response),
                    Ok(Err(mut error)) => match error.take_message() {
                        Some(unsent) if !fresh => {
                            attempt = unsent;
                            fresh = true;
                        }
                        Some(_) => break Sent::Unsent(error.into_error().to_string()),
                        None => break Sent::Broken(error.into_error().to_string()),
                    },
                }
            };
            match sent {
                Sent::TimedOut => {
                    // No answer by the deadline: paused, overloaded or cut off mid-way.
                    self.suspect(name);
                    return Err(Round::Failed(ForwardError::Timeout));
                }
                Sent::Unsent(reason) => {
                    self.suspect(name);
                    failures.push(format!("{name}: {reason}"));
                }
                Sent::Answered(sender, response) => {
                    let refused = response.status() == StatusCode::SERVICE_UNAVAILABLE
                        && response.headers().get(NOT_PLACED_HERE).is_some();
                    self.keep(name, sender);
                    if refused && taken.is_some() {
                        crate::metrics::smooth_into(&self.hop_us, sending.elapsed());
                    }
                    if refused {
                        failures.push(format!("{name}: does not run it now"));
                        continue; // it did nothing
                    }
                    let (parts, body) = response.into_parts();
                    let body = Deadlined {
                        body,
                        deadline: Box::pin(tokio::time::sleep_until(deadline.into())),
                    };
                    return Ok(Response::from_parts(parts, body.boxed_unsync()));
                }
                Sent::Broken(reason) if idempotent => {
                    self.suspect(name);
                    failures.push(format!("{name}: {reason}"));
                }
                Sent::Broken(reason) => {
                    self.suspect(name);
                    return Err(Round::Failed(ForwardError::BrokenMidway {
                        node: name.clone(),
                        method: parts.method.to_string(),
                        reason,
                    }));
                }
            }
        }
        Err(Round::NothingDone(failures.join("; ")))
    }

    /// An idle kept-open connection to `name` (unless `fresh`), or a new one.
    async fn connection(
        &self,
        name: &str,
        uri: &http::Uri,
        book: &Book,
        fresh: bool,
    ) -> Result<SendRequest<Full<Bytes>>, String> {
        if !fresh {
            loop {
                let idle = self
                    .idle
                    .lock()
                    .expect("never poisoned")
                    .get_mut(name)
                    .and_then(Vec::pop);
                match idle {
                    Some(sender) if sender.is_ready() => return Ok(sender),
                    Some(_) => {} // closed or still busy with a body: dropped
                    None => break,
                }
            }
        }
        let host = uri.host().ok_or("the address has no host")?.to_string();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let stream = tokio::net::TcpStream::connect((bare.as_str(), port))
            .await
            .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
        _ = stream.set_nodelay(true);
        if https {
            let config = book
                .tls
                .clone()
                .ok_or("it speaks TLS but announced no CA certificate")?;
            let server_name = ServerName::try_from(bare.clone())
                .map_err(|e| format!("{host} is not a TLS server name: {e}"))?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, stream)
                .await
                .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
            handshake(TokioIo::new(stream)).await
        } else {
            handshake(TokioIo::new(stream)).await
        }
    }

    fn suspect(&self, name: &str) {
        let mut suspect = self.suspect.lock().expect("never poisoned");
        // Bounded by the peers known: names come from the node list, not from clients.
        suspect.insert(name.to_string(), Instant::now() + SUSPECT_FOR);
    }

    fn keep(&self, name: &str, sender: SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.lock().expect("never poisoned");
        let kept = idle.entry(name.to_string()).or_default();
        if kept.len() < IDLE_PER_PEER {
            kept.push(sender);
        }
    }
}

/// How sending a request to one peer went.
enum Sent {
    /// Nothing was sent: no connection, or the connection handed the request back.
    Unsent(String),
    /// No answer by the request's deadline.
    TimedOut,
    Answered(SendRequest<Full<Bytes>>, Response<hyper::body::Incoming>),
    /// The connection broke after the request was (perhaps) sent.
    Broken(String),
}

/// A peer's answer body, cut off at the request's deadline: a peer that stops sending
/// midway does not hold the client (or a trigger) beyond it.
struct Deadlined {
    body: hyper::body::Incoming,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl hyper::body::Body for Deadlined {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        use std::future::Future as _;
        use std::task::Poll;
        let this = self.get_mut();
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(|e| -> BoxError { Box::new(e) })));
        }
        match this.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(
                "the node's answer did not complete within the service's timeout".into(),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Whether `a` and `b` are equal, in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

async fn handshake<T>(io: TokioIo<T>) -> Result<SendRequest<Full<Bytes>>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "cluster: a forwarding connection ended");
        }
    });
    Ok(sender)
}

/// How a forwarding failure is answered.
pub(crate) fn failure(error: &ForwardError) -> (StatusCode, &'static str, String) {
    match error {
        ForwardError::NoPeer(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no_node",
            error.to_string(),
        ),
        ForwardError::BrokenMidway { .. } => {
            (StatusCode::BAD_GATEWAY, "node_failed", error.to_string())
        }
        ForwardError::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout", error.to_string()),
    }
}

/// How a round tries the nodes: forwarding, or offering overflow.
#[derive(Clone, Copy)]
struct Try<'a> {
    connect_timeout: std::time::Duration,
    /// Called once a node has had the request for [`OVERFLOW_GRACE`] without answering.
    taken: Option<&'a (dyn Fn() + Sync)>,
}

impl Try<'_> {
    const FORWARD: Try<'static> = Try {
        connect_timeout: CONNECT_TIMEOUT,
        taken: None,
    };
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whether a request with this method may be sent again after a connection broke mid-way
/// (RFC 9110 §9.2.2).
fn idempotent(method: &http::Method) -> bool {
    matches!(
        *method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::PUT
            | http::Method::DELETE
            | http::Method::TRACE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef";

    fn forwarded_headers(key: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(FORWARDED, HeaderValue::from_static("node-b"));
        headers.insert(FORWARD_SERVICE, HeaderValue::from_static("shop/web"));
        headers.insert(
            FORWARD_KEY,
            HeaderValue::from_str(key).expect("a key is a header value"),
        );
        headers.insert(OVERFLOW, HeaderValue::from_static("2500"));
        headers.insert("x-other", HeaderValue::from_static("kept"));
        headers
    }

    fn stripped(headers: &http::HeaderMap) -> bool {
        [FORWARDED, FORWARD_SERVICE, FORWARD_KEY, OVERFLOW]
            .iter()
            .all(|name| headers.get(*name).is_none())
            && headers.get("x-other").is_some()
    }

    #[test]
    fn a_request_with_the_key_is_forwarded_and_loses_the_headers() {
        let peers = Peers::default();
        peers.set_key(KEY);
        let mut headers = forwarded_headers(KEY);
        assert_eq!(
            peers.accept(&mut headers),
            Some(Forwarded {
                by: "node-b".into(),
                service: "shop/web".into(),
                overflow: Some(2500),
            })
        );
        assert!(stripped(&headers));
        // Without the overflow mark: forwarded for a service the sender does not run; an
        // unreadable mark counts as an empty line at the sender.
        let mut headers = forwarded_headers(KEY);
        headers.remove(OVERFLOW);
        assert_eq!(peers.accept(&mut headers).map(|f| f.overflow), Some(None));
        let mut headers = forwarded_headers(KEY);
        headers.insert(OVERFLOW, HeaderValue::from_static("lots"));
        assert_eq!(
            peers.accept(&mut headers).map(|f| f.overflow),
            Some(Some(0))
        );
        assert!(stripped(&headers));
    }

    /// Offer `request` to node-b, with a pressure of 4000 and 5 s to answer.
    async fn offer_to_b(
        peers: &Peers,
        request: Request<Full<Bytes>>,
        taken: &(dyn Fn() + Sync),
    ) -> Result<Response<Body>, Offer> {
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        peers
            .offer(
                &["node-b".into()],
                "shop/orders",
                request,
                4000,
                deadline,
                taken,
            )
            .await
    }

    #[tokio::test]
    async fn an_offer_nobody_can_take_comes_back_unchanged() {
        let request = || {
            Request::builder()
                .method("POST")
                .uri("/orders?page=2")
                .header("x-client", "kept")
                .body(Full::new(Bytes::from_static(b"the order")))
                .expect("request")
        };
        let back = |offered: Result<Response<Body>, Offer>| match offered {
            Err(Offer::Declined(back)) => back,
            Err(Offer::Failed(error)) => panic!("failed: {error}"),
            Ok(_) => panic!("answered"),
        };
        // Alone (no key), no other node known, and only a node that failed lately.
        let alone = Peers::default();
        let mut given = vec![back(offer_to_b(&alone, request(), &|| {}).await)];
        let peers = Peers::default();
        peers.set_key(KEY);
        given.push(back(offer_to_b(&peers, request(), &|| {}).await));
        peers.suspect("node-b");
        given.push(back(offer_to_b(&peers, request(), &|| {}).await));
        for back in given {
            let (parts, body) = back.into_parts();
            assert_eq!(parts.method, http::Method::POST);
            assert_eq!(parts.uri, "/orders?page=2");
            assert_eq!(parts.headers.len(), 1, "{:?}", parts.headers);
            assert_eq!(parts.headers["x-client"], "kept");
            let body = body.collect().await.expect("body").to_bytes();
            assert_eq!(&body[..], b"the order");
        }
    }

    #[test]
    fn a_client_cannot_pass_for_a_node() {
        let peers = Peers::default();
        peers.set_key(KEY);
        // A wrong key, a key of another length, none at all: an ordinary client's request,
        // with the claims removed before the service sees them.
        let wrong = KEY.replace('0', "1");
        for key in [wrong.as_str(), "0123", ""] {
            let mut headers = forwarded_headers(key);
            assert_eq!(peers.accept(&mut headers), None, "key {key:?}");
            assert!(stripped(&headers));
        }
        let mut headers = forwarded_headers(KEY);
        headers.remove(FORWARD_KEY);
        assert_eq!(peers.accept(&mut headers), None);
        assert!(stripped(&headers));
        // The right key without naming a service is not a forwarded request either.
        let mut headers = forwarded_headers(KEY);
        headers.remove(FORWARD_SERVICE);
        assert_eq!(peers.accept(&mut headers), None);
        assert!(stripped(&headers));
    }

    #[test]
    fn a_node_alone_accepts_no_forwarded_request() {
        let peers = Peers::default();
        let mut headers = forwarded_headers(KEY);
        assert_eq!(peers.accept(&mut headers), None);
        assert!(stripped(&headers));
    }

    #[tokio::test]
    async fn a_node_without_the_key_forwards_nothing() {
        let peers = Peers::default();
        let request = Request::new(Full::new(Bytes::new()));
        let deadline = Instant::now() + std::time::Duration::from_secs(1);
        let result = peers
            .forward(&["node-b".to_string()], "shop/web", request, deadline)
            .await;
        let error = result.err();
        assert!(matches!(error, Some(ForwardError::NoPeer(_))), "{error:?}");
    }

    #[test]
    fn keys_compare_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
        assert!(same(b"", b""));
    }

    /// A peer on loopback that reads one request head per connection, hands it to the
    /// test, and answers with `response` after `delay`.
    async fn fake_peer(
        response: &'static str,
        delay: std::time::Duration,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let (heads, received) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let heads = heads.clone();
                tokio::spawn(async move {
                    let mut read = Vec::new();
                    let mut buffer = [0u8; 4096];
                    while !read.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => read.extend_from_slice(&buffer[..n]),
                        }
                    }
                    _ = heads.send(String::from_utf8_lossy(&read).into_owned());
                    tokio::time::sleep(delay).await;
                    _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        (format!("http://{address}"), received)
    }

    fn peers_with(url: String, seen_ms_ago: u64) -> Peers {
        let peers = Peers::default();
        peers.set_key(KEY);
        peers.set(
            "node-a",
            [("node-b".to_string(), PeerAddress { url, ca_pem: None })].into(),
        );
        peers.set_seen([("node-b".to_string(), unix_ms() - seen_ms_ago)].into());
        peers
    }

    fn order() -> Request<Full<Bytes>> {
        Request::builder()
            .method("GET")
            .uri("/orders")
            .header(http::header::HOST, "shop.example")
            .body(Full::new(Bytes::new()))
            .expect("request")
    }

    #[tokio::test]
    async fn an_offer_is_marked_refused_offers_come_back_and_taken_ones_are_counted_as_taken() {
        let taken = std::sync::atomic::AtomicUsize::new(0);
        let count = || {
            taken.fetch_add(1, Ordering::Relaxed);
        };
        // Refused at once (the peer's line is not shorter): back unchanged, not taken.
        let (url, mut heads) = fake_peer(
            "HTTP/1.1 503 Service Unavailable\r\nnot_placed_here: 1\r\ncontent-length: 0\r\n\r\n",
            std::time::Duration::ZERO,
        )
        .await;
        let peers = peers_with(url, 0);
        match offer_to_b(&peers, order(), &count).await {
            Err(Offer::Declined(back)) => {
                assert!(back.headers().get(OVERFLOW).is_none());
                assert!(back.headers().get(FORWARD_KEY).is_none());
            }
            other => panic!("not declined: {:?}", other.map(|r| r.status())),
        }
        let head = heads
            .recv()
            .await
            .expect("the peer saw the offer")
            .to_lowercase();
        assert!(head.contains("maru-overflow: 4000"), "{head}");
        assert!(head.contains("maru-forward-service: shop/orders"), "{head}");
        assert!(head.contains(&format!("maru-forward-key: {KEY}")), "{head}");
        assert_eq!(taken.load(Ordering::Relaxed), 0);
        // The refusal measured what a hop costs.
        assert_eq!(Peers::default().hop(), HOP_ASSUMED);
        assert!(peers.hop_us.load(Ordering::Relaxed) > 0);
        assert!(peers.hop() < std::time::Duration::from_secs(5));
        // Taken: answered after a while, counted as taken once the grace passed.
        let (url, _heads) = fake_peer(
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            OVERFLOW_GRACE * 3,
        )
        .await;
        let peers = peers_with(url, 0);
        let answered = offer_to_b(&peers, order(), &count)
            .await
            .map_err(|_| "not answered")
            .expect("answered");
        assert_eq!(answered.status(), StatusCode::OK);
        assert_eq!(taken.load(Ordering::Relaxed), 1);
        // A node not heard from for longer than OVERFLOW_FRESH is not offered anything.
        let (url, mut heads) =
            fake_peer("HTTP/1.1 200 OK\r\n\r\n", std::time::Duration::ZERO).await;
        let stale = u64::try_from(OVERFLOW_FRESH.as_millis()).expect("ms") + 1000;
        let peers = peers_with(url, stale);
        assert!(matches!(
            offer_to_b(&peers, order(), &count).await,
            Err(Offer::Declined(_))
        ));
        assert!(
            heads.try_recv().is_err(),
            "a stale node was offered overflow"
        );
    }
}
