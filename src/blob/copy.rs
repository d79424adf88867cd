//! The local seekable copy: uncompressed data of regions that cannot be entered in the blob
//! (zstd frames too big to enter, gzip deflate blocks longer than a span), re-compressed in
//! `span_size` chunks, each an independent zstd frame (level 1, with checksum), on a second
//! thread. Written to a temp file beside the destination, fsynced and renamed at the end.
//! The same file holds records (the dictionaries of zstd resume points), written as they are,
//! in order with the frames, once they pass their check (also on the second thread).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use super::{BlobError, Result};

const COPY_LEVEL: i32 = 1;
/// Prefix of a local copy's temp file (beside the destination until renamed into place).
pub const COPY_TEMP_PREFIX: &str = ".lazysnap-copy-";

/// One frame of the local copy: where its data sits in the uncompressed blob and in the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CopyFrame {
    pub(super) u_off: u64,
    pub(super) c_off: u64,
    pub(super) c_len: u64,
}

type FrameTable = Vec<Written>;

/// Decides on the worker thread whether a record's bytes are written.
pub(super) type RecordCheck = Box<dyn FnOnce(&[u8]) -> bool + Send>;

/// Bytes to write as they are (the concatenation of `parts`), if `check` accepts them.
pub(super) struct Record {
    pub(super) parts: Vec<Vec<u8>>,
    pub(super) check: Option<RecordCheck>,
}

/// Where a record went: `None` if its check refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RecordAt {
    pub(super) off: u64,
    pub(super) len: u64,
    pub(super) crc: u32,
}

enum Job {
    /// Uncompressed bytes to compress into one frame.
    Frame(Vec<u8>),
    Record(Record),
}

/// What the worker wrote per job, in order: (offset, length) of a frame, or a record.
enum Written {
    Frame(u64, u64),
    Record(Option<RecordAt>),
}

/// The local seekable copy: chunks of `span_size` go to a compressor thread, which appends
/// each as an independent frame to a temp file beside the destination.
pub(super) struct LocalCopy {
    dest: PathBuf,
    tmp: tempfile::NamedTempFile,
    span_size: u64,
    tx: Option<SyncSender<Job>>,
    worker: Option<JoinHandle<io::Result<FrameTable>>>,
    chunk: Vec<u8>,
    /// Uncompressed offset of `chunk[0]`.
    chunk_u_off: u64,
    /// What was sent, in order: a frame's uncompressed offset, or `None` for a record.
    sent: Vec<Option<u64>>,
}

/// What a finished local copy holds.
pub(super) struct CopyTable {
    pub(super) frames: Vec<CopyFrame>,
    /// Each record in the order pushed: where it went, or `None` if its check refused it.
    pub(super) records: Vec<Option<RecordAt>>,
    pub(super) size: u64,
}

