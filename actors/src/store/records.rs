//! Typed tables of the store: VMs (with a unique name index), images and kernels. Values
//! are JSON, so adding an optional field needs no migration; renaming or removing one does.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Store, StoreError};
use crate::image::{ImageRecord, KernelRecord};
use crate::vm::model::VmRecord;

pub(crate) const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
pub(crate) const VM_NAMES: TableDefinition<&str, &str> = TableDefinition::new("vm_names");
pub(crate) const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");
pub(crate) const KERNELS: TableDefinition<&str, &[u8]> = TableDefinition::new("kernels");

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
    /// Insert or update a VM. Its name must not belong to another VM.
    pub fn put_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
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
    }

    /// Find a VM by name, or by id.
    pub fn find_vm(&self, name_or_id: &str) -> Result<Option<VmRecord>, StoreError> {
        let txn = self.db.begin_read()?;
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
    }

    pub fn list_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let vms = txn.open_table(VMS)?;
        let mut out = Vec::new();
        for entry in vms.iter()? {
            let (_, v) = entry?;
            out.push(decode::<VmRecord>(self, "vms", v.value())?);
        }
        out.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
        Ok(out)
    }

    pub fn delete_vm(&self, id: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
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
    }

    pub fn put_image(&self, image: &ImageRecord) -> Result<(), StoreError> {
        self.put_json(IMAGES, &image.name, image)
    }

    pub fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        self.get_json(IMAGES, "images", name)
    }

    pub fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.list_json(IMAGES, "images")
    }

    pub fn delete_image(&self, name: &str) -> Result<bool, StoreError> {
        self.delete_key(IMAGES, name)
    }

    pub fn put_kernel(&self, kernel: &KernelRecord) -> Result<(), StoreError> {
        self.put_json(KERNELS, &kernel.name, kernel)
    }

    pub fn get_kernel(&self, name: &str) -> Result<Option<KernelRecord>, StoreError> {
        self.get_json(KERNELS, "kernels", name)
    }

    pub fn list_kernels(&self) -> Result<Vec<KernelRecord>, StoreError> {
        self.list_json(KERNELS, "kernels")
    }

    pub fn delete_kernel(&self, name: &str) -> Result<bool, StoreError> {
        self.delete_key(KERNELS, name)
    }

    fn put_json<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(table)?
            .insert(key, encode(value).as_slice())?;
        txn.commit()?;
        Ok(())
    }

    fn get_json<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        name: &str,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        match t.get(key)? {
            Some(v) => Ok(Some(decode(self, name, v.value())?)),
            None => Ok(None),
        }
    }

    fn list_json<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        name: &str,
    ) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (_, v) = entry?;
            out.push(decode(self, name, v.value())?);
        }
        Ok(out)
    }

    fn delete_key(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = txn.open_table(table)?.remove(key)?.is_some();
        txn.commit()?;
        Ok(existed)
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
}
