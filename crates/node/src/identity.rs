//! The node's identity file, `<data dir>/node.json`: its UUID, made once.

use serde::{Deserialize, Serialize};
use std::path::Path;
use torus_types::NodeId;

#[derive(Debug, Serialize, Deserialize)]
struct Identity {
    id: NodeId,
    format: u32,
}

/// Reads the node's UUID, creating the data directory and the file on first start.
pub fn load_or_create(dir: &Path) -> std::io::Result<NodeId> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("node.json");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let ident: Identity = serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))
            })?;
            Ok(ident.id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = NodeId::random();
            let body = serde_json::to_vec_pretty(&Identity { id, format: 1 }).expect("identity serialises");
            let tmp = dir.join("node.json.tmp");
            std::fs::write(&tmp, body)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()?;
            Ok(id)
        }
        Err(e) => Err(e),
    }
}
