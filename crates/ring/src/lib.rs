//! torus-ring: placement, as pure functions (no I/O, no async).
//!
//! An extent's replicas are the R nodes with the highest weighted rendezvous
//! (HRW) scores for that extent: score = -weight / ln(u), u being a uniform
//! hash of (extent, node) in (0, 1). Adding or removing one node moves only
//! the extents whose top-R set it enters or leaves (about R/N of them), and
//! each node's share is proportional to its weight. Where nodes carry a
//! failure-domain label, replicas are chosen from distinct domains first.
//!
//! A member may be marked *full*: it stays a replica of the extents it
//! already holds, and new extents skip it for the next node in their
//! ranking. Which extents a full node holds is not part of the ring, so
//! [`Ring::replicas_held`] asks the caller (who asks the node).
//!
//! Depends on torus-types only.

use std::collections::HashSet;
use torus_types::{ids::splitmix64, ExtentId, NodeId};

/// One node as placement sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub id: NodeId,
    pub weight: f64,
    /// The failure domain (e.g. the value of a `zone` or `rack` label); `None` means its own.
    pub domain: Option<String>,
}

/// The nodes data is placed on. Built from the ring document in etcd.
#[derive(Clone, Debug, Default)]
pub struct Ring {
    pub version: u64,
    members: Vec<(Member, u64)>,
    /// Members that take no new extents.
    full: HashSet<NodeId>,
}

impl Ring {
    pub fn new(version: u64, members: Vec<Member>) -> Ring {
        let mut members: Vec<(Member, u64)> = members
            .into_iter()
            .filter(|m| m.weight > 0.0)
            .map(|m| {
                let seed = splitmix64((m.id.as_u128() >> 64) as u64 ^ splitmix64(m.id.as_u128() as u64));
                (m, seed)
            })
            .collect();
        members.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        Ring { version, members, full: HashSet::new() }
    }

    /// Marks members as full (see [`Ring::replicas_held`]).
    pub fn with_full(mut self, full: impl IntoIterator<Item = NodeId>) -> Ring {
        self.full = full.into_iter().filter(|n| self.members.iter().any(|(m, _)| m.id == *n)).collect();
        self
    }

    pub fn is_full(&self, id: NodeId) -> bool {
        self.full.contains(&id)
    }

    pub fn has_full(&self) -> bool {
        !self.full.is_empty()
    }

    /// Builds a ring from (id, weight, labels, full); the failure domain is
    /// the `zone` label, else the `rack` label, else the node itself.
    pub fn from_labeled<'a>(
        version: u64,
        members: impl IntoIterator<Item = (NodeId, u64, &'a std::collections::BTreeMap<String, String>, bool)>,
    ) -> Ring {
        let mut full = Vec::new();
        let members = members
            .into_iter()
            .map(|(id, weight, labels, is_full)| {
                if is_full {
                    full.push(id);
                }
                Member { id, weight: weight as f64, domain: labels.get("zone").or_else(|| labels.get("rack")).cloned() }
            })
            .collect();
        Ring::new(version, members).with_full(full)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().map(|(m, _)| m)
    }

    /// The ordered replica set of an extent ignoring full marks: up to `r`
    /// distinct nodes, the first being the preferred one. Where no member is
    /// full, these are the replicas.
    pub fn replicas(&self, extent: ExtentId, r: usize) -> Vec<NodeId> {
        self.replicas_skipping(extent, r, &[])
    }

