/work/main/examples/target/wasm32-wasip2/release/deps/reservations.d: reservations/src/lib.rs

/work/main/examples/target/wasm32-wasip2/release/deps/reservations.wasm: reservations/src/lib.rs

reservations/src/lib.rs:
