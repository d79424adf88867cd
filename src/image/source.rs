//! Where an image comes from: an OCI layout directory, or a tar archive (an OCI archive or a
//! `docker save` archive). Both are read as a small file system of relative paths; archive
//! members are located in one pass over the headers and then read in place.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::ImageError;
use crate::index::builder::normalize;

pub trait ImageSource {
    /// Opens a member by its path relative to the layout/archive root.
    fn open(&self, path: &str) -> Result<(Box<dyn Read + '_>, u64), ImageError>;
    fn exists(&self, path: &str) -> bool;
    fn describe(&self) -> String;
    /// A layer blob the source serves remotely (a lazy pull): recorded, not copied in.
    fn is_remote(&self, _digest: &crate::digest::Digest) -> bool {
        false
    }
    /// Opens a layer blob to copy into the store; a source may also index the layer from the
    /// same bytes (`import::IndexWhileCopying`).
    fn open_layer(
        &self,
        layer: &super::LayerDesc,
    ) -> Result<(Box<dyn Read + '_>, u64), ImageError> {
        self.open(&format!("blobs/sha256/{}", layer.desc.digest.hex()))
    }
}

pub fn open_source(path: &Path) -> Result<Box<dyn ImageSource>, ImageError> {
    let meta = std::fs::metadata(path).map_err(|e| ImageError::Io {
        context: format!("opening {}", path.display()),
        source: e,
    })?;
    if meta.is_dir() {
        Ok(Box::new(DirSource {
            root: path.to_path_buf(),
        }))
    } else {
        Ok(Box::new(TarSource::open(path)?))
    }
}

/// Confines a member path to the source root: no absolute paths, no `..`.
fn clean(path: &str) -> Option<String> {
    let comps = normalize(path.as_bytes());
    if comps.is_empty() || path.split('/').any(|c| c == "..") {
        return None;
    }
    let parts: Vec<&str> = comps
        .iter()
        .map(|c| std::str::from_utf8(c).ok())
        .collect::<Option<_>>()?;
    Some(parts.join("/"))
}

pub struct DirSource {
    root: PathBuf,
}

impl DirSource {
    /// The file opened for `rel` must lie inside the source: a symlink in a layout may not
    /// hand the import a file from elsewhere on the host (what was opened is checked, so a
    /// symlink swapped in meanwhile changes nothing).
    fn check_inside(&self, file: &File, rel: &str) -> Result<(), ImageError> {
        use std::os::unix::io::AsRawFd;
        let io = |context: String| move |source| ImageError::Io { context, source };
        let opened = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(io(format!("resolving {rel}")))?;
        let root = std::fs::canonicalize(&self.root)
            .map_err(io(format!("resolving {}", self.root.display())))?;
        if !opened.starts_with(&root) {
            return Err(ImageError::Invalid(format!(
                "{rel} in {} leads outside it (to {})",
                self.root.display(),
                opened.display()
            )));
        }
        Ok(())
    }
}

impl ImageSource for DirSource {
    fn open(&self, path: &str) -> Result<(Box<dyn Read + '_>, u64), ImageError> {
        let rel = clean(path).ok_or_else(|| ImageError::Invalid(format!("bad path {path:?}")))?;
        let full = self.root.join(&rel);
        let file = File::open(&full).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ImageError::Missing(format!("{rel} in {}", self.root.display()))
            } else {
                ImageError::Io {
                    context: format!("opening {}", full.display()),
                    source: e,
                }
            }
        })?;
        let meta = file.metadata().map_err(|e| ImageError::Io {
            context: format!("stat {}", full.display()),
            source: e,
        })?;
        if !meta.is_file() {
            return Err(ImageError::Invalid(format!(
                "{rel} in {} is not a regular file",
                self.root.display()
            )));
        }
        self.check_inside(&file, &rel)?;
        Ok((Box::new(file), meta.len()))
    }

    fn exists(&self, path: &str) -> bool {
        clean(path).is_some_and(|rel| self.root.join(rel).is_file())
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

/// A tar archive read in place: member offsets found in one header pass.
pub struct TarSource {
    path: PathBuf,
    members: HashMap<String, (u64, u64)>,
}

impl TarSource {
    fn open(path: &Path) -> Result<Self, ImageError> {
        let io_err = |e: io::Error| ImageError::Io {
            context: format!("reading archive {}", path.display()),
            source: e,
        };
        let mut file = File::open(path).map_err(io_err)?;
        let mut magic = [0u8; 4];
        let n = file.read(&mut magic).map_err(io_err)?;
        if n >= 2 && magic[..2] == [0x1f, 0x8b] || n >= 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
            return Err(ImageError::Invalid(format!(
                "{} is a compressed archive: decompress it first (gzip -d / zstd -d)",
                path.display()
            )));
        }
        file.seek(SeekFrom::Start(0)).map_err(io_err)?;
        let mut archive = tar::Archive::new(file);
        let mut members = HashMap::new();
        let entries = archive.entries_with_seek().map_err(|e| {
            ImageError::Invalid(format!("{} is not a tar archive: {e}", path.display()))
        })?;
        for entry in entries {
            let entry = entry.map_err(|e| {
                ImageError::Invalid(format!("corrupt archive {}: {e}", path.display()))
            })?;
            let kind = entry.header().entry_type();
            if !(kind.is_file() || kind == tar::EntryType::Continuous) {
                continue;
            }
            let name = entry.path_bytes();
            let Some(name) = std::str::from_utf8(&name).ok().and_then(clean) else {
                continue;
            };
            members.insert(name, (entry.raw_file_position(), entry.size()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            members,
        })
    }
}

impl ImageSource for TarSource {
    fn open(&self, path: &str) -> Result<(Box<dyn Read + '_>, u64), ImageError> {
        let rel = clean(path).ok_or_else(|| ImageError::Invalid(format!("bad path {path:?}")))?;
        let &(offset, size) = self
            .members
            .get(&rel)
            .ok_or_else(|| ImageError::Missing(format!("{rel} in {}", self.path.display())))?;
        let mut file = File::open(&self.path).map_err(|e| ImageError::Io {
            context: format!("opening {}", self.path.display()),
            source: e,
        })?;
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| ImageError::Io {
                context: format!("seeking in {}", self.path.display()),
                source: e,
            })?;
        Ok((Box::new(file.take(size)), size))
    }

    fn exists(&self, path: &str) -> bool {
        clean(path).is_some_and(|rel| self.members.contains_key(&rel))
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the manifest_config fuzz target: a docker manifest.json naming a directory
    /// (`"Layers": ["sub", ...]`) opened it as a member. Directories, `..`, and symlinks that
    /// lead out of the source are refused; absolute paths are relative to the source.
    #[test]
    fn dir_source_opens_only_files_inside_it() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = tmp.path().join("layout");
        fs_setup(&layout, tmp.path());
        let src = open_source(&layout).unwrap();
        let data = br#"[{"Config": "abc.json", "RepoTags": ["x:1"], "Layers": ["sub", "../outside", "/sub/ler.tar", "./ssb//layer.tar"]}]"#;
        let entries = crate::image::resolve::parse_docker_manifest(data).unwrap();
        for path in &entries[0].layers {
            assert!(src.open(path).is_err(), "{path} opened");
        }
        let err = src.open("sub").err().unwrap().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let err = src.open("sub/link-out").err().unwrap().to_string();
        assert!(err.contains("leads outside it"), "{err}");
        let mut content = String::new();
        src.open("/sub/layer.tar")
            .unwrap()
            .0
            .read_to_string(&mut content)
            .unwrap();
        assert_eq!(content, "x");
        // A symlink that stays inside is followed.
        assert!(src.open("sub/link-in").is_ok());
    }

    fn fs_setup(layout: &Path, tmp: &Path) {
        std::fs::create_dir_all(layout.join("sub")).unwrap();
        std::fs::write(layout.join("sub/layer.tar"), b"x").unwrap();
        std::fs::write(tmp.join("outside"), b"secret").unwrap();
        std::os::unix::fs::symlink(tmp.join("outside"), layout.join("sub/link-out")).unwrap();
        std::os::unix::fs::symlink("layer.tar", layout.join("sub/link-in")).unwrap();
    }
}
