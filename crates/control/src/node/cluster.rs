//! A node's part in a cluster's placement: which services it runs and how many instances
//! of each (its share), which it forwards to other nodes, and what it tells the scheduler
//! to place. The placement itself is computed in [`crate::placement`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use gateway::Locality;

use super::{ControlError, Node, ServiceKey};
use crate::placement::{AppPlacement, Want};

/// How long a deploy waits for the scheduler to place a new service before it answers.
pub const PLACEMENT_WAIT: Duration = Duration::from_secs(10);

/// What a node in a cluster knows of placement.
#[derive(Debug, Default)]
pub(super) struct ClusterView {
    /// This node's name.
    name: String,
    /// Apps the cluster shares (read back from it); other apps in this node's state were
    /// deployed before it joined and run here alone.
    shared: BTreeSet<String>,
    /// The placement of each shared app, as last read.
    placements: BTreeMap<String, AppPlacement>,
}

impl ClusterView {
    pub(super) fn locality(&self, (app, service): &ServiceKey) -> Locality {
        if !self.shared.contains(app) {
            return Locality::Alone;
        }
        let Some(placed) = self.placements.get(app).and_then(|a| a.get(service)) else {
            return Locality::Unplaced("the cluster's scheduler has not placed it yet".into());
        };
        if placed.nodes.is_empty() {
            return Locality::Unplaced(
                placed
                    .unplaced
                    .clone()
                    .unwrap_or_else(|| "no node may run it".into()),
            );
        }
        match placed.nodes.get(&self.name) {
            Some(share) => Locality::Here {
                min: share.min,
                max: share.max,
                others: placed
                    .nodes
                    .keys()
                    .filter(|node| **node != self.name)
                    .cloned()
                    .collect(),
            },
            None => Locality::Elsewhere(placed.nodes.keys().cloned().collect()),
        }
    }

    /// Whether this node delivers the service's triggers. The cluster keeps the topics, so
    /// one node delivers: the one the scheduler named (the first by name of the service's
    /// nodes that is not an edge node), or in a placement written without that name the
    /// first by name. A service placed on edge nodes only has each of them deliver its own
    /// topics' events (no node holds them all). When the placement moves, the next one takes over from
    /// the offset the group last committed (at least once: a window under way when it
    /// moved may be delivered twice).
    pub(super) fn delivers_triggers(&self, (app, service): &ServiceKey) -> bool {
        if !self.shared.contains(app) {
            return true;
        }
        let placed = self.placements.get(app).and_then(|a| a.get(service));
        if let Some(placed) = placed
            && placed.edge_only
        {
            return placed.nodes.contains_key(&self.name);
        }
        placed
            .and_then(|placed| {
                placed
                    .triggers
                    .as_ref()
                    .filter(|named| placed.nodes.contains_key(*named))
                    .or_else(|| placed.nodes.keys().next())
            })
            .is_some_and(|first| *first == self.name)
    }
}

impl Node {
    /// This node is `name` in a cluster from now on (once, at start, before the first
    /// reconcile): services of the cluster's apps run only where the scheduler places them.
    pub fn join_cluster(&self, name: &str) {
        let mut cluster = self.cluster.lock().expect("never poisoned");
        if cluster.is_none() {
            *cluster = Some(ClusterView {
                name: name.to_string(),
                ..ClusterView::default()
            });
        }
    }

    /// The app is (`true`) or is no longer (`false`) one the cluster shares.
    pub(super) fn mark_shared(&self, app: &str, shared: bool) {
        if let Some(cluster) = self.cluster.lock().expect("never poisoned").as_mut() {
            if shared {
                cluster.shared.insert(app.to_string());
            } else {
                cluster.shared.remove(app);
                cluster.placements.remove(app);
            }
        }
    }

    /// The placement of an app as the cluster's scheduler wrote it (`None`: none).
    pub fn set_placement(&self, app: &str, placement: Option<AppPlacement>) {
        {
            let mut cluster = self.cluster.lock().expect("never poisoned");
            let Some(cluster) = cluster.as_mut() else {
                return;
            };
            match placement {
                Some(placement) => {
                    cluster.placements.insert(app.to_string(), placement);
                }
                None => {
                    cluster.placements.remove(app);
                }
            }
        }
        self.apply_localities();
        self.placed.notify_waiters();
    }

