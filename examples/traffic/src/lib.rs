//! Loop-detector pipeline, the aggregation step: a `wasi:http` component that receives
//! batches of vehicle counts from Maru (CloudEvents batched mode, one event per sensor
//! reading), sums them per intersection in one-minute windows, and answers with the
//! windows whose flow is above the congestion threshold. Maru publishes a non-empty answer
//! to the trigger's `reply_to` topic, so congestion flags become events too.
//!
//! A reading is published by a loop sensor over MQTT to `city/traffic/INTERSECTION` as
//! `{"loop": "north-1", "vehicles": 12, "at_ms": 1795392000000}` (vehicles counted since
//! its previous reading); Maru stores it in topic `city.traffic` with the key
//! `INTERSECTION`, so one intersection's readings reach the component in order.
//!
//! `CONGESTION_VEHICLES_PER_MINUTE` (default 120) sets the threshold for an intersection.
//! Any component instance can take any batch: windows are summed within a batch, so a
//! window cut across two batches is judged on each part (the demo sends whole windows).

use std::collections::BTreeMap;
use std::io::Write as _;

use serde::{Deserialize, Serialize};
use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

const BODY_BYTES_MAX: usize = 8 << 20;
const WINDOW_MS: u64 = 60_000;

struct Traffic;

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
        // (intersection, window) -> (vehicles, loops seen)
        let mut windows: BTreeMap<(String, u64), (u64, std::collections::BTreeSet<String>)> =
            BTreeMap::new();
        for reading in readings {
            let Some(count) = reading.data else { continue };
            let window = count.at_ms / WINDOW_MS * WINDOW_MS;
            let entry = windows
                .entry((reading.subject.clone(), window))
                .or_default();
            entry.0 += count.vehicles;
            entry.1.insert(count.detector);
        }
        let flags: Vec<Congestion> = windows
            .into_iter()
            .filter(|(_, (vehicles, _))| *vehicles > threshold)
            .map(
                |((intersection, window_start_ms), (vehicles, loops))| Congestion {
                    intersection,
                    window_start_ms,
                    vehicles_per_minute: vehicles,
                    loops: loops.len(),
                    threshold,
                },
            )
            .collect();
        if flags.is_empty() {
            respond(response_out, 200, "")
        } else {
            let body = serde_json::json!({ "congested": flags }).to_string();
            respond(response_out, 200, &body)
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
    let headers = Fields::from_list(&[
        ("content-type".to_string(), b"application/json".to_vec()),
        ("ce-type".to_string(), b"city.traffic.congestion".to_vec()),
    ])
    .expect("content-type and ce-type are allowed headers");
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
