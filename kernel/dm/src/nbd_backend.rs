//! The devices as NBD exports. Every active device that carries data (`linear`,
//! `thin`) is an export named after it; an export handle is the device's id, so each
//! request goes straight to its device's target, and requests for a removed device
//! fail with `ESHUTDOWN`. Who may use which export is the access list's decision.

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use blockdev::SECTOR_SIZE;
use core::cell::RefCell;
use core::net::SocketAddr;
use nbd::{
    Access, Backend, BackendError, ContextHandle, ExportHandle, ExportInfo, IoCompletion,
    IoRequest, OpenError, Peer, QueueFull,
};

use crate::access::Client;
use crate::device::{Device, DeviceId, State};
use crate::mapper::DeviceMapper;
use crate::table::Target;

impl DeviceMapper {
    /// What NBD offers of a device: data-carrying active devices only.
    fn export_info(&self, device: &Device) -> Option<ExportInfo> {
        let State::Active(active) = &device.state else {
            return None;
        };
        let preferred_block_size = match device.table.target() {
            Target::Thin(thin) => self
                .find(&thin.pool_dev)
                .and_then(|pool| match pool.table.target() {
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
            fast_zero: matches!(device.table.target(), Target::Thin(_)) && !read_only,
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

    fn access(&self, name: &str, peer: &Peer) -> Access {
        self.access.decide(name, &Client::of(peer))
    }

    fn open_access(&self, export: ExportHandle, peer: &Peer) -> Access {
        self.access_of(DeviceId(export.0), peer)
    }

    fn access_generation(&self) -> u64 {
        self.access_generation
    }

    fn tls(&self) -> nbd::Tls {
        self.tls_offer()
    }

    fn tls_failed(&mut self, peer: SocketAddr, failure: &nbd::TlsFailure) {
        self.record_tls_failure(peer, failure);
    }

    fn open(
        &mut self,
        name: &str,
        peer: SocketAddr,
    ) -> Result<(ExportHandle, ExportInfo), OpenError> {
        self.open_by(name, &Peer::at(peer))
    }

    fn open_by(
        &mut self,
        name: &str,
        peer: &Peer,
    ) -> Result<(ExportHandle, ExportInfo), OpenError> {
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
        active.clients.push(peer.clone());
        Ok((ExportHandle(id.0), info))
    }

    fn close(&mut self, export: ExportHandle, peer: SocketAddr) {
        if let Some(device) = self.devices.get_mut(&DeviceId(export.0))
            && let State::Active(active) = &mut device.state
            && let Some(at) = active
                .clients
                .iter()
                .position(|client| client.address == peer)
        {
            active.clients.remove(at);
        }
    }

    fn submit(&mut self, request: IoRequest) -> Result<(), QueueFull> {
        self.requests_submitted += 1;
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

    fn meta_contexts(&self, export: &str) -> Vec<String> {
        self.changed_contexts(export)
    }

    fn open_context(&mut self, export: ExportHandle, name: &str) -> Result<ContextHandle, String> {
        self.open_changed(export, name)
    }

    fn close_context(&mut self, context: ContextHandle) {
        self.close_changed(context)
    }

    fn context_status(
        &mut self,
        context: ContextHandle,
        sector: u64,
        sectors: u64,
        max_extents: u32,
        extent: &mut dyn FnMut(u64, u32),
    ) -> Result<(), BackendError> {
        self.changed_status(context, (sector, sectors), max_extents, extent)
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

    fn access(&self, name: &str, peer: &Peer) -> Access {
        self.0.borrow().access(name, peer)
    }

    fn open_access(&self, export: ExportHandle, peer: &Peer) -> Access {
        self.0.borrow().open_access(export, peer)
    }

    fn access_generation(&self) -> u64 {
        self.0.borrow().access_generation()
    }

    fn tls(&self) -> nbd::Tls {
        self.0.borrow().tls_offer()
    }

    fn tls_failed(&mut self, peer: SocketAddr, failure: &nbd::TlsFailure) {
        self.0.borrow_mut().record_tls_failure(peer, failure);
    }

    fn open(
        &mut self,
        name: &str,
        peer: SocketAddr,
    ) -> Result<(ExportHandle, ExportInfo), OpenError> {
        self.0.borrow_mut().open(name, peer)
    }

    fn open_by(
        &mut self,
        name: &str,
        peer: &Peer,
    ) -> Result<(ExportHandle, ExportInfo), OpenError> {
        self.0.borrow_mut().open_by(name, peer)
    }

    fn close(&mut self, export: ExportHandle, peer: SocketAddr) {
        self.0.borrow_mut().close(export, peer)
    }

    fn submit(&mut self, request: IoRequest) -> Result<(), QueueFull> {
        self.0.borrow_mut().submit(request)
    }

    fn poll(&mut self) -> Option<IoCompletion> {
        self.0.borrow_mut().poll()
    }

    fn meta_contexts(&self, export: &str) -> Vec<String> {
        self.0.borrow().meta_contexts(export)
    }

    fn open_context(&mut self, export: ExportHandle, name: &str) -> Result<ContextHandle, String> {
        self.0.borrow_mut().open_context(export, name)
    }

    fn close_context(&mut self, context: ContextHandle) {
        self.0.borrow_mut().close_context(context)
    }

    fn context_status(
        &mut self,
        context: ContextHandle,
        sector: u64,
        sectors: u64,
        max_extents: u32,
        extent: &mut dyn FnMut(u64, u32),
    ) -> Result<(), BackendError> {
        self.0
            .borrow_mut()
            .context_status(context, sector, sectors, max_extents, extent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Disk, Format, State};
    use alloc::boxed::Box;
    use alloc::string::ToString;
    use blockdev::{IoBuf, MemDisk};
    use core::net::{IpAddr, Ipv4Addr};
    use nbd::{IoOp, IoOutput};

    const PEER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40000);

    fn mapper(disk: &MemDisk) -> DeviceMapper {
        DeviceMapper::new(alloc::vec![Disk {
            name: "vda".to_string(),
            device: Box::new(disk.handle()),
        }])
    }

    fn write(mapper: &mut DeviceMapper, export: ExportHandle, tag: u64, byte: u8) {
        let mut buf = IoBuf::with_sectors(1);
        buf.fill(byte);
        let op = IoOp::Write {
            sector: 0,
            buf,
            fua: false,
        };
        mapper.submit(IoRequest { tag, export, op }).expect("room");
    }

    fn next(mapper: &mut DeviceMapper) -> IoCompletion {
        loop {
            if let Some(done) = mapper.poll() {
                return done;
            }
        }
    }

    fn clients(mapper: &DeviceMapper, name: &str) -> usize {
        match mapper.device(name).unwrap().state() {
            State::Active(active) => active.clients(),
            State::Inactive(why) => panic!("{name} inactive: {why}"),
        }
    }

    #[test]
    fn a_handle_reaches_its_device_and_never_a_successor_of_the_same_name() {
        let disk = MemDisk::new(1024);
        let mut dm = mapper(&disk);
        dm.create("a", false, "0 8 linear vda 16", Format::IfBlank)
            .unwrap();
        let (old, info) = dm.open("a", PEER).unwrap();
        assert_eq!((info.name.as_str(), info.sectors), ("a", 8));
        write(&mut dm, old, 1, 0xa1);
        assert!(next(&mut dm).result.is_ok());
        let mut byte = [0u8];
        disk.read_at(16 * 512, &mut byte);
        assert_eq!(byte, [0xa1]);

        assert!(dm.remove("a", false).is_err(), "a client is connected");
        dm.remove("a", true).unwrap();
        dm.create("a", false, "0 8 linear vda 32", Format::IfBlank)
            .unwrap();
        let (new, _) = dm.open("a", PEER).unwrap();
        assert_ne!(new, old);
        write(&mut dm, old, 2, 0xb2);
        let done = next(&mut dm);
        assert_eq!(
            (done.tag, done.result.unwrap_err()),
            (2, BackendError::Gone)
        );
        disk.read_at(32 * 512, &mut byte);
        assert_eq!(byte, [0], "the old client's write reached no disk");

        dm.close(old, PEER);
        assert_eq!(
            clients(&dm, "a"),
            1,
            "closing the old handle leaves the new one"
        );
        dm.close(new, PEER);
        assert_eq!(clients(&dm, "a"), 0);
        assert_eq!(dm.open("vda", PEER).unwrap_err(), OpenError::NotFound);
    }

    #[test]
    fn requests_wait_while_suspended_and_run_on_resume() {
        let disk = MemDisk::new(1024);
        let mut dm = mapper(&disk);
        dm.create("a", false, "0 8 linear vda 0", Format::IfBlank)
            .unwrap();
        let (export, _) = dm.open("a", PEER).unwrap();
        dm.suspend("a").unwrap();
        write(&mut dm, export, 7, 0x5a);
        for _ in 0..100 {
            assert!(dm.poll().is_none(), "held while suspended");
        }
        dm.resume("a").unwrap();
        let done = next(&mut dm);
        assert_eq!(done.tag, 7);
        assert!(matches!(done.result, Ok(IoOutput::Done)));
        let mut byte = [0u8];
        disk.read_at(0, &mut byte);
        assert_eq!(byte, [0x5a]);
    }
}
