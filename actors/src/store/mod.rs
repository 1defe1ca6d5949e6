//! The store: an embedded redb database with a schema version and forward-only migrations,
//! and the StoreActor that serialises access to it from the tree.
//!
//! The store is the owner of the records: every write that depends on a check (a name is
//! free, an image exists, no VM uses a kernel) is one method here that checks and writes in
//! one redb write transaction, and there is no other way to write those records; name
//! reservations keep a name while its files are made (see [`Reservation`] and `records.rs`
//! for the list and the rules).
//!
//! Why redb and not sled: sled 0.34 has had no release since 2021 and warns about space
//! use and reliability; redb is ACID with a stable file format, which the forward-only
//! schema promise below needs.
//!
//! Schema promise: a binary opens any store written by an older binary and migrates it
//! forward, in order, one transaction per step. A store written by a *newer* binary is
//! refused with [`StoreError::TooNew`] and never touched. `bangerd --check-migrations`
//! runs the same migrations on a copy of the file (see [`check_migrations`]), so an update
//! can be tested before the binaries are swapped.

mod actor;
mod migrations;
mod records;

pub use actor::{StoreActor, StoreMsg};
pub use migrations::SCHEMA_VERSION;
pub use records::{Named, Reservation};

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

/// Key/value metadata of the store itself: schema version, instance id, counters.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

pub(crate) const KEY_SCHEMA: &str = "schema_version";
pub(crate) const KEY_INSTANCE: &str = "instance_id";
pub(crate) const KEY_CREATED: &str = "created_at";
pub(crate) const KEY_STARTS: &str = "starts";

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the store {path} is open in another process (is another bangerd running on the same state directory?)"
    )]
    Locked { path: PathBuf },
    #[error(
        "the store {path} has schema version {found}, written by a newer banger; this binary supports up to version {supported}. Upgrade banger (`banger update`) or point it at another state directory"
    )]
    TooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("the store {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot open the store {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("migration of the store to schema version {to} failed")]
    Migration {
        to: u32,
        #[source]
        source: Box<StoreError>,
    },
    #[error("store i/o on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store transaction failed")]
    Db(#[source] redb::Error),
    #[error("the store actor is not running")]
    Unavailable,
    /// The operation conflicts with the state: a name being made, an image in use, ...
    #[error("{0}")]
    Conflict(String),
    /// A record of that name exists already (the caller adds its own hint).
    #[error("{} named {name} exists already", kind.article())]
    Exists { kind: Named, name: String },
    /// A record a write depends on is not there (a VM's image or kernel).
    #[error(transparent)]
    NotFound(crate::not_found::NotFound),
}

impl StoreError {
    /// The JSON-RPC code of this error.
    pub fn code(&self) -> i32 {
        match self {
            StoreError::Conflict(_) | StoreError::Exists { .. } => banger_api::codes::CONFLICT,
            StoreError::NotFound(_) => banger_api::codes::NOT_FOUND,
            _ => banger_api::codes::STORE,
        }
    }
}

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        StoreError::Db(e.into())
    }
}

/// What the store says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreInfo {
    pub path: PathBuf,
    pub schema_version: u32,
    pub instance_id: String,
    pub created_at: u64,
    pub starts: u64,
}

/// An open store. Cheap to share behind an `Arc`; redb serialises write transactions.
#[derive(Debug)]
pub struct Store {
    db: std::sync::RwLock<Open>,
    path: PathBuf,
}

/// The open database and how many times it has been opened again.
#[derive(Debug)]
struct Open {
    /// None only between closing a database that had an I/O error and opening it again
    /// (see [`Store::begin_write`]).
    db: Option<Database>,
    generation: u64,
}

/// How many times [`Store::retry`] runs an operation that an I/O error cut short.
const RETRIES: u32 = 4;

