//! `POST /events/{topic}`: events over HTTP, answered `202` only once they are durable.
//!
//! One event per request in CloudEvents binary mode (the body is the payload; `ce-type`,
//! `ce-source`, `ce-partitionkey` or `ce-subject`, and `content-type` are kept), one event
//! in structured mode (`application/cloudevents+json`), or many in batched mode
//! (`application/cloudevents-batch+json`, a JSON array), all appended at once.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use serde_json::Value;

use events::{AppendError, Events, NewEvent};

use crate::server::read_body;

/// The largest ingest request body.
pub const INGEST_BODY_BYTES_MAX: usize = 8 << 20;
/// A client must send the whole body within this time.
pub(crate) const BODY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Ingest {
    pub events: Arc<Events>,
    /// Who may publish (the bearer token is the secret) and where.
    pub gate: events::Gate,
}

pub type Failure = (StatusCode, &'static str, String);

fn body_too_large() -> Failure {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!(
            "an ingest request may carry at most {INGEST_BODY_BYTES_MAX} bytes; split the batch"
        ),
    )
}

fn header<'a>(request: &'a Request<()>, name: &str) -> &'a str {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

impl Ingest {
    /// Store the request's events; the JSON answer on success.
    /// Store the events of one request whose body must have arrived by `deadline`.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        deadline: tokio::time::Instant,
    ) -> Result<Value, Failure> {
        let (parts, body) = request.into_parts();
        let result = self.store(Request::from_parts(parts, ())).await;
        match result {
            Ok(store) => store.finish(body, deadline).await,
            Err(failure) => {
                // Read a small unread body, so the client sees the answer instead of a
                // connection reset while it is still sending.
                let drain = Limited::new(body, 64 * 1024).collect();
                _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
                Err(failure)
            }
        }
    }

    /// Everything that can be decided from the request head.
    async fn store(&self, request: Request<()>) -> Result<Pending, Failure> {
        if request.method() != Method::POST {
            return Err((
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "send events with POST /events/TOPIC".into(),
            ));
        }
        let presented = header(&request, AUTHORIZATION.as_str())
            .strip_prefix("Bearer ")
            .unwrap_or("");
        let Some(producer) = self.gate.authenticate(presented) else {
            return Err((
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send the node's ingest token (DATA/ingest.token) or a machine token with the ingest role as Authorization: Bearer TOKEN"
                    .into(),
            ));
        };
        let name = request
            .uri()
            .path()
            .strip_prefix("/events/")
            .unwrap_or("")
            .to_string();
        let topic = self.events.topic(&name).map_err(|error| {
            if error.is_transient() {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "topic_unavailable",
                    error.to_string(),
                )
            } else {
                (StatusCode::NOT_FOUND, "unknown_topic", error.to_string())
            }
        })?;
        if let Err(why) = producer.admit(&name, None).resolve().await {
            return Err((
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("{} may not publish to topic {name}: {why}", producer.name()),
            ));
        }
        let declared = header(&request, CONTENT_LENGTH.as_str())
            .parse::<usize>()
            .ok();
        if declared.is_some_and(|length| length > INGEST_BODY_BYTES_MAX) {
            return Err(body_too_large());
        }
        let content_type = header(&request, CONTENT_TYPE.as_str()).to_string();
        let single = NewEvent {
            key: [
                header(&request, "ce-partitionkey"),
                header(&request, "ce-subject"),
            ]
            .into_iter()
            .find(|v| !v.is_empty())
            .unwrap_or("")
            .to_string(),
            content_type: content_type.clone(),
            kind: header(&request, "ce-type").to_string(),
            source: match header(&request, "ce-source") {
                "" => "http".to_string(),
                source => source.to_string(),
            },
            payload: Bytes::new(),
        };
        Ok(Pending {
            name,
            topic,
            content_type,
            single,
        })
    }
}

/// A request whose head was accepted, waiting for its body.
struct Pending {
    name: String,
    topic: Arc<events::Topic>,
    content_type: String,
    single: NewEvent,
}

impl Pending {
    async fn finish(
        self,
        body: Incoming,
        deadline: tokio::time::Instant,
    ) -> Result<Value, Failure> {
        let Pending {
            name,
            topic,
            content_type,
            single,
        } = self;
        let body = read_body(body, INGEST_BODY_BYTES_MAX, deadline)
            .await
            .map_err(|error| error.failure(body_too_large(), "30 s"))?;
        let media_type = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let events = match media_type.as_str() {
            "application/cloudevents-batch+json" => {
                let values: Vec<Value> = serde_json::from_slice(&body).map_err(|error| {
                    (
                        StatusCode::BAD_REQUEST,
                        "bad_batch",
                        format!("the batch is not a JSON array of CloudEvents: {error}"),
                    )
                })?;
                values
                    .iter()
                    .enumerate()
                    .map(|(i, value)| {
                        structured(value).map_err(|why| {
                            (
                                StatusCode::BAD_REQUEST,
                                "bad_event",
                                format!("event {i} of the batch: {why}"),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            "application/cloudevents+json" => {
                let value: Value = serde_json::from_slice(&body).map_err(|error| {
                    (
                        StatusCode::BAD_REQUEST,
                        "bad_event",
                        format!("the body is not a JSON CloudEvent: {error}"),
                    )
                })?;
                vec![
                    structured(&value)
                        .map_err(|why| (StatusCode::BAD_REQUEST, "bad_event", why))?,
                ]
            }
            _ => vec![NewEvent {
                payload: body,
                ..single
            }],
        };
        let count = events.len();
        match topic.append(events).await {
            Ok(offsets) => Ok(serde_json::json!({
                "topic": name,
                "count": count,
                "first_offset": offsets.start,
            })),
            Err(AppendError::TooLarge(why)) => {
                Err((StatusCode::PAYLOAD_TOO_LARGE, "event_too_large", why))
            }
            Err(error) => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "topic_unavailable",
                error.to_string(),
            )),
        }
    }
}

/// One CloudEvent in structured JSON form.
fn structured(value: &Value) -> Result<NewEvent, String> {
    let object = value.as_object().ok_or("an event must be a JSON object")?;
    let text = |name: &str| -> Result<String, String> {
        match object.get(name) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!("`{name}` must be a string")),
        }
    };
    let mut content_type = text("datacontenttype")?;
    let payload = match (object.get("data"), object.get("data_base64")) {
        (Some(_), Some(_)) => return Err("give `data` or `data_base64`, not both".into()),
        (None, Some(Value::String(encoded))) => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|e| format!("`data_base64` is not base64: {e}"))?,
        ),
        (None, Some(_)) => return Err("`data_base64` must be a string".into()),
        (Some(Value::String(s)), None) if !content_type.contains("json") => Bytes::from(s.clone()),
        (Some(data), None) => {
            if content_type.is_empty() {
                content_type = "application/json".into();
            }
            Bytes::from(data.to_string())
        }
        (None, None) => Bytes::new(),
    };
    let key = match text("partitionkey")? {
        key if key.is_empty() => text("subject")?,
        key => key,
    };
    Ok(NewEvent {
        key,
        content_type,
        kind: text("type")?,
        source: match text("source")? {
            source if source.is_empty() => "http".into(),
            source => source,
        },
        payload,
    })
}
