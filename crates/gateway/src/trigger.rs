//! Triggers: deliver a topic's events to a service as HTTP requests in CloudEvents form,
//! at least once, in order per key, committing the consumer group's offset only after
//! every event before it was delivered (or set aside in the dead-letter topic).
//!
//! Events are read in windows of `parallel × batch`. Each window is split into `parallel`
//! lanes by key (events without a key are spread by offset), each lane delivers its
//! requests one after another, and the window's end is committed when all lanes are done.
//! The lanes are the service's concurrency: a backlog keeps `parallel` requests queued at
//! the service, so its scaler grows it while the consumer lags and shrinks it once caught up.
//!
//! In a cluster the topics are shared and one node delivers a service's triggers
//! ([`Service::triggers_here`]). The trigger reads where its group stands when it starts
//! delivering, commits at most every [`COMMIT_SHARED_EVERY`] while a backlog lasts, and
//! when another node takes over it stops the window under way (the next node delivers it
//! again) and commits what it had finished.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, HeaderValue};
use http::{HeaderName, Request};
use http_body_util::{BodyExt as _, Full};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use events::{Event, NewEvent, ReadError, Topic};

use crate::service::Service;

const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);
const REPLY_BYTES_MAX: usize = 1 << 20;
const WINDOW_EVENTS_MAX: usize = 1000;
const WINDOW_BYTES_MAX: usize = 8 << 20;
/// How often a trigger with a backlog commits on a topic the cluster keeps.
const COMMIT_SHARED_EVERY: Duration = Duration::from_millis(250);

#[derive(Clone)]
pub struct TriggerConfig {
    /// The consumer group whose committed offset this trigger advances.
    pub group: String,
    /// Events per request: 1 sends binary mode; more sends a JSON batch.
    pub batch: usize,
    /// Requests in flight at once.
    pub parallel: usize,
    pub path: String,
    /// Failed attempts after which a request's events go to `dead_letter`. Without a
    /// dead-letter topic the trigger keeps retrying (backoff up to 30 s): nothing is dropped.
    pub max_attempts: u32,
    pub dead_letter: Option<Arc<Topic>>,
    pub reply_to: Option<Arc<Topic>>,
    /// Asked before every delivery (the node's data policy); `None` delivers as read.
    pub guard: Option<Arc<dyn DeliveryGuard>>,
    /// In a cluster, deliveries to a service placed on other nodes go to them.
    pub peers: Arc<crate::peers::Peers>,
}

/// What [`DeliveryGuard::admit`] answers, when it has decided.
pub type Admitted<'a> =
    Pin<Box<dyn Future<Output = Result<Option<Vec<Event>>, String>> + Send + 'a>>;

/// Decides on, records and shapes each delivery before it is made: the node's data
/// policy (whether the service may read the topic, the audit entry for personal data,
/// pseudonymised fields).
pub trait DeliveryGuard: Send + Sync {
    /// `Ok(None)` delivers `events` as they are; `Ok(Some(other))` delivers those instead
    /// (pseudonymised, or fewer: the guard logs what it withholds). `Err` refuses the
    /// delivery for now (the access is denied, or its audit entry cannot be written);
    /// nothing is committed and it is asked again after a backoff.
    fn admit<'a>(&'a self, events: &'a [Event]) -> Admitted<'a>;
}

struct Cancelled;

