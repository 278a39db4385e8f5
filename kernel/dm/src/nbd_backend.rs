//! The devices as NBD exports. Every active device that carries data (`linear`,
//! `thin`) is an export named after it; an export handle is the device's id, so each
//! request goes straight to its device's target, and requests for a removed device
//! fail with `ESHUTDOWN`.

use alloc::format;
use alloc::rc::Rc;
use alloc::vec::Vec;
use blockdev::SECTOR_SIZE;
use core::cell::RefCell;
use nbd::{
    Backend, BackendError, ExportHandle, ExportInfo, IoCompletion, IoRequest, OpenError, QueueFull,
};

use crate::device::{Device, DeviceId, State};
use crate::mapper::DeviceMapper;
use crate::table::Target;

impl DeviceMapper {
    /// What NBD offers of a device: data-carrying active devices only.
    fn export_info(&self, device: &Device) -> Option<ExportInfo> {
        let State::Active(active) = &device.state else {
            return None;
        };
        let preferred_block_size = match &device.table.target {
            Target::Thin(thin) => self
                .find(&thin.pool_dev)
                .and_then(|pool| match &pool.table.target {
                    Target::Pool(table) => Some(table.config.data_block_size * SECTOR_SIZE as u32),
                    _ => None,
                })
                .unwrap_or(4096),
            _ => 4096,
        };
        let read_only = active.io.read_only();
        Some(ExportInfo {
            name: device.name.clone(),
            description: format!("{} {}", device.table.kind(), device.table),
            sectors: active.io.data_sectors()?,
            read_only,
            preferred_block_size,
            trim: active.io.discard() && !read_only,
            write_zeroes: !read_only,
            // A thin volume zeroes fast by unmapping; a linear device only by writing.
            fast_zero: matches!(device.table.target, Target::Thin(_)) && !read_only,
            multi_conn: true,
        })
    }
}

impl Backend for DeviceMapper {
    fn exports(&self) -> Vec<ExportInfo> {
        self.devices()
            .filter_map(|device| self.export_info(device))
            .collect()
    }

    fn open(&mut self, name: &str) -> Result<(ExportHandle, ExportInfo), OpenError> {
        let id = self
            .devices
            .iter()
            .find(|(_, device)| device.name == name)
            .map(|(id, _)| *id)
            .ok_or(OpenError::NotFound)?;
        let info = self
            .export_info(&self.devices[&id])
            .ok_or(OpenError::NotFound)?;
        let device = self.devices.get_mut(&id).expect("found above");
        let State::Active(active) = &mut device.state else {
            return Err(OpenError::NotFound);
        };
        active.clients += 1;
        Ok((ExportHandle(id.0), info))
    }

    fn close(&mut self, export: ExportHandle) {
        if let Some(device) = self.devices.get_mut(&DeviceId(export.0))
            && let State::Active(active) = &mut device.state
        {
            active.clients -= 1;
        }
    }

    fn submit(&mut self, request: IoRequest) -> Result<(), QueueFull> {
        let DeviceMapper { devices, ready, .. } = self;
        let active = devices
            .get_mut(&DeviceId(request.export.0))
            .and_then(|device| match &mut device.state {
                State::Active(active) => Some(active),
                State::Inactive(_) => None,
            });
        let Some(active) = active else {
            ready.push_back(IoCompletion {
                tag: request.tag,
                result: Err(BackendError::Gone),
            });
            return Ok(());
        };
        if active.suspended {
            active.held.push_back(request);
        } else if active.io.congested() {
            return Err(QueueFull(request));
        } else {
            active
                .io
                .submit(request.tag, request.op, &mut |done| ready.push_back(done));
        }
        Ok(())
    }

    fn poll(&mut self) -> Option<IoCompletion> {
        if let Some(done) = self.ready.pop_front() {
            return Some(done);
        }
        self.devices
            .values_mut()
            .find_map(|device| match &mut device.state {
                State::Active(active) => active.io.poll(),
                State::Inactive(_) => None,
            })
    }
}

/// The device mapper as an NBD backend, shared with the console that manages it (the
/// appliance is single-threaded: the console and the NBD server take turns).
#[derive(Clone)]
pub struct NbdBackend(Rc<RefCell<DeviceMapper>>);

impl NbdBackend {
    pub fn new(mapper: Rc<RefCell<DeviceMapper>>) -> Self {
        NbdBackend(mapper)
    }
}

impl Backend for NbdBackend {
    fn exports(&self) -> Vec<ExportInfo> {
        self.0.borrow().exports()
    }

    fn open(&mut self, name: &str) -> Result<(ExportHandle, ExportInfo), OpenError> {
        self.0.borrow_mut().open(name)
    }

    fn close(&mut self, export: ExportHandle) {
        self.0.borrow_mut().close(export)
    }

    fn submit(&mut self, request: IoRequest) -> Result<(), QueueFull> {
        self.0.borrow_mut().submit(request)
    }

    fn poll(&mut self) -> Option<IoCompletion> {
        self.0.borrow_mut().poll()
    }
}
