//! The node's one wasmtime engine and linker, and loading of compiled components.

use std::hash::{Hash as _, Hasher as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::artifact::{ArtifactCache, ArtifactError, ComponentHash};
use crate::instance::GuestState;

/// Node-wide runtime limits.
#[derive(Debug, Clone, Copy)]
pub struct RuntimeConfig {
    /// Component instances alive at once across all services (the pooling allocator's size).
    pub instances_total_max: u32,
    /// The hard ceiling on one instance's linear memory; each service sets its own lower
    /// limit in its manifest.
    pub memory_bytes_max_per_instance: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            instances_total_max: 1000,
            memory_bytes_max_per_instance: 1 << 30,
        }
    }
}

/// How often guest code is interrupted to check its deadline.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The engine, linker and epoch ticker shared by every service on the node.
pub struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<GuestState>,
    engine_key: String,
    pub(crate) config: RuntimeConfig,
    ticker_stop: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
    /// Components loaded and still held by some service, by hash: services running the same
    /// component share one copy of its code (a copy is the size of the compiled artifact,
    /// ~280 KiB for examples/hello) instead of each deserialising its own.
    loaded: std::sync::Mutex<
        std::collections::HashMap<ComponentHash, std::sync::Weak<ProxyPre<GuestState>>>,
    >,
}

/// A component compiled, linked and ready to instantiate; cheap to clone.
#[derive(Clone)]
pub struct LoadedComponent {
    pub(crate) pre: Arc<ProxyPre<GuestState>>,
    pub hash: ComponentHash,
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> anyhow::Result<Arc<Self>> {
        let mut pooling = PoolingAllocationConfig::default();
        let instances = config.instances_total_max;
        // A component built by Rust's wasm32-wasip2 target holds a few core instances (the
        // program and its WASI adapter), each with up to one memory and a few tables.
        pooling
            .total_component_instances(instances)
            .total_core_instances(instances.saturating_mul(8))
            .total_memories(instances.saturating_mul(2))
            .total_tables(instances.saturating_mul(8))
            .total_stacks(instances)
            .max_memory_size(
                usize::try_from(config.memory_bytes_max_per_instance).unwrap_or(usize::MAX),
            );
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        let engine = Engine::new(&wasm).map_err(anyhow::Error::from)?;
        let mut linker = Linker::new(&engine);
        // The whole of WASI p2 is linked because components built for `wasmtime serve` by
        // ordinary toolchains import the CLI world's interfaces (environment, filesystem
        // types) even when they never use them. What a guest can reach is decided by its
        // WasiCtx: no preopened directories, no sockets, outbound HTTP by allow list.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(anyhow::Error::from)?;
        crate::keyvalue::add_to_linker(&mut linker, crate::instance::kv_view)
            .map_err(anyhow::Error::from)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)?;

        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = format!("{:016x}", hasher.finish());

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            std::thread::Builder::new()
                .name("maru-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })?
        };
        Ok(Arc::new(Runtime {
            engine,
            linker,
            engine_key,
            config,
            ticker_stop,
            ticker: Some(ticker),
            loaded: std::sync::Mutex::new(std::collections::HashMap::new()),
        }))
    }

    /// Compile a stored component into the cache unless an intact artifact is already there.
    /// Called at deploy time, so that scaling never compiles.
    pub fn compile(
        &self,
        cache: &ArtifactCache,
        hash: &ComponentHash,
    ) -> Result<(), ArtifactError> {
        if cache.read_compiled(hash, &self.engine_key).is_some() {
            return Ok(());
        }
        let bytes = cache.read_component(hash)?;
        let compiled =
            self.engine
                .precompile_component(&bytes)
                .map_err(|e| ArtifactError::Compile {
                    hash: hash.clone(),
                    reason: format!("{e:#}"),
                })?;
        cache.write_compiled(hash, &self.engine_key, &compiled)?;
        Ok(())
    }

    /// Load a compiled component and link it against the host, checking that it targets the
    /// `wasi:http/proxy` world. Compiles first if the cached artifact is missing or damaged.
    pub fn load(
        &self,
        cache: &ArtifactCache,
        hash: &ComponentHash,
    ) -> Result<LoadedComponent, ArtifactError> {
        let shared = self
            .loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(hash)
            .and_then(std::sync::Weak::upgrade);
        if let Some(pre) = shared {
            return Ok(LoadedComponent {
                pre,
                hash: hash.clone(),
            });
        }
        let compiled = match cache.read_compiled(hash, &self.engine_key) {
            Some(bytes) => bytes,
            None => {
                self.compile(cache, hash)?;
                cache.read_compiled(hash, &self.engine_key).ok_or_else(|| {
                    ArtifactError::Compile {
                        hash: hash.clone(),
                        reason: "the compiled artifact could not be read back after writing it"
                            .into(),
                    }
                })?
            }
        };
        let failed = |e: wasmtime::Error| ArtifactError::Compile {
            hash: hash.clone(),
            reason: format!("{e:#}"),
        };
        // SAFETY: the bytes were produced by `Engine::precompile_component` of an engine with
        // the same compatibility hash (it is part of the file name) and were verified against
        // the blake3 sum written beside them, so they are exactly what wasmtime wrote.
        #[allow(unsafe_code)]
        let component =
            unsafe { Component::deserialize(&self.engine, &compiled) }.map_err(failed)?;
        let instance_pre = self.linker.instantiate_pre(&component).map_err(failed)?;
        let pre = ProxyPre::new(instance_pre).map_err(|e| ArtifactError::Compile {
            hash: hash.clone(),
            reason: format!("it does not export wasi:http/incoming-handler (is it built for the wasi:http/proxy world?): {e:#}"),
        })?;
        let pre = Arc::new(pre);
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        loaded.retain(|_, weak| weak.strong_count() > 0);
        loaded.insert(hash.clone(), Arc::downgrade(&pre));
        Ok(LoadedComponent {
            pre,
            hash: hash.clone(),
        })
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
        if let Some(ticker) = self.ticker.take() {
            _ = ticker.join();
        }
    }
}
