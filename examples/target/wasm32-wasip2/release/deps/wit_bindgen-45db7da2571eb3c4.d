/work/main/examples/target/wasm32-wasip2/release/deps/wit_bindgen-45db7da2571eb3c4.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/wit-bindgen-0.62.0/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/wit-bindgen-0.62.0/src/rt/mod.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/wit-bindgen-0.62.0/src/resource.rs

/work/main/examples/target/wasm32-wasip2/release/deps/libwit_bindgen-45db7da2571eb3c4.rlib: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/wit-bindgen-0.62.0/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/wit-bindgen-0.62.0/src/rt/mod.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/wit-bindgen-0.62.0/src/resource.rs

/work/main/examples/target/wasm32-wasip2/release/deps/libwit_bindgen-45db7da2571eb3c4.rmeta: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/wit-bindgen-0.62.0/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/wit-bindgen-0.62.0/src/rt/mod.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/wit-bindgen-0.62.0/src/resource.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/wit-bindgen-0.62.0/src/lib.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/wit-bindgen-0.62.0/src/rt/mod.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/wit-bindgen-0.62.0/src/resource.rs:
