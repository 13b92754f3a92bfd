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
//! Bookings live in the instance's memory: each instance keeps its own list, and they are
//! gone when it stops. Durable state arrives with Maru's key-value interface.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write as _;

use serde::{Deserialize, Serialize};
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

thread_local! {
    static BOOKINGS: RefCell<BTreeMap<String, Booking>> = RefCell::new(BTreeMap::new());
    static NEXT_ID: RefCell<u64> = const { RefCell::new(1) };
}

const BODY_BYTES_MAX: usize = 64 * 1024;

impl wasip2::exports::http::incoming_handler::Guest for Reservations {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path_and_query = request.path_with_query().unwrap_or_else(|| "/".into());
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((&path_and_query, ""));
        simulate_work(query);
        let method = request.method();
        let (status, body) = match (&method, path.split_once("/slots/")) {
            (Method::Get, Some((_, slot))) => {
                let taken = BOOKINGS.with(|b| b.borrow().contains_key(slot));
                (200, serde_json::json!({ "slot": slot, "free": !taken }).to_string())
            }
            (Method::Get, None) => {
                let all: Vec<Booking> = BOOKINGS.with(|b| b.borrow().values().cloned().collect());
                (200, serde_json::json!({ "bookings": all }).to_string())
            }
            (Method::Post, None) => match read_body(&request).and_then(|bytes| serde_json::from_slice::<Booking>(&bytes).map_err(|e| e.to_string())) {
                Err(error) => (400, serde_json::json!({ "error": format!("send JSON like {{\"slot\": \"2026-12-01T10:00\", \"name\": \"Kim\"}}: {error}") }).to_string()),
                Ok(mut booking) if !booking.slot.is_empty() && !booking.name.is_empty() => BOOKINGS.with(|b| {
                    let mut bookings = b.borrow_mut();
                    if bookings.contains_key(&booking.slot) {
                        return (409, serde_json::json!({ "error": format!("slot {} is already booked", booking.slot) }).to_string());
                    }
                    booking.id = NEXT_ID.with(|n| {
                        let id = *n.borrow();
                        *n.borrow_mut() += 1;
                        id
                    });
                    bookings.insert(booking.slot.clone(), booking.clone());
                    (201, serde_json::to_string(&booking).expect("a booking serialises"))
                }),
                Ok(_) => (400, serde_json::json!({ "error": "slot and name must not be empty" }).to_string()),
            },
            _ => (405, serde_json::json!({ "error": "use GET or POST" }).to_string()),
        };
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
