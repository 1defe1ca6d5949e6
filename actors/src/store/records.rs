//! Typed tables of the store: VMs (with a unique name index), images, kernels, and the
//! reservations of image and kernel names being made. Values are JSON, so adding an
//! optional field needs no migration; renaming or removing one does.
//!
//! Every operation that checks something and writes because of it is **one** redb write
//! transaction here (redb runs one write transaction at a time), so no other writer can
//! slip in between the check and the write:
//! - [`Store::reserve`]: a name is free (no record, no reservation) and is now reserved;
//! - [`Reservation::publish_image`] / [`publish_kernel`](Reservation::publish_kernel) /
//!   [`publish_image_and_kernel`](Reservation::publish_image_and_kernel): the record is
//!   written and the reservation ends, together;
//! - [`Store::create_vm`]: the VM's name and address are free and the image and kernel it
//!   names exist, and the VM (which is the reference to them) is written;
//! - [`Store::delete_image_unused`] / [`delete_kernel_unused`](Store::delete_kernel_unused):
//!   no VM names it, the record goes, and the name stays reserved while the caller removes
//!   the files.
//!
//! Reservations: whoever makes an image or kernel (a pull, a build, a promote, `image
//! register`, `kernel import`) reserves its name *before* it writes any file under
//! `images/<name>/` or `kernels/<name>/`, and publishes the record with the reservation. A
//! second producer into a name that is reserved is refused with a [`StoreError::Conflict`]
//! that says what holds it; into a name that has a record, with [`StoreError::Exists`].
//! Requests for the *same* thing (same source, same name) never get here twice: the
//! PullActor coalesces them into one pull first (see [`crate::pull`]); two different
//! sources for one name are two different images, so the second is refused, never merged.
//! A reservation ends when it is published or dropped (a failed or cancelled pull), and
//! all of them end with the process: [`Store::open`] clears what a crash left. Reservation
//! writes are not fsynced (nothing of them must survive a crash).

use std::sync::Arc;

use redb::{Durability, ReadableTable, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};
use crate::image::{ImageRecord, KernelRecord};
use crate::not_found::NotFound;
use crate::vm::model::VmRecord;
use crate::vm::warm::WarmRecord;

pub(crate) const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
pub(crate) const VM_NAMES: TableDefinition<&str, &str> = TableDefinition::new("vm_names");
pub(crate) const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");
pub(crate) const KERNELS: TableDefinition<&str, &[u8]> = TableDefinition::new("kernels");
/// `image/<name>` or `kernel/<name>` → [`Held`]. Only ever opened in write transactions
/// (so it needs no migration: redb creates it on first use), and emptied on open.
pub(crate) const RESERVATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("reservations");
/// Warm snapshot id → [`WarmRecord`]. Made by its first write (no migration: a read of a
/// store without it finds none).
pub(crate) const WARM: TableDefinition<&str, &[u8]> = TableDefinition::new("warm");

/// The kinds of names that are reserved while they are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Named {
    Image,
    Kernel,
}

impl Named {
    pub fn as_str(self) -> &'static str {
        match self {
            Named::Image => "image",
            Named::Kernel => "kernel",
        }
    }

    /// `an image`, `a kernel`.
    pub fn article(self) -> &'static str {
        match self {
            Named::Image => "an image",
            Named::Kernel => "a kernel",
        }
    }

    fn table(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            Named::Image => IMAGES,
            Named::Kernel => KERNELS,
        }
    }

    fn key(self, name: &str) -> String {
        format!("{}/{name}", self.as_str())
    }

    fn not_found(self, name: &str) -> NotFound {
        match self {
            Named::Image => NotFound::image(name),
            Named::Kernel => NotFound::kernel(name),
        }
    }
}

impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a reservation records: who holds it (for the conflict message) and its token (so a
/// holder only ever ends its own).
#[derive(Debug, Serialize, Deserialize)]
struct Held {
    token: String,
    /// What is happening to the name, as a clause: `being pulled from debian:bookworm`.
    doing: String,
}

/// A reserved image or kernel name (see the module docs). Publish the record with it, or
/// drop it to give the name back.
#[derive(Debug)]
#[must_use = "a reservation is released when dropped"]
pub struct Reservation {
    store: Arc<Store>,
    kind: Named,
    name: String,
    token: String,
    open: bool,
}

impl Reservation {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> Named {
        self.kind
    }

    /// Write `rec` (named as reserved) and end the reservation, in one transaction.
    pub fn publish_image(self, rec: &ImageRecord) -> Result<(), StoreError> {
        assert_eq!(
            (self.kind, self.name.as_str()),
            (Named::Image, rec.name.as_str())
        );
        let store = Arc::clone(&self.store);
        store.publish(&mut [(self, encode(rec))])
    }

    /// Write `rec` (named as reserved) and end the reservation, in one transaction.
    pub fn publish_kernel(self, rec: &KernelRecord) -> Result<(), StoreError> {
        assert_eq!(
            (self.kind, self.name.as_str()),
            (Named::Kernel, rec.name.as_str())
        );
        let store = Arc::clone(&self.store);
        store.publish(&mut [(self, encode(rec))])
    }

    /// An image and its kernel (`image build`), both or neither, in one transaction.
    pub fn publish_image_and_kernel(
        self,
        image: &ImageRecord,
        kernel: Reservation,
        krec: &KernelRecord,
    ) -> Result<(), StoreError> {
        assert_eq!(
            (self.kind, self.name.as_str()),
            (Named::Image, image.name.as_str())
        );
        assert_eq!(
            (kernel.kind, kernel.name.as_str()),
            (Named::Kernel, krec.name.as_str())
        );
        let store = Arc::clone(&self.store);
        store.publish(&mut [(kernel, encode(krec)), (self, encode(image))])
    }
}

impl Drop for Reservation {
    /// Give the name back, synchronously, so a retry right after a failure finds it free.
    /// One small transaction without fsync (it may wait for a write in progress); normal
    /// ends are publishes, so this runs on failures and cancellations.
    fn drop(&mut self) {
        if self.open
            && let Err(e) = self.store.release(self.kind, &self.name, &self.token)
        {
            tracing::warn!(kind = self.kind.as_str(), name = %self.name, error = %e, "cannot release a name reservation");
        }
    }
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialise")
}

fn decode<T: DeserializeOwned>(store: &Store, table: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        path: store.path.clone(),
        detail: format!("a record in {table} does not decode: {e}"),
    })
}

impl Store {
    /// A write transaction that is not fsynced: for reservations, which die with the
    /// process anyway. (A later durable commit persists it all the same; harmless.)
    fn begin_light(&self) -> Result<WriteTransaction, StoreError> {
        let mut txn = self.begin_write()?;
        txn.set_durability(Durability::None)?;
        Ok(txn)
    }

    /// Forget every reservation (a previous process's are void). Called by [`Store::open`].
    pub(crate) fn clear_reservations(&self) -> Result<(), StoreError> {
        self.retry(|| {
            let txn = self.begin_write()?;
            txn.delete_table(RESERVATIONS)?;
            txn.commit()?;
            Ok(())
        })
    }

    /// Reserve `name` for an image or kernel about to be made (see the module docs).
    /// `doing` says what is making it, as a clause (`being pulled from debian:bookworm`),
    /// for the message a second producer gets.
    pub fn reserve(
        self: &Arc<Self>,
        kind: Named,
        name: &str,
        doing: &str,
    ) -> Result<Reservation, StoreError> {
        self.retry(|| {
            let token = uuid::Uuid::new_v4().simple().to_string();
            let txn = self.begin_light()?;
            {
                if txn.open_table(kind.table())?.get(name)?.is_some() {
                    return Err(StoreError::Exists {
                        kind,
                        name: name.to_owned(),
                    });
                }
                let mut res = txn.open_table(RESERVATIONS)?;
                let key = kind.key(name);
                if let Some(held) = res.get(key.as_str())? {
                    let held: Held = decode(self, "reservations", held.value())?;
                    return Err(StoreError::Conflict(format!(
                        "{kind} {name} is {} right now; wait for that to finish, or choose another name",
                        held.doing
                    )));
                }
                let held = Held {
                    token: token.clone(),
                    doing: doing.to_owned(),
                };
                res.insert(key.as_str(), encode(&held).as_slice())?;
            }
            txn.commit()?;
            Ok(Reservation {
                store: Arc::clone(self),
                kind,
                name: name.to_owned(),
                token,
                open: true,
            })

        })
    }

