/work/main/examples/target/wasm32-wasip2/release/hello.wasm: /work/main/examples/hello/src/lib.rs
