//! The metadata store: SQLite (WAL) holding layers, blobs, chains, images and snapshots.
//! Every change is one transaction. Knows nothing of FUSE or tar.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// What a caller's step inside a transaction reported (the transaction was rolled back).
    #[error("{0}")]
    Step(String),
}

pub type Result<T> = std::result::Result<T, MetaError>;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS layers (
    diff_id           TEXT PRIMARY KEY,
    uncompressed_size INTEGER NOT NULL,
    entries           INTEGER NOT NULL,
    index_path        TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS blobs (
    digest      TEXT PRIMARY KEY,
    diff_id     TEXT NOT NULL REFERENCES layers(diff_id),
    media_type  TEXT NOT NULL,
    compression TEXT NOT NULL,
    size        INTEGER NOT NULL,
    spans_path  TEXT NOT NULL,
    local_copy  TEXT,
    remote      TEXT
);
CREATE TABLE IF NOT EXISTS chains (
    chain_id    TEXT PRIMARY KEY,
    parent      TEXT REFERENCES chains(chain_id),
    diff_id     TEXT NOT NULL REFERENCES layers(diff_id),
    blob_digest TEXT NOT NULL REFERENCES blobs(digest),
    depth       INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    name              TEXT PRIMARY KEY,
    target_digest     TEXT NOT NULL,
    target_media_type TEXT NOT NULL,
    target_size       INTEGER NOT NULL,
    manifest_digest   TEXT NOT NULL,
    manifest_media_type TEXT NOT NULL,
    manifest_size     INTEGER NOT NULL,
    config_digest     TEXT NOT NULL,
    config_media_type TEXT NOT NULL,
    config_size       INTEGER NOT NULL,
    platform          TEXT NOT NULL,
    chain_id          TEXT REFERENCES chains(chain_id),
    created_at        INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS image_layers (
    image       TEXT NOT NULL REFERENCES images(name) ON DELETE CASCADE,
    position    INTEGER NOT NULL,
    blob_digest TEXT NOT NULL,
    media_type  TEXT NOT NULL,
    size        INTEGER NOT NULL,
    diff_id     TEXT NOT NULL,
    PRIMARY KEY (image, position)
);
CREATE TABLE IF NOT EXISTS image_blobs (
    image  TEXT NOT NULL REFERENCES images(name) ON DELETE CASCADE,
    digest TEXT NOT NULL,
    PRIMARY KEY (image, digest)
);
CREATE TABLE IF NOT EXISTS snapshots (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    key        TEXT NOT NULL UNIQUE,
    kind       TEXT NOT NULL CHECK (kind IN ('committed', 'active', 'view')),
    parent     TEXT REFERENCES snapshots(key),
    chain_id   TEXT REFERENCES chains(chain_id),
    mountpoint TEXT,
    applied_blob TEXT REFERENCES blobs(digest),
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
CREATE TABLE IF NOT EXISTS snapshot_labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    key         TEXT NOT NULL,
    value       TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, key)
);
"#;

/// Label marking a committed snapshot that unpack made for an image's chain; garbage
/// collection may remove it once no image needs it.
pub const UNPACK_LABEL: &str = "lazysnap.io/unpacked";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerRow {
    pub diff_id: String,
    pub uncompressed_size: u64,
    pub entries: u64,
    pub index_path: String,
}

/// The columns [`layer_row`] reads, in its order.
const LAYER_COLUMNS: &str = "diff_id, uncompressed_size, entries, index_path";

fn layer_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LayerRow> {
    Ok(LayerRow {
        diff_id: r.get(0)?,
        uncompressed_size: r.get(1)?,
        entries: r.get(2)?,
        index_path: r.get(3)?,
    })
}

/// The columns [`blob_row`] reads, in its order.
const BLOB_COLUMNS: &str =
    "digest, diff_id, media_type, compression, size, spans_path, local_copy, remote";

fn blob_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BlobRow> {
    Ok(BlobRow {
        digest: r.get(0)?,
        diff_id: r.get(1)?,
        media_type: r.get(2)?,
        compression: r.get(3)?,
        size: r.get(4)?,
        spans_path: r.get(5)?,
        local_copy: r.get(6)?,
        remote: r.get(7)?,
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlobRow {
    pub digest: String,
    pub diff_id: String,
    pub media_type: String,
    pub compression: String,
    pub size: u64,
    pub spans_path: String,
    pub local_copy: Option<String>,
    /// For a lazily pulled blob: the file (relative to the root) saying where to fetch it
    /// from and how to check its chunks; the blob itself arrives in the store later, if ever.
    pub remote: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainRow {
    pub chain_id: String,
    pub parent: Option<String>,
    pub diff_id: String,
    pub blob_digest: String,
    pub depth: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageLayerRow {
    pub blob_digest: String,
    pub media_type: String,
    pub size: u64,
    pub diff_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageRow {
    pub name: String,
    pub target_digest: String,
    pub target_media_type: String,
    pub target_size: u64,
    pub manifest_digest: String,
    pub manifest_media_type: String,
    pub manifest_size: u64,
    pub config_digest: String,
    pub config_media_type: String,
    pub config_size: u64,
    pub platform: String,
    pub chain_id: Option<String>,
    pub created_at: i64,
    pub layers: Vec<ImageLayerRow>,
    /// Every content blob the image references (index, manifest, config, layers).
    pub blobs: Vec<String>,
}

pub struct Meta {
    conn: Connection,
}

/// Now in Unix nanoseconds: snapshot times (containerd compares them with the wall clock).
pub fn now_unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Meta {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        Ok(Self { conn })
    }

    /// Runs `f` in one IMMEDIATE transaction (takes the write lock up front, so concurrent
    /// writers queue on busy_timeout instead of failing mid-transaction).
    pub fn write<T>(&mut self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    pub fn layer(&self, diff_id: &str) -> Result<Option<LayerRow>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {LAYER_COLUMNS} FROM layers WHERE diff_id = ?1"),
                [diff_id],
                layer_row,
            )
            .optional()?)
    }

    pub fn blob(&self, digest: &str) -> Result<Option<BlobRow>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {BLOB_COLUMNS} FROM blobs WHERE digest = ?1"),
                [digest],
                blob_row,
            )
            .optional()?)
    }

    pub fn chain(&self, chain_id: &str) -> Result<Option<ChainRow>> {
        Ok(self
            .conn
            .query_row(
                "SELECT chain_id, parent, diff_id, blob_digest, depth FROM chains WHERE chain_id = ?1",
                [chain_id],
                |r| {
                    Ok(ChainRow {
                        chain_id: r.get(0)?,
                        parent: r.get(1)?,
                        diff_id: r.get(2)?,
                        blob_digest: r.get(3)?,
                        depth: r.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    /// The chain from the bottom layer up to `chain_id`.
    pub fn chain_stack(&self, chain_id: &str) -> Result<Vec<ChainRow>> {
        let mut out = Vec::new();
        let mut next = Some(chain_id.to_string());
        while let Some(id) = next {
            let row = self
                .chain(&id)?
                .ok_or_else(|| MetaError::NotFound(format!("chain {id}")))?;
            next = row.parent.clone();
            out.push(row);
        }
        out.reverse();
        Ok(out)
    }

    /// Records one indexed layer and the chain level it completes, in one transaction.
    pub fn record_layer(
        &mut self,
        layer: &LayerRow,
        blob: &BlobRow,
        chain: &ChainRow,
    ) -> Result<()> {
        self.write(|tx| {
            insert_layer_blob(tx, layer, blob)?;
            insert_chain(tx, chain)?;
            ensure_unpacked_snapshot(
                tx,
                &chain.chain_id,
                chain.parent.as_deref(),
                &chain.chain_id,
            )?;
            Ok(())
        })
    }

    pub fn put_image(&mut self, img: &ImageRow) -> Result<()> {
        self.write(|tx| {
            tx.execute("DELETE FROM images WHERE name = ?1", [&img.name])?;
            tx.execute(
                "INSERT INTO images (name, target_digest, target_media_type, target_size,
                    manifest_digest, manifest_media_type, manifest_size, config_digest,
                    config_media_type, config_size, platform, chain_id, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    img.name,
                    img.target_digest,
                    img.target_media_type,
                    img.target_size,
                    img.manifest_digest,
                    img.manifest_media_type,
                    img.manifest_size,
                    img.config_digest,
                    img.config_media_type,
                    img.config_size,
                    img.platform,
                    img.chain_id,
                    img.created_at
                ],
            )?;
            for (i, l) in img.layers.iter().enumerate() {
                tx.execute(
                    "INSERT INTO image_layers (image, position, blob_digest, media_type, size, diff_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![img.name, i as i64, l.blob_digest, l.media_type, l.size, l.diff_id],
                )?;
            }
            for d in &img.blobs {
                tx.execute(
                    "INSERT OR IGNORE INTO image_blobs (image, digest) VALUES (?1, ?2)",
                    params![img.name, d],
                )?;
            }
            Ok(())
        })
    }

    pub fn set_image_chain(&mut self, name: &str, chain_id: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE images SET chain_id = ?2 WHERE name = ?1",
                params![name, chain_id],
            )?;
            Ok(())
        })
    }

    pub fn image(&self, name: &str) -> Result<Option<ImageRow>> {
        let row = self
            .conn
            .query_row(
                "SELECT name, target_digest, target_media_type, target_size, manifest_digest,
                    config_digest, config_media_type, config_size, platform, chain_id, created_at,
                    manifest_media_type, manifest_size
                 FROM images WHERE name = ?1",
                [name],
                |r| {
                    Ok(ImageRow {
                        name: r.get(0)?,
                        target_digest: r.get(1)?,
                        target_media_type: r.get(2)?,
                        target_size: r.get(3)?,
                        manifest_digest: r.get(4)?,
                        manifest_media_type: r.get(11)?,
                        manifest_size: r.get(12)?,
                        config_digest: r.get(5)?,
                        config_media_type: r.get(6)?,
                        config_size: r.get(7)?,
                        platform: r.get(8)?,
                        chain_id: r.get(9)?,
                        created_at: r.get(10)?,
                        layers: Vec::new(),
                        blobs: Vec::new(),
                    })
                },
            )
            .optional()?;
        let Some(mut img) = row else { return Ok(None) };
        let mut stmt = self.conn.prepare(
            "SELECT blob_digest, media_type, size, diff_id FROM image_layers
             WHERE image = ?1 ORDER BY position",
        )?;
        img.layers = stmt
            .query_map([name], |r| {
                Ok(ImageLayerRow {
                    blob_digest: r.get(0)?,
                    media_type: r.get(1)?,
                    size: r.get(2)?,
                    diff_id: r.get(3)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut stmt = self
            .conn
            .prepare("SELECT digest FROM image_blobs WHERE image = ?1 ORDER BY digest")?;
        img.blobs = stmt
            .query_map([name], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(Some(img))
    }

    pub fn image_names(&self) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare("SELECT name FROM images ORDER BY name")?;
        let names = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(names)
    }

    pub fn remove_image(&mut self, name: &str) -> Result<()> {
        self.write(|tx| {
            let n = tx.execute("DELETE FROM images WHERE name = ?1", [name])?;
            if n == 0 {
                return Err(MetaError::NotFound(format!("image {name}")));
            }
            Ok(())
        })
    }

    pub fn snapshot_exists(&self, key: &str) -> Result<bool> {
        Ok(self
            .conn
            .query_row("SELECT 1 FROM snapshots WHERE key = ?1", [key], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Garbage collection of metadata: removes unpack snapshots no image needs and that have
    /// no children, then chains, blobs and layers nothing references. The files behind them
    /// are left to [`crate::gc`], which keeps what [`Meta::referenced_files`] names.
    pub fn collect_garbage(&mut self) -> Result<()> {
        self.write(collect_garbage_tx)
    }
}

/// The statements of [`Meta::collect_garbage`], inside the caller's transaction.
fn collect_garbage_tx(tx: &Transaction<'_>) -> Result<()> {
    // Unpack snapshots not on any image's chain and without children, to a fixpoint.
    loop {
        let n = tx.execute(
            "DELETE FROM snapshots WHERE id IN (
                    SELECT s.id FROM snapshots s
                    JOIN snapshot_labels l ON l.snapshot_id = s.id AND l.key = ?1
                    WHERE s.kind = 'committed'
                      AND NOT EXISTS (SELECT 1 FROM snapshots c WHERE c.parent = s.key)
                      AND NOT EXISTS (
                        WITH RECURSIVE up(id) AS (
                            SELECT chain_id FROM images WHERE chain_id IS NOT NULL
                            UNION SELECT c.parent FROM chains c JOIN up ON c.chain_id = up.id
                            WHERE c.parent IS NOT NULL)
                        SELECT 1 FROM up WHERE up.id = s.key))",
            [UNPACK_LABEL],
        )?;
        if n == 0 {
            break;
        }
    }
    // Chains live while an image or snapshot reaches them.
    tx.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS live_chains (id TEXT PRIMARY KEY);
             DELETE FROM live_chains;
             WITH RECURSIVE up(id) AS (
                SELECT chain_id FROM images WHERE chain_id IS NOT NULL
                UNION SELECT chain_id FROM snapshots WHERE chain_id IS NOT NULL
                UNION SELECT c.parent FROM chains c JOIN up ON c.chain_id = up.id
                WHERE c.parent IS NOT NULL)
             INSERT OR IGNORE INTO live_chains SELECT id FROM up;",
    )?;
    // Delete dead chains top-down (children before parents).
    loop {
        let n = tx.execute(
            "DELETE FROM chains WHERE chain_id NOT IN (SELECT id FROM live_chains)
                   AND NOT EXISTS (SELECT 1 FROM chains c WHERE c.parent = chains.chain_id)",
            [],
        )?;
        if n == 0 {
            break;
        }
    }
    tx.execute(
        "DELETE FROM blobs WHERE
               NOT EXISTS (SELECT 1 FROM chains c WHERE c.blob_digest = blobs.digest)
               AND NOT EXISTS (SELECT 1 FROM image_blobs i WHERE i.digest = blobs.digest)",
        [],
    )?;
    tx.execute(
        "DELETE FROM layers WHERE
               NOT EXISTS (SELECT 1 FROM blobs b WHERE b.diff_id = layers.diff_id)
               AND NOT EXISTS (SELECT 1 FROM chains c WHERE c.diff_id = layers.diff_id)",
        [],
    )?;
    Ok(())
}

impl Meta {
    /// Index, span-map and local-copy files (relative to the root) some row references.
    pub fn referenced_files(&self) -> Result<std::collections::HashSet<String>> {
        referenced_files_in(&self.conn)
    }

    /// Content blobs some image or layer row references.
    pub fn referenced_blobs(&self) -> Result<std::collections::HashSet<String>> {
        referenced_blobs_in(&self.conn)
    }

    /// What [`crate::gc`] would keep: the blobs and files still referenced after metadata
    /// GC, computed in a transaction that is rolled back (nothing changes).
    pub fn referenced_after_gc(&mut self) -> Result<Referenced> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        collect_garbage_tx(&tx)?;
        let out = Referenced {
            blobs: referenced_blobs_in(&tx)?,
            files: referenced_files_in(&tx)?,
        };
        tx.rollback()?;
        Ok(out)
    }
}

/// Blobs and index files (relative to the root) the metadata references.
#[derive(Debug, Default)]
pub struct Referenced {
    pub blobs: std::collections::HashSet<String>,
    pub files: std::collections::HashSet<String>,
}

fn referenced_files_in(conn: &Connection) -> Result<std::collections::HashSet<String>> {
    let mut stmt = conn.prepare(
        "SELECT index_path FROM layers UNION SELECT spans_path FROM blobs
         UNION SELECT local_copy FROM blobs WHERE local_copy IS NOT NULL
         UNION SELECT remote FROM blobs WHERE remote IS NOT NULL
         UNION SELECT replace(remote, '.remote', '.tocindex') FROM blobs WHERE remote IS NOT NULL",
    )?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn referenced_blobs_in(conn: &Connection) -> Result<std::collections::HashSet<String>> {
    let mut stmt = conn.prepare("SELECT digest FROM image_blobs UNION SELECT digest FROM blobs")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Columns added after a table was first created: added to older databases in place.
fn migrate(conn: &Connection) -> Result<()> {
    const ADDED: &[(&str, &str, &str)] = &[
        ("images", "manifest_media_type", "TEXT NOT NULL DEFAULT ''"),
        ("images", "manifest_size", "INTEGER NOT NULL DEFAULT 0"),
        ("snapshots", "mountpoint", "TEXT"),
        ("snapshots", "applied_blob", "TEXT REFERENCES blobs(digest)"),
        ("blobs", "remote", "TEXT"),
    ];
    for (table, column, decl) in ADDED {
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
        let present = stmt
            .query_map([], |r| r.get::<_, String>(1))?
            .collect::<rusqlite::Result<Vec<_>>>()?
            .iter()
            .any(|c| c == column);
        if !present {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
    }
    Ok(())
}

fn insert_chain(tx: &Transaction<'_>, chain: &ChainRow) -> Result<()> {
    tx.execute(
        "INSERT OR IGNORE INTO chains (chain_id, parent, diff_id, blob_digest, depth)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            chain.chain_id,
            chain.parent,
            chain.diff_id,
            chain.blob_digest,
            chain.depth
        ],
    )?;
    Ok(())
}

/// Creates the committed snapshot `key` for a chain unpack made (no-op if it exists).
fn ensure_unpacked_snapshot(
    tx: &Transaction<'_>,
    key: &str,
    parent: Option<&str>,
    chain_id: &str,
) -> Result<()> {
    let exists: Option<String> = tx
        .query_row("SELECT kind FROM snapshots WHERE key = ?1", [key], |r| {
            r.get(0)
        })
        .optional()?;
    match exists.as_deref() {
        Some("committed") => return Ok(()),
        Some(_) => {
            return Err(MetaError::AlreadyExists(format!(
                "snapshot {key} (as an active snapshot)"
            )))
        }
        None => {}
    }
    let labels = std::iter::once((UNPACK_LABEL.to_string(), "true".to_string())).collect();
    insert_committed(tx, key, parent, chain_id, &labels)
}

/// A snapshot as containerd's `Info` describes it, plus where lazysnap keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotRow {
    pub id: i64,
    pub key: String,
    /// "committed", "active" or "view".
    pub kind: String,
    pub parent: Option<String>,
    /// The layer chain: for committed snapshots their own, for active ones their parent's.
    pub chain_id: Option<String>,
    /// Where an active snapshot's filesystem is mounted when not the default place.
    pub mountpoint: Option<String>,
    /// A layer blob applied to an active snapshot by the diff service (indexed, not
    /// extracted): its commit records this layer instead of tarring the upper.
    pub applied_blob: Option<String>,
    /// Unix nanoseconds (rows written before sub-second times: seconds; see
    /// `service::snapshots::timestamp`).
    pub created_at: i64,
    pub updated_at: i64,
    pub labels: std::collections::BTreeMap<String, String>,
}

const SNAPSHOT_COLS: &str =
    "id, key, kind, parent, chain_id, mountpoint, created_at, updated_at, applied_blob";

fn snapshot_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SnapshotRow> {
    Ok(SnapshotRow {
        id: r.get(0)?,
        key: r.get(1)?,
        kind: r.get(2)?,
        parent: r.get(3)?,
        chain_id: r.get(4)?,
        mountpoint: r.get(5)?,
        created_at: r.get(6)?,
        updated_at: r.get(7)?,
        applied_blob: r.get(8)?,
        labels: Default::default(),
    })
}

fn load_labels(conn: &Connection, row: &mut SnapshotRow) -> Result<()> {
    let mut stmt =
        conn.prepare_cached("SELECT key, value FROM snapshot_labels WHERE snapshot_id = ?1")?;
    row.labels = stmt
        .query_map([row.id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(())
}

fn get_snapshot(conn: &Connection, key: &str) -> Result<Option<SnapshotRow>> {
    let row = conn
        .query_row(
            &format!("SELECT {SNAPSHOT_COLS} FROM snapshots WHERE key = ?1"),
            [key],
            snapshot_from_row,
        )
        .optional()?;
    match row {
        Some(mut r) => {
            load_labels(conn, &mut r)?;
            Ok(Some(r))
        }
        None => Ok(None),
    }
}

fn put_labels(
    tx: &Transaction<'_>,
    id: i64,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<()> {
    tx.execute("DELETE FROM snapshot_labels WHERE snapshot_id = ?1", [id])?;
    for (k, v) in labels {
        tx.execute(
            "INSERT INTO snapshot_labels (snapshot_id, key, value) VALUES (?1, ?2, ?3)",
            params![id, k, v],
        )?;
    }
    Ok(())
}

/// The labels containerd passes from an active snapshot to the one committed from it
/// (`snapshots.FilterInheritedLabels`: the `containerd.io/snapshot/` prefix, which also covers
/// the uid/gid mapping labels).
pub fn inheritable_label(key: &str) -> bool {
    key.starts_with("containerd.io/snapshot/")
}

/// Everything a commit records, in one transaction.
pub struct CommitRecord<'a> {
    pub layer: &'a LayerRow,
    pub blob: &'a BlobRow,
    pub chain: &'a ChainRow,
}

impl Meta {
    pub fn snapshot(&self, key: &str) -> Result<Option<SnapshotRow>> {
        get_snapshot(&self.conn, key)
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotRow>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {SNAPSHOT_COLS} FROM snapshots ORDER BY id"
        ))?;
        let mut rows: Vec<SnapshotRow> = stmt
            .query_map([], snapshot_from_row)?
            .collect::<rusqlite::Result<_>>()?;
        for r in &mut rows {
            load_labels(&self.conn, r)?;
        }
        Ok(rows)
    }

    /// Creates an active (or view) snapshot on a committed parent ("" = none).
    pub fn create_active(
        &mut self,
        key: &str,
        parent: &str,
        view: bool,
        labels: &std::collections::BTreeMap<String, String>,
        mountpoint: Option<&str>,
    ) -> Result<SnapshotRow> {
        self.create_active_with(key, parent, view, labels, mountpoint, &mut |_| Ok(()))
    }

    /// [`Meta::create_active`], running `made` on the new row before the transaction
    /// commits (to create what the row stands for); an error from `made` rolls it back.
    pub fn create_active_with(
        &mut self,
        key: &str,
        parent: &str,
        view: bool,
        labels: &std::collections::BTreeMap<String, String>,
        mountpoint: Option<&str>,
        made: &mut dyn FnMut(&SnapshotRow) -> std::result::Result<(), String>,
    ) -> Result<SnapshotRow> {
        if key.is_empty() {
            return Err(MetaError::FailedPrecondition(
                "snapshot key is empty".into(),
            ));
        }
        self.write(|tx| {
            if get_snapshot(tx, key)?.is_some() {
                return Err(MetaError::AlreadyExists(format!("snapshot {key}")));
            }
            let chain_id = if parent.is_empty() {
                None
            } else {
                let p = get_snapshot(tx, parent)?
                    .ok_or_else(|| MetaError::NotFound(format!("parent snapshot {parent}")))?;
                if p.kind != "committed" {
                    return Err(MetaError::FailedPrecondition(format!(
                        "parent {parent} is not a committed snapshot"
                    )));
                }
                p.chain_id
            };
            let now = now_unix_nanos();
            tx.execute(
                "INSERT INTO snapshots (key, kind, parent, chain_id, mountpoint, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                params![
                    key,
                    if view { "view" } else { "active" },
                    (!parent.is_empty()).then_some(parent),
                    chain_id,
                    mountpoint,
                    now
                ],
            )?;
            let id = tx.last_insert_rowid();
            put_labels(tx, id, labels)?;
            let row = get_snapshot(tx, key)?
                .ok_or_else(|| MetaError::NotFound(format!("snapshot {key}")))?;
            made(&row).map_err(MetaError::Step)?;
            Ok(row)
        })
    }

    /// Records the layer a commit made and the committed snapshot `name`, in one transaction.
    pub fn commit_snapshot(
        &mut self,
        name: &str,
        key: &str,
        extra_labels: &std::collections::BTreeMap<String, String>,
        record: &CommitRecord<'_>,
    ) -> Result<SnapshotRow> {
        self.write(|tx| {
            let active = get_snapshot(tx, key)?
                .ok_or_else(|| MetaError::NotFound(format!("snapshot {key}")))?;
            check_committable(&active, key)?;
            if get_snapshot(tx, name)?.is_some() {
                return Err(MetaError::AlreadyExists(format!("snapshot {name}")));
            }
            insert_layer_blob(tx, record.layer, record.blob)?;
            insert_chain(tx, record.chain)?;
            let mut labels: std::collections::BTreeMap<String, String> = active
                .labels
                .iter()
                .filter(|(k, _)| inheritable_label(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            labels.extend(extra_labels.clone());
            insert_committed(
                tx,
                name,
                active.parent.as_deref(),
                &record.chain.chain_id,
                &labels,
            )?;
            get_snapshot(tx, name)?.ok_or_else(|| MetaError::NotFound(format!("snapshot {name}")))
        })
    }

    /// Removes a snapshot row; fails while children exist.
    pub fn remove_snapshot(&mut self, key: &str) -> Result<SnapshotRow> {
        self.write(|tx| {
            let row = get_snapshot(tx, key)?
                .ok_or_else(|| MetaError::NotFound(format!("snapshot {key}")))?;
            let children: i64 = tx.query_row(
                "SELECT COUNT(*) FROM snapshots WHERE parent = ?1",
                [key],
                |r| r.get(0),
            )?;
            if children > 0 {
                return Err(MetaError::FailedPrecondition(format!(
                    "cannot remove snapshot {key}: {children} snapshot(s) depend on it"
                )));
            }
            tx.execute("DELETE FROM snapshots WHERE id = ?1", [row.id])?;
            Ok(row)
        })
    }

    /// containerd's Update: replaces labels (`labels`), or sets/deletes single ones
    /// (`labels.KEY`); no field paths = replace all labels.
    pub fn update_labels(
        &mut self,
        key: &str,
        labels: &std::collections::BTreeMap<String, String>,
        fieldpaths: &[String],
    ) -> Result<SnapshotRow> {
        self.write(|tx| {
            let row = get_snapshot(tx, key)?
                .ok_or_else(|| MetaError::NotFound(format!("snapshot {key}")))?;
            let mut new = row.labels.clone();
            if fieldpaths.is_empty() || fieldpaths.iter().any(|p| p == "labels") {
                new = labels.clone();
            } else {
                for p in fieldpaths {
                    let Some(k) = p.strip_prefix("labels.") else {
                        return Err(MetaError::InvalidArgument(format!(
                            "cannot update field {p:?} of snapshot {key}: only labels"
                        )));
                    };
                    match labels.get(k) {
                        Some(v) => {
                            new.insert(k.to_string(), v.clone());
                        }
                        None => {
                            new.remove(k);
                        }
                    }
                }
            }
            put_labels(tx, row.id, &new)?;
            tx.execute(
                "UPDATE snapshots SET updated_at = ?2 WHERE id = ?1",
                params![row.id, now_unix_nanos()],
            )?;
            get_snapshot(tx, key)?.ok_or_else(|| MetaError::NotFound(format!("snapshot {key}")))
        })
    }
}

impl Meta {
    /// A lazily pulled blob indexed again from its downloaded bytes: its row names the new
    /// span map and no remote record (its own TOC index, if it had one, gives way).
    pub fn make_local(&mut self, layer: &LayerRow, blob: &BlobRow) -> Result<()> {
        self.write(|tx| {
            insert_layer_blob(tx, layer, blob)?;
            tx.execute(
                "UPDATE blobs SET spans_path = ?2, local_copy = ?3, remote = NULL WHERE digest = ?1",
                params![blob.digest, blob.spans_path, blob.local_copy],
            )?;
            Ok(())
        })
    }

    /// Records an indexed layer blob as applied to active snapshot `key`, in one transaction.
    pub fn set_applied(&mut self, key: &str, layer: &LayerRow, blob: &BlobRow) -> Result<()> {
        self.write(|tx| {
            let row = get_snapshot(tx, key)?
                .ok_or_else(|| MetaError::NotFound(format!("snapshot {key}")))?;
            check_committable(&row, key)?;
            insert_layer_blob(tx, layer, blob)?;
            tx.execute(
                "UPDATE snapshots SET applied_blob = ?2, updated_at = ?3 WHERE id = ?1",
                params![row.id, blob.digest, now_unix_nanos()],
            )?;
            Ok(())
        })
    }

    /// Records a layer and the committed snapshot `name` on `parent` made of it (the
    /// remote-snapshot path: no active snapshot involved), in one transaction.
    pub fn commit_layer(
        &mut self,
        name: &str,
        parent: Option<&str>,
        labels: &std::collections::BTreeMap<String, String>,
        record: &CommitRecord<'_>,
    ) -> Result<SnapshotRow> {
        self.write(|tx| {
            if get_snapshot(tx, name)?.is_some() {
                return Err(MetaError::AlreadyExists(format!("snapshot {name}")));
            }
            insert_layer_blob(tx, record.layer, record.blob)?;
            insert_chain(tx, record.chain)?;
            insert_committed(tx, name, parent, &record.chain.chain_id, labels)?;
            get_snapshot(tx, name)?.ok_or_else(|| MetaError::NotFound(format!("snapshot {name}")))
        })
    }
}

/// Inserts committed snapshot `name` of `chain_id` with `labels`.
fn insert_committed(
    tx: &Transaction<'_>,
    name: &str,
    parent: Option<&str>,
    chain_id: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<()> {
    tx.execute(
        "INSERT INTO snapshots (key, kind, parent, chain_id, created_at, updated_at)
         VALUES (?1, 'committed', ?2, ?3, ?4, ?4)",
        params![name, parent, chain_id, now_unix_nanos()],
    )?;
    put_labels(tx, tx.last_insert_rowid(), labels)
}

fn insert_layer_blob(tx: &Transaction<'_>, layer: &LayerRow, blob: &BlobRow) -> Result<()> {
    tx.execute(
        // A layer first known only from an eStargz TOC has that blob's own index; an index of
        // the tar stream (made from any blob of the layer) replaces it as the layer's.
        "INSERT INTO layers (diff_id, uncompressed_size, entries, index_path)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(diff_id) DO UPDATE SET
             uncompressed_size = excluded.uncompressed_size,
             entries = excluded.entries,
             index_path = excluded.index_path
         WHERE layers.index_path LIKE '%.tocindex' AND excluded.index_path NOT LIKE '%.tocindex'",
        params![
            layer.diff_id,
            layer.uncompressed_size,
            layer.entries,
            layer.index_path
        ],
    )?;
    tx.execute(
        "INSERT OR IGNORE INTO blobs (digest, diff_id, media_type, compression, size, spans_path, local_copy, remote)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            blob.digest,
            blob.diff_id,
            blob.media_type,
            blob.compression,
            blob.size,
            blob.spans_path,
            blob.local_copy,
            blob.remote
        ],
    )?;
    Ok(())
}

/// Only active snapshots (not views, not committed ones) can be committed.
pub fn check_committable(active: &SnapshotRow, key: &str) -> Result<()> {
    match active.kind.as_str() {
        "active" => Ok(()),
        "view" => Err(MetaError::FailedPrecondition(format!(
            "snapshot {key} is a view and cannot be committed"
        ))),
        _ => Err(MetaError::FailedPrecondition(format!(
            "snapshot {key} is committed, not active"
        ))),
    }
}

/// What `lazysnap check` asks of the database itself.
impl Meta {
    /// `PRAGMA integrity_check`: empty when the database is sound, else SQLite's findings.
    pub fn integrity_problems(&self) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare("PRAGMA integrity_check")?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows.into_iter().filter(|r| r != "ok").collect())
    }

    /// `PRAGMA foreign_key_check`: (table, rowid, referenced table) of every row whose
    /// reference dangles.
    pub fn foreign_key_problems(&self) -> Result<Vec<(String, Option<i64>, String)>> {
        let mut stmt = self.conn.prepare("PRAGMA foreign_key_check")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    pub fn layers(&self) -> Result<Vec<LayerRow>> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {LAYER_COLUMNS} FROM layers"))?;
        let rows = stmt
            .query_map([], layer_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn blobs(&self) -> Result<Vec<BlobRow>> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {BLOB_COLUMNS} FROM blobs"))?;
        let rows = stmt
            .query_map([], blob_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Every content blob an image names, with the size the image records when it knows one:
    /// (digest, size, image).
    pub fn image_blob_refs(&self) -> Result<Vec<(String, Option<u64>, String)>> {
        let mut stmt = self.conn.prepare(
            "SELECT b.digest, COALESCE(
                (SELECT l.size FROM image_layers l WHERE l.image = b.image AND l.blob_digest = b.digest LIMIT 1),
                (SELECT i.target_size FROM images i WHERE i.name = b.image AND i.target_digest = b.digest),
                (SELECT i.manifest_size FROM images i WHERE i.name = b.image AND i.manifest_digest = b.digest AND i.manifest_size > 0),
                (SELECT i.config_size FROM images i WHERE i.name = b.image AND i.config_digest = b.digest)),
                b.image
             FROM image_blobs b ORDER BY b.digest",
        )?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Removes what depends on the content blob `digest` so the metadata no longer needs it:
    /// the images naming it, then the committed snapshots whose chain (or a chain below it)
    /// is made of it, children first. Refuses (and changes nothing) when an active snapshot or
    /// view sits on such a chain: its upper holds changes nobody else has. Returns the images
    /// and snapshots removed. Rows gc then finds unreferenced are left to [`Meta::collect_garbage`].
    pub fn drop_blob_dependents(&mut self, digest: &str) -> Result<(Vec<String>, Vec<String>)> {
        self.write(|tx| {
            // Chains made of the blob, and every chain above them.
            tx.execute_batch(
                "CREATE TEMP TABLE IF NOT EXISTS dead_chains (id TEXT PRIMARY KEY);
                 DELETE FROM dead_chains;",
            )?;
            tx.execute(
                "WITH RECURSIVE down(id) AS (
                    SELECT chain_id FROM chains WHERE blob_digest = ?1
                    UNION SELECT c.chain_id FROM chains c JOIN down ON c.parent = down.id)
                 INSERT OR IGNORE INTO dead_chains SELECT id FROM down",
                [digest],
            )?;
            let blocking: Vec<String> = {
                let mut stmt = tx.prepare(
                    "SELECT key FROM snapshots WHERE kind != 'committed'
                       AND (chain_id IN (SELECT id FROM dead_chains) OR applied_blob = ?1)
                     ORDER BY key",
                )?;
                let rows = stmt
                    .query_map([digest], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                rows
            };
            if !blocking.is_empty() {
                return Err(MetaError::FailedPrecondition(format!(
                    "blob {digest} is under active snapshot(s) {}: their changes would be lost",
                    blocking.join(", ")
                )));
            }
            let images: Vec<String> = {
                let mut stmt = tx.prepare(
                    "SELECT name FROM images WHERE chain_id IN (SELECT id FROM dead_chains)
                       OR name IN (SELECT image FROM image_blobs WHERE digest = ?1)
                       OR name IN (SELECT image FROM image_layers WHERE blob_digest = ?1)
                     ORDER BY name",
                )?;
                let rows = stmt
                    .query_map([digest], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                rows
            };
            for name in &images {
                tx.execute("DELETE FROM images WHERE name = ?1", [name])?;
            }
            let mut snapshots = Vec::new();
            loop {
                let leaves: Vec<(i64, String)> = {
                    let mut stmt = tx.prepare(
                        "SELECT s.id, s.key FROM snapshots s
                         WHERE s.chain_id IN (SELECT id FROM dead_chains)
                           AND NOT EXISTS (SELECT 1 FROM snapshots c WHERE c.parent = s.key)",
                    )?;
                    let rows = stmt
                        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<rusqlite::Result<_>>()?;
                    rows
                };
                if leaves.is_empty() {
                    break;
                }
                for (id, key) in leaves {
                    tx.execute("DELETE FROM snapshots WHERE id = ?1", [id])?;
                    snapshots.push(key);
                }
            }
            // A snapshot on a dead chain whose child is on a live one cannot exist (a child's
            // chain is its parent's plus one layer), so every dead chain is now unreferenced;
            // so is the blob row, and the layer row if no other blob is that layer. Nothing
            // else goes: what only the removed images needed is left to gc.
            tx.execute(
                "DELETE FROM chains WHERE chain_id IN (SELECT id FROM dead_chains)",
                [],
            )?;
            let diff_id: Option<String> = tx
                .query_row(
                    "SELECT diff_id FROM blobs WHERE digest = ?1",
                    [digest],
                    |r| r.get(0),
                )
                .optional()?;
            tx.execute("DELETE FROM blobs WHERE digest = ?1", [digest])?;
            if let Some(diff_id) = diff_id {
                tx.execute(
                    "DELETE FROM layers WHERE diff_id = ?1
                       AND NOT EXISTS (SELECT 1 FROM blobs b WHERE b.diff_id = ?1)
                       AND NOT EXISTS (SELECT 1 FROM chains c WHERE c.diff_id = ?1)",
                    [&diff_id],
                )?;
            }
            Ok((images, snapshots))
        })
    }
}

impl Meta {
    /// Runs `f` holding the database's write lock, given every snapshot row: no other process
    /// can create or remove a snapshot (and its directory) meanwhile.
    pub fn with_write_lock<T>(
        &mut self,
        f: impl FnOnce(&[SnapshotRow]) -> T,
    ) -> Result<(Vec<SnapshotRow>, T)> {
        self.write(|tx| {
            let mut stmt = tx.prepare(&format!(
                "SELECT {SNAPSHOT_COLS} FROM snapshots ORDER BY id"
            ))?;
            let rows: Vec<SnapshotRow> = stmt
                .query_map([], snapshot_from_row)?
                .collect::<rusqlite::Result<_>>()?;
            let out = f(&rows);
            Ok((rows, out))
        })
    }
}
