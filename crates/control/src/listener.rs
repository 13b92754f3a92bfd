//! The control API's listener: the gateway's guards (`gateway::serve_connections`: a
//! connection cap, a deadline for the request head, a bound on its size), so that idle or
//! slow clients can never take the API away from the operator.

use std::time::Duration;

use gateway::ConnectionLimits;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::Service as _;

/// The control listener's limits by default; `header_read_timeout` and `shutdown_grace`
/// follow the node's settings.
pub fn default_limits() -> ConnectionLimits {
    ConnectionLimits {
        connections_max: 256,
        header_read_timeout: Duration::from_secs(10),
        header_bytes_max: 64 * 1024,
        shutdown_grace: Duration::from_secs(10),
    }
}

/// The client's address, in every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddress(pub std::net::SocketAddr);

/// Serve `router` on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: ConnectionLimits,
    tls: Option<gateway::tls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    gateway::serve_connections(listener, limits, tls, shutdown, |peer| {
        let router = router.clone();
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let mut router = router.clone();
            let mut request = request.map(axum::body::Body::new);
            request.extensions_mut().insert(PeerAddress(peer));
            async move { router.call(request).await }
        })
    })
    .await;
}
