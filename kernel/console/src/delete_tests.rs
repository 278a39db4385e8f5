//! A thin device with 1,000,000 mappings deleted in the background while another
//! thin volume of the same pool serves NBD requests between the console's polls.

use alloc::string::String;
use blockdev::IoBuf;
use nbd::{Backend, IoOp, IoOutput};
use persistent_data::thin::{OpenOptions, ThinMetadata};

use crate::tests::{CLIENT, boot, io, mem_disk, nbd_backend, ok};

const MAPPINGS: u64 = 1_000_000;
/// Pool data blocks (64 KiB): the big device's and 1024 more.
const DATA_BLOCKS: u64 = MAPPINGS + 1024;

#[test]
fn a_million_mapping_delete_runs_in_the_background_while_nbd_requests_are_served() {
    let meta = mem_disk(128, "disk", "meta");
    let data = mem_disk(DATA_BLOCKS / 16, "disk", "data");
    // Device 0's mappings come from the metadata layer: writing them would take long.
    {
        let options = OpenOptions::new(128);
        let (mut md, _) = ThinMetadata::open(alloc::boxed::Box::new(meta.handle()), &options)
            .expect("formatting");
        md.resize_data(DATA_BLOCKS).unwrap();
        md.create_thin(0).unwrap();
        for vblock in 0..MAPPINGS {
            let block = md.alloc_data_block().unwrap();
            md.insert(0, vblock, block).unwrap();
        }
        md.commit().unwrap();
    }
    let disks = alloc::vec![("vda", meta), ("vdb", data)];
    let (mut console, _) = boot(&disks);
    ok(
        &mut console,
        &alloc::format!(
            "create pool --table \"0 {} thin-pool vda vdb 128 0\"",
            DATA_BLOCKS * 128
        ),
    );
    ok(
        &mut console,
        &alloc::format!("create big --table \"0 {} thin pool 0\"", MAPPINGS * 128),
    );
    ok(&mut console, "thin create vol pool --size 32M");
    let mut backend = nbd_backend(&console);
    let (vol, _) = backend.open("vol", CLIENT).unwrap();
    ok(&mut console, "thin delete big --background");

    let mut rng = fastrand::Rng::with_seed(3);
    let mut model = alloc::collections::BTreeMap::new();
    let mut polls = 0;
    let mut out = String::new();
    loop {
        let jobs = ok(&mut console, "jobs");
        out.push_str(&jobs);
        if jobs.contains("no background jobs") {
            break;
        }
        // A write and a read through the NBD backend between the console's polls.
        let page = rng.u64(..512);
        let byte = rng.u8(1..);
        let mut buf = IoBuf::with_sectors(8);
        buf.fill(byte);
        let op = IoOp::Write {
            sector: page * 8,
            buf,
            fua: false,
        };
        io(&mut backend, vol, 1, op).unwrap();
        model.insert(page, byte);
        let (&check, &expected) = model.iter().nth(rng.usize(..model.len())).unwrap();
        let op = IoOp::Read {
            sector: check * 8,
            buf: IoBuf::with_sectors(8),
        };
        let Ok(IoOutput::Read { buf, .. }) = io(&mut backend, vol, 2, op) else {
            panic!("read of page {check} failed");
        };
        assert!(buf.iter().all(|&b| b == expected), "page {check}");
        console.poll(&mut out);
        polls += 1;
        assert!(polls < 20_000, "the delete never finished");
    }
    assert!(
        polls >= MAPPINGS / 4096,
        "{polls} polls: the delete ran in one go"
    );
    assert!(out.contains("thin device 0 deleted: all its blocks are released"));
    // The pool is left with the blocks the volume wrote.
    let blocks: alloc::collections::BTreeSet<u64> = model.keys().map(|page| page / 16).collect();
    let status = ok(&mut console, "status pool");
    let used = status.split_whitespace().nth(5).unwrap();
    assert_eq!(used, alloc::format!("{}/{DATA_BLOCKS}", blocks.len()));
}
