//! The NBD metadata context `thinbox:changed:BASE`: on a thin device's export, for
//! every thin device BASE of the same pool, status bit 0 says "this range differs
//! from BASE" (mapped to other data blocks, mapped only here, or mapped only in
//! BASE). A backup client reads only what changed since a snapshot. What a
//! connection sees is fixed when it opens the export: the pool pins both devices'
//! mappings for the connection's life (see `thin_pool::ChangedView`).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use nbd::{BackendError, ContextHandle, ExportHandle};
use thin_pool::ThinTable;

use crate::device::{Device, DeviceId, State};
use crate::mapper::DeviceMapper;
use crate::table::Target;

/// The context's namespace and leaf prefix; the base device's name follows.
pub const CHANGED_CONTEXT_PREFIX: &str = "thinbox:changed:";

/// Status bit of a range that differs from the base.
const CHANGED: u32 = 1;

fn thin_table(device: &Device) -> Option<&ThinTable> {
    match device.table.target() {
        Target::Thin(thin) => Some(thin),
        _ => None,
    }
}

impl DeviceMapper {
    /// `thinbox:changed:BASE` for every thin device BASE of the export's pool.
    pub(crate) fn changed_contexts(&self, export: &str) -> Vec<String> {
        let Some(this) = self.find(export).and_then(thin_table) else {
            return Vec::new();
        };
        self.devices()
            .filter(|device| thin_table(device).is_some_and(|t| t.pool_dev == this.pool_dev))
            .map(|device| format!("{CHANGED_CONTEXT_PREFIX}{}", device.name))
            .collect()
    }

    /// Pins the export's and the base's mappings for one connection.
    pub(crate) fn open_changed(
        &mut self,
        export: ExportHandle,
        name: &str,
    ) -> Result<ContextHandle, String> {
        let unavailable = || format!("metadata context {name} is not available");
        let base_name = name
            .strip_prefix(CHANGED_CONTEXT_PREFIX)
            .ok_or_else(unavailable)?;
        let this = self
            .devices
            .get(&DeviceId(export.0))
            .filter(|device| matches!(device.state, State::Active(_)))
            .and_then(thin_table)
            .ok_or_else(unavailable)?;
        let base = self
            .find(base_name)
            .ok_or_else(|| format!("{name}: no device {base_name}"))?;
        let base =
            thin_table(base).ok_or_else(|| format!("{name}: {base_name} is not a thin device"))?;
        if base.pool_dev != this.pool_dev {
            return Err(format!(
                "{name}: {base_name} is in pool {}, not {}",
                base.pool_dev, this.pool_dev
            ));
        }
        let pool = self.pool(&this.pool_dev).map_err(|error| error.0)?;
        let view = pool
            .changed_view(this.dev_id, base.dev_id)
            .map_err(|error| format!("{name}: {}", error.text))?;
        let handle = self.next_view;
        self.next_view += 1;
        self.views.insert(handle, view);
        Ok(ContextHandle(handle))
    }

    pub(crate) fn close_changed(&mut self, context: ContextHandle) {
        self.views.remove(&context.0);
    }

    pub(crate) fn changed_status(
        &mut self,
        context: ContextHandle,
        (sector, sectors): (u64, u64),
        max_extents: u32,
        extent: &mut dyn FnMut(u64, u32),
    ) -> Result<(), BackendError> {
        let view = self.views.get(&context.0).ok_or(BackendError::Gone)?;
        view.extents(sector, sectors, max_extents, &mut |len, changed| {
            extent(len, if changed { CHANGED } else { 0 })
        })
        .map_err(BackendError::from)
    }
}