    /// Where a service's instances run, as this node knows it.
    pub(super) fn locality(&self, key: &ServiceKey) -> Locality {
        match self.cluster.lock().expect("never poisoned").as_ref() {
            None => Locality::Alone,
            Some(cluster) => cluster.locality(key),
        }
    }

    /// Tell every running service where it runs now, and whether it delivers its triggers.
    pub(super) fn apply_localities(&self) {
        let running = self.running.lock().expect("running lock is never poisoned");
        let cluster = self.cluster.lock().expect("never poisoned");
        for (key, running) in running.iter() {
            let (locality, triggers) = match cluster.as_ref() {
                None => (Locality::Alone, true),
                Some(cluster) => (cluster.locality(key), cluster.delivers_triggers(key)),
            };
            running.service.set_locality(locality);
            running.service.set_triggers_here(triggers);
        }
    }

    /// Wait (at most [`PLACEMENT_WAIT`]) until every service of `app` is placed with the
    /// instances its manifest asks for (`services`: name, min, max), so a deploy answers
    /// once its services can be reached as deployed (a redeploy that changes a maximum
    /// waits for the new shares); false if the wait ran out.
    pub(super) async fn wait_placed(&self, app: &str, services: &[(String, u32, u32)]) -> bool {
        let deadline = tokio::time::Instant::now() + PLACEMENT_WAIT;
        loop {
            let placed = self.placed.notified();
            let done = match self.cluster.lock().expect("never poisoned").as_ref() {
                None => true,
                Some(cluster) => services.iter().all(|(service, min, max)| {
                    cluster
                        .placements
                        .get(app)
                        .and_then(|p| p.get(service))
                        .is_some_and(|placed| {
                            placed.unplaced.is_some()
                                || (placed.nodes.values().map(|s| s.max).sum::<u32>() == *max
                                    && placed.nodes.values().map(|s| s.min).sum::<u32>()
                                        == (*min).min(*max))
                        })
                }),
            };
            if done {
                return true;
            }
            if tokio::time::timeout_at(deadline, placed).await.is_err() {
                return false;
            }
        }
    }

    /// What the scheduler places: every service of the apps the cluster shares.
    pub fn placement_wants(&self) -> Result<Vec<Want>, ControlError> {
        let shared = match self.cluster.lock().expect("never poisoned").as_ref() {
            None => return Ok(Vec::new()),
            Some(cluster) => cluster.shared.clone(),
        };
        let mut wants = Vec::new();
        for deployed in self.deployed()? {
            if !shared.contains(&deployed.app) {
                continue;
            }
            for (name, service) in &deployed.manifest.services {
                wants.push(Want {
                    app: deployed.app.clone(),
                    service: name.clone(),
                    instances_min: service.instances_min,
                    instances_max: service.instances_max,
                    memory_bytes: service.memory_bytes,
                    rule: service.placement.clone(),
                });
            }
        }
        Ok(wants)
    }

    /// The apps the cluster shares, as this node has applied them.
    pub fn shared_apps(&self) -> BTreeSet<String> {
        self.cluster
            .lock()
            .expect("never poisoned")
            .as_ref()
            .map(|c| c.shared.clone())
            .unwrap_or_default()
    }

    /// Drain a node of the cluster (`drain`: its instances move to other nodes, nothing more
    /// is placed on it), or stop draining it.
    pub async fn drain(&self, node: &str, drain: bool) -> Result<(), ControlError> {
        if self.shared.get().is_none() {
            return Err(ControlError::BadRequest {
                message: "this node is not in a cluster: there is nowhere to move its instances"
                    .into(),
                hint: Some(
                    "stop a node alone with SIGTERM: it finishes the requests it has".into(),
                ),
            });
        }
        if drain && !self.nodes().iter().any(|n| n.name == node) {
            return Err(ControlError::BadRequest {
                message: format!("no node {node} is in the cluster"),
                hint: Some("`maru nodes` lists them".into()),
            });
        }
        let directory = self
            .directory
            .get()
            .ok_or_else(|| ControlError::Internal("the node list is not set up yet".into()))?;
        directory
            .drain(node, drain)
            .await
            .map_err(ControlError::ClusterUnavailable)
    }

