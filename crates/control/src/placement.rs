//! Placement: which nodes of a cluster run each service's instances, and how many each may
//! run. The scheduler (the node holding the scheduler lease) computes it with [`place`] from
//! the deployed services and the nodes whose announcements stand, and writes it to the
//! cluster; every node applies its share ([`crate::node::Node::set_placement`]).
//!
//! The rules, in order:
//! 1. A node may run a service only if it is not draining, is in the service's region (if
//!    the manifest names one) and matches its edge rule (`only` / `never`).
//! 2. A service runs on as many of those nodes as its `instances.max` allows (one instance
//!    per node at least), so losing a node loses as little of it as possible.
//! 3. Nodes already running the service keep it (a placement moves instances only when a
//!    node leaves, drains or stops matching), then new ones are chosen: with `spread =
//!    "zone"` from the zones holding fewest of the service's nodes first, then the least
//!    loaded node (instances' memory over the node's memory), then by name.
//! 4. `instances.min` and `instances.max` are divided over the chosen nodes, the remainder
//!    going to the first by name: the sum of the nodes' maxima is exactly the service's
//!    maximum, so the cluster never runs more instances than the manifest allows (but for
//!    a node cut off from the cluster, which keeps what it runs: docs/cluster.md).
//!
//! 5. A share grows only once the shares that shrink have been given up
//!    ([`hold_growth`]): while a listed node still runs more instances than its new share,
//!    every growing share keeps its old size, so the nodes never run more than the maximum
//!    together while one scales down and another up (their placements are applied at
//!    different moments). A node that is not listed (gone, cut off) is not waited for: its
//!    instances are the allowance of a node cut off.
//! 6. A service that no listed node may run, placed on nodes that are all gone or cut off
//!    (an edge-only service whose edge node's link is down), keeps its placement: nothing
//!    else runs it, and its node goes on with its share when it returns.
//!
//! Each placement also names the node that delivers the service's triggers: the first by
//! name that is not an edge node (an edge node's topics hold only its own events); a
//! service placed on edge nodes only has each of them deliver its own events.
//!
//! Demand is not yet part of placement: each node scales its share by the requests that
//! reach it (its gateway's, and the overflow of other nodes' shares, `gateway::peers`),
//! and gateways that do not run a service forward to nodes that do.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::manifest::{EdgeRule, Placement, Spread};

/// Memory counted for an instance whose manifest sets none (processes).
pub const DEFAULT_INSTANCE_BYTES: u64 = 64 * 1024 * 1024;

/// How many instances one node may run of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    pub min: u32,
    pub max: u32,
}

/// Where one service runs: its nodes and their shares, or why it runs nowhere.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePlacement {
    pub nodes: BTreeMap<String, Share>,
    /// Set when no node may run the service (`nodes` is then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unplaced: Option<String>,
    /// The node that delivers the service's triggers: the first by name of its nodes that
    /// is not an edge node (the cluster's topics hold every node's events, an edge node's
    /// own topics only its own), else the first. Absent in placements written before it
    /// existed: the first by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub triggers: Option<String>,
    /// Every node of the placement is an edge node: then each delivers the service's
    /// triggers from its own topics (they hold its own events only, and no node holds
    /// them all), and `triggers` is not used.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub edge_only: bool,
}

/// One app's placement, by service name: the value the cluster stores per app.
pub type AppPlacement = BTreeMap<String, ServicePlacement>;

/// A service to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub app: String,
    pub service: String,
    pub instances_min: u32,
    pub instances_max: u32,
    /// Per instance; `None` counts as [`DEFAULT_INSTANCE_BYTES`].
    pub memory_bytes: Option<u64>,
    pub rule: Placement,
}

/// A node that may be given instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub region: String,
    pub zone: String,
    pub edge: bool,
    pub memory_bytes: u64,
    pub draining: bool,
}

impl Candidate {
    fn allows(&self, rule: &Placement) -> bool {
        !self.draining
            && rule
                .region
                .as_ref()
                .is_none_or(|region| *region == self.region)
            && match rule.edge {
                EdgeRule::Allowed => true,
                EdgeRule::Only => self.edge,
                EdgeRule::Never => !self.edge,
            }
    }
}

