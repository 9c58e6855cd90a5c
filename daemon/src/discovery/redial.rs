//! Which lost peers to dial again, and when: a plain struct fed explicit instants.
//!
//! A peer whose last control-plane connection broke (the process died, or the network
//! between us did) is dialled again with a growing delay until a connection to it is
//! established, it announces that it leaves, or [`LOST_PEER_MEMORY`] passes. Why: after a
//! partition heals, the two sides must find each other again by themselves. Announcements
//! only travel over connections, Kademlia does not redial, and bootstrap peers are redialled
//! only by nodes with almost no peers (and may all sit on one side). A cut shorter than
//! TCP's retransmission limit needs none of this (the connections resume); a longer one
//! closes them, and without redialling each side stays alone for good.
//!
//! Addresses come from members' announcements ([`Redial::learn`]), kept for peers that are
//! members or being redialled, so a member that expired before its connection broke (a
//! cut drops announcements seconds before TCP gives up) can still be dialled.
//!
//! Bounds: at most [`KNOWN_PEERS_MAX`] peers' addresses and [`ADDRS_PER_PEER_MAX`] addresses
//! each; a lost peer is dialled at most once per [`REDIAL_DELAY_MAX`] after the first few.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};

/// The first redial of a lost peer waits this long; each failure doubles the wait.
pub const REDIAL_DELAY_MIN: Duration = Duration::from_secs(2);
/// The longest wait between two redials of one lost peer.
pub const REDIAL_DELAY_MAX: Duration = Duration::from_secs(30);
/// A lost peer is forgotten this long after its connection broke (a partition lasting
/// longer is healed by bootstrap redials alone, or by restarts).
pub const LOST_PEER_MEMORY: Duration = Duration::from_secs(60 * 60);
/// Peers whose addresses are kept: the membership table's bound.
pub const KNOWN_PEERS_MAX: usize = super::MEMBERS_MAX;
/// Addresses kept per peer.
pub const ADDRS_PER_PEER_MAX: usize = 8;

#[derive(Debug)]
struct Lost {
    since: Instant,
    next_dial: Instant,
    delay: Duration,
}

/// Known addresses of peers, and the lost ones among them to dial again.
#[derive(Debug, Default)]
pub struct Redial {
    addrs: HashMap<PeerId, Vec<Multiaddr>>,
    lost: HashMap<PeerId, Lost>,
}

impl Redial {
    /// Records the addresses `peer` announced (a member's p2p listen addresses).
    pub fn learn(&mut self, peer: PeerId, addrs: &[Multiaddr]) {
        if addrs.is_empty() || (!self.addrs.contains_key(&peer) && self.addrs.len() >= KNOWN_PEERS_MAX) {
            return;
        }
        self.addrs.insert(peer, addrs.iter().take(ADDRS_PER_PEER_MAX).cloned().collect());
    }

    /// `peer` left the DC on purpose: forget it.
    pub fn left(&mut self, peer: &PeerId) {
        self.addrs.remove(peer);
        self.lost.remove(peer);
    }

    /// A connection to `peer` is established: it is no longer lost.
    pub fn connected(&mut self, peer: &PeerId) {
        self.lost.remove(peer);
    }

    /// The last connection to `peer` broke at `now`; true when it will be redialled (its
    /// addresses are known).
    pub fn broke(&mut self, peer: PeerId, now: Instant) -> bool {
        if !self.addrs.contains_key(&peer) {
            return false;
        }
        self.lost.entry(peer).or_insert(Lost {
            since: now,
            next_dial: now + REDIAL_DELAY_MIN,
            delay: REDIAL_DELAY_MIN,
        });
        true
    }

    /// The lost peers to dial at `now`, with their addresses; each is due again after a
    /// doubled delay. Forgets those lost for longer than [`LOST_PEER_MEMORY`].
    pub fn due(&mut self, now: Instant) -> Vec<(PeerId, Vec<Multiaddr>)> {
        self.lost.retain(|_, lost| now.saturating_duration_since(lost.since) < LOST_PEER_MEMORY);
        let mut due = Vec::new();
        for (peer, lost) in &mut self.lost {
            if lost.next_dial > now {
                continue;
            }
            let Some(addrs) = self.addrs.get(peer) else { continue };
            lost.delay = (lost.delay * 2).min(REDIAL_DELAY_MAX);
            lost.next_dial = now + lost.delay;
            due.push((*peer, addrs.clone()));
        }
        due.sort_by_key(|(peer, _)| *peer);
        due
    }