/// How long opening the store again waits for the transactions of the closed database.
const REOPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The outcome of [`check_migrations`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationCheck {
    /// No store exists yet; one will be created at the current schema.
    NoStore { would_create: u32 },
    /// The store is at `from`; migrating it to `to` succeeded on a copy.
    Ok { from: u32, to: u32 },
}

impl Store {
    /// Open (or create) the store at `path` and migrate it forward to [`SCHEMA_VERSION`].
    /// Blocking: call it from a blocking context.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        // Look before opening for writing: redb rewrites its header on a read-write open,
        // and a store from a newer binary must be left byte for byte as it was.
        if path.exists()
            && let Ok(ro) = redb::ReadOnlyDatabase::open(path)
        {
            let found = migrations::read_version(&ro, path)?;
            if found > SCHEMA_VERSION {
                return Err(StoreError::TooNew {
                    path: path.to_owned(),
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
        }
        let db = Database::create(path).map_err(|source| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
                path: path.to_owned(),
            },
            source => StoreError::Open {
                path: path.to_owned(),
                source,
            },
        })?;
        migrations::migrate(&db, path)?;
        let store = Store {
            db: std::sync::RwLock::new(Open {
                db: Some(db),
                generation: 0,
            }),
            path: path.to_owned(),
        };
        store.clear_reservations()?;
        Ok(store)
    }

    /// A write transaction. After a write that failed on I/O (a full disk), redb refuses
    /// every later transaction until the database is opened again: it is, here, so once
    /// there is room again the daemon writes without a restart. (A failed commit leaves
    /// the file as it was before it: redb's commit is atomic.)
    pub(crate) fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        self.transaction(|db| db.begin_write().map_err(redb::Error::from))
    }

    /// A read transaction (the database opened again first if an I/O error closed it,
    /// as for [`Store::begin_write`]).
    pub(crate) fn begin_read(&self) -> Result<redb::ReadTransaction, StoreError> {
        self.transaction(|db| db.begin_read().map_err(redb::Error::from))
    }

    /// Begin a transaction with `begin`; on redb's "a previous I/O error" refusal, open
    /// the database again (once for all the callers that saw the same failure) and retry.
    fn transaction<T>(
        &self,
        begin: impl Fn(&Database) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let seen = {
            let open = self.db.read().expect("store lock");
            match open.db.as_ref() {
                Some(db) => match begin(db) {
                    Err(redb::Error::PreviousIo) => open.generation,
                    other => return Ok(other?),
                },
                None => open.generation,
            }
        };
        self.reopen(seen)?;
        let open = self.db.read().expect("store lock");
        match open.db.as_ref() {
            Some(db) => Ok(begin(db)?),
            None => Err(StoreError::Db(redb::Error::PreviousIo)),
        }
    }

    /// Run `op`, which begins and commits transactions of its own; if it failed because an
    /// earlier I/O error closed the database, or because the database was opened again
    /// under one of its transactions (redb ends a closed database's read transactions),
    /// open it again if nobody has and run `op` again, up to [`RETRIES`] runs in all (on a
    /// disk that is still full, another caller's failed write can close the database
    /// again under the next run). Nothing was committed by a failed run: a commit that
    /// fails leaves the file as it was.
    pub(crate) fn retry<T>(
        &self,
        mut op: impl FnMut() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut tries = 1;
        loop {
            let seen = self.db.read().expect("store lock").generation;
            match op() {
                Err(StoreError::Db(redb::Error::PreviousIo | redb::Error::DatabaseClosed))
                    if tries < RETRIES =>
                {
                    tries += 1;
                    self.reopen(seen)?;
                }
                other => return other,
            }
        }
    }

    /// Close the database and open it again, unless another caller already did since
    /// `seen` (the generation in which this caller saw the failure): two callers that hit
    /// the same I/O error must not close the database twice, the second time under the
    /// first one's fresh transactions.
    ///
    /// redb keeps the file (and its lock) open while any transaction of the closed
    /// database lives, so opening it again waits, briefly, for those to end.
    fn reopen(&self, seen: u64) -> Result<(), StoreError> {
        let mut open = self.db.write().expect("store lock");
        if open.generation != seen && open.db.is_some() {
            return Ok(());
        }
        if open.db.take().is_some() {
            tracing::warn!(path = %self.path.display(), "the store had an I/O error; opening it again");
        }
        let deadline = std::time::Instant::now() + REOPEN_WAIT;
        let db = loop {
            match Database::create(&self.path) {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen)
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(source) => {
                    open.generation += 1;
                    return Err(StoreError::Open {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
        };
        open.db = Some(db);
        open.generation += 1;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Count one more daemon start on this store and return the new count.
    pub fn record_start(&self) -> Result<u64, StoreError> {
        self.retry(|| {
            let txn = self.begin_write()?;
            let starts = {
                let mut meta = txn.open_table(META)?;
                let starts = match meta.get(KEY_STARTS)? {
                    Some(v) => decode_u64(&self.path, KEY_STARTS, v.value())?,
                    None => 0,
                } + 1;
                meta.insert(KEY_STARTS, starts.to_le_bytes().as_slice())?;
                starts
            };
            txn.commit()?;
            Ok(starts)
        })
    }

    /// Read the store's metadata.
    pub fn info(&self) -> Result<StoreInfo, StoreError> {
        self.retry(|| {
            let txn = self.begin_read()?;
            let meta = txn.open_table(META)?;
            let get = |key: &str| -> Result<Vec<u8>, StoreError> {
                meta.get(key)?
                    .map(|v| v.value().to_vec())
                    .ok_or_else(|| StoreError::Corrupt {
                        path: self.path.clone(),
                        detail: format!("meta key {key} missing"),
                    })
            };
            let schema = get(KEY_SCHEMA)?;
            let instance = get(KEY_INSTANCE)?;
            let created = get(KEY_CREATED)?;
            let starts = match meta.get(KEY_STARTS)? {
                Some(v) => decode_u64(&self.path, KEY_STARTS, v.value())?,
                None => 0,
            };
            Ok(StoreInfo {
                path: self.path.clone(),
                schema_version: decode_u32(&self.path, KEY_SCHEMA, &schema)?,
                instance_id: String::from_utf8(instance).map_err(|_| StoreError::Corrupt {
                    path: self.path.clone(),
                    detail: "instance id is not UTF-8".into(),
                })?,
                created_at: decode_u64(&self.path, KEY_CREATED, &created)?,
                starts,
            })
        })
    }
}

/// Test what opening `path` would do, without touching it: the file is copied to a
/// temporary directory and the migrations run on the copy. Refuses a store written by a
/// newer binary with [`StoreError::TooNew`].
///
/// The copy is taken while a running daemon may be writing; redb's two-phase commit makes
/// a torn copy look like a crash image, which redb recovers on open, so the check stays
/// meaningful without stopping the daemon.
pub fn check_migrations(path: &Path) -> Result<MigrationCheck, StoreError> {
    if !path.exists() {
        return Ok(MigrationCheck::NoStore {
            would_create: SCHEMA_VERSION,
        });
    }
    let dir = tempfile::Builder::new()
        .prefix("banger-check-migrations")
        .tempdir()
        .map_err(|source| StoreError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
    let copy = dir.path().join("store.redb");
    std::fs::copy(path, &copy).map_err(|source| StoreError::Io {
        path: path.to_owned(),
        source,
    })?;
    let from = {
        let db = Database::create(&copy).map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        migrations::read_version(&db, path)?
    };
    if from > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found: from,
            supported: SCHEMA_VERSION,
        });
    }
    let store = Store::open(&copy).map_err(|e| match e {
        StoreError::Migration { to, source } => StoreError::Migration { to, source },
        other => other,
    })?;
    drop(store);
    Ok(MigrationCheck::Ok {
        from,
        to: SCHEMA_VERSION,
    })
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn decode_u32(path: &Path, key: &str, bytes: &[u8]) -> Result<u32, StoreError> {
    let arr: [u8; 4] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        path: path.to_owned(),
        detail: format!("meta key {key} has {} bytes, expected 4", bytes.len()),
    })?;
    Ok(u32::from_le_bytes(arr))
}

pub(crate) fn decode_u64(path: &Path, key: &str, bytes: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        path: path.to_owned(),
        detail: format!("meta key {key} has {} bytes, expected 8", bytes.len()),
    })?;
    Ok(u64::from_le_bytes(arr))
}

