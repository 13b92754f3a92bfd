/work/main/examples/target/wasm32-wasip2/release/misbehave.wasm: /work/main/examples/misbehave/src/lib.rs
