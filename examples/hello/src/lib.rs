//! The smallest `wasi:http/proxy` component: answers every request with a greeting.
//! It uses only the standard interfaces, so `wasmtime serve` runs it unchanged too.

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

wasip2::http::proxy::export!(Hello);

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(_request: IncomingRequest, response_out: ResponseOutparam) {
        let greeting = std::env::var("GREETING").unwrap_or_else(|_| "Hello".to_string());
        let headers = Fields::from_list(&[("content-type".to_string(), b"text/plain".to_vec())])
            .expect("content-type is an allowed header");
        let response = OutgoingResponse::new(headers);
        let body = response.body().expect("a new response has a body");
        ResponseOutparam::set(response_out, Ok(response));
        let mut out = body.write().expect("a new body has a stream");
        out.write_all(format!("{greeting} from Maru!\n").as_bytes())
            .expect("write body");
        out.flush().expect("flush body");
        drop(out);
        OutgoingBody::finish(body, None).expect("finish body");
    }
}
