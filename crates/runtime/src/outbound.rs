//! Outbound HTTP from guests: denied unless the service's manifest allows the origin.

use std::fmt;
use std::sync::Arc;

use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

/// A scheme, host and port that a guest may send requests to, such as
/// `https://api.example.org` or `http://127.0.0.1:9000`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{text}` is not an origin: {reason} (write it as scheme://host[:port], e.g. https://api.example.org)"
)]
pub struct OriginParseError {
    text: String,
    reason: &'static str,
}

impl Origin {
    pub fn parse(text: &str) -> Result<Self, OriginParseError> {
        let error = |reason| OriginParseError {
            text: text.to_string(),
            reason,
        };
        let uri: http::Uri = text
            .parse()
            .map_err(|_| error("it does not parse as a URI"))?;
        let scheme = uri
            .scheme_str()
            .ok_or_else(|| error("the scheme is missing"))?
            .to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return Err(error("only http and https are supported")),
        };
        if uri
            .path_and_query()
            .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
        {
            return Err(error("an origin has no path or query"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| error("the host is missing"))?;
        if authority.as_str().contains('@') {
            return Err(error("credentials do not belong in an origin"));
        }
        let host = authority.host().to_ascii_lowercase();
        if host.is_empty() {
            return Err(error("the host is missing"));
        }
        Ok(Origin {
            scheme,
            host,
            port: authority.port_u16().unwrap_or(default_port),
        })
    }

    fn of_uri(uri: &http::Uri) -> Option<Self> {
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        let authority = uri.authority()?;
        Some(Origin {
            scheme,
            host: authority.host().to_ascii_lowercase(),
            port: authority.port_u16().unwrap_or(default_port),
        })
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

/// The hooks wasmtime-wasi-http calls for outgoing requests from one instance.
pub(crate) struct OutboundHooks {
    pub(crate) allowed: Arc<[Origin]>,
}

impl WasiHttpHooks for OutboundHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<WasiBody>,
                        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
                    ),
                    HttpError,
                >,
            > + Send,
    > {
        _ = fut;
        let allowed =
            Origin::of_uri(request.uri()).is_some_and(|origin| self.allowed.contains(&origin));
        Box::new(async move {
            if !allowed {
                return Err(HttpError::HttpRequestDenied);
            }
            use http_body_util::BodyExt;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_normalise_and_reject_junk() {
        let parsed = |t: &str| {
            Origin::parse(t)
                .map(|o| o.to_string())
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            parsed("HTTPS://Api.Example.org"),
            Ok("https://api.example.org:443".into())
        );
        assert_eq!(
            parsed("http://127.0.0.1:9000/"),
            Ok("http://127.0.0.1:9000".into())
        );
        for bad in [
            "api.example.org",
            "ftp://x",
            "https://x/path",
            "https://user:pw@x",
            "",
        ] {
            assert!(parsed(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn request_uri_matches_only_its_own_origin() {
        let allowed = Origin::parse("https://api.example.org").expect("origin");
        let uri = |u: &str| Origin::of_uri(&u.parse().expect("uri"));
        assert_eq!(uri("https://api.example.org/v1?q=1"), Some(allowed.clone()));
        assert_ne!(uri("https://api.example.org:8443/"), Some(allowed.clone()));
        assert_ne!(uri("http://api.example.org/"), Some(allowed));
    }
}
