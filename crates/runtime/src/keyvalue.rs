//! `wasi:keyvalue` (0.2.0-draft: `store`, `atomics`, `batch`) for guests, over a backend the
//! node gives each service ([`KeyValue`]: its app's declared buckets, durable).
//!
//! A guest opens a bucket by the name its app's manifest declares; any other name is
//! `no-such-store`. Backend calls may wait for a disk sync, so they run on blocking threads,
//! and they are bounded by the call's deadline like every host wait.

use std::sync::Arc;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

mod bindings {
    wasmtime::component::bindgen!({
        path: "wit/keyvalue",
        world: "wasi:keyvalue/imports",
        imports: { default: async | trappable },
        with: { "wasi:keyvalue/store.bucket": super::Bucket },
        trappable_error_type: { "wasi:keyvalue/store.error" => super::KvFailure },
    });
}

use bindings::wasi::keyvalue::{atomics, batch, store};

/// What a service's key-value calls reach: its app's buckets. Each call may be refused
/// by the node's data policy (`AccessDenied`).
pub trait KeyValue: Send + Sync + 'static {
    /// May the service open `bucket`? `NoSuchStore` if its app did not declare it.
    fn open(&self, bucket: &str) -> Result<(), KvFailure>;
    fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvFailure>;
    fn exists(&self, bucket: &str, key: &str) -> Result<bool, KvFailure>;
    /// Store every entry, or none.
    fn set_many(&self, bucket: &str, entries: Vec<(String, Vec<u8>)>) -> Result<(), KvFailure>;
    fn delete_many(&self, bucket: &str, keys: Vec<String>) -> Result<(), KvFailure>;
    /// A page of keys in order and the cursor of the next page.
    fn list(
        &self,
        bucket: &str,
        cursor: Option<u64>,
    ) -> Result<(Vec<String>, Option<u64>), KvFailure>;
    fn increment(&self, bucket: &str, key: &str, delta: u64) -> Result<u64, KvFailure>;
}

/// An open bucket, as a guest holds it.
pub struct Bucket {
    name: String,
}

/// A failed key-value call, as the guest sees it.
#[derive(Debug)]
pub enum KvFailure {
    NoSuchStore,
    /// The node's data policy refuses the call (the reason is in the service's log and the
    /// audit log; the guest sees `access-denied`).
    AccessDenied,
    Other(String),
}

impl std::fmt::Display for KvFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvFailure::NoSuchStore => f.write_str("no such key-value bucket"),
            KvFailure::AccessDenied => f.write_str("access denied by the data policy"),
            KvFailure::Other(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for KvFailure {}

/// The host side of one instance's key-value calls.
pub struct KvView<'a> {
    pub table: &'a mut ResourceTable,
    pub backend: Option<&'a Arc<dyn KeyValue>>,
}

impl KvView<'_> {
    fn backend(&self) -> Result<Arc<dyn KeyValue>, KvFailure> {
        self.backend.cloned().ok_or(KvFailure::NoSuchStore)
    }

    fn bucket_name(&self, bucket: &Resource<Bucket>) -> Result<String, KvFailure> {
        self.table
            .get(bucket)
            .map(|b| b.name.clone())
            .map_err(|e| KvFailure::Other(e.to_string()))
    }
}

/// Run a backend call on a blocking thread.
async fn blocking<T: Send + 'static>(
    backend: Arc<dyn KeyValue>,
    work: impl FnOnce(&dyn KeyValue) -> Result<T, KvFailure> + Send + 'static,
) -> Result<T, KvFailure> {
    tokio::task::spawn_blocking(move || work(backend.as_ref()))
        .await
        .map_err(|e| KvFailure::Other(format!("a key-value task failed: {e}")))?
}

impl store::Host for KvView<'_> {
    async fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, KvFailure> {
        let bucket = identifier.clone();
        blocking(self.backend()?, move |kv| kv.open(&bucket)).await?;
        self.table
            .push(Bucket { name: identifier })
            .map_err(|e| KvFailure::Other(e.to_string()))
    }

    fn convert_error(&mut self, error: KvFailure) -> wasmtime::Result<store::Error> {
        Ok(match error {
            KvFailure::NoSuchStore => store::Error::NoSuchStore,
            KvFailure::AccessDenied => store::Error::AccessDenied,
            KvFailure::Other(message) => store::Error::Other(message),
        })
    }
}

impl store::HostBucket for KvView<'_> {
    async fn get(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> Result<Option<Vec<u8>>, KvFailure> {
        let name = self.bucket_name(&bucket)?;
        blocking(self.backend()?, move |kv| kv.get(&name, &key)).await
    }

    async fn set(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), KvFailure> {
        let name = self.bucket_name(&bucket)?;
        blocking(self.backend()?, move |kv| {
            kv.set_many(&name, vec![(key, value)])
        })
        .await
    }

    async fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> Result<(), KvFailure> {
        let name = self.bucket_name(&bucket)?;
        blocking(self.backend()?, move |kv| kv.delete_many(&name, vec![key])).await
    }

    async fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> Result<bool, KvFailure> {
        let name = self.bucket_name(&bucket)?;
        blocking(self.backend()?, move |kv| kv.exists(&name, &key)).await
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Result<store::KeyResponse, KvFailure> {
        let name = self.bucket_name(&bucket)?;
        let (keys, cursor) = blocking(self.backend()?, move |kv| kv.list(&name, cursor)).await?;
        Ok(store::KeyResponse { keys, cursor })
    }

    async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for KvView<'_> {
    async fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: u64,
    ) -> Result<u64, KvFailure> {
        let name = self.bucket_name(&bucket)?;
        blocking(self.backend()?, move |kv| kv.increment(&name, &key, delta)).await
    }
}

impl batch::Host for KvView<'_> {
    async fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<Vec<Option<(String, Vec<u8>)>>, KvFailure> {
        let name = self.bucket_name(&bucket)?;
        blocking(self.backend()?, move |kv| {
            keys.into_iter()
                .map(|key| Ok(kv.get(&name, &key)?.map(|value| (key, value))))
                .collect()
        })
        .await
    }

    async fn set_many(
        &mut self,
        bucket: Resource<Bucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> Result<(), KvFailure> {
        let name = self.bucket_name(&bucket)?;
        blocking(self.backend()?, move |kv| kv.set_many(&name, key_values)).await
    }

    async fn delete_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<(), KvFailure> {
        let name = self.bucket_name(&bucket)?;
        blocking(self.backend()?, move |kv| kv.delete_many(&name, keys)).await
    }
}

struct HasKv;

impl HasData for HasKv {
    type Data<'a> = KvView<'a>;
}

/// Add `wasi:keyvalue` to a linker whose store data gives a [`KvView`].
pub(crate) fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> KvView<'_>,
) -> wasmtime::Result<()> {
    store::add_to_linker::<T, HasKv>(linker, view)?;
    atomics::add_to_linker::<T, HasKv>(linker, view)?;
    batch::add_to_linker::<T, HasKv>(linker, view)?;
    Ok(())
}