    /// Drops the addresses of peers that are neither lost nor kept by `keep` (members, or
    /// connected): the addresses of a peer that expired and was never connected are not
    /// needed.
    pub fn prune(&mut self, keep: impl Fn(&PeerId) -> bool) {
        let lost = &self.lost;
        self.addrs.retain(|peer, _| lost.contains_key(peer) || keep(peer));
    }

    /// Peers being redialled.
    pub fn lost_count(&self) -> usize {
        self.lost.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> Multiaddr {
        format!("/ip4/10.0.0.1/tcp/{port}").parse().unwrap()
    }

    #[test]
    fn a_lost_peer_is_redialled_with_a_doubling_delay_until_it_connects() {
        let start = Instant::now();
        let peer = PeerId::random();
        let mut redial = Redial::default();
        redial.learn(peer, &[addr(1)]);
        assert!(redial.broke(peer, start));
        assert!(redial.due(start).is_empty(), "not at once: the network that broke it is likely still broken");
        let mut dialled_at = Vec::new();
        let mut now = start;
        while now < start + Duration::from_secs(200) {
            if let Some((due_peer, addrs)) = redial.due(now).pop() {
                assert_eq!((due_peer, addrs), (peer, vec![addr(1)]));
                dialled_at.push(now.duration_since(start).as_secs());
            }
            now += Duration::from_secs(1);
        }
        assert_eq!(dialled_at[..5], [2, 6, 14, 30, 60], "2 s, then 4, 8, 16, then the 30 s cap");
        assert!(dialled_at.windows(2).all(|pair| pair[1] - pair[0] <= REDIAL_DELAY_MAX.as_secs()));
        redial.connected(&peer);
        assert_eq!(redial.lost_count(), 0);
        assert!(redial.due(now + REDIAL_DELAY_MAX).is_empty());
    }

    #[test]
    fn peers_without_addresses_or_that_left_are_not_redialled() {
        let now = Instant::now();
        let (unknown, leaver) = (PeerId::random(), PeerId::random());
        let mut redial = Redial::default();
        assert!(!redial.broke(unknown, now), "nothing to dial");
        redial.learn(leaver, &[addr(2)]);
        assert!(redial.broke(leaver, now));
        redial.left(&leaver);
        assert!(redial.due(now + REDIAL_DELAY_MAX).is_empty());
        assert!(!redial.broke(leaver, now), "its addresses went with it");
    }

    #[test]
    fn lost_peers_are_forgotten_after_the_memory() {
        let start = Instant::now();
        let peer = PeerId::random();
        let mut redial = Redial::default();
        redial.learn(peer, &[addr(3)]);
        redial.broke(peer, start);
        assert_eq!(redial.due(start + REDIAL_DELAY_MIN).len(), 1);
        assert!(redial.due(start + LOST_PEER_MEMORY).is_empty());
        assert_eq!(redial.lost_count(), 0);
    }

    #[test]
    fn pruning_keeps_lost_and_kept_peers_addresses_only() {
        let now = Instant::now();
        let (member, lost, gone) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut redial = Redial::default();
        for (port, peer) in [member, lost, gone].into_iter().enumerate() {
            redial.learn(peer, &[addr(port as u16)]);
        }
        redial.broke(lost, now);
        redial.prune(|peer| *peer == member);
        assert!(redial.broke(member, now), "a member's addresses are kept");
        assert!(!redial.broke(gone, now), "an expired peer's are dropped");
        assert_eq!(redial.lost_count(), 2);
    }

    #[test]
    fn addresses_are_bounded() {
        let mut redial = Redial::default();
        let many: Vec<Multiaddr> = (0..20).map(addr).collect();
        let peer = PeerId::random();
        redial.learn(peer, &many);
        redial.broke(peer, Instant::now());
        let due = redial.due(Instant::now() + REDIAL_DELAY_MIN);
        assert_eq!(due[0].1.len(), ADDRS_PER_PEER_MAX);
    }
}
