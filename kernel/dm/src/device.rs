//! A device in the device table: its name, read-only flag, live table, the inactive
//! table loaded by `reload` and whether it is running.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;

use crate::activate::Window;
use crate::table::Table;
use crate::targets::TargetIo;

/// Names one registration of a device: a later device of the same name gets another
/// id, so NBD clients of a removed device never reach its successor. Ids grow with
/// every registration, so their order is creation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct DeviceId(pub(crate) u64);

/// A device and whether it is running.
pub struct Device {
    pub(crate) name: String,
    pub(crate) read_only: bool,
    pub(crate) table: Table,
    /// Loaded by `reload`, swapped in by `resume`, dropped by `clear`.
    pub(crate) inactive: Option<Table>,
    pub(crate) state: State,
}

impl Device {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Created with `--readonly`.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The live table.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The table `reload` loaded for the next `resume`.
    pub fn inactive_table(&self) -> Option<&Table> {
        self.inactive.as_ref()
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// The running device, or why it is not running.
    pub(crate) fn active_mut(&mut self) -> Result<&mut Active, String> {
        match &mut self.state {
            State::Active(active) => Ok(active),
            State::Inactive(why) => Err(alloc::format!("{} is inactive ({why})", self.name)),
        }
    }
}

pub enum State {
    Active(Box<Active>),
    /// Known from the configuration but not running; the text says why.
    Inactive(String),
}

/// A running device.
pub struct Active {
    pub(crate) suspended: bool,
    pub(crate) io: TargetIo,
    /// NBD requests that arrived while suspended.
    pub(crate) held: VecDeque<nbd::IoRequest>,
    /// The NBD connections' peers that have the device open.
    pub(crate) clients: Vec<nbd::Peer>,
    /// A pool's metadata and data windows as the engine has them (a reload that
    /// extends them hands the engine the larger devices).
    pub(crate) pool_windows: Option<PoolWindows>,
}

/// The disk windows under a running pool.
#[derive(Clone, Debug)]
pub(crate) struct PoolWindows {
    pub metadata: alloc::vec::Vec<Window>,
    pub data: alloc::vec::Vec<Window>,
}

impl Active {
    pub(crate) fn new(io: TargetIo) -> Self {
        Active {
            suspended: false,
            io,
            held: VecDeque::new(),
            clients: Vec::new(),
            pool_windows: None,
        }
    }

    /// I/O is held until `resume`.
    pub fn suspended(&self) -> bool {
        self.suspended
    }

    /// NBD connections that have the device open.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Who the NBD connections that have the device open are: their addresses and
    /// any client certificates.
    pub fn client_peers(&self) -> &[nbd::Peer] {
        &self.clients
    }

    /// Whether the device carries data (and so is an NBD export); pools do not.
    pub fn carries_data(&self) -> bool {
        self.io.data_sectors().is_some()
    }
}
