//! Forward-only migrations. `MIGRATIONS[i]` takes a store from version `i` to `i + 1`;
//! each runs in its own write transaction together with the version bump, so a crash
//! leaves the store at a whole version. Never edit a released migration: add one.

use std::path::Path;

use redb::{Database, ReadableDatabase, TableError, WriteTransaction};

use super::{
    KEY_CREATED, KEY_INSTANCE, KEY_SCHEMA, KEY_STARTS, META, StoreError, decode_u32, now_secs,
};

type Migration = fn(&WriteTransaction) -> Result<(), StoreError>;

/// The migrations, in order. The schema version is their count.
const MIGRATIONS: &[Migration] = &[v1_meta, v2_vms_images_kernels];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// v1: the meta table with the store's identity.
fn v1_meta(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META)?;
    if meta.get(KEY_INSTANCE)?.is_none() {
        let id = uuid::Uuid::new_v4().to_string();
        meta.insert(KEY_INSTANCE, id.as_bytes())?;
        meta.insert(KEY_CREATED, now_secs().to_le_bytes().as_slice())?;
        meta.insert(KEY_STARTS, 0u64.to_le_bytes().as_slice())?;
    }
    Ok(())
}

/// v2: VMs (with a name index), images and kernels.
fn v2_vms_images_kernels(txn: &WriteTransaction) -> Result<(), StoreError> {
    use super::records::{IMAGES, KERNELS, VM_NAMES, VMS};
    txn.open_table(VMS)?;
    txn.open_table(VM_NAMES)?;
    txn.open_table(IMAGES)?;
    txn.open_table(KERNELS)?;
    Ok(())
}

use redb::ReadableTable;

/// The schema version recorded in `db`; 0 for a fresh file.
pub(crate) fn read_version(db: &impl ReadableDatabase, path: &Path) -> Result<u32, StoreError> {
    let txn = db.begin_read()?;
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    match meta.get(KEY_SCHEMA)? {
        Some(v) => decode_u32(path, KEY_SCHEMA, v.value()),
        None => Ok(0),
    }
}

/// Bring `db` to [`SCHEMA_VERSION`], refusing a newer store.
pub(crate) fn migrate(db: &Database, path: &Path) -> Result<(), StoreError> {
    let found = read_version(db, path)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (from, step) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let to = from as u32 + 1;
        let run = || -> Result<(), StoreError> {
            let txn = db.begin_write()?;
            step(&txn)?;
            {
                let mut meta = txn.open_table(META)?;
                meta.insert(KEY_SCHEMA, to.to_le_bytes().as_slice())?;
            }
            txn.commit()?;
            Ok(())
        };
        run().map_err(|source| StoreError::Migration {
            to,
            source: Box::new(source),
        })?;
        tracing::info!(from, to, "store migrated");
    }
    Ok(())
}
