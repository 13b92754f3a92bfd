//! The routing table: which service answers a request, by host and longest path prefix.

use std::sync::Arc;

/// One route: an optional exact host and a path prefix that matches whole segments.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey {
    pub host: Option<String>,
    pub prefix: String,
}

impl RouteKey {
    /// `prefix` must start with `/`; a trailing `/` (other than the root) is dropped so that
    /// `/api` and `/api/` mean the same route.
    pub fn new(host: Option<&str>, prefix: &str) -> Self {
        let mut prefix = prefix.to_string();
        while prefix.len() > 1 && prefix.ends_with('/') {
            prefix.pop();
        }
        RouteKey {
            host: host.map(|h| h.to_ascii_lowercase()),
            prefix,
        }
    }

    fn matches_path(&self, path: &str) -> bool {
        if self.prefix == "/" {
            return true;
        }
        path.strip_prefix(self.prefix.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

/// An immutable table; a new one is built and swapped in whole on every change, so a request
/// sees either the old routes or the new ones, never a mix.
#[derive(Debug)]
pub struct RouteTable<S> {
    /// Sorted so that the first match is the best one: host routes before hostless, then
    /// longer prefixes first.
    routes: Vec<(RouteKey, Arc<S>)>,
    /// Every running service by `app/service`, routed or not: for requests another node of a
    /// cluster forwarded, which name their service (trigger deliveries have no route).
    named: std::collections::BTreeMap<String, Arc<S>>,
}

impl<S> Default for RouteTable<S> {
    fn default() -> Self {
        RouteTable {
            routes: Vec::new(),
            named: std::collections::BTreeMap::new(),
        }
    }
}

impl<S> RouteTable<S> {
    pub fn new(mut routes: Vec<(RouteKey, Arc<S>)>) -> Self {
        routes.sort_by(|(a, _), (b, _)| {
            b.host
                .is_some()
                .cmp(&a.host.is_some())
                .then(b.prefix.len().cmp(&a.prefix.len()))
                .then(a.cmp(b))
        });
        RouteTable {
            routes,
            named: std::collections::BTreeMap::new(),
        }
    }

    /// The same table, also naming every running service (`app/service`).
    #[must_use]
    pub fn with_named(mut self, named: impl IntoIterator<Item = (String, Arc<S>)>) -> Self {
        self.named = named.into_iter().collect();
        self
    }

    /// The running service named `app/service`.
    pub fn named(&self, name: &str) -> Option<&Arc<S>> {
        self.named.get(name)
    }

    /// The service for a request's `Host` (port stripped, any case) and path.
    pub fn lookup(&self, host: Option<&str>, path: &str) -> Option<&Arc<S>> {
        let host = host.map(|h| strip_port(h).to_ascii_lowercase());
        self.routes
            .iter()
            .find(|(key, _)| {
                key.host
                    .as_deref()
                    .is_none_or(|want| Some(want) == host.as_deref())
                    && key.matches_path(path)
            })
            .map(|(_, service)| service)
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<S>> {
        self.routes.iter().map(|(_, service)| service)
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host
            .split_once(']')
            .map(|(h, _)| &host[..h.len() + 1])
            .unwrap_or(host);
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map(|(h, _)| h)
        .unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable<&'static str> {
        RouteTable::new(vec![
            (RouteKey::new(None, "/"), Arc::new("root")),
            (RouteKey::new(None, "/api/"), Arc::new("api")),
            (RouteKey::new(None, "/api/v2"), Arc::new("api-v2")),
            (
                RouteKey::new(Some("Shop.Local"), "/api"),
                Arc::new("shop-api"),
            ),
        ])
    }

    fn check(host: Option<&str>, path: &str, expect: Option<&str>) {
        let table = table();
        assert_eq!(
            table.lookup(host, path).map(|s| **s),
            expect,
            "{host:?} {path}"
        );
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        check(None, "/api", Some("api"));
        check(None, "/api/v2/x", Some("api-v2"));
        check(None, "/api/v20", Some("api"));
        check(None, "/apix", Some("root"));
        check(None, "/", Some("root"));
    }

    #[test]
    fn host_routes_win_and_ignore_port_and_case() {
        check(Some("shop.local:8080"), "/api/v2", Some("shop-api"));
        check(Some("SHOP.local"), "/other", Some("root"));
        check(Some("other.local"), "/api/v2", Some("api-v2"));
        check(Some("[::1]:8080"), "/api", Some("api"));
    }

    #[test]
    fn empty_table_matches_nothing() {
        let table: RouteTable<()> = RouteTable::default();
        assert!(table.lookup(None, "/").is_none());
    }
}
