//! Indexing a layer while it is copied in (downloaded by a pull, copied from a layout by an
//! import): the bytes the content store ingests are also handed (through a bounded channel, so
//! the slower side sets the pace) to an indexing thread, so each layer is read once and the copy
//! overlaps the index. The result is used only after the store has checked the
//! digest of the same stream and the diffID is checked against the config (`unpack_with`).

use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::image::LayerDesc;
use crate::unpack::{index_stream, ChannelReader, Indexed, Limits, UnpackProgress};

/// Chunks in flight between download and indexing (each up to the store's 1 MiB buffer).
const IN_FLIGHT: usize = 16;

/// A download whose bytes are also sent to an indexer.
pub struct TeeReader<R> {
    inner: R,
    tx: Option<SyncSender<Vec<u8>>>,
}

impl<R: Read> Read for TeeReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 {
            // End of the blob: the indexer sees end of stream.
            self.tx = None;
        } else if let Some(tx) = &self.tx {
            if tx.send(buf[..n].to_vec()).is_err() {
                // The indexer stopped (bad data): the download goes on; unpack redoes it.
                self.tx = None;
            }
        }
        Ok(n)
    }
}

/// Wraps `inner` so `layer` is indexed (under `root_path`) from the same bytes; the handle
/// yields the (diffID-unchecked) result once the stream ended.
pub fn tee_index<R: Read>(
    inner: R,
    root_path: PathBuf,
    layer: LayerDesc,
    limits: Limits,
) -> (TeeReader<R>, JoinHandle<anyhow::Result<Indexed>>) {
    let (tx, rx) = sync_channel(IN_FLIGHT);
    let handle = std::thread::spawn(move || {
        let reader = ChannelReader::new(rx);
        index_stream(
            &root_path,
            reader,
            &layer,
            Arc::new(UnpackProgress::default()),
            &limits,
            layer.desc.size,
            false,
        )
    });
    (
        TeeReader {
            inner,
            tx: Some(tx),
        },
        handle,
    )
}
