//! Quiescing a thin device for a snapshot in steps. `create_snap` needs its origin
//! quiet (no write in flight), and waiting for that inside the pool message would
//! hold every device while the origin's slowest write finishes. Instead the device
//! mapper holds the origin's new requests (as a suspend does), and each step
//! advances the origin's requests in flight and checks them; every other device
//! keeps serving meanwhile. Once the origin is quiet, the message has nothing left
//! to wait for; the held requests then go on, after the snapshot.

use alloc::format;

use crate::Error;
use crate::device::{DeviceId, State};
use crate::mapper::{DeviceMapper, unknown_device};
use crate::targets::TargetIo;

/// A thin device whose new requests are held until it is quiet.
#[derive(Debug)]
pub struct Quiesce {
    id: DeviceId,
    /// The device was not suspended before: its held requests go on at the end.
    release: bool,
}

impl DeviceMapper {
    /// Starts quiescing thin device `name`: its new requests are held from now on,
    /// those in flight go on. An inactive device is quiet already.
    pub fn start_quiesce(&mut self, name: &str) -> Result<Quiesce, Error> {
        let id = self.device_id(name).ok_or_else(|| unknown_device(name))?;
        let device = self.devices.get_mut(&id).expect("found above");
        let State::Active(active) = &mut device.state else {
            return Ok(Quiesce { id, release: false });
        };
        if !matches!(active.io, TargetIo::Thin(_)) {
            return Err(format!("{name} is a {} device, not thin", device.table.kind()).into());
        }
        let release = !active.suspended;
        active.suspended = true;
        Ok(Quiesce { id, release })
    }

    /// One bounded step of quiescing: advances the device's requests in flight and
    /// returns whether none of them changes data any more (parts of writes waiting
    /// for pool space excepted: they are ordered after the snapshot).
    pub fn quiesce_step(&mut self, quiesce: &Quiesce) -> Result<bool, Error> {
        let Some(device) = self.devices.get_mut(&quiesce.id) else {
            return Err(Error::from(
                "the device was removed while it was being quiesced",
            ));
        };
        match &mut device.state {
            State::Active(active) => match &mut active.io {
                TargetIo::Thin(io) => Ok(io.settle_writes()),
                _ => Ok(true),
            },
            State::Inactive(_) => Ok(true),
        }
    }

    /// Ends quiescing: the requests held meanwhile go on (unless the device was
    /// suspended before, when they wait for its `resume`).
    pub fn end_quiesce(&mut self, quiesce: Quiesce) {
        if quiesce.release && self.devices.contains_key(&quiesce.id) {
            // An inactive device holds nothing.
            let _ = self.release_held(quiesce.id);
        }
    }
}
