//! The north-south maps (`datapath_common::maps::north_south`) as the
//! agent writes them: the shared Maglev settings, each table (by storing
//! into the mapped array), which table a frontend uses, and this node's
//! underlay pods with their MACs.

use std::net::Ipv4Addr;

use aya::maps::{Array, HashMap, MapData, MapError};
use datapath_common::{
    ipv4_be,
    maps::{BackendId, CtKey, LocalPod, MaglevPair, NorthSouthConfig, UplinkSnat, maglev_elements},
};

use super::mapped_array::MappedArray;

/// Why a Maglev table was not written.
#[derive(Debug, thiserror::Error)]
pub enum MaglevWriteError {
    #[error("Maglev table {table} is beyond the {tables} the map holds (--maglev-tables)")]
    NoSuchTable { table: u32, tables: u32 },
    #[error("a Maglev table has {expected} entries, not {given}")]
    WrongSize { expected: u32, given: usize },
    #[error(transparent)]
    Map(#[from] MapError),
}

/// Handles on `NORTH_SOUTH`, `MAGLEV_TABLE_OF`, `MAGLEV`, `LOCAL_PODS`,
/// `UPLINK_SNAT`.
pub struct NorthSouthMaps {
    config: Array<MapData, NorthSouthConfig>,
    table_of: Array<MapData, u32>,
    tables: MappedArray<MaglevPair>,
    local_pods: HashMap<MapData, u32, LocalPod>,
    /// Flows SNATed to this node, by their replies' tuple.
    pub snat: HashMap<MapData, CtKey, UplinkSnat>,
}

impl NorthSouthMaps {
    pub(super) fn new(
        config: Array<MapData, NorthSouthConfig>,
        table_of: Array<MapData, u32>,
        tables: MappedArray<MaglevPair>,
        local_pods: HashMap<MapData, u32, LocalPod>,
        snat: HashMap<MapData, CtKey, UplinkSnat>,
    ) -> Self {
        Self {
            config,
            table_of,
            tables,
            local_pods,
            snat,
        }
    }

    /// The settings the programs read: nothing is served from outside
    /// until they are written.
    pub fn config(&self) -> Result<NorthSouthConfig, MapError> {
        self.config.get(&0, 0)
    }

    /// Writes the settings: the cluster's Maglev seed and the table
    /// size the tables are built with, this node's SNAT address and
    /// ports.
    pub fn set_config(&mut self, config: NorthSouthConfig) -> Result<(), MapError> {
        self.config.set(0, config, 0)
    }

    /// How many tables of `table_size` entries the map holds.
    pub fn table_capacity(&self, table_size: u32) -> u32 {
        self.tables.len() / maglev_elements(table_size).max(1)
    }

    /// Writes table `table` (0-based): `backend_ids[i]` is entry i's
    /// backend (`maglev::build_table`'s indices mapped to ids). A flow
    /// meeting the table while it is written goes to the old or the new
    /// entry's backend, either of which is live.
    pub fn write_table(
        &self,
        table: u32,
        table_size: u32,
        backend_ids: &[BackendId],
    ) -> Result<(), MaglevWriteError> {
        if backend_ids.len() != table_size as usize {
            return Err(MaglevWriteError::WrongSize {
                expected: table_size,
                given: backend_ids.len(),
            });
        }
        let tables = self.table_capacity(table_size);
        if table >= tables {
            return Err(MaglevWriteError::NoSuchTable { table, tables });
        }
        let elements = maglev_elements(table_size);
        let pairs = (0..elements as usize).map(|k| MaglevPair {
            backend_ids: [
                backend_ids[2 * k],
                backend_ids.get(2 * k + 1).copied().unwrap_or(0),
            ],
        });
        self.tables.write(table * elements, pairs)?;
        Ok(())
    }

    /// The backend ids table `table` names (sorted, once each; empty
    /// when the table is beyond the map).
    pub fn table_set(&self, table: u32, table_size: u32) -> Result<Vec<BackendId>, MapError> {
        let elements = maglev_elements(table_size);
        if table_size == 0 || table >= self.table_capacity(table_size) {
            return Ok(Vec::new());
        }
        let mut set = Vec::new();
        for k in 0..elements {
            if let Some(pair) = self.tables.get(table * elements + k)? {
                set.extend(pair.backend_ids);
            }
        }
        set.truncate(table_size as usize);
        set.sort_unstable();
        set.dedup();
        Ok(set)
    }

    /// Points frontend `rev_nat_id` at table `table` (`None`: not served
    /// from outside, its packets pass to the stack).
    pub fn set_table_of(&mut self, rev_nat_id: u32, table: Option<u32>) -> Result<(), MapError> {
        self.table_of.set(rev_nat_id, table.map_or(0, |t| t + 1), 0)
    }

    /// Every frontend pointed at a table: (reverse-NAT id, table).
    pub fn tables_of(&self) -> Result<Vec<(u32, u32)>, MapError> {
        let entries = super::batch::read_array(&self.table_of)?;
        Ok(entries
            .into_iter()
            .enumerate()
            .filter(|(_, plus_one)| *plus_one != 0)
            .map(|(id, plus_one)| (id as u32, plus_one - 1))
            .collect())
    }

    /// Every backend id a table some frontend points at names.
    pub fn backends_in_use(&self) -> Result<std::collections::BTreeSet<BackendId>, MapError> {
        let size = self.config()?.maglev_table_size;
        let mut tables: Vec<u32> = self.tables_of()?.into_iter().map(|(_, t)| t).collect();
        tables.sort_unstable();
        tables.dedup();
        let mut ids = std::collections::BTreeSet::new();
        for table in tables {
            ids.extend(self.table_set(table, size)?);
        }
        ids.remove(&0);
        Ok(ids)
    }

    /// Leaves every frontend's flows from outside to the stack (tables
    /// built with other settings: the next sync builds them anew).
    /// Returns how many frontends lost their table.
    pub fn clear_tables_of(&mut self) -> Result<usize, MapError> {
        let pointed = self.tables_of()?;
        for (id, _) in &pointed {
            self.table_of.set(*id, 0, 0)?;
        }
        Ok(pointed.len())
    }

    /// Records an underlay pod of this node's uplink.
    pub fn set_local_pod(&mut self, address: Ipv4Addr, mac: [u8; 6]) -> Result<(), MapError> {
        let pod = LocalPod { mac, _pad: [0; 2] };
        self.local_pods.insert(ipv4_be(address.octets()), pod, 0)
    }

    /// Forgets a pod (gone, or no longer on the uplink).
    pub fn remove_local_pod(&mut self, address: Ipv4Addr) -> Result<(), MapError> {
        match self.local_pods.remove(&ipv4_be(address.octets())) {
            Err(MapError::KeyNotFound) => Ok(()),
            other => other,
        }
    }
}