impl LocalCopy {
    pub(super) fn create(dest: PathBuf, span_size: u64) -> Result<Self> {
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| BlobError::io(format!("creating {}", dir.display()), e))?;
        let tmp =
            crate::store::locked_tempfile(tempfile::Builder::new().prefix(COPY_TEMP_PREFIX), &dir)
                .map_err(|e| {
                    BlobError::io(format!("creating local copy in {}", dir.display()), e)
                })?;
        let file = tmp
            .as_file()
            .try_clone()
            .map_err(|e| BlobError::io("cloning local copy handle", e))?;
        let (tx, rx) = sync_channel::<Job>(2);
        let worker = std::thread::Builder::new()
            .name("lazysnap-copy".into())
            .spawn(move || compress_worker(rx, file))
            .map_err(|e| BlobError::io("starting local copy compressor", e))?;
        tracing::debug!(dest = %dest.display(), "writing a local seekable copy");
        Ok(LocalCopy {
            dest,
            tmp,
            span_size,
            tx: Some(tx),
            worker: Some(worker),
            chunk: Vec::new(),
            chunk_u_off: 0,
            sent: Vec::new(),
        })
    }

    pub(super) fn start_frame(&mut self, u_off: u64) {
        self.chunk_u_off = u_off;
    }

    pub(super) fn push(&mut self, mut data: &[u8]) -> Result<()> {
        let span = self.span_size as usize;
        while !data.is_empty() {
            if self.chunk.capacity() == 0 {
                self.chunk.reserve_exact(span);
            }
            let take = (span - self.chunk.len()).min(data.len());
            self.chunk.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.chunk.len() == span {
                self.send()?;
            }
        }
        Ok(())
    }

    pub(super) fn end_frame(&mut self) -> Result<()> {
        if !self.chunk.is_empty() {
            self.send()?;
        }
        Ok(())
    }

    /// Appends a record; returns its number (its place in [`CopyTable::records`]).
    pub(super) fn push_record(&mut self, record: Record) -> Result<usize> {
        let n = self.sent.iter().filter(|s| s.is_none()).count();
        self.sent.push(None);
        self.submit(Job::Record(record))?;
        Ok(n)
    }

    fn send(&mut self) -> Result<()> {
        let chunk = std::mem::take(&mut self.chunk);
        let len = chunk.len() as u64;
        self.sent.push(Some(self.chunk_u_off));
        self.chunk_u_off += len;
        self.submit(Job::Frame(chunk))
    }

    fn submit(&mut self, job: Job) -> Result<()> {
        let ok = self.tx.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        if !ok {
            // The worker stopped: its error says why.
            return Err(self
                .join()
                .err()
                .unwrap_or_else(|| BlobError::Internal("local copy compressor stopped".into())));
        }
        Ok(())
    }

    fn join(&mut self) -> Result<FrameTable> {
        self.tx = None;
        let Some(w) = self.worker.take() else {
            return Err(BlobError::Internal(
                "local copy compressor already joined".into(),
            ));
        };
        match w.join() {
            Ok(r) => r.map_err(|e| {
                BlobError::io(format!("writing local copy for {}", self.dest.display()), e)
            }),
            Err(_) => Err(BlobError::Internal("local copy compressor panicked".into())),
        }
    }

    /// Waits for the compressor, fsyncs and renames the copy into place.
    pub(super) fn finish(mut self) -> Result<CopyTable> {
        let table = self.join()?;
        if table.len() != self.sent.len() {
            return Err(BlobError::Internal(
                "local copy frame table is incomplete".into(),
            ));
        }
        let size = table
            .iter()
            .filter_map(|w| match w {
                Written::Frame(o, l) => Some(o + l),
                Written::Record(r) => r.map(|r| r.off + r.len),
            })
            .max()
            .unwrap_or(0);
        let ctx = |what: &str| format!("{what} local copy {}", self.dest.display());
        self.tmp
            .as_file()
            .sync_all()
            .map_err(|e| BlobError::io(ctx("syncing"), e))?;
        self.tmp
            .persist(&self.dest)
            .map_err(|e| BlobError::io(ctx("renaming"), e.error))?;
        if let Some(dir) = self.dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| BlobError::io(ctx("syncing directory of"), e))?;
        }
        let mut frames = Vec::new();
        let mut records = Vec::new();
        for (sent, written) in self.sent.iter().zip(table) {
            match (*sent, written) {
                (Some(u_off), Written::Frame(c_off, c_len)) => frames.push(CopyFrame {
                    u_off,
                    c_off,
                    c_len,
                }),
                (None, Written::Record(r)) => records.push(r),
                _ => return Err(BlobError::Internal("local copy table out of order".into())),
            }
        }
        Ok(CopyTable {
            frames,
            records,
            size,
        })
    }
}

fn compress_worker(rx: Receiver<Job>, file: File) -> io::Result<FrameTable> {
    let mut comp = zstd::bulk::Compressor::new(COPY_LEVEL)?;
    comp.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
    let wb_file = file.try_clone()?;
    let mut writeback = crate::store::Writeback::default();
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut table = Vec::new();
    let mut off = 0u64;
    let mut joined = Vec::new();
    for job in rx {
        let bytes = match job {
            Job::Frame(chunk) => {
                let frame = comp.compress(&chunk)?;
                table.push(Written::Frame(off, frame.len() as u64));
                frame
            }
            Job::Record(r) => {
                joined.clear();
                for p in &r.parts {
                    joined.extend_from_slice(p);
                }
                if !r.check.is_none_or(|check| check(&joined)) {
                    table.push(Written::Record(None));
                    continue;
                }
                table.push(Written::Record(Some(RecordAt {
                    off,
                    len: joined.len() as u64,
                    crc: crc32fast::hash(&joined),
                })));
                std::mem::take(&mut joined)
            }
        };
        w.write_all(&bytes)?;
        writeback.wrote(&wb_file, bytes.len());
        off += bytes.len() as u64;
        if joined.capacity() == 0 {
            joined = bytes;
        }
    }
    w.flush()?;
    Ok(table)
}
