//! Loop-detector pipeline, the aggregation step: a `wasi:http` component that receives
//! vehicle counts from Maru (CloudEvents, one event per sensor reading, in batches when
//! they queue up), sums them per intersection in one-minute windows, and when a window
//! closes (a reading of a later minute arrives) answers with it if its flow was above the
//! congestion threshold. Maru publishes a non-empty answer to the trigger's `reply_to`
//! topic, so congestion flags become events too.
//!
//! A reading is published by a loop sensor over MQTT to `city/traffic/INTERSECTION` as
//! `{"loop": "north-1", "vehicles": 12, "at_ms": 1795392000000}` (vehicles counted since
//! its previous reading); Maru stores it in topic `city.traffic` with the key
//! `INTERSECTION`, so one intersection's readings reach the component in order.
//!
//! `CONGESTION_VEHICLES_PER_MINUTE` (default 120) sets the threshold for an intersection.
//! Open windows are kept in the instance's memory: if the instance is replaced (a crash,
//! a redeploy), the windows open at that moment are judged only on what arrives after.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;

use serde::{Deserialize, Serialize};
use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

const BODY_BYTES_MAX: usize = 8 << 20;
const WINDOW_MS: u64 = 60_000;

struct Traffic;

/// The minute being summed for one intersection.
struct Window {
    start_ms: u64,
    vehicles: u64,
    loops: BTreeSet<String>,
}

impl Window {
    fn new(start_ms: u64) -> Self {
        Window {
            start_ms,
            vehicles: 0,
            loops: BTreeSet::new(),
        }
    }
}

thread_local! {
    /// Open windows by intersection. They live in the instance, which Maru reuses for every
    /// request; the manifest keeps exactly one instance and one request in flight, so this
    /// instance sees every reading in order.
    static OPEN: RefCell<BTreeMap<String, Window>> = const { RefCell::new(BTreeMap::new()) };
}

wasip2::http::proxy::export!(Traffic);

/// One CloudEvent of the batch, with only what this step needs.
#[derive(Deserialize)]
struct Reading {
    /// The event key: the intersection.
    #[serde(default)]
    subject: String,
    data: Option<Count>,
}

#[derive(Deserialize)]
struct Count {
    #[serde(rename = "loop", default)]
    detector: String,
    vehicles: u64,
    at_ms: u64,
}

#[derive(Serialize)]
struct Congestion {
    intersection: String,
    window_start_ms: u64,
    vehicles_per_minute: u64,
    loops: usize,
    threshold: u64,
}

impl wasip2::exports::http::incoming_handler::Guest for Traffic {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        if !matches!(request.method(), Method::Post) {
            return respond(
                response_out,
                405,
                "{\"error\":\"POST a batch of readings\"}",
            );
        }
        let threshold = std::env::var("CONGESTION_VEHICLES_PER_MINUTE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(120);
        let body = match read_body(&request) {
            Ok(body) => body,
            Err(error) => {
                return respond(
                    response_out,
                    400,
                    &serde_json::json!({ "error": error }).to_string(),
                );
            }
        };
        // A batch (array) or, when the trigger sends one event at a time, a bare reading.
        let readings: Vec<Reading> = match serde_json::from_slice(&body) {
            Ok(readings) => readings,
            Err(_) => match serde_json::from_slice::<Count>(&body) {
                Ok(count) => vec![Reading {
                    subject: header(&request, "ce-subject"),
                    data: Some(count),
                }],
                Err(error) => {
                    // A malformed reading is the sensor's fault, not a reason to retry:
                    // accept it and say why it was skipped.
                    eprintln!(
                        "skipping a reading that is not {{\"loop\":ID,\"vehicles\":N,\"at_ms\":T}}: {error}"
                    );
                    return respond(response_out, 200, "");
                }
            },
        };
        let mut flags = Vec::new();
        OPEN.with(|open| {
            let mut open = open.borrow_mut();
            for reading in readings {
                let Some(count) = reading.data else { continue };
                let window_start_ms = count.at_ms / WINDOW_MS * WINDOW_MS;
                let current = open
                    .entry(reading.subject.clone())
                    .or_insert_with(|| Window::new(window_start_ms));
                if window_start_ms > current.start_ms {
                    // A reading of a later minute closes the intersection's window.
                    let closed = std::mem::replace(current, Window::new(window_start_ms));
                    if closed.vehicles > threshold {
                        flags.push(Congestion {
                            intersection: reading.subject.clone(),
                            window_start_ms: closed.start_ms,
                            vehicles_per_minute: closed.vehicles,
                            loops: closed.loops.len(),
                            threshold,
                        });
                    }
                }
                if window_start_ms == current.start_ms {
                    current.vehicles += count.vehicles;
                    current.loops.insert(count.detector);
                }
                // Readings older than the open window arrived late; they are not counted.
            }
        });
        if flags.is_empty() {
            respond(response_out, 200, "")
        } else {
            let body = serde_json::json!({ "congested": flags }).to_string();
            // The flag's key in the congestion topic: the intersections it names.
            let mut subject: Vec<&str> = flags.iter().map(|f| f.intersection.as_str()).collect();
            subject.dedup();
            respond_about(response_out, 200, &body, &subject.join(","))
        }
    }
}

fn header(request: &IncomingRequest, name: &str) -> String {
    request
        .headers()
        .get(name)
        .first()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

fn read_body(request: &IncomingRequest) -> Result<Vec<u8>, String> {
    let body = request
        .consume()
        .map_err(|()| "the body was already read".to_string())?;
    let stream = body
        .stream()
        .map_err(|()| "the body has no stream".to_string())?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(65536) {
            Ok(chunk) => {
                bytes.extend_from_slice(&chunk);
                if bytes.len() > BODY_BYTES_MAX {
                    return Err(format!("the body is larger than {BODY_BYTES_MAX} bytes"));
                }
            }
            Err(wasip2::io::streams::StreamError::Closed) => break,
            Err(error) => return Err(format!("read body: {error:?}")),
        }
    }
    Ok(bytes)
}

fn respond(response_out: ResponseOutparam, status: u16, body: &str) {
    respond_about(response_out, status, body, "")
}

/// Answer with `body`; a non-empty `subject` becomes the answer's `ce-subject`, which Maru
/// uses as the key of the event it publishes to the reply topic.
fn respond_about(response_out: ResponseOutparam, status: u16, body: &str, subject: &str) {
    let mut fields = vec![
        ("content-type".to_string(), b"application/json".to_vec()),
        ("ce-type".to_string(), b"city.traffic.congestion".to_vec()),
    ];
    if !subject.is_empty() {
        fields.push(("ce-subject".to_string(), subject.as_bytes().to_vec()));
    }
    let headers = Fields::from_list(&fields)
        .expect("content-type, ce-type and ce-subject are allowed headers");
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).expect("a valid status");
    let outgoing = response.body().expect("a new response has a body");
    ResponseOutparam::set(response_out, Ok(response));
    let mut out = outgoing.write().expect("a new body has a stream");
    out.write_all(body.as_bytes()).expect("write body");
    out.flush().expect("flush body");
    drop(out);
    OutgoingBody::finish(outgoing, None).expect("finish body");
}
