//! A thin snapshot waits, in steps, only for its origin's writes in flight: while
//! one of them is stuck (its external origin does not answer), other devices — a
//! thin device of the same pool and a linear device — serve every request, the
//! origin's new requests are held, and once the stuck write finishes the snapshot
//! holds it while the held write lands after the snapshot, on the origin only.

use std::collections::BTreeMap;

use blockdev::{CrashDisk, IoBuf, MemDisk};
use dm::{DeviceMapper, Disk, Format};
use nbd::{Backend, ExportHandle, IoOp, IoOutput, IoRequest};

/// The address NBD clients of these tests connect from.
const CLIENT: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000);

/// Data block size (64 KiB) and the size of the thin devices.
const BS: u64 = 128;
const THIN_SECTORS: u64 = 4 * BS;

fn pattern(seed: u8, sectors: u64) -> Vec<u8> {
    (0..sectors * 512)
        .map(|at| seed.wrapping_mul(37).wrapping_add((at % 241) as u8))
        .collect()
}

/// NBD requests on the device mapper, and the completions that came back.
struct Client {
    dm: DeviceMapper,
    next_tag: u64,
    done: BTreeMap<u64, IoOutput>,
}

impl Client {
    fn submit(&mut self, export: ExportHandle, op: IoOp) -> u64 {
        self.next_tag += 1;
        let tag = self.next_tag;
        self.dm
            .submit(IoRequest { tag, export, op })
            .expect("room for the request");
        tag
    }

    /// Collects the completions that are ready.
    fn poll(&mut self) {
        while let Some(done) = self.dm.poll() {
            let output = done
                .result
                .unwrap_or_else(|e| panic!("request failed: {e:?}"));
            self.done.insert(done.tag, output);
        }
    }

    /// Polls until request `tag` is done (at most `polls` times).
    fn wait(&mut self, tag: u64, polls: usize) -> Option<IoOutput> {
        for _ in 0..polls {
            self.poll();
            if let Some(output) = self.done.remove(&tag) {
                return Some(output);
            }
        }
        None
    }

    fn write(&mut self, export: ExportHandle, sector: u64, data: &[u8]) -> u64 {
        let buf = IoBuf::from_slice(data);
        self.submit(
            export,
            IoOp::Write {
                sector,
                buf,
                fua: false,
            },
        )
    }

    fn read(&mut self, export: ExportHandle, sector: u64, sectors: u64) -> Vec<u8> {
        let buf = IoBuf::with_sectors(sectors as usize);
        let tag = self.submit(export, IoOp::Read { sector, buf });
        match self.wait(tag, 100) {
            Some(IoOutput::Read { buf, .. }) => buf.to_vec(),
            other => panic!("read answered {other:?}"),
        }
    }
}

#[test]
fn a_snapshot_waits_in_steps_for_its_origins_writes_only() {
    let origin = CrashDisk::new(THIN_SECTORS);
    origin.write_at(0, &pattern(9, THIN_SECTORS));
    let memory = [
        MemDisk::new(4096),
        MemDisk::new(4096),
        MemDisk::new(32 * BS),
        MemDisk::new(1024),
    ];
    let disk = |name: &str, device: Box<dyn blockdev::BlockDevice>| Disk {
        name: name.to_string(),
        device,
    };
    let mut dm = DeviceMapper::new(vec![
        disk("vda", Box::new(memory[0].handle())),
        disk("vdb", Box::new(memory[1].handle())),
        disk("vdc", Box::new(memory[2].handle())),
        disk("vdd", Box::new(origin.handle())),
        disk("vde", Box::new(memory[3].handle())),
    ]);
    dm.config_init("vda", [7; 16], false).unwrap();
    let pool = format!("0 {} thin-pool vdb vdc {BS} 0", 32 * BS);
    dm.create("pool", false, &pool, Format::IfBlank).unwrap();
    dm.message("pool", "create_thin 0").unwrap();
    dm.message("pool", "create_thin 1").unwrap();
    let table = format!("0 {THIN_SECTORS} thin pool 0 vdd");
    dm.create("vol", false, &table, Format::Never).unwrap();
    let table = format!("0 {THIN_SECTORS} thin pool 1");
    dm.create("other", false, &table, Format::Never).unwrap();
    dm.create("lin", false, "0 1024 linear vde 0", Format::Never)
        .unwrap();
    let mut client = Client {
        dm,
        next_tag: 0,
        done: BTreeMap::new(),
    };
    let [vol, other, lin] =
        ["vol", "other", "lin"].map(|name| client.dm.open(name, CLIENT).unwrap().0);

    // A 4 KiB write to an unprovisioned block copies the rest of the block from the
    // origin, which does not answer for now.
    origin.hold(true);
    let stuck = client.write(vol, 8, &pattern(1, 8));
    assert!(client.wait(stuck, 20).is_none(), "the origin holds it");
    let quiesce = client.dm.start_quiesce("vol").unwrap();
    let held = client.write(vol, 2 * BS, &pattern(2, 8));
    for round in 0..10u8 {
        assert!(!client.dm.quiesce_step(&quiesce).unwrap(), "round {round}");
        let data = pattern(10 + round, 8);
        let tag = client.write(other, u64::from(round) * 8, &data);
        assert!(
            client.wait(tag, 100).is_some(),
            "round {round}: other device"
        );
        assert_eq!(client.read(other, u64::from(round) * 8, 8), data);
        let tag = client.write(lin, u64::from(round) * 8, &data);
        assert!(
            client.wait(tag, 100).is_some(),
            "round {round}: linear device"
        );
        assert_eq!(client.read(lin, u64::from(round) * 8, 8), data);
    }
    assert!(!client.done.contains_key(&stuck) && !client.done.contains_key(&held));

    origin.hold(false);
    let mut steps = 1;
    while !client.dm.quiesce_step(&quiesce).unwrap() {
        steps += 1;
        assert!(
            steps < 100,
            "the origin's write finished, but the device is not quiet"
        );
    }
    client.poll();
    assert!(
        client.done.remove(&stuck).is_some(),
        "the stuck write is done"
    );
    assert!(
        !client.done.contains_key(&held),
        "new requests wait for the snapshot"
    );
    let (dev, _) = client
        .dm
        .new_thin("snap", "pool", THIN_SECTORS, Some("vdd"), Some(0))
        .unwrap();
    assert_eq!(dev, 2);
    client.dm.end_quiesce(quiesce);
    assert!(client.wait(held, 100).is_some(), "the held write goes on");

    let snap = client.dm.open("snap", CLIENT).unwrap().0;
    let mut origin_block = pattern(9, THIN_SECTORS)[..(BS * 512) as usize].to_vec();
    origin_block[8 * 512..16 * 512].copy_from_slice(&pattern(1, 8));
    assert_eq!(
        client.read(snap, 0, BS),
        origin_block,
        "the stuck write is in"
    );
    let from_origin = pattern(9, THIN_SECTORS)[(2 * BS * 512) as usize..][..4096].to_vec();
    assert_eq!(
        client.read(snap, 2 * BS, 8),
        from_origin,
        "the held write is not"
    );
    assert_eq!(client.read(vol, 2 * BS, 8), pattern(2, 8));
    assert_eq!(client.read(vol, 0, BS), origin_block);
}
