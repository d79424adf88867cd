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
        let size = file
            .metadata()
            .map_err(|e| ImageError::Io {
                context: format!("stat {}", full.display()),
                source: e,
            })?
            .len();
        Ok((Box::new(file), size))
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