    /// While held, changes read from the cluster update the state but start nothing: a node
    /// catching up at start reconciles once, after it has read every app and placement.
    pub fn hold_reconcile(&self, held: bool) {
        self.reconcile_held
            .store(held, std::sync::atomic::Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{ServicePlacement, Share};

    #[test]
    fn a_service_runs_here_elsewhere_alone_or_nowhere_as_placed() {
        let mut view = ClusterView {
            name: "n1".into(),
            ..ClusterView::default()
        };
        let key = |app: &str, service: &str| (app.to_string(), service.to_string());
        assert_eq!(view.locality(&key("local", "s")), Locality::Alone);
        view.shared.insert("a".into());
        assert!(matches!(
            view.locality(&key("a", "s")),
            Locality::Unplaced(_)
        ));
        let mut app = AppPlacement::new();
        app.insert(
            "here".into(),
            ServicePlacement {
                nodes: [
                    ("n1".to_string(), Share { min: 1, max: 2 }),
                    ("n2".to_string(), Share { min: 0, max: 1 }),
                ]
                .into(),
                unplaced: None,
                triggers: None,
                edge_only: false,
            },
        );
        app.insert(
            "there".into(),
            ServicePlacement {
                nodes: [("n2".to_string(), Share { min: 1, max: 1 })].into(),
                unplaced: None,
                triggers: None,
                edge_only: false,
            },
        );
        app.insert(
            "nowhere".into(),
            ServicePlacement {
                nodes: BTreeMap::new(),
                unplaced: Some("every node is draining".into()),
                triggers: None,
                edge_only: false,
            },
        );
        view.placements.insert("a".into(), app);
        assert_eq!(
            view.locality(&key("a", "here")),
            Locality::Here {
                min: 1,
                max: 2,
                others: ["n2".to_string()].into()
            }
        );
        assert_eq!(
            view.locality(&key("a", "there")),
            Locality::Elsewhere(vec!["n2".into()])
        );
        assert_eq!(
            view.locality(&key("a", "nowhere")),
            Locality::Unplaced("every node is draining".into())
        );
        // One node delivers a shared app's triggers: the first by name it is placed on.
        assert!(view.delivers_triggers(&key("a", "here")));
        assert!(!view.delivers_triggers(&key("a", "there")));
        assert!(!view.delivers_triggers(&key("a", "nowhere")));
        assert!(view.delivers_triggers(&key("local", "s")));
        let n2 = ClusterView {
            name: "n2".into(),
            ..view
        };
        assert!(!n2.delivers_triggers(&key("a", "here")));
        assert!(n2.delivers_triggers(&key("a", "there")));
        // The node the scheduler names delivers, first by name or not; on edge nodes only,
        // each of them delivers its own events.
        let mut n2 = n2;
        let app = n2.placements.get_mut("a").expect("placed");
        app.get_mut("here").expect("placed").triggers = Some("n2".into());
        app.insert(
            "street".into(),
            ServicePlacement {
                nodes: [
                    ("e1".to_string(), Share { min: 1, max: 1 }),
                    ("n2".to_string(), Share { min: 1, max: 1 }),
                ]
                .into(),
                unplaced: None,
                triggers: Some("e1".into()),
                edge_only: true,
            },
        );
        assert!(n2.delivers_triggers(&key("a", "here")));
        assert!(n2.delivers_triggers(&key("a", "street")));
        let e1 = ClusterView {
            name: "e1".into(),
            ..n2
        };
        assert!(!e1.delivers_triggers(&key("a", "here")));
        assert!(e1.delivers_triggers(&key("a", "street")));
        let e3 = ClusterView {
            name: "e3".into(),
            ..e1
        };
        assert!(!e3.delivers_triggers(&key("a", "street")));
    }
}
