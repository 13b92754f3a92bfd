//! A test guest that misbehaves on request, so the platform's limits can be shown to hold.
//! Not an example to copy: it exists for Maru's end-to-end tests.
//!
//! Paths (matched by their last segment):
//! - `.../spin`      loop forever (the request deadline must stop it)
//! - `.../hog`       allocate memory until it fails (the memory limit must stop it)
//! - `.../trap`      panic (the instance must be replaced)
//! - `.../sleep?ms=` wait without CPU, holding the instance
//! - `.../print`     write a line to stdout and one to stderr
//! - `.../outbound?url=` try an outbound HTTP GET and report what happened
//! - `.../reply`     answer with the request body, unchanged (a trigger's reply)
//! - `.../fail`      answer 500 (a consumer that always fails)
//! - anything else   echo: method, path, the request body's length and a per-instance counter

use std::cell::Cell;
use std::io::Write as _;

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingRequest, OutgoingResponse, ResponseOutparam,
    Scheme,
};

struct Misbehave;

wasip2::http::proxy::export!(Misbehave);

thread_local! {
    static SERVED: Cell<u64> = const { Cell::new(0) };
}

impl wasip2::exports::http::incoming_handler::Guest for Misbehave {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let served = SERVED.with(|s| {
            s.set(s.get() + 1);
            s.get()
        });
        let path_and_query = request.path_with_query().unwrap_or_else(|| "/".into());
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((&path_and_query, ""));
        let last = path.rsplit('/').next().unwrap_or("");
        let param = |key: &str| {
            query
                .split('&')
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string())
        };
        let mut status = 200;
        let text = match last {
            "spin" => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "hog" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "trap" => panic!("asked to trap"),
            "sleep" => {
                let ms: u64 = param("ms").and_then(|v| v.parse().ok()).unwrap_or(1000);
                wasip2::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000).block();
                format!("slept {ms} ms\n")
            }
            "print" => {
                println!("to stdout from request {served}");
                eprintln!("to stderr from request {served}");
                "printed\n".to_string()
            }
            "outbound" => outbound(&param("url").unwrap_or_default()),
            "reply" => String::from_utf8_lossy(&read_body(&request)).into_owned(),
            "fail" => {
                status = 500;
                "failing as asked\n".to_string()
            }
            _ => {
                let length = read_body_length(&request);
                format!(
                    "{:?} {path} body={length} served={served}\n",
                    request.method()
                )
            }
        };
        let response = OutgoingResponse::new(Fields::new());
        response
            .set_status_code(status)
            .expect("500 and 200 are valid statuses");
        let body = response.body().expect("a new response has a body");
        ResponseOutparam::set(response_out, Ok(response));
        let mut out = body.write().expect("a new body has a stream");
        out.write_all(text.as_bytes()).expect("write body");
        out.flush().expect("flush body");
        drop(out);
        OutgoingBody::finish(body, None).expect("finish body");
    }
}

fn read_body(request: &IncomingRequest) -> Vec<u8> {
    let mut bytes = Vec::new();
    let Ok(body) = request.consume() else {
        return bytes;
    };
    let Ok(stream) = body.stream() else {
        return bytes;
    };
    while let Ok(chunk) = stream.blocking_read(16384) {
        bytes.extend_from_slice(&chunk);
    }
    bytes
}

fn read_body_length(request: &IncomingRequest) -> usize {
    let Ok(body) = request.consume() else {
        return 0;
    };
    let Ok(stream) = body.stream() else { return 0 };
    let mut total = 0;
    while let Ok(chunk) = stream.blocking_read(16384) {
        total += chunk.len();
    }
    total
}

/// `http://host:port/path` only; enough to show whether the host lets the request out.
fn outbound(url: &str) -> String {
    let Some(rest) = url.strip_prefix("http://") else {
        return format!("outbound: only http:// URLs, got `{url}`\n");
    };
    let (authority, path) = rest
        .split_once('/')
        .map(|(a, p)| (a, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let request = OutgoingRequest::new(Fields::new());
    _ = request.set_scheme(Some(&Scheme::Http));
    _ = request.set_authority(Some(authority));
    _ = request.set_path_with_query(Some(&path));
    match outgoing_handler::handle(request, None) {
        Err(code) => format!("outbound: refused: {code:?}\n"),
        Ok(future) => {
            future.subscribe().block();
            match future.get() {
                Some(Ok(Ok(response))) => format!("outbound: status {}\n", response.status()),
                Some(Ok(Err(code))) => format!("outbound: failed: {code:?}\n"),
                other => format!("outbound: no response: {other:?}\n"),
            }
        }
    }
}
