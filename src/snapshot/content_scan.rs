//! Finds, in containerd's content store directory, the layer blob behind a chain ID: for
//! containerd 1.6, whose `ctr images import` unpacks with Prepare("extract-… <chainID>") →
//! walking differ → Commit and cannot use a proxy diff plugin. Knowing the blob, the snapshotter
//! indexes it at Prepare and the differ's extraction goes to a throwaway tmpfs.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::digest::Digest;

/// The chain ID an unpack key (`[ns/seq/]extract-<unique> <chainID>`) is for.
pub fn chain_of_extract_key(key: &str) -> Option<&str> {
    let (head, chain) = key.rsplit_once(' ')?;
    let last = head.rsplit('/').next()?;
    (last.starts_with("extract-") && Digest::parse(chain).is_ok()).then_some(chain)
}

/// A layer blob of containerd's content store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    pub path: PathBuf,
    pub digest: Digest,
    pub media_type: String,
    pub diff_id: Digest,
}

/// chain ID → layer blob, learnt from the manifests and configs in the content store; files
/// already looked at are not read again.
#[derive(Default)]
pub struct ContentScan {
    by_chain: HashMap<String, LayerBlob>,
    seen: HashSet<String>,
}

const MAX_JSON: u64 = 4 << 20;

impl ContentScan {
    pub fn find(&mut self, content: &Path, chain: &str) -> Option<LayerBlob> {
        if let Some(b) = self.by_chain.get(chain) {
            return Some(b.clone());
        }
        self.rescan(content);
        self.by_chain.get(chain).cloned()
    }

    fn rescan(&mut self, content: &Path) {
        let blobs = content.join("blobs/sha256");
        let Ok(entries) = std::fs::read_dir(&blobs) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !self.seen.insert(name.clone()) {
                continue;
            }
            let Ok(md) = e.metadata() else { continue };
            if md.len() > MAX_JSON || md.len() < 2 {
                continue;
            }
            let Ok(data) = std::fs::read(e.path()) else {
                continue;
            };
            if data.first() != Some(&b'{') {
                continue;
            }
            let Ok(manifest) = serde_json::from_slice::<serde_json::Value>(&data) else {
                continue;
            };
            self.learn_manifest(&blobs, &manifest);
        }
    }

    fn learn_manifest(&mut self, blobs: &Path, manifest: &serde_json::Value) {
        let (Some(config), Some(layers)) = (
            manifest["config"]["digest"].as_str(),
            manifest["layers"].as_array(),
        ) else {
            return;
        };
        let Ok(config) = Digest::parse(config) else {
            return;
        };
        let Ok(data) = std::fs::read(blobs.join(config.hex())) else {
            return;
        };
        let Ok(config) = serde_json::from_slice::<serde_json::Value>(&data) else {
            return;
        };
        let Some(diff_ids) = config["rootfs"]["diff_ids"].as_array() else {
            return;
        };
        let diff_ids: Vec<Digest> = diff_ids
            .iter()
            .filter_map(|d| d.as_str().and_then(|d| Digest::parse(d).ok()))
            .collect();
        if diff_ids.len() != layers.len() {
            return;
        }
        for ((chain, layer), diff_id) in Digest::chain_ids(&diff_ids)
            .iter()
            .zip(layers)
            .zip(&diff_ids)
        {
            let (Some(digest), Some(media_type)) =
                (layer["digest"].as_str(), layer["mediaType"].as_str())
            else {
                continue;
            };
            let Ok(digest) = Digest::parse(digest) else {
                continue;
            };
            let path = blobs.join(digest.hex());
            self.by_chain.entry(chain.to_string()).or_insert(LayerBlob {
                path,
                digest,
                media_type: media_type.to_string(),
                diff_id: diff_id.clone(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extract_keys() {
        let c = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            chain_of_extract_key(&format!("default/3/extract-123-abc {c}")),
            Some(c.as_str())
        );
        assert_eq!(
            chain_of_extract_key(&format!("extract-1 {c}")),
            Some(c.as_str())
        );
        assert_eq!(
            chain_of_extract_key(&format!("default/3/container {c}")),
            None
        );
        assert_eq!(chain_of_extract_key("extract-1 nothex"), None);
    }
}