/// Deliver `topic`'s events to `service` until `cancel` fires.
pub async fn run_trigger(
    topic: Arc<Topic>,
    service: Arc<Service>,
    config: TriggerConfig,
    cancel: CancellationToken,
) {
    let config = Arc::new(config);
    let parallel = config.parallel.max(1);
    let window = (parallel * config.batch.max(1)).clamp(1, WINDOW_EVENTS_MAX);
    let mut next = topic.subscribe();
    let mut here = service.triggers_here();
    // Where delivery goes on; unknown while another node delivers (it commits meanwhile).
    let mut known: Option<u64> = None;
    let mut last_commit = Instant::now();
    // The offset last read from or written to the store.
    let mut stored = 0;
    loop {
        if !*here.borrow_and_update() {
            // Another node delivers from now on: leave it what was delivered here.
            if let Some(offset) = known.take()
                && offset > stored
                && let Err(error) = topic.commit(&config.group, offset).await
            {
                service.log(&format!("trigger {}: commit failed: {error}", config.group));
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = here.changed() => if changed.is_err() { return },
            }
            continue;
        }
        let offset = match known {
            Some(offset) => offset,
            None => match topic.group_offset_now(&config.group).await {
                Ok(offset) => {
                    stored = offset;
                    offset
                }
                Err(error) => {
                    service.log(&format!(
                        "trigger {}: cannot read where delivery stands on topic {}: {error}; retrying in 1 s",
                        config.group,
                        topic.name()
                    ));
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        known = Some(offset);
        if offset >= topic.next_offset() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = next.changed() => if changed.is_err() { return },
                changed = here.changed() => if changed.is_err() { return },
            }
            continue;
        }
        let events = match topic.read(offset, window, WINDOW_BYTES_MAX).await {
            Ok(events) => events,
            Err(ReadError::Expired { first, .. }) => {
                service.log(&format!(
                    "trigger {}: events {offset}..{first} of topic {} were deleted by retention before delivery; skipping to {first}",
                    config.group,
                    topic.name()
                ));
                known = Some(first);
                continue;
            }
            Err(error) => {
                service.log(&format!(
                    "trigger {}: cannot read topic {}: {error}; retrying in 5 s",
                    config.group,
                    topic.name()
                ));
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                }
            }
        };
        let Some(last) = events.last().map(|e| e.offset) else {
            // Nothing readable from here: the offsets are lost (damage, or skipped by
            // recovery so none is handed out twice). Move past them and say so.
            let skipped = topic.skip_lost(offset);
            if skipped > offset {
                service.log(&format!(
                    "trigger {}: events {offset}..{skipped} of topic {} are lost (see maru events stats); skipping to {skipped}",
                    config.group,
                    topic.name()
                ));
                known = Some(skipped);
            } else {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            continue;
        };
        let mut lanes: Vec<Vec<Event>> = vec![Vec::new(); parallel];
        for event in events {
            let lane = if event.key.is_empty() {
                event.offset as usize % parallel
            } else {
                fnv(event.key.as_bytes()) as usize % parallel
            };
            lanes[lane].push(event);
        }
        let mut deliveries = JoinSet::new();
        for lane in lanes.into_iter().filter(|l| !l.is_empty()) {
            let (topic, service, config, cancel) = (
                topic.clone(),
                service.clone(),
                config.clone(),
                cancel.clone(),
            );
            deliveries.spawn(async move {
                for chunk in lane.chunks(config.batch.max(1)) {
                    if deliver(&topic, &service, &config, chunk, &cancel)
                        .await
                        .is_err()
                    {
                        return false;
                    }
                }
                true
            });
        }
        let (mut cancelled, mut handed_over) = (false, false);
        loop {
            tokio::select! {
                done = deliveries.join_next() => match done {
                    Some(done) => cancelled |= !matches!(done, Ok(true)),
                    None => break,
                },
                // Another node delivers from now on (the placement moved): stop this window
                // rather than deliver it alongside the node that starts over from the
                // committed offset.
                changed = here.changed(), if !handed_over => {
                    if changed.is_err() {
                        // The service is gone.
                        deliveries.abort_all();
                        return;
                    }
                    if !*here.borrow() {
                        deliveries.abort_all();
                        handed_over = true;
                    }
                }
            }
        }
        if cancelled && !handed_over {
            // Not committed: the window is delivered again after a restart (at least once).
            return;
        }
        if handed_over {
            // Not committed either: the next node delivers it again (at least once).
            continue;
        }
        let offset = last + 1;
        known = Some(offset);
        // A shared topic's commit is a replicated write that costs more than a window of
        // small deliveries: it is made at most every COMMIT_SHARED_EVERY while a backlog
        // lasts, and always once caught up. What was delivered but not yet committed is
        // delivered again if the trigger moves or restarts (at least once either way).
        if topic.is_shared()
            && offset < topic.next_offset()
            && last_commit.elapsed() < COMMIT_SHARED_EVERY
        {
            continue;
        }
        last_commit = Instant::now();
        // A failed commit only means redelivery after a restart; keep going.
        match topic.commit(&config.group, offset).await {
            Ok(()) => stored = offset,
            Err(error) => {
                service.log(&format!("trigger {}: commit failed: {error}", config.group));
            }
        }
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Deliver one request's events, retrying; `Err` only when cancelled.
async fn deliver(
    topic: &Topic,
    service: &Service,
    config: &TriggerConfig,
    events: &[Event],
    cancel: &CancellationToken,
) -> Result<(), Cancelled> {
    let admitted;
    let events = match &config.guard {
        None => events,
        Some(guard) => {
            let mut refusals: u32 = 0;
            loop {
                let why = match guard.admit(events).await {
                    Ok(None) => break events,
                    Ok(Some(changed)) => {
                        break {
                            admitted = changed;
                            &admitted[..]
                        };
                    }
                    Err(why) => why,
                };
                refusals += 1;
                if refusals == 1 || refusals.is_multiple_of(10) {
                    service.log(&format!(
                        "trigger {}: events {}..={} of topic {} not delivered: {why}; asking again (refused {refusals} times)",
                        config.group,
                        events[0].offset,
                        events[events.len() - 1].offset,
                        topic.name()
                    ));
                }
                back_off(refusals, cancel).await?;
            }
        }
    };
    if events.is_empty() {
        return Ok(());
    }
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let request = request(topic.name(), &config.path, events);
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return Err(Cancelled),
            outcome = attempt_once(service, config, request, events) => outcome,
        };
        let failure = match outcome {
            Ok(()) => return Ok(()),
            Err(failure) => failure,
        };
        let range = format!("{}..={}", events[0].offset, events[events.len() - 1].offset);
        if attempt >= config.max_attempts {
            if let Some(dead_letter) = &config.dead_letter {
                let set_aside: Vec<NewEvent> = events
                    .iter()
                    .map(|e| NewEvent {
                        key: e.key.clone(),
                        content_type: e.content_type.clone(),
                        kind: e.kind.clone(),
                        source: e.source.clone(),
                        payload: e.payload.clone(),
                    })
                    .collect();
                match dead_letter.append(set_aside).await {
                    Ok(at) => {
                        service.log(&format!(
                            "trigger {}: events {range} of topic {} failed {attempt} times ({failure}); moved to topic {} at offsets {}..{}",
                            config.group,
                            topic.name(),
                            dead_letter.name(),
                            at.start,
                            at.end
                        ));
                        return Ok(());
                    }
                    Err(error) => service.log(&format!(
                        "trigger {}: cannot move events {range} to the dead-letter topic: {error}",
                        config.group
                    )),
                }
            } else if attempt == config.max_attempts {
                service.log(&format!(
                    "trigger {}: events {range} of topic {} failed {attempt} times ({failure}); no dead_letter topic is set, so delivery keeps being retried",
                    config.group,
                    topic.name()
                ));
            }
        }
        back_off(attempt, cancel).await?;
    }
}

/// Wait before try `tries + 1`: 200 ms doubling to 30 s, unless cancelled first.
async fn back_off(tries: u32, cancel: &CancellationToken) -> Result<(), Cancelled> {
    let backoff = RETRY_FIRST
        .saturating_mul(1 << tries.saturating_sub(1).min(16))
        .min(RETRY_MAX);
    tokio::select! {
        _ = cancel.cancelled() => Err(Cancelled),
        _ = tokio::time::sleep(backoff) => Ok(()),
    }
}

async fn attempt_once(
    service: &Service,
    config: &TriggerConfig,
    request: Request<Full<Bytes>>,
    events: &[Event],
) -> Result<(), String> {
    let response = match service.locality() {
        crate::Locality::Elsewhere(nodes) => {
            let deadline = Instant::now() + service.config.timeout;
            config
                .peers
                .forward(&nodes, &service.id(), request, deadline)
                .await
                .map_err(|e| e.to_string())?
        }
        crate::Locality::Unplaced(why) => {
            return Err(format!("no node of the cluster runs the service: {why}"));
        }
        crate::Locality::Alone | crate::Locality::Here { .. } => service
            .handle(request, Instant::now())
            .await
            .map_err(|e| e.to_string())?,
    };
    let status = response.status();
    if !status.is_success() {
        return Err(format!("the service answered {status}"));
    }
    let Some(reply_to) = &config.reply_to else {
        return Ok(());
    };
    let (content_type, kind, key) = {
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let kind = match header("ce-type") {
            kind if kind.is_empty() => "maru.reply".to_string(),
            kind => kind,
        };
        // The answer's own key if it names one; else the request's key if all its events
        // share one; else none.
        let key = [header("ce-partitionkey"), header("ce-subject")]
            .into_iter()
            .find(|k| !k.is_empty())
            .unwrap_or_else(|| {
                if events.iter().all(|e| e.key == events[0].key) {
                    events[0].key.clone()
                } else {
                    String::new()
                }
            });
        (header(CONTENT_TYPE.as_str()), kind, key)
    };
    let mut stream = response.into_body();
    let mut body = Vec::new();
    while let Some(frame) = stream.frame().await {
        let frame = frame.map_err(|e| format!("reading the reply failed: {e}"))?;
        if let Ok(data) = frame.into_data() {
            body.extend_from_slice(&data);
            if body.len() > REPLY_BYTES_MAX {
                return Err(format!("the reply exceeds {REPLY_BYTES_MAX} bytes"));
            }
        }
    }
    let body = Bytes::from(body);
    if body.is_empty() {
        return Ok(());
    }
    let reply = NewEvent {
        key,
        content_type,
        kind,
        source: format!("maru:trigger:{}", config.group),
        payload: body,
    };
    reply_to
        .append(vec![reply])
        .await
        .map(|_| ())
        .map_err(|e| format!("publishing the reply failed: {e}"))
}

fn request(topic: &str, path: &str, events: &[Event]) -> Request<Full<Bytes>> {
    let mut builder = Request::post(path).header(HOST, "localhost");
    let body = if let [event] = events {
        let attributes = attributes(topic, event);
        for (name, value) in &attributes {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(format!("ce-{name}").as_bytes()),
                HeaderValue::from_str(value),
            ) {
                builder = builder.header(name, value);
            }
        }
        if !event.content_type.is_empty() {
            builder = builder.header(CONTENT_TYPE, event.content_type.as_str());
        }
        event.payload.clone()
    } else {
        builder = builder.header(CONTENT_TYPE, "application/cloudevents-batch+json");
        let batch: Vec<serde_json::Value> = events
            .iter()
            .map(|event| {
                let mut object: serde_json::Map<String, serde_json::Value> =
                    attributes(topic, event)
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v.into()))
                        .collect();
                if !event.content_type.is_empty() {
                    object.insert("datacontenttype".into(), event.content_type.clone().into());
                }
                let json = (event.content_type.is_empty() || event.content_type.contains("json"))
                    .then(|| serde_json::from_slice::<serde_json::Value>(&event.payload).ok())
                    .flatten();
                match (json, std::str::from_utf8(&event.payload)) {
                    (Some(value), _) => {
                        object.insert("data".into(), value);
                    }
                    (None, Ok(text)) => {
                        object.insert("data".into(), text.into());
                    }
                    (None, Err(_)) => {
                        use base64::Engine as _;
                        object.insert(
                            "data_base64".into(),
                            base64::engine::general_purpose::STANDARD
                                .encode(&event.payload)
                                .into(),
                        );
                    }
                }
                serde_json::Value::Object(object)
            })
            .collect();
        Bytes::from(serde_json::Value::Array(batch).to_string())
    };
    builder
        .body(Full::new(body))
        .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
}

/// The CloudEvents context attributes of a stored event.
fn attributes(topic: &str, event: &Event) -> Vec<(&'static str, String)> {
    let mut out = vec![
        ("specversion", "1.0".to_string()),
        ("id", format!("{topic}:{}", event.offset)),
        (
            "source",
            if event.source.is_empty() {
                format!("/maru/topics/{topic}")
            } else {
                event.source.clone()
            },
        ),
        (
            "type",
            if event.kind.is_empty() {
                "maru.event".to_string()
            } else {
                event.kind.clone()
            },
        ),
        ("time", rfc3339(event.time_ms)),
        ("maruoffset", event.offset.to_string()),
    ];
    if !event.key.is_empty() {
        out.push(("subject", event.key.clone()));
        out.push(("partitionkey", event.key.clone()));
    }
    out
}

/// Milliseconds since the Unix epoch as an RFC 3339 UTC time.
pub fn rfc3339(time_ms: u64) -> String {
    let seconds = time_ms / 1000;
    let days = (seconds / 86_400) as i64;
    let rest = seconds % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        time_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_795_392_000_000), "2026-11-23T00:00:00.000Z");
    }
}
