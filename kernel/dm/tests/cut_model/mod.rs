//! What the power-cut sweeps share: the model of what each sector of a device may
//! hold after a cut, the disks on one power supply, and the disks a reboot finds.

use std::collections::BTreeMap;

use blockdev::{BlockDevice, CrashDisk, MemDisk, SECTOR_SIZE, Unflushed};
use dm::{DeviceMapper, Disk};
use nbd::{Backend, BackendError, ExportHandle, IoOp, IoOutput, IoRequest};

/// The address NBD clients of these tests connect from.
pub const CLIENT: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000);

/// Disk names, the configuration area's disk first.
pub const NAMES: [&str; 4] = ["vda", "vdb", "vdc", "vdd"];

/// A device mapper over `devices`, named [`NAMES`] in order.
pub fn mapper(devices: Vec<Box<dyn BlockDevice>>) -> DeviceMapper {
    DeviceMapper::new(
        NAMES
            .iter()
            .zip(devices)
            .map(|(name, device)| Disk {
                name: name.to_string(),
                device,
            })
            .collect(),
    )
}

/// Brings back the devices saved in the configuration area (all three of them).
pub fn restore(dm: &mut DeviceMapper) {
    let notes = dm.restore();
    assert!(
        notes
            .iter()
            .any(|note| note == "config: 3 of 3 devices active"),
        "{notes:?}"
    );
}

/// Crash disks with `prepared`'s contents, all on the first one's power supply.
pub fn crash_disks(prepared: &[MemDisk]) -> Vec<CrashDisk> {
    let disks: Vec<CrashDisk> = prepared.iter().map(CrashDisk::from_disk).collect();
    for disk in &disks[1..] {
        disks[0].share_power(disk);
    }
    disks
}

/// Handles on `disks` that take at most `max_transfer_sectors` per request and
/// `queue_depth` requests; disk `n` completes in a random order seeded by
/// `shuffle(n)` where that gives a seed.
pub fn handles(
    disks: &[CrashDisk],
    max_transfer_sectors: u32,
    queue_depth: u16,
    shuffle: impl Fn(usize) -> Option<u64>,
) -> Vec<Box<dyn BlockDevice>> {
    disks
        .iter()
        .enumerate()
        .map(|(n, disk)| {
            let mut info = disk.info().clone();
            info.max_transfer_sectors = max_transfer_sectors;
            info.queue_depth = queue_depth;
            let mut handle = disk.handle_with_info(info);
            if let Some(seed) = shuffle(n) {
                handle.shuffle_completions(seed);
            }
            Box::new(handle) as _
        })
        .collect()
}

/// The cuts a sweep runs at least: `variable`'s value, else `default`.
pub fn cuts_wanted(variable: &str, default: u64) -> u64 {
    std::env::var(variable)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

pub type Sector = [u8; SECTOR_SIZE];
pub const ZERO: Sector = [0; SECTOR_SIZE];

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    fastrand::Rng::with_seed(seed).fill(&mut out);
    out
}

/// What a sector nothing wrote reads: the origin's sector, or zeros.
pub fn base(origin: &[u8], with_origin: bool, sector: u64) -> Sector {
    let at = sector as usize * SECTOR_SIZE;
    match origin.get(at..at + SECTOR_SIZE) {
        Some(bytes) if with_origin => bytes.try_into().expect("one sector"),
        _ => ZERO,
    }
}

/// What a device's sectors may hold: every version written to each, oldest first
/// (index 0: what it read before), the first version a power cut may not go back
/// past, and the newest version a completed request wrote.
#[derive(Clone, Default)]
pub struct DeviceModel {
    pub with_origin: bool,
    pub versions: BTreeMap<u64, Vec<Sector>>,
    pub durable_from: BTreeMap<u64, usize>,
    pub completed: BTreeMap<u64, usize>,
}

impl DeviceModel {
    /// Records a new version of `sector`; returns its index.
    pub fn write(&mut self, origin: &[u8], sector: u64, data: Sector) -> usize {
        let with_origin = self.with_origin;
        let versions = self
            .versions
            .entry(sector)
            .or_insert_with(|| vec![base(origin, with_origin, sector)]);
        versions.push(data);
        versions.len() - 1
    }

    /// A cut may not take `sector` back past `version`.
    pub fn promise(&mut self, sector: u64, version: usize) {
        let from = self.durable_from.entry(sector).or_insert(0);
        *from = (*from).max(version);
    }

    pub fn promise_all(&mut self, completed: &BTreeMap<u64, usize>) {
        for (&sector, &version) in completed {
            self.promise(sector, version);
        }
    }

    /// Whether `found` may be in `sector`: a version from `from` (a version index per
    /// sector) on.
    pub fn allows(
        &self,
        origin: &[u8],
        sector: u64,
        found: &[u8],
        from: &BTreeMap<u64, usize>,
    ) -> bool {
        match self.versions.get(&sector) {
            Some(versions) => versions[from.get(&sector).copied().unwrap_or(0)..]
                .iter()
                .any(|version| version[..] == *found),
            None => base(origin, self.with_origin, sector)[..] == *found,
        }
    }

    /// Why `found` may not be in `sector` after a cut: which version it is, if any,
    /// against the first one the cut may leave.
    pub fn refusal(&self, origin: &[u8], sector: u64, found: &[u8]) -> String {
        let from = self.durable_from.get(&sector).copied().unwrap_or(0);
        let versions = self.versions.get(&sector);
        let which = versions.and_then(|all| all.iter().position(|version| version[..] == *found));
        match (versions, which) {
            (Some(all), Some(index)) => format!(
                "holds version {index} of {}, older than version {from}, which was made durable",
                all.len()
            ),
            (Some(all), None) => format!("holds none of its {} versions", all.len()),
            (None, _) if base(origin, self.with_origin, sector)[..] == *found => {
                "holds what it held before".into()
            }
            (None, _) => "holds data nothing wrote there".into(),
        }
    }

    /// What `sector` reads once the requests in flight have completed.
    pub fn content(&self, origin: &[u8], sector: u64) -> Sector {
        match self.completed.get(&sector) {
            Some(&version) => self.versions[&sector][version],
            None => base(origin, self.with_origin, sector),
        }
    }
}

/// The disks a reboot finds after the cut (each disk keeps its own random subset).
pub fn rebuild(disks: &[CrashDisk], unflushed: Unflushed) -> Vec<MemDisk> {
    disks
        .iter()
        .enumerate()
        .map(|(n, disk)| {
            disk.after_power_loss(match unflushed {
                Unflushed::Random(bits) => Unflushed::Random(bits.rotate_left(n as u32 * 16)),
                other => other,
            })
        })
        .collect()
}

/// The four ways a sweep rebuilds the disks after the cut at I/O `cut` of
/// workload `seed`.
pub fn rebuild_modes(seed: u64, cut: u64) -> [Unflushed; 4] {
    [
        Unflushed::DropAll,
        Unflushed::KeepAll,
        Unflushed::Random(seed ^ cut),
        Unflushed::Torn(cut),
    ]
}

/// Runs one request through a backend to its completion.
pub fn run_request(
    backend: &mut dyn Backend,
    export: ExportHandle,
    op: IoOp,
) -> Result<IoOutput, BackendError> {
    const TAG: u64 = 1 << 40;
    backend
        .submit(IoRequest {
            tag: TAG,
            export,
            op,
        })
        .expect("an idle device takes a request");
    loop {
        if let Some(done) = backend.poll() {
            assert_eq!(done.tag, TAG);
            return done.result;
        }
    }
}