/// Test support: force a store's schema version, e.g. to simulate a store written by a
/// newer binary. Not used by the daemon.
#[doc(hidden)]
pub fn force_schema_version(path: &Path, version: u32) -> Result<(), StoreError> {
    let db = Database::create(path).map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })?;
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        meta.insert(KEY_SCHEMA, version.to_le_bytes().as_slice())?;
    }
    txn.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_store_is_at_current_schema_with_stable_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let first = {
            let store = Store::open(&path).unwrap();
            assert_eq!(store.record_start().unwrap(), 1);
            store.info().unwrap()
        };
        assert_eq!(first.schema_version, SCHEMA_VERSION);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.record_start().unwrap(), 2);
        let second = store.info().unwrap();
        assert_eq!(second.instance_id, first.instance_id);
        assert_eq!(second.created_at, first.created_at);
        assert_eq!(second.starts, 2);
    }

    #[test]
    fn second_open_in_same_process_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let _a = Store::open(&path).unwrap();
        match Store::open(&path) {
            Err(StoreError::Locked { .. }) => {}
            other => panic!("expected Locked, got {other:?}"),
        }
    }

    #[test]
    fn newer_schema_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        drop(Store::open(&path).unwrap());
        force_schema_version(&path, SCHEMA_VERSION + 3).unwrap();
        let before = std::fs::read(&path).unwrap();
        match Store::open(&path) {
            Err(StoreError::TooNew {
                found, supported, ..
            }) => {
                assert_eq!(found, SCHEMA_VERSION + 3);
                assert_eq!(supported, SCHEMA_VERSION);
            }
            other => panic!("expected TooNew, got {other:?}"),
        }
        match check_migrations(&path) {
            Err(StoreError::TooNew { .. }) => {}
            other => panic!("expected TooNew, got {other:?}"),
        }
        assert!(std::fs::read(&path).unwrap() == before, "store untouched");
    }

    #[test]
    fn check_migrations_reports_without_modifying() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        assert_eq!(
            check_migrations(&path).unwrap(),
            MigrationCheck::NoStore {
                would_create: SCHEMA_VERSION
            }
        );
        assert!(!path.exists());
        drop(Store::open(&path).unwrap());
        assert_eq!(
            check_migrations(&path).unwrap(),
            MigrationCheck::Ok {
                from: SCHEMA_VERSION,
                to: SCHEMA_VERSION
            }
        );
    }

    #[test]
    fn a_store_left_at_an_older_schema_is_migrated_forward() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        drop(Store::open(&path).unwrap());
        // Pretend the file was written at version 0 (before any migration ran).
        force_schema_version(&path, 0).unwrap();
        assert_eq!(
            check_migrations(&path).unwrap(),
            MigrationCheck::Ok {
                from: 0,
                to: SCHEMA_VERSION
            }
        );
        let store = Store::open(&path).unwrap();
        assert_eq!(store.info().unwrap().schema_version, SCHEMA_VERSION);
    }
}