/// Why no node may run a service, for `maru ps` and the gateway's answer.
fn unplaced_reason(rule: &Placement, nodes: &[Candidate]) -> String {
    if nodes.is_empty() {
        return "no node is up".into();
    }
    if nodes.iter().all(|n| n.draining) {
        return "every node is draining".into();
    }
    let mut wants = Vec::new();
    if let Some(region) = &rule.region {
        wants.push(format!("in region {region}"));
    }
    match rule.edge {
        EdgeRule::Allowed => {}
        EdgeRule::Only => wants.push("an edge node".into()),
        EdgeRule::Never => wants.push("not an edge node".into()),
    }
    format!(
        "no node that is not draining matches its placement ({})",
        wants.join(", ")
    )
}

/// Hold back the shares of `placed` that grow from `previous` while a listed node still
/// runs more instances than its share in `placed`. `running`: every listed node and the
/// instances of this service it announced (a node listed nowhere in the placements counts
/// with a share of 0, so a node given up on in an earlier round is still waited for).
/// Returns whether any share was held.
pub fn hold_growth(
    placed: &mut ServicePlacement,
    previous: Option<&ServicePlacement>,
    running: &BTreeMap<String, u32>,
) -> bool {
    let old = |node: &str| {
        previous
            .and_then(|p| p.nodes.get(node))
            .copied()
            .unwrap_or(Share { min: 0, max: 0 })
    };
    let giving_up = running.iter().any(|(node, runs)| {
        let share = placed.nodes.get(node).map_or(0, |s| s.max);
        *runs > share
    });
    if !giving_up {
        return false;
    }
    let growing: Vec<String> = placed
        .nodes
        .iter()
        .filter(|(node, share)| share.max > old(node).max)
        .map(|(node, _)| node.clone())
        .collect();
    for node in &growing {
        let before = old(node);
        if before.max == 0 {
            placed.nodes.remove(node);
        } else {
            placed.nodes.insert(node.clone(), before);
        }
    }
    if placed.nodes.is_empty() && placed.unplaced.is_none() {
        placed.unplaced = Some("moving: waiting for a node to stop its instances".into());
    }
    !growing.is_empty()
}