    /// The replicas of an extent when members may be full: a full member is a
    /// replica only if it holds the extent (it takes no new ones), and the next
    /// node in the extent's ranking stands in for it otherwise. `holds(n)`
    /// tells, for a full member `n`, whether it holds the extent; where it
    /// returns `None`, this returns `Err(n)`: find out and ask again.
    pub fn replicas_held(
        &self,
        extent: ExtentId,
        r: usize,
        holds: impl Fn(NodeId) -> Option<bool>,
    ) -> Result<Vec<NodeId>, NodeId> {
        let mut skip = Vec::new();
        'again: loop {
            let set = self.replicas_skipping(extent, r, &skip);
            if self.full.is_empty() {
                return Ok(set);
            }
            for n in &set {
                if self.full.contains(n) {
                    match holds(*n) {
                        Some(true) => {}
                        Some(false) => {
                            skip.push(*n);
                            continue 'again;
                        }
                        None => return Err(*n),
                    }
                }
            }
            return Ok(set);
        }
    }

    /// Every node that may hold a replica of the extent, whatever the full
    /// members hold: the replicas ignoring full marks, then those skipping
    /// every full member. For readers that ask for present blocks only.
    pub fn candidates(&self, extent: ExtentId, r: usize) -> Vec<NodeId> {
        let mut out = self.replicas(extent, r);
        if !self.full.is_empty() {
            let full: Vec<NodeId> = self.full.iter().copied().collect();
            for n in self.replicas_skipping(extent, r, &full) {
                if !out.contains(&n) {
                    out.push(n);
                }
            }
        }
        out
    }

    fn replicas_skipping(&self, extent: ExtentId, r: usize, skip: &[NodeId]) -> Vec<NodeId> {
        let key = extent.placement_key();
        let mut scored: Vec<(f64, &Member)> = self
            .members
            .iter()
            .filter(|(m, _)| !skip.contains(&m.id))
            .map(|(m, seed)| {
                let h = splitmix64(key ^ seed);
                // Uniform in (0, 1): never exactly 0 or 1.
                let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                (-m.weight / u.ln(), m)
            })
            .collect();
        let order = |a: &(f64, &Member), b: &(f64, &Member)| b.0.total_cmp(&a.0).then_with(|| a.1.id.cmp(&b.1.id));
        // Only the best few matter: partially select them, then sort that head.
        let head = (4 * r).max(8);
        if scored.len() > head {
            scored.select_nth_unstable_by(head, order);
            scored[..head].sort_by(order);
            let wanted = self.pick(&scored[..head], r);
            if wanted.len() == r && self.domains_ok(&wanted, &scored[..head], r) {
                return wanted;
            }
        }
        scored.sort_by(order);
        self.pick(&scored, r)
    }

    /// True unless a node with an unused failure domain sits beyond the head.
    fn domains_ok(&self, picked: &[NodeId], head: &[(f64, &Member)], r: usize) -> bool {
        let in_head: HashSet<&str> = head.iter().filter_map(|(_, m)| m.domain.as_deref()).collect();
        let all: HashSet<&str> = self.members.iter().filter_map(|(m, _)| m.domain.as_deref()).collect();
        picked.len() == r && (in_head.len() >= r.min(all.len()) || in_head.len() == all.len())
    }

    fn pick(&self, scored: &[(f64, &Member)], r: usize) -> Vec<NodeId> {
        let mut out = Vec::with_capacity(r);
        let mut domains = HashSet::new();
        // First pass: distinct failure domains.
        for (_, m) in scored {
            if out.len() == r {
                break;
            }
            let fresh = match &m.domain {
                Some(d) => domains.insert(d.clone()),
                None => true,
            };
            if fresh {
                out.push(m.id);
            }
        }
        // Not enough domains: fill with the next best nodes.
        for (_, m) in scored {
            if out.len() == r {
                break;
            }
            if !out.contains(&m.id) {
                out.push(m.id);
            }
        }
        out
    }
}

