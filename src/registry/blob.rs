//! A blob download as a `Read` that survives dropped connections: when the body fails or ends
//! early it asks again from the last byte received (`Range: bytes=N-`), with backoff. The
//! digest is checked by whoever consumes the stream (the content store's ingest).

use std::io::{self, Read};

use tracing::warn;

use super::client::{Client, Result};
use crate::digest::Digest;

pub struct BlobStream<'a> {
    client: &'a Client,
    digest: Digest,
    pos: u64,
    size: Option<u64>,
    body: Option<ureq::BodyReader<'static>>,
    /// Consecutive failures without progress.
    failures: u32,
    /// How many times the download was resumed (for logs and tests).
    pub resumed: u32,
}

impl<'a> BlobStream<'a> {
    /// Starts the download (so a missing blob or a refused request is an error here).
    pub fn open(client: &'a Client, digest: &Digest) -> Result<Self> {
        let (body, size) = client.get_blob_from(digest, 0)?;
        Ok(Self {
            client,
            digest: digest.clone(),
            pos: 0,
            size,
            body: Some(body),
            failures: 0,
            resumed: 0,
        })
    }

    /// The size the registry announced.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// Called after a failure: gives up after the retry budget, else waits.
    fn interrupted(&mut self, why: String) -> io::Result<()> {
        self.body = None;
        self.failures += 1;
        if self.failures > self.client.retry.retries {
            return Err(io::Error::other(format!(
                "blob {}: {why} (gave up after {} attempts at byte {})",
                self.digest, self.failures, self.pos
            )));
        }
        warn!(blob = %self.digest, pos = self.pos, "{why}; resuming");
        std::thread::sleep(self.client.retry.delay(self.failures, None));
        Ok(())
    }
}

impl Read for BlobStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let body = match &mut self.body {
                Some(b) => b,
                None => {
                    match self.client.get_blob_from(&self.digest, self.pos) {
                        Ok((b, total)) => {
                            self.resumed += 1;
                            if self.size.is_none() {
                                self.size = total;
                            }
                            self.body = Some(b);
                        }
                        Err(e) => self.interrupted(format!("resuming failed: {e}"))?,
                    }
                    continue;
                }
            };
            match body.read(buf) {
                Ok(0) if self.size.is_none_or(|s| self.pos >= s) => return Ok(0),
                Ok(0) => {
                    let why = format!(
                        "connection closed at byte {} of {}",
                        self.pos,
                        self.size.unwrap_or_default()
                    );
                    self.interrupted(why)?
                }
                Ok(n) => {
                    self.pos += n as u64;
                    self.failures = 0;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.interrupted(format!("read failed: {e}"))?,
            }
        }
    }
}