/// Place every service (module docs). `previous` is the placement standing now, by (app,
/// service); the result has an entry for every want. Deterministic for its inputs.
pub fn place(
    wants: &[Want],
    nodes: &[Candidate],
    previous: &BTreeMap<(String, String), ServicePlacement>,
) -> BTreeMap<(String, String), ServicePlacement> {
    // Memory planned on each node so far, in bytes.
    let mut planned: BTreeMap<&str, u128> = nodes.iter().map(|n| (n.name.as_str(), 0)).collect();
    let mut wants: Vec<&Want> = wants.iter().collect();
    wants.sort_by(|a, b| (&a.app, &a.service).cmp(&(&b.app, &b.service)));
    let mut placed = BTreeMap::new();
    for want in wants {
        let key = (want.app.clone(), want.service.clone());
        let eligible: Vec<&Candidate> = nodes.iter().filter(|n| n.allows(&want.rule)).collect();
        let count = (want.instances_max as usize).min(eligible.len());
        // No listed node may run it, though nodes did: they are gone or cut off (an edge
        // node whose link is down, say). Nothing else runs it, so the placement stays as it
        // was: a node that comes back goes on with its share instead of stopping it and
        // starting it again once the scheduler has seen it return.
        if count == 0
            && want.instances_max > 0
            && let Some(before) = previous.get(&key)
            && !before.nodes.is_empty()
            && before
                .nodes
                .keys()
                .all(|name| !nodes.iter().any(|n| n.name == *name))
            && before.nodes.values().map(|s| s.max).sum::<u32>() == want.instances_max
            && before.nodes.values().map(|s| s.min).sum::<u32>()
                == want.instances_min.min(want.instances_max)
        {
            placed.insert(key, before.clone());
            continue;
        }
        if count == 0 {
            let unplaced = if want.instances_max == 0 {
                "its instances.max is 0".to_string()
            } else {
                unplaced_reason(&want.rule, nodes)
            };
            placed.insert(
                key,
                ServicePlacement {
                    nodes: BTreeMap::new(),
                    unplaced: Some(unplaced),
                    triggers: None,
                    edge_only: false,
                },
            );
            continue;
        }
        let instance_bytes = u128::from(want.memory_bytes.unwrap_or(DEFAULT_INSTANCE_BYTES));
        // Keep the nodes that run it now, as long as they may.
        let mut chosen: Vec<&Candidate> = match previous.get(&key) {
            Some(before) => eligible
                .iter()
                .filter(|n| before.nodes.contains_key(&n.name))
                .take(count)
                .copied()
                .collect(),
            None => Vec::new(),
        };
        while chosen.len() < count {
            let load = |n: &Candidate| {
                // Fraction of the node's memory planned, compared without floats:
                // planned / memory, as planned * 2^20 / memory.
                let memory = u128::from(n.memory_bytes.max(1));
                (planned[n.name.as_str()] << 20) / memory
            };
            let zone_use = |n: &Candidate| match want.rule.spread {
                Spread::Zone => chosen.iter().filter(|c| c.zone == n.zone).count(),
                Spread::Node => 0,
            };
            let next = eligible
                .iter()
                .filter(|n| !chosen.iter().any(|c| c.name == n.name))
                .min_by(|a, b| {
                    (zone_use(a), load(a), &a.name).cmp(&(zone_use(b), load(b), &b.name))
                })
                .copied();
            let Some(next) = next else { break };
            chosen.push(next);
        }
        chosen.sort_by(|a, b| a.name.cmp(&b.name));
        let k = chosen.len() as u32;
        assert!(
            (1..=want.instances_max).contains(&k),
            "one instance per node at least"
        );
        let mut shares = BTreeMap::new();
        for (i, node) in chosen.iter().enumerate() {
            let i = i as u32;
            let max = want.instances_max / k + u32::from(i < want.instances_max % k);
            let min = want.instances_min.min(want.instances_max) / k
                + u32::from(i < want.instances_min.min(want.instances_max) % k);
            assert!(min <= max && max >= 1, "a share is at least one instance");
            *planned
                .get_mut(node.name.as_str())
                .expect("every node is planned") += u128::from(max) * instance_bytes;
            shares.insert(node.name.clone(), Share { min, max });
        }
        assert_eq!(
            shares.values().map(|s| s.max).sum::<u32>(),
            want.instances_max,
            "the shares add up to the service's maximum"
        );
        let triggers = chosen
            .iter()
            .find(|n| !n.edge)
            .or(chosen.first())
            .map(|n| n.name.clone());
        placed.insert(
            key,
            ServicePlacement {
                nodes: shares,
                unplaced: None,
                triggers,
                edge_only: chosen.iter().all(|n| n.edge),
            },
        );
    }
    placed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, zone: &str) -> Candidate {
        Candidate {
            name: name.into(),
            region: "seoul".into(),
            zone: zone.into(),
            edge: false,
            memory_bytes: 8 << 30,
            draining: false,
        }
    }

    fn want(service: &str, min: u32, max: u32) -> Want {
        Want {
            app: "a".into(),
            service: service.into(),
            instances_min: min,
            instances_max: max,
            memory_bytes: None,
            rule: Placement::default(),
        }
    }

    fn placement(shares: &[(&str, u32, u32)]) -> ServicePlacement {
        ServicePlacement {
            triggers: None,
            edge_only: false,
            nodes: shares
                .iter()
                .map(|(n, min, max)| {
                    (
                        n.to_string(),
                        Share {
                            min: *min,
                            max: *max,
                        },
                    )
                })
                .collect(),
            unplaced: None,
        }
    }

    fn runs(listed: &[(&str, u32)]) -> BTreeMap<String, u32> {
        listed.iter().map(|(n, r)| (n.to_string(), *r)).collect()
    }

    #[test]
    fn a_share_grows_only_once_the_shrinking_ones_are_given_up() {
        // n2 ran both instances while n3 was away; n3 is back and gets one of them.
        let previous = placement(&[("n2", 2, 2)]);
        let wanted = placement(&[("n2", 1, 1), ("n3", 1, 1)]);
        // n2 still runs two: n3 waits, n2 shrinks.
        let mut placed = wanted.clone();
        assert!(hold_growth(
            &mut placed,
            Some(&previous),
            &runs(&[("n2", 2), ("n3", 0)])
        ));
        assert_eq!(placed, placement(&[("n2", 1, 1)]));
        // n2 runs one now: n3 grows.
        let mut placed = wanted.clone();
        assert!(!hold_growth(
            &mut placed,
            Some(&previous),
            &runs(&[("n2", 1), ("n3", 0)])
        ));
        assert_eq!(placed, wanted);
        // A node not listed (gone, cut off) is not waited for: its share moves at once.
        let previous = placement(&[("n1", 1, 1), ("n2", 1, 1)]);
        let wanted = placement(&[("n2", 1, 1), ("n3", 1, 1)]);
        let mut placed = wanted.clone();
        assert!(!hold_growth(
            &mut placed,
            Some(&previous),
            &runs(&[("n2", 1), ("n3", 0)])
        ));
        assert_eq!(placed, wanted);
        // A drained node still running the only instance: the service waits, unplaced
        // for the moment, rather than run two.
        let previous = placement(&[("n1", 1, 1)]);
        let drained = runs(&[("n1", 1), ("n2", 0)]);
        let mut placed = placement(&[("n2", 1, 1)]);
        assert!(hold_growth(&mut placed, Some(&previous), &drained));
        assert!(placed.nodes.is_empty());
        assert!(placed.unplaced.is_some());
        // The next round starts from the held placement, where n1 has no share any more:
        // it still runs its instance, so n2 still waits; once n1 has stopped, n2 grows.
        let held = placed.clone();
        let mut placed = placement(&[("n2", 1, 1)]);
        assert!(hold_growth(&mut placed, Some(&held), &drained));
        assert!(placed.nodes.is_empty());
        let mut placed = placement(&[("n2", 1, 1)]);
        assert!(!hold_growth(
            &mut placed,
            Some(&held),
            &runs(&[("n1", 0), ("n2", 0)])
        ));
        assert_eq!(placed, placement(&[("n2", 1, 1)]));
        // A new service grows from nothing: nothing to wait for.
        let mut placed = wanted.clone();
        assert!(!hold_growth(
            &mut placed,
            None,
            &runs(&[("n2", 0), ("n3", 0)])
        ));
        assert_eq!(placed, wanted);
    }

    fn shares(placed: &ServicePlacement) -> Vec<(String, u32, u32)> {
        placed
            .nodes
            .iter()
            .map(|(n, s)| (n.clone(), s.min, s.max))
            .collect()
    }

    fn key(service: &str) -> (String, String) {
        ("a".into(), service.into())
    }

    #[test]
    fn a_service_is_spread_over_as_many_nodes_as_its_maximum_allows() {
        let nodes = [node("n1", "a"), node("n2", "b"), node("n3", "c")];
        let placed = place(
            &[want("wide", 1, 10), want("one", 0, 1), want("two", 2, 2)],
            &nodes,
            &BTreeMap::new(),
        );
        assert_eq!(
            shares(&placed[&key("wide")]),
            [
                ("n1".into(), 1, 4),
                ("n2".into(), 0, 3),
                ("n3".into(), 0, 3)
            ]
        );
        assert_eq!(placed[&key("one")].nodes.len(), 1);
        let two = shares(&placed[&key("two")]);
        assert_eq!(two.len(), 2);
        assert!(two.iter().all(|(_, min, max)| (*min, *max) == (1, 1)));
        // The single-instance services went to different nodes (load).
        let one = placed[&key("one")].nodes.keys().next().expect("placed");
        assert!(!two.iter().any(|(n, ..)| n == one), "{one} {two:?}");
    }

    #[test]
    fn zones_are_spread_over_before_nodes() {
        let nodes = [
            node("n1", "a"),
            node("n2", "a"),
            node("n3", "a"),
            node("n4", "b"),
        ];
        let placed = place(&[want("s", 2, 2)], &nodes, &BTreeMap::new());
        let zones: Vec<&str> = placed[&key("s")]
            .nodes
            .keys()
            .map(|name| {
                nodes
                    .iter()
                    .find(|n| n.name == *name)
                    .map_or("", |n| &n.zone)
            })
            .collect();
        assert_eq!(zones, ["a", "b"]);
        let mut by_node = want("s", 2, 2);
        by_node.rule.spread = Spread::Node;
        let placed = place(&[by_node], &nodes, &BTreeMap::new());
        assert_eq!(
            placed[&key("s")].nodes.keys().collect::<Vec<_>>(),
            ["n1", "n2"]
        );
    }

    #[test]
    fn region_and_edge_rules_choose_the_nodes_and_say_why_when_none_fits() {
        let mut edge = node("e1", "street");
        edge.edge = true;
        let mut busan = node("b1", "x");
        busan.region = "busan".into();
        let nodes = [node("n1", "a"), edge, busan];
        let mut only = want("signals", 1, 3);
        only.rule.edge = EdgeRule::Only;
        let mut never = want("records", 1, 3);
        never.rule.edge = EdgeRule::Never;
        let mut busan_only = want("port", 1, 3);
        busan_only.rule.region = Some("busan".into());
        let mut nowhere = want("lost", 1, 3);
        nowhere.rule.region = Some("jeju".into());
        let placed = place(
            &[only, never, busan_only, nowhere],
            &nodes,
            &BTreeMap::new(),
        );
        assert_eq!(shares(&placed[&key("signals")]), [("e1".into(), 1, 3)]);
        assert_eq!(
            placed[&key("records")].nodes.keys().collect::<Vec<_>>(),
            ["b1", "n1"]
        );
        assert_eq!(shares(&placed[&key("port")]), [("b1".into(), 1, 3)]);
        assert!(placed[&key("lost")].nodes.is_empty());
        assert_eq!(
            placed[&key("lost")].unplaced.as_deref(),
            Some("no node that is not draining matches its placement (in region jeju)")
        );
    }

    #[test]
    fn a_lost_or_draining_node_s_share_moves_and_the_others_stay() {
        let nodes = [node("n1", "a"), node("n2", "b"), node("n3", "c")];
        let before = place(&[want("s", 2, 2)], &nodes, &BTreeMap::new());
        let held: Vec<String> = before[&key("s")].nodes.keys().cloned().collect();
        assert_eq!(held, ["n1", "n2"]);
        // n1 dies: n2 keeps its share, n3 takes n1's.
        let after = place(&[want("s", 2, 2)], &nodes[1..], &before);
        assert_eq!(
            shares(&after[&key("s")]),
            [("n2".into(), 1, 1), ("n3".into(), 1, 1)]
        );
        // n1 comes back: nothing moves.
        assert_eq!(place(&[want("s", 2, 2)], &nodes, &after), after);
        // n2 drains.
        let mut draining = nodes.clone();
        draining[1].draining = true;
        let drained = place(&[want("s", 2, 2)], &draining, &after);
        assert_eq!(
            drained[&key("s")].nodes.keys().collect::<Vec<_>>(),
            ["n1", "n3"]
        );
        let everyone = nodes.iter().cloned().map(|mut n| {
            n.draining = true;
            n
        });
        let none = place(&[want("s", 2, 2)], &everyone.collect::<Vec<_>>(), &after);
        assert_eq!(
            none[&key("s")].unplaced.as_deref(),
            Some("every node is draining")
        );
        // No node listed at all: nothing else could run it, so the placement stays.
        assert_eq!(place(&[want("s", 2, 2)], &[], &after), after);
        assert_eq!(
            place(&[want("s", 2, 2)], &[], &BTreeMap::new())[&key("s")]
                .unplaced
                .as_deref(),
            Some("no node is up")
        );
    }

    #[test]
    fn an_edge_node_cut_off_keeps_its_share_and_triggers_go_to_a_node_that_is_not_edge() {
        let mut e1 = node("e1", "street");
        e1.edge = true;
        let nodes = [e1, node("n1", "a"), node("n2", "b")];
        let mut signals = want("signals", 1, 1);
        signals.rule.edge = EdgeRule::Only;
        let anywhere = want("anywhere", 3, 3);
        let before = place(
            &[signals.clone(), anywhere.clone()],
            &nodes,
            &BTreeMap::new(),
        );
        assert_eq!(shares(&before[&key("signals")]), [("e1".into(), 1, 1)]);
        assert!(
            before[&key("signals")].edge_only,
            "each edge node delivers its own"
        );
        // Placed on every node, e1 first by name: a node that is not edge delivers the
        // triggers (the cluster's topics hold every node's events; e1's only its own).
        assert_eq!(before[&key("anywhere")].nodes.len(), 3);
        assert_eq!(before[&key("anywhere")].triggers.as_deref(), Some("n1"));
        assert!(!before[&key("anywhere")].edge_only);
        // e1's link is down: it is not listed, no other node may run `signals`, so its
        // share stays with it (it keeps serving, and goes on when it returns); `anywhere`
        // moves its share to the others as for any lost node.
        let cut = place(&[signals.clone(), anywhere.clone()], &nodes[1..], &before);
        assert_eq!(cut[&key("signals")], before[&key("signals")]);
        assert_eq!(
            cut[&key("anywhere")].nodes.keys().collect::<Vec<_>>(),
            ["n1", "n2"]
        );
        // Back: nothing moves for `signals`.
        let back = place(&[signals.clone(), anywhere], &nodes, &cut);
        assert_eq!(back[&key("signals")], before[&key("signals")]);
        // Redeployed with another maximum while e1 is away: placed anew (nowhere), not kept.
        let mut more = signals.clone();
        more.instances_max = 2;
        assert!(
            place(&[more], &nodes[1..], &before)[&key("signals")]
                .nodes
                .is_empty()
        );
        // A node still listed that may no longer run it (draining) gives it up as before.
        let mut draining = nodes.clone();
        draining[0].draining = true;
        let drained = place(&[signals], &draining, &before);
        assert!(drained[&key("signals")].nodes.is_empty());
    }

    proptest::proptest! {
        /// Whatever the nodes and services, the shares add up to each maximum, no node
        /// gets a service it may not run, and minima never exceed maxima.
        #[test]
        fn shares_add_up_and_respect_the_rules(
            nodes in proptest::collection::vec((0u8..3, 0u8..3, proptest::bool::ANY, proptest::bool::ANY, 1u64..64), 0..8),
            wants in proptest::collection::vec((0u32..6, 0u32..12, 0u8..4, 0u8..3), 1..12),
        ) {
            let nodes: Vec<Candidate> = nodes.iter().enumerate().map(|(i, (region, zone, edge, draining, gib))| Candidate {
                name: format!("n{i}"),
                region: format!("r{region}"),
                zone: format!("z{zone}"),
                edge: *edge,
                memory_bytes: gib << 30,
                draining: *draining,
            }).collect();
            let wants: Vec<Want> = wants.iter().enumerate().map(|(i, (min, max, region, edge))| Want {
                app: "a".into(),
                service: format!("s{i}"),
                instances_min: (*min).min(*max),
                instances_max: *max,
                memory_bytes: Some(u64::from(*max + 1) << 24),
                rule: Placement {
                    region: (*region < 3).then(|| format!("r{region}")),
                    spread: if i % 2 == 0 { Spread::Zone } else { Spread::Node },
                    edge: [EdgeRule::Allowed, EdgeRule::Only, EdgeRule::Never][*edge as usize],
                },
            }).collect();
            let placed = place(&wants, &nodes, &BTreeMap::new());
            let again = place(&wants, &nodes, &placed);
            proptest::prop_assert_eq!(&again, &placed, "placing again moves nothing");
            for want in &wants {
                let p = &placed[&(want.app.clone(), want.service.clone())];
                if p.nodes.is_empty() {
                    proptest::prop_assert!(p.unplaced.is_some());
                    continue;
                }
                proptest::prop_assert_eq!(p.nodes.values().map(|s| s.max).sum::<u32>(), want.instances_max);
                proptest::prop_assert_eq!(p.nodes.values().map(|s| s.min).sum::<u32>(), want.instances_min);
                for (name, share) in &p.nodes {
                    let node = nodes.iter().find(|n| &n.name == name).expect("a real node");
                    proptest::prop_assert!(node.allows(&want.rule));
                    proptest::prop_assert!(share.min <= share.max && share.max >= 1);
                }
            }
        }
    }
}
