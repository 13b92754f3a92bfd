//! A small booking API for a city's reservation desk, as a `wasi:http/proxy` component.
//!
//! Routes (under whatever prefix it is deployed at, e.g. `/reservations`):
//! - `GET  {prefix}`            list bookings
//! - `POST {prefix}`            book: `{"slot": "2026-12-01T10:00", "name": "Kim"}` → 201, 409 if taken
//! - `GET  {prefix}/slots/{s}`  is slot `s` free?
//!
//! Every route takes `?work_ms=N` (burn N ms of CPU) and `?wait_ms=N` (wait N ms without
//! CPU), so load tests can model the service time of real work.
//!
//! Bookings live in the app's `bookings` key-value bucket (the standard `wasi:keyvalue`
//! interface, through its published guest bindings): every instance sees the same ones,
//! and they survive restarts. A slot is claimed with an atomic increment of its claim key,
//! so two instances booking one slot at once cannot both win.

use std::io::Write as _;

use serde::{Deserialize, Serialize};
use wasi_passthrough_keyvalue::bindings::wasi::keyvalue::{atomics, batch, store};
use wasip2::clocks::monotonic_clock;
use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Reservations;

wasip2::http::proxy::export!(Reservations);

#[derive(Serialize, Deserialize, Clone)]
struct Booking {
    #[serde(default)]
    id: u64,
    slot: String,
    name: String,
}

const BODY_BYTES_MAX: usize = 64 * 1024;
/// Bookings a listing shows at most.
const LISTED_MAX: usize = 50;

fn bucket() -> Result<store::Bucket, String> {
    store::open("bookings").map_err(|e| format!("open the bookings bucket: {e:?}"))
}

fn booked(bucket: &store::Bucket, slot: &str) -> Result<bool, String> {
    bucket
        .exists(&format!("booking/{slot}"))
        .map_err(|e| format!("{e:?}"))
}

/// The first bookings, and how many there are.
fn list(bucket: &store::Bucket) -> Result<(Vec<Booking>, u64), String> {
    let keys = bucket.list_keys(None).map_err(|e| format!("{e:?}"))?.keys;
    let wanted: Vec<String> = keys
        .into_iter()
        .filter(|k| k.starts_with("booking/"))
        .take(LISTED_MAX)
        .collect();
    let found = batch::get_many(bucket, &wanted).map_err(|e| format!("{e:?}"))?;
    let bookings = found
        .into_iter()
        .flatten()
        .filter_map(|(_, value)| serde_json::from_slice(&value).ok())
        .collect();
    let total = bucket
        .get("count")
        .map_err(|e| format!("{e:?}"))?
        .and_then(|v| String::from_utf8(v).ok()?.trim().parse().ok())
        .unwrap_or(0);
    Ok((bookings, total))
}

/// Book a slot: 201 with the booking, or 409 if it was taken.
fn book(bucket: &store::Bucket, mut booking: Booking) -> Result<(u16, String), String> {
    let claims = atomics::increment(bucket, &format!("claim/{}", booking.slot), 1)
        .map_err(|e| format!("{e:?}"))?;
    if claims > 1 {
        return Ok((
            409,
            serde_json::json!({ "error": format!("slot {} is already booked", booking.slot) })
                .to_string(),
        ));
    }
    booking.id = atomics::increment(bucket, "next-id", 1).map_err(|e| format!("{e:?}"))?;
    let json = serde_json::to_string(&booking).expect("a booking serialises");
    if let Err(error) = bucket.set(&format!("booking/{}", booking.slot), json.as_bytes()) {
        // Give the slot back, so a booking that could not be stored does not hold it.
        _ = bucket.delete(&format!("claim/{}", booking.slot));
        return Err(format!("{error:?}"));
    }
    atomics::increment(bucket, "count", 1).map_err(|e| format!("{e:?}"))?;
    Ok((201, json))
}

impl wasip2::exports::http::incoming_handler::Guest for Reservations {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path_and_query = request.path_with_query().unwrap_or_else(|| "/".into());
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((&path_and_query, ""));
        simulate_work(query);
        let method = request.method();
        let outcome = (|| -> Result<(u16, String), String> {
            let bucket = bucket()?;
            Ok(match (&method, path.split_once("/slots/")) {
                (Method::Get, Some((_, slot))) => {
                    let taken = booked(&bucket, slot)?;
                    (200, serde_json::json!({ "slot": slot, "free": !taken }).to_string())
                }
                (Method::Get, None) => {
                    let (bookings, total) = list(&bucket)?;
                    (200, serde_json::json!({ "bookings": bookings, "total": total }).to_string())
                }
                (Method::Post, None) => match read_body(&request).and_then(|bytes| serde_json::from_slice::<Booking>(&bytes).map_err(|e| e.to_string())) {
                    Err(error) => (400, serde_json::json!({ "error": format!("send JSON like {{\"slot\": \"2026-12-01T10:00\", \"name\": \"Kim\"}}: {error}") }).to_string()),
                    Ok(booking) if !booking.slot.is_empty() && !booking.name.is_empty() && !booking.slot.contains('/') => book(&bucket, booking)?,
                    Ok(_) => (400, serde_json::json!({ "error": "slot and name must not be empty, and a slot has no `/`" }).to_string()),
                },
                _ => (405, serde_json::json!({ "error": "use GET or POST" }).to_string()),
            })
        })();
        let (status, body) = outcome
            .unwrap_or_else(|error| (500, serde_json::json!({ "error": error }).to_string()));
        respond(response_out, status, &body);
    }
}

fn query_ms(query: &str, key: &str) -> u64 {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
        .min(60_000)
}

fn simulate_work(query: &str) {
    let work = query_ms(query, "work_ms");
    if work > 0 {
        let until = monotonic_clock::now() + work * 1_000_000;
        let mut spin = 0u64;
        while monotonic_clock::now() < until {
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
    }
    let wait = query_ms(query, "wait_ms");
    if wait > 0 {
        monotonic_clock::subscribe_duration(wait * 1_000_000).block();
    }
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
        match stream.blocking_read(8192) {
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
    let headers = Fields::from_list(&[("content-type".to_string(), b"application/json".to_vec())])
        .expect("content-type is an allowed header");
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).expect("a valid status");
    let outgoing = response.body().expect("a new response has a body");
    ResponseOutparam::set(response_out, Ok(response));
    let mut out = outgoing.write().expect("a new body has a stream");
    out.write_all(body.as_bytes()).expect("write body");
    out.write_all(b"\n").expect("write body");
    out.flush().expect("flush body");
    drop(out);
    OutgoingBody::finish(outgoing, None).expect("finish body");
}