/// Where an extent lives while data moves from ring `prev` to ring `next`:
/// `(old, new)` replicas, `holds(n)` telling whether node `n` holds a copy
/// now (`Err(n)`: find out and ask again).
///
/// - A member that is full in `next` and does not hold the extent is left out
///   of `old` as well: it has nothing to give, and must not be handed the
///   extent by writes meant for the old replicas.
/// - A member full in `prev` but not in `next` (its mark was cleared) may
///   receive the extent during this very move, so holding it now does not
///   make it an old replica: it was one only if no node that stood in for it
///   holds the extent. (After a move's clean-up, exactly one of them does.)
pub fn moving_replicas(
    prev: &Ring,
    next: &Ring,
    extent: ExtentId,
    r: usize,
    holds: impl Fn(NodeId) -> Option<bool>,
) -> Result<(Vec<NodeId>, Vec<NodeId>), NodeId> {
    let new = next.replicas_held(extent, r, &holds)?;
    // The first node whose answer was needed and missing.
    let need = std::cell::Cell::new(None);
    let ask = |n: NodeId| {
        let h = holds(n);
        if h.is_none() && need.get().is_none() {
            need.set(Some(n));
        }
        h
    };
    let held_before = |n: NodeId| -> Option<bool> {
        let h = ask(n)?;
        if !h || !prev.is_full(n) || next.is_full(n) {
            return Some(h);
        }
        let with = prev.replicas_held(extent, r, |m| if m == n { Some(true) } else { ask(m) }).ok()?;
        let without = prev.replicas_held(extent, r, |m| if m == n { Some(false) } else { ask(m) }).ok()?;
        for s in without.iter().filter(|s| !with.contains(s)) {
            if ask(*s)? {
                return Some(false);
            }
        }
        Some(true)
    };
    let missing = |n: NodeId| need.get().unwrap_or(n);
    let mut old = Vec::new();
    for n in prev.replicas_held(extent, r, held_before).map_err(missing)? {
        if next.is_full(n) {
            match ask(n) {
                Some(false) => continue,
                Some(true) => {}
                None => return Err(missing(n)),
            }
        }
        old.push(n);
    }
    Ok((old, new))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use torus_types::VolumeId;

    fn node(i: u64) -> NodeId {
        NodeId(uuid::Uuid::from_u64_pair(0x1234, i))
    }

    fn ring(n: u64) -> Ring {
        Ring::new(1, (0..n).map(|i| Member { id: node(i), weight: 1.0, domain: None }).collect())
    }

    fn extents(count: u64) -> impl Iterator<Item = ExtentId> {
        (0..count).map(|i| ExtentId::new(VolumeId(i % 97 + 1), i))
    }

    #[test]
    fn deterministic_and_distinct() {
        let r = ring(10);
        for e in extents(1000) {
            let a = r.replicas(e, 3);
            assert_eq!(a, r.replicas(e, 3));
            assert_eq!(a.len(), 3);
            assert_eq!(a.iter().collect::<HashSet<_>>().len(), 3);
            assert_eq!(&r.replicas(e, 2)[..], &a[..2], "smaller R is a prefix");
        }
        assert_eq!(ring(2).replicas(ExtentId::new(VolumeId(1), 0), 3).len(), 2, "never more than the ring has");
    }

    /// Max/mean load for N nodes, replication 2, 200 extents per node.
    fn imbalance(n: u64) -> f64 {
        let r = ring(n);
        let mut load: HashMap<NodeId, u64> = HashMap::new();
        let count = 200 * n;
        for e in extents(count) {
            for id in r.replicas(e, 2) {
                *load.entry(id).or_default() += 1;
            }
        }
        let mean = (count * 2) as f64 / n as f64;
        load.values().map(|v| *v as f64).fold(0.0, f64::max) / mean
    }

    #[test]
    fn balance_within_bound() {
        // With 400 replicas per node on average, binomial noise keeps the max within ~1.25x.
        for n in [3, 10, 100, 1000] {
            let ratio = imbalance(n);
            assert!(ratio < 1.3, "{n} nodes: max load {ratio:.2}x the mean");
        }
    }

    #[test]
    fn movement_on_add_and_remove_is_near_ideal() {
        for n in [3u64, 10, 100] {
            let before = ring(n);
            let after = ring(n + 1);
            let count = 20_000;
            let moved = extents(count).filter(|e| before.replicas(*e, 1) != after.replicas(*e, 1)).count();
            let ideal = count as f64 / (n + 1) as f64;
            assert!((moved as f64) < ideal * 1.15, "{n}->{}: moved {moved}, ideal {ideal:.0}", n + 1);
            // Every moved extent moved to the new node.
            for e in extents(count) {
                let (b, a) = (before.replicas(e, 1), after.replicas(e, 1));
                if a != b {
                    assert_eq!(a[0], node(n));
                }
            }
        }
    }

    #[test]
    fn weights_are_honoured() {
        let r = Ring::new(
            1,
            vec![Member { id: node(0), weight: 1.0, domain: None }, Member { id: node(1), weight: 3.0, domain: None }],
        );
        let heavy = extents(20_000).filter(|e| r.replicas(*e, 1)[0] == node(1)).count();
        let share = heavy as f64 / 20_000.0;
        assert!((share - 0.75).abs() < 0.03, "share {share}");
    }

    #[test]
    fn distinct_failure_domains() {
        let members =
            (0..9).map(|i| Member { id: node(i), weight: 1.0, domain: Some(format!("zone-{}", i % 3)) }).collect();
        let r = Ring::new(1, members);
        let zone = |id: NodeId| r.members().find(|m| m.id == id).and_then(|m| m.domain.clone());
        for e in extents(2000) {
            let reps = r.replicas(e, 3);
            let zones: HashSet<_> = reps.iter().map(|id| zone(*id)).collect();
            assert_eq!(zones.len(), 3, "replicas of {e} share a zone");
        }
        // Four replicas with three zones: still four distinct nodes.
        let reps = r.replicas(ExtentId::new(VolumeId(1), 1), 4);
        assert_eq!(reps.iter().collect::<HashSet<_>>().len(), 4);
    }

    #[test]
    fn full_members_keep_what_they_hold_and_take_nothing_new() {
        let plain = ring(6);
        let full_node = node(2);
        let r = ring(6).with_full([full_node]);
        let (mut held, mut skipped) = (0, 0);
        for e in extents(2000) {
            let natural = plain.replicas(e, 2);
            // No full member among the replicas: nothing to ask, same answer.
            if !natural.contains(&full_node) {
                assert_eq!(r.replicas_held(e, 2, |_| None), Ok(natural));
                continue;
            }
            assert_eq!(r.replicas_held(e, 2, |_| None), Err(full_node), "must ask the full node");
            // It holds the extent: it stays a replica.
            assert_eq!(r.replicas_held(e, 2, |_| Some(true)), Ok(natural.clone()));
            held += 1;
            // It does not: the next node stands in, the other replica stays.
            let spill = r.replicas_held(e, 2, |_| Some(false)).unwrap();
            assert_eq!(spill.len(), 2);
            assert!(!spill.contains(&full_node));
            let other: Vec<_> = natural.iter().filter(|n| **n != full_node).collect();
            assert!(other.iter().all(|n| spill.contains(n)), "the other replica stays");
            assert_eq!(spill, plain.replicas_skipping(e, 2, &[full_node]));
            // Readers without the answer look at every candidate.
            let cands = r.candidates(e, 2);
            assert!(natural.iter().chain(&spill).all(|n| cands.contains(n)));
            skipped += 1;
        }
        assert!(held > 300 && skipped > 300);
    }

    #[test]
    fn moves_into_and_out_of_full() {
        let prev = ring(5);
        let full_node = node(1);
        let next = ring(5).with_full([full_node]);
        for e in extents(1000) {
            let natural = prev.replicas(e, 2);
            // Becoming full moves nothing it holds...
            let (old, new) = moving_replicas(&prev, &next, e, 2, |_| Some(true)).unwrap();
            assert_eq!((old.clone(), new), (natural.clone(), natural.clone()));
            // ...and where it does not hold the extent, it is neither old nor new.
            let (old, new) = moving_replicas(&prev, &next, e, 2, |_| Some(false)).unwrap();
            assert!(!old.contains(&full_node) && !new.contains(&full_node));
            // No longer full: it becomes a replica again, the stand-in an old one.
            let (old, new) = moving_replicas(&next, &prev, e, 2, |_| Some(false)).unwrap();
            assert_eq!(new, natural);
            assert!(!old.contains(&full_node));
            if !natural.contains(&full_node) {
                continue;
            }
            let stand_in = *next.replicas_skipping(e, 2, &[full_node]).iter().find(|n| !natural.contains(n)).unwrap();
            // It held the extent all along (the stand-in does not): it was an old replica.
            let (old, _) = moving_replicas(&next, &prev, e, 2, |n| Some(n != stand_in)).unwrap();
            assert_eq!(old, natural);
            // It got the extent during this move (the stand-in holds it): it was not.
            let (old, _) = moving_replicas(&next, &prev, e, 2, |_| Some(true)).unwrap();
            assert!(!old.contains(&full_node) && old.contains(&stand_in));
            // The stand-in must be asked before that can be told.
            let asked = moving_replicas(&next, &prev, e, 2, |n| (n == full_node).then_some(true));
            assert!(matches!(asked, Err(n) if n == stand_in || natural.contains(&n)), "{asked:?}");
        }
    }
}
