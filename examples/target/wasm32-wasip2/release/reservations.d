/work/main/examples/target/wasm32-wasip2/release/reservations.wasm: /work/main/examples/reservations/src/lib.rs
