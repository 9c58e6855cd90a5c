//! Who a node is, and what admits it to the cluster.
//!
//! - The node identity is an ed25519 key kept in `<data dir>/node.key` (libp2p's protobuf
//!   encoding, mode 0600), created on first start and stable across restarts. Its libp2p
//!   `PeerId` names the node in the DHT, in membership and on the data plane.
//! - The cluster key is 32 secret random bytes shared by every admitted node, in a file
//!   made by `cachemesh cluster-key new FILE`. Nothing derived from it is ever sent: from it
//!   each node derives the libp2p private-network key of its datacenter (so nodes of other
//!   clusters or other DCs cannot complete a connection to the DHT) and the data plane's
//!   admission MAC key (so they cannot fetch, nor make a node fetch for them).
//!
//! Non-goals: key rotation and revocation of single nodes (rotate the cluster key).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use libp2p::PeerId;
use libp2p::identity::Keypair;

const CLUSTER_KEY_HEADER: &str = "cachemesh-cluster-key-v1";

/// Identity and key-file errors.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file's contents are not what they should be.
    #[error("{path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io { path: path.to_path_buf(), source }
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io(path))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io(path))
}

/// This node's persistent identity.
#[derive(Clone)]
pub struct NodeIdentity {
    keypair: Keypair,
    peer_id: PeerId,
    public_key: [u8; 32],
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity").field("peer_id", &self.peer_id).finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// Loads the key at `path`, creating it if the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, IdentityError> {
        let keypair = match std::fs::read(path) {
            Ok(bytes) => Keypair::from_protobuf_encoding(&bytes)
                .map_err(|error| IdentityError::Invalid { path: path.to_path_buf(), detail: error.to_string() })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let keypair = Keypair::generate_ed25519();
                let encoded = keypair
                    .to_protobuf_encoding()
                    .map_err(|error| IdentityError::Invalid { path: path.to_path_buf(), detail: error.to_string() })?;
                write_secret(path, &encoded)?;
                tracing::info!(peer_id = %keypair.public().to_peer_id(), path = %path.display(), "created a node identity");
                keypair
            }
            Err(source) => return Err(IdentityError::Io { path: path.to_path_buf(), source }),
        };
        Self::from_keypair(keypair).map_err(|detail| IdentityError::Invalid { path: path.to_path_buf(), detail })
    }

    /// An identity from an ed25519 keypair.
    pub fn from_keypair(keypair: Keypair) -> Result<Self, String> {
        let public_key = keypair
            .public()
            .try_into_ed25519()
            .map_err(|_| "the node key is not an ed25519 key".to_string())?
            .to_bytes();
        let peer_id = keypair.public().to_peer_id();
        Ok(Self { keypair, peer_id, public_key })
    }

    /// The libp2p keypair.
    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    /// The node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The raw ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public_key
    }

    /// Signs `message` with the node key.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut signature = [0u8; 64];
        if let Ok(bytes) = self.keypair.sign(message)
            && bytes.len() == 64
        {
            signature.copy_from_slice(&bytes);
        }
        signature
    }
}

/// Checks an ed25519 signature by `public_key`; returns the signer's peer id when valid.
pub fn verify_signature(public_key: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> Option<PeerId> {
    let key = libp2p::identity::ed25519::PublicKey::try_from_bytes(public_key).ok()?;
    if !key.verify(message, signature) {
        return None;
    }
    Some(libp2p::identity::PublicKey::from(key).to_peer_id())
}

/// The shared secret that admits nodes to the cluster.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret; a fingerprint identifies it.
        write!(f, "ClusterKey({})", self.fingerprint())
    }
}

impl ClusterKey {
    /// Creates a new random key and writes it to `path` (mode 0600); never overwrites.
    pub fn generate(path: &Path) -> Result<Self, IdentityError> {
        let key: [u8; 32] = rand::random();
        let text = format!("{CLUSTER_KEY_HEADER}\n{}\n", blake3::Hash::from_bytes(key).to_hex());
        write_secret(path, text.as_bytes())?;
        Ok(Self(key))
    }

    /// Reads a key file.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let invalid = |detail: &str| IdentityError::Invalid { path: path.to_path_buf(), detail: detail.to_string() };
        let mut lines = text.lines();
        if lines.next() != Some(CLUSTER_KEY_HEADER) {
            return Err(invalid("not a cachemesh cluster key (create one with `cachemesh cluster-key new FILE`)"));
        }
        let hex = lines.next().unwrap_or_default().trim();
        let hash = blake3::Hash::from_hex(hex).map_err(|_| invalid("the key line is not 64 hex digits"))?;
        Ok(Self(*hash.as_bytes()))
    }

    /// A short public fingerprint, safe to log: tells whether two nodes hold the same key.
    pub fn fingerprint(&self) -> String {
        blake3::derive_key("cachemesh 2026 cluster key fingerprint", &self.0)[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The libp2p private-network key of datacenter `dc`.
    pub fn private_network_key(&self, dc: &str) -> [u8; 32] {
        let mut material = self.0.to_vec();
        material.extend_from_slice(dc.as_bytes());
        blake3::derive_key("cachemesh 2026 libp2p private network key", &material)
    }

    /// The data plane's admission MAC key.
    pub fn admission_key(&self) -> [u8; 32] {
        blake3::derive_key("cachemesh 2026 data plane admission", &self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_reloaded_the_same() {
        // Goal: the first load creates a 0600 key file; the next load gives the same peer id.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let first = NodeIdentity::load_or_create(&path).unwrap();
        let second = NodeIdentity::load_or_create(&path).unwrap();
        assert_eq!(first.peer_id(), second.peer_id());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let message = b"hello";
        assert_eq!(verify_signature(&first.public_key(), message, &first.sign(message)), Some(first.peer_id()));
        assert_eq!(verify_signature(&first.public_key(), b"other", &first.sign(message)), None);
    }

    #[test]
    fn cluster_keys_round_trip_and_derive_per_dc() {
        // Goal: a generated key reloads identically; derived keys differ per DC and per use;
        // an existing file is never overwritten; a foreign file is refused.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        let key = ClusterKey::generate(&path).unwrap();
        let loaded = ClusterKey::load(&path).unwrap();
        assert_eq!(key.fingerprint(), loaded.fingerprint());
        assert_eq!(key.private_network_key("a"), loaded.private_network_key("a"));
        assert_ne!(key.private_network_key("a"), key.private_network_key("b"));
        assert_ne!(key.private_network_key("a"), key.admission_key());
        assert!(ClusterKey::generate(&path).is_err());
        std::fs::write(dir.path().join("junk"), "hello\n").unwrap();
        assert!(matches!(ClusterKey::load(&dir.path().join("junk")), Err(IdentityError::Invalid { .. })));
    }
}