    fn release(&self, kind: Named, name: &str, token: &str) -> Result<(), StoreError> {
        self.retry(|| {
            let txn = self.begin_light()?;
            {
                let mut res = txn.open_table(RESERVATIONS)?;
                let key = kind.key(name);
                let ours = match res.get(key.as_str())? {
                    Some(h) => decode::<Held>(self, "reservations", h.value())?.token == token,
                    None => false,
                };
                if ours {
                    res.remove(key.as_str())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
    }

    /// Write each record under its reservation and end the reservations, all in one
    /// transaction; on error nothing is written and the reservations stay (their drop
    /// releases them).
    fn publish(&self, items: &mut [(Reservation, Vec<u8>)]) -> Result<(), StoreError> {
        self.retry(|| {
            let txn = self.begin_write()?;
            {
                let mut res = txn.open_table(RESERVATIONS)?;
                for (r, value) in items.iter() {
                    let key = r.kind.key(&r.name);
                    let ours = match res.get(key.as_str())? {
                        Some(h) => {
                            decode::<Held>(self, "reservations", h.value())?.token == r.token
                        }
                        None => false,
                    };
                    if !ours {
                        return Err(StoreError::Conflict(format!(
                            "the reservation of {} {} was lost; nothing was published",
                            r.kind, r.name
                        )));
                    }
                    let mut table = txn.open_table(r.kind.table())?;
                    if table.get(r.name.as_str())?.is_some() {
                        return Err(StoreError::Exists {
                            kind: r.kind,
                            name: r.name.clone(),
                        });
                    }
                    table.insert(r.name.as_str(), value.as_slice())?;
                    res.remove(key.as_str())?;
                }
            }
            txn.commit()?;
            for (r, _) in items.iter_mut() {
                r.open = false;
            }
            Ok(())
        })
    }

    /// Record a new VM: its id and name must be new, its address free, and the image and
    /// kernel it names must exist; all checked in the transaction that writes it, so an
    /// `image delete` either sees this VM or runs before the check (and the create is
    /// refused with "no image named ...").
    pub fn create_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        self.retry(|| {
            let txn = self.begin_write()?;
            {
                let mut names = txn.open_table(VM_NAMES)?;
                if names.get(vm.name.as_str())?.is_some() {
                    return Err(StoreError::Conflict(format!(
                        "a vm named {name} exists already; pick another --name, or delete it with `banger vm delete {name}`",
                        name = vm.name
                    )));
                }
                for (kind, name) in [(Named::Image, &vm.image), (Named::Kernel, &vm.kernel)] {
                    if txn.open_table(kind.table())?.get(name.as_str())?.is_none() {
                        return Err(StoreError::NotFound(kind.not_found(name)));
                    }
                }
                let mut vms = txn.open_table(VMS)?;
                if vms.get(vm.id.as_str())?.is_some() {
                    return Err(StoreError::Conflict(format!(
                        "a vm with id {} exists already",
                        vm.id
                    )));
                }
                if vm.ip.is_some() || vm.uid.is_some() {
                    for entry in vms.iter()? {
                        let (_, v) = entry?;
                        let other: VmRecord = decode(self, "vms", v.value())?;
                        if let Some(ip) = &vm.ip
                            && other.ip.as_ref() == Some(ip)
                        {
                            return Err(StoreError::Conflict(format!(
                                "the address {ip} is taken by vm {}",
                                other.name
                            )));
                        }
                        if let Some(uid) = vm.uid
                            && other.uid == Some(uid)
                        {
                            return Err(StoreError::Conflict(format!(
                                "the uid {uid} is taken by vm {}",
                                other.name
                            )));
                        }
                    }
                }
                names.insert(vm.name.as_str(), vm.id.as_str())?;
                vms.insert(vm.id.as_str(), encode(vm).as_slice())?;
            }
            txn.commit()?;
            Ok(())

        })
    }

    /// Update a VM (its actor's writes). Its name must not belong to another VM.
    pub fn put_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        self.retry(|| {
            let txn = self.begin_write()?;
            {
                let mut names = txn.open_table(VM_NAMES)?;
                if let Some(owner) = names.get(vm.name.as_str())?
                    && owner.value() != vm.id
                {
                    return Err(StoreError::Conflict(format!(
                        "a vm named {} exists already",
                        vm.name
                    )));
                }
                let mut vms = txn.open_table(VMS)?;
                let old_name = match vms.get(vm.id.as_str())? {
                    Some(old) => Some(decode::<VmRecord>(self, "vms", old.value())?.name),
                    None => None,
                };
                if let Some(old) = old_name.filter(|n| *n != vm.name) {
                    names.remove(old.as_str())?;
                }
                names.insert(vm.name.as_str(), vm.id.as_str())?;
                vms.insert(vm.id.as_str(), encode(vm).as_slice())?;
            }
            txn.commit()?;
            Ok(())
        })
    }

    /// Find a VM by name, or by id.
    pub fn find_vm(&self, name_or_id: &str) -> Result<Option<VmRecord>, StoreError> {
        self.retry(|| {
            let txn = self.begin_read()?;
            let vms = txn.open_table(VMS)?;
            let names = txn.open_table(VM_NAMES)?;
            let id = match names.get(name_or_id)? {
                Some(id) => id.value().to_owned(),
                None => name_or_id.to_owned(),
            };
            match vms.get(id.as_str())? {
                Some(v) => Ok(Some(decode(self, "vms", v.value())?)),
                None => Ok(None),
            }
        })
    }

    pub fn list_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        self.retry(|| {
            let txn = self.begin_read()?;
            let vms = txn.open_table(VMS)?;
            let mut out = Vec::new();
            for entry in vms.iter()? {
                let (_, v) = entry?;
                out.push(decode::<VmRecord>(self, "vms", v.value())?);
            }
            out.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
            Ok(out)
        })
    }

    pub fn delete_vm(&self, id: &str) -> Result<(), StoreError> {
        self.retry(|| {
            let txn = self.begin_write()?;
            {
                let mut vms = txn.open_table(VMS)?;
                let name = match vms.remove(id)? {
                    Some(v) => Some(decode::<VmRecord>(self, "vms", v.value())?.name),
                    None => None,
                };
                if let Some(name) = name {
                    txn.open_table(VM_NAMES)?.remove(name.as_str())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
    }

    /// Record a warm snapshot (its files are in place already).
    pub fn put_warm(&self, w: &WarmRecord) -> Result<(), StoreError> {
        self.retry(|| {
            let txn = self.begin_write()?;
            txn.open_table(WARM)?
                .insert(w.id.as_str(), encode(w).as_slice())?;
            txn.commit()?;
            Ok(())
        })
    }

    /// The warm snapshots, oldest first.
    pub fn list_warm(&self) -> Result<Vec<WarmRecord>, StoreError> {
        let mut out: Vec<WarmRecord> = self.retry(|| {
            let txn = self.begin_read()?;
            let t = match txn.open_table(WARM) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let mut out = Vec::new();
            for entry in t.iter()? {
                let (_, v) = entry?;
                out.push(decode(self, "warm", v.value())?);
            }
            Ok(out)
        })?;
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    /// Forget a warm snapshot (the caller removes its files afterwards).
    pub fn delete_warm(&self, id: &str) -> Result<(), StoreError> {
        self.retry(|| {
            let txn = self.begin_write()?;
            txn.open_table(WARM)?.remove(id)?;
            txn.commit()?;
            Ok(())
        })
    }

    pub fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        self.get_json(IMAGES, "images", name)
    }

    pub fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.list_json(IMAGES, "images")
    }

    /// Delete image `name` unless a VM uses it (see [`Store::delete_unused`]).
    pub fn delete_image_unused(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<Option<(ImageRecord, Reservation)>, StoreError> {
        self.delete_unused(Named::Image, name)
    }

    pub fn get_kernel(&self, name: &str) -> Result<Option<KernelRecord>, StoreError> {
        self.get_json(KERNELS, "kernels", name)
    }

    pub fn list_kernels(&self) -> Result<Vec<KernelRecord>, StoreError> {
        self.list_json(KERNELS, "kernels")
    }

    /// Delete kernel `name` unless a VM uses it (see [`Store::delete_unused`]).
    pub fn delete_kernel_unused(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<Option<(KernelRecord, Reservation)>, StoreError> {
        self.delete_unused(Named::Kernel, name)
    }

    /// In one transaction: refuse if any VM names it ([`StoreError::Conflict`] naming the
    /// VMs), remove the record, and reserve the name as being deleted, so nothing is made
    /// into its directory while the caller removes the files; drop the reservation after.
    /// `None`: no such record.
    fn delete_unused<T: DeserializeOwned>(
        self: &Arc<Self>,
        kind: Named,
        name: &str,
    ) -> Result<Option<(T, Reservation)>, StoreError> {
        self.retry(|| {
            let token = uuid::Uuid::new_v4().simple().to_string();
            let txn = self.begin_write()?;
            let rec = {
                let mut table = txn.open_table(kind.table())?;
                let rec: T = match table.get(name)? {
                    Some(v) => decode(self, kind.as_str(), v.value())?,
                    None => return Ok(None),
                };
                let vms = txn.open_table(VMS)?;
                let mut users = Vec::new();
                for entry in vms.iter()? {
                    let (_, v) = entry?;
                    let vm: VmRecord = decode(self, "vms", v.value())?;
                    let uses = match kind {
                        Named::Image => vm.image == name,
                        Named::Kernel => vm.kernel == name,
                    };
                    if uses {
                        users.push(vm.name);
                    }
                }
                if !users.is_empty() {
                    users.sort();
                    return Err(StoreError::Conflict(format!(
                        "{kind} {name} is used by vm {}; delete those first",
                        users.join(", ")
                    )));
                }
                table.remove(name)?;
                let held = Held {
                    token: token.clone(),
                    doing: "being deleted".into(),
                };
                txn.open_table(RESERVATIONS)?
                    .insert(kind.key(name).as_str(), encode(&held).as_slice())?;
                rec
            };
            txn.commit()?;
            Ok(Some((
                rec,
                Reservation {
                    store: Arc::clone(self),
                    kind,
                    name: name.to_owned(),
                    token,
                    open: true,
                },
            )))
        })
    }

    fn get_json<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        name: &str,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        self.retry(|| {
            let txn = self.begin_read()?;
            let t = txn.open_table(table)?;
            match t.get(key)? {
                Some(v) => Ok(Some(decode(self, name, v.value())?)),
                None => Ok(None),
            }
        })
    }

    fn list_json<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        name: &str,
    ) -> Result<Vec<T>, StoreError> {
        self.retry(|| {
            let txn = self.begin_read()?;
            let t = txn.open_table(table)?;
            let mut out = Vec::new();
            for entry in t.iter()? {
                let (_, v) = entry?;
                out.push(decode(self, name, v.value())?);
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_api::{VmSpec, VmState, VmmKind};

    fn vm(id: &str, name: &str) -> VmRecord {
        VmRecord {
            id: id.into(),
            name: name.into(),
            image: "img".into(),
            kernel: "k".into(),
            vmm: VmmKind::Qemu,
            spec: VmSpec {
                vcpu: 1,
                memory_mib: 256,
                disk_bytes: 1 << 30,
            },
            nat: false,
            state: VmState::Created,
            error: None,
            created_at: 1,
            started_at: None,
            cmdline: None,
            runtime: None,
            ip: None,
            publish: Vec::new(),
            uid: None,
            egress: Default::default(),
            isolate: false,
            expires: None,
            spawned: None,
            snapshots: Vec::new(),
            clone_of: None,
            warm: None,
            warm_maker: false,
        }
    }

    #[test]
    fn vms_by_name_and_id_with_unique_names() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.redb")).unwrap();
        s.put_vm(&vm("aaa", "one")).unwrap();
        assert_eq!(s.find_vm("one").unwrap().unwrap().id, "aaa");
        assert_eq!(s.find_vm("aaa").unwrap().unwrap().name, "one");
        assert!(matches!(
            s.put_vm(&vm("bbb", "one")),
            Err(StoreError::Conflict(_))
        ));
        // Renaming frees the old name.
        s.put_vm(&vm("aaa", "uno")).unwrap();
        assert!(s.find_vm("one").unwrap().is_none());
        s.put_vm(&vm("bbb", "one")).unwrap();
        assert_eq!(s.list_vms().unwrap().len(), 2);
        s.delete_vm("aaa").unwrap();
        assert!(s.find_vm("uno").unwrap().is_none());
        assert_eq!(s.list_vms().unwrap().len(), 1);
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let s = Store::open(&path).unwrap();
            s.put_vm(&vm("aaa", "one")).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.find_vm("one").unwrap().unwrap(), vm("aaa", "one"));
    }

    fn image(name: &str) -> ImageRecord {
        ImageRecord {
            name: name.into(),
            rootfs: "/r".into(),
            size_bytes: 1,
            kernel: None,
            registered_at: 1,
        }
    }

    fn kernel(name: &str) -> KernelRecord {
        KernelRecord {
            name: name.into(),
            kernel: "/k".into(),
            initrd: None,
            modules: None,
            registered_at: 1,
            vmlinux: None,
            format: None,
            config: None,
            options: Default::default(),
        }
    }

    #[test]
    fn a_reserved_name_is_refused_until_published_or_dropped_and_reopen_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let s = Arc::new(Store::open(&path).unwrap());
        let r = s.reserve(Named::Image, "x", "being pulled from a").unwrap();
        let e = s
            .reserve(Named::Image, "x", "being pulled from b")
            .unwrap_err();
        assert!(matches!(e, StoreError::Conflict(_)), "{e}");
        assert!(
            e.to_string().contains("image x is being pulled from a"),
            "{e}"
        );
        // Kernels are another namespace.
        drop(s.reserve(Named::Kernel, "x", "k").unwrap());
        drop(r);
        let r = s.reserve(Named::Image, "x", "being pulled from b").unwrap();
        r.publish_image(&image("x")).unwrap();
        assert_eq!(s.get_image("x").unwrap(), Some(image("x")));
        let e = s.reserve(Named::Image, "x", "again").unwrap_err();
        assert!(matches!(e, StoreError::Exists { .. }), "{e}");
        assert_eq!(e.to_string(), "an image named x exists already");

        // A crash leaves a reservation behind: the next open forgets it.
        let mut left = s.reserve(Named::Kernel, "left", "being imported").unwrap();
        left.open = false;
        drop(left);
        assert!(s.reserve(Named::Kernel, "left", "being imported").is_err());
        drop(s);
        let s = Arc::new(Store::open(&path).unwrap());
        drop(s.reserve(Named::Kernel, "left", "being imported").unwrap());
    }

    #[test]
    fn an_image_or_kernel_in_use_is_not_deleted_and_a_vm_needs_both() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Store::open(&dir.path().join("s.redb")).unwrap());
        let e = s.create_vm(&vm("aaa", "one")).unwrap_err();
        assert_eq!(e.to_string(), "no image named img; see `banger image list`");
        assert_eq!(e.code(), banger_api::codes::NOT_FOUND);
        s.reserve(Named::Image, "img", "t")
            .unwrap()
            .publish_image(&image("img"))
            .unwrap();
        let e = s.create_vm(&vm("aaa", "one")).unwrap_err();
        assert_eq!(e.to_string(), "no kernel named k; see `banger kernel list`");
        s.reserve(Named::Kernel, "k", "t")
            .unwrap()
            .publish_kernel(&kernel("k"))
            .unwrap();
        s.create_vm(&vm("aaa", "one")).unwrap();
        s.create_vm(&vm("bbb", "two")).unwrap();
        let e = s.create_vm(&vm("ccc", "one")).unwrap_err();
        assert!(
            e.to_string().contains("a vm named one exists already"),
            "{e}"
        );
        let e = s.delete_image_unused("img").unwrap_err();
        assert_eq!(
            e.to_string(),
            "image img is used by vm one, two; delete those first"
        );
        assert_eq!(e.code(), banger_api::codes::CONFLICT);
        let e = s.delete_kernel_unused("k").unwrap_err();
        assert_eq!(
            e.to_string(),
            "kernel k is used by vm one, two; delete those first"
        );
        s.delete_vm("aaa").unwrap();
        s.delete_vm("bbb").unwrap();
        let (rec, deleting) = s.delete_image_unused("img").unwrap().unwrap();
        assert_eq!(rec, image("img"));
        // While its files go, the name is not free.
        let e = s.reserve(Named::Image, "img", "being pulled").unwrap_err();
        assert!(e.to_string().contains("image img is being deleted"), "{e}");
        drop(deleting);
        drop(s.reserve(Named::Image, "img", "being pulled").unwrap());
        assert!(s.delete_image_unused("img").unwrap().is_none());
    }

    #[test]
    fn a_build_publishes_its_image_and_kernel_together() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Store::open(&dir.path().join("s.redb")).unwrap());
        let ri = s.reserve(Named::Image, "b", "being built").unwrap();
        let rk = s.reserve(Named::Kernel, "b", "being built").unwrap();
        ri.publish_image_and_kernel(&image("b"), rk, &kernel("b"))
            .unwrap();
        assert!(s.get_image("b").unwrap().is_some());
        assert!(s.get_kernel("b").unwrap().is_some());
    }

    #[test]
    fn a_new_vm_needs_a_free_address() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Store::open(&dir.path().join("s.redb")).unwrap());
        s.reserve(Named::Image, "img", "t")
            .unwrap()
            .publish_image(&image("img"))
            .unwrap();
        s.reserve(Named::Kernel, "k", "t")
            .unwrap()
            .publish_kernel(&kernel("k"))
            .unwrap();
        let with_ip = |id: &str, name: &str| VmRecord {
            ip: Some("172.30.0.2".into()),
            ..vm(id, name)
        };
        s.create_vm(&with_ip("aaa", "one")).unwrap();
        let e = s.create_vm(&with_ip("bbb", "two")).unwrap_err();
        assert_eq!(e.to_string(), "the address 172.30.0.2 is taken by vm one");
    }
}
