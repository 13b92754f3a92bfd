//! Baseline for the cold-start benchmark: the cost of a bare wasmtime instantiate-and-call
//! of a `wasi:http/proxy` component, with no gateway, queue or pool around it.
//!
//! `cargo run --release -p runtime --example bare_instantiate -- COMPONENT.wasm [SAMPLES]`
//! prints one JSON line: `{"samples":N,"p50_us":…,"p99_us":…}`. Run by
//! `cargo xtask bench gateway`.

use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

struct State {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: Default::default(),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: bare_instantiate COMPONENT.wasm [SAMPLES]"))?;
    let samples: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(200);
    let engine = Engine::new(&Config::new())?;
    let component = Component::from_file(&engine, &path)?;
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    let pre = ProxyPre::new(linker.instantiate_pre(&component)?)?;
    let mut timings = Vec::with_capacity(samples);
    for _ in 0..samples + 10 {
        let started = Instant::now();
        let mut store = Store::new(
            &engine,
            State {
                wasi: WasiCtx::builder().build(),
                http: WasiHttpCtx::new(),
                table: ResourceTable::new(),
            },
        );
        let proxy = pre.instantiate_async(&mut store).await?;
        let request = http::Request::get("http://localhost/hello").body(Full::new(Bytes::new()))?;
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let request = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, request)?;
        let outparam = store.data_mut().http().new_response_outparam(sender)?;
        proxy
            .wasi_http_incoming_handler()
            .call_handle(&mut store, request, outparam)
            .await?;
        let response = receiver
            .await?
            .map_err(|code| anyhow::anyhow!("guest error {code:?}"))?;
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .to_bytes();
        anyhow::ensure!(!body.is_empty(), "empty body");
        timings.push(started.elapsed());
    }
    // The first few include lazy initialisation in wasmtime; they are not what a warm
    // engine pays per instance.
    let mut timings = timings.split_off(10);
    timings.sort();
    let quantile =
        |q: f64| timings[((timings.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    println!(
        "{{\"samples\":{},\"p50_us\":{:.1},\"p99_us\":{:.1}}}",
        timings.len(),
        quantile(0.5),
        quantile(0.99)
    );
    Ok(())
}
