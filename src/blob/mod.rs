//! TEMPORARY STUB of the blob reader (replaced by the real module): sequential decode only.
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}
impl Compression {
    pub fn sniff(magic: &[u8]) -> Compression {
        if magic.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("{0}")]
    Io(#[from] io::Error),
}
pub type Result<T> = std::result::Result<T, BlobError>;
pub struct SpanOptions {
    pub span_size: u64,
    pub local_copy: Option<PathBuf>,
}
impl Default for SpanOptions {
    fn default() -> Self {
        Self { span_size: 4 << 20, local_copy: None }
    }
}
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpanMap {
    pub compression: Compression,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
}
impl SpanMap {
    pub fn has_local_copy(&self) -> bool {
        false
    }
}
pub struct IndexingReader<R: Read> {
    inner: Box<dyn Read + Send>,
    compression: Compression,
    n: u64,
    _r: std::marker::PhantomData<R>,
}
impl<R: Read + Send + 'static> IndexingReader<R> {
    pub fn new(compression: Compression, inner: R, _opts: SpanOptions) -> Result<Self> {
        let inner: Box<dyn Read + Send> = match compression {
            Compression::None => Box::new(inner),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(inner)),
            Compression::Zstd => Box::new(zstd::Decoder::new(inner)?),
        };
        Ok(Self { inner, compression, n: 0, _r: Default::default() })
    }
    pub fn finish(self) -> Result<SpanMap> {
        Ok(SpanMap { compression: self.compression, compressed_size: 0, uncompressed_size: self.n })
    }
}
impl<R: Read> Read for IndexingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}
pub struct SpanCache;
impl SpanCache {
    pub fn new(_max: u64) -> Arc<Self> {
        Arc::new(SpanCache)
    }
}
pub struct BlobReader {
    path: PathBuf,
    map: Arc<SpanMap>,
}
impl BlobReader {
    pub fn open(blob: &Path, map: Arc<SpanMap>, _l: Option<&Path>, _c: Arc<SpanCache>) -> Result<Self> {
        Ok(Self { path: blob.to_path_buf(), map })
    }
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let f = std::fs::File::open(&self.path)?;
        let mut r: Box<dyn Read> = match self.map.compression {
            Compression::None => Box::new(f),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(f)),
            Compression::Zstd => Box::new(zstd::Decoder::new(f)?),
        };
        io::copy(&mut (&mut r).take(offset), &mut io::sink())?;
        let mut n = 0;
        while n < buf.len() {
            let k = r.read(&mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        Ok(n)
    }
    pub fn decompressed_bytes(&self) -> u64 {
        0
    }
}
