/work/main/examples/target/wasm32-wasip2/release/deps/misbehave.d: misbehave/src/lib.rs

/work/main/examples/target/wasm32-wasip2/release/deps/misbehave.wasm: misbehave/src/lib.rs

misbehave/src/lib.rs:
