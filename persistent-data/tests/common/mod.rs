//! Code shared by the integration tests: scratch files, the real
//! thin-provisioning-tools, and parsing their XML into a comparable model.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use blockdev::MemDisk;
use host_tools::Tool;
use persistent_data::thin::{OpenOptions, ThinMetadata};

/// Data block size used by the tests (64 KiB).
pub const DATA_BLOCK_SIZE: u32 = 128;

/// A scratch directory removed on drop.
pub struct Scratch(tempfile::TempDir);

impl Scratch {
    pub fn new(name: &str) -> Self {
        Scratch(
            tempfile::Builder::new()
                .prefix(&format!("pdata-{name}-"))
                .tempdir()
                .unwrap(),
        )
    }
    pub fn path(&self, file: &str) -> PathBuf {
        self.0.path().join(file)
    }
}

/// Makes sure thin-provisioning-tools are installed.
pub fn require_tools() {
    host_tools::require_for_test(&[Tool::ThinCheck]);
}

/// Copies a memory disk into a file.
pub fn save(disk: &MemDisk, path: &Path) {
    let len = disk_bytes(disk);
    let mut data = vec![0u8; len as usize];
    disk.read_at(0, &mut data);
    std::fs::write(path, data).unwrap();
}

pub fn disk_bytes(disk: &MemDisk) -> u64 {
    use blockdev::BlockDevice;
    disk.info().bytes()
}

/// A memory disk holding a copy of a file.
pub fn load(path: &Path) -> MemDisk {
    let data = std::fs::read(path).unwrap();
    let disk = MemDisk::new(data.len() as u64 / 512);
    disk.write_at(0, &data);
    disk
}

/// Opens (formatting if blank) metadata on a memory disk handle.
pub fn open(disk: &MemDisk, cache_blocks: usize) -> ThinMetadata {
    let mut options = OpenOptions::new(DATA_BLOCK_SIZE);
    options.cache_blocks = cache_blocks;
    ThinMetadata::open(Box::new(disk.handle()), &options)
        .unwrap()
        .0
}

/// Output of a tool run.
pub struct Output {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program).args(args).output().unwrap();
    Output {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs thin_check on an image and panics with its output when it fails.
pub fn assert_thin_check(path: &Path, extra: &[&str]) {
    let mut args: Vec<&str> = extra.to_vec();
    args.push(path.to_str().unwrap());
    let out = run("thin_check", &args);
    assert_eq!(
        out.status, 0,
        "thin_check failed:\nstdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
}

/// One device as the XML describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XmlDevice {
    pub mapped_blocks: u64,
    pub transaction: u64,
    pub creation_time: u32,
    pub snap_time: u32,
    /// virtual block -> (data block, time)
    pub mappings: BTreeMap<u64, (u64, u32)>,
}

/// A whole dump.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XmlDump {
    pub time: u32,
    pub transaction: u64,
    pub flags: u32,
    pub data_block_size: u32,
    pub nr_data_blocks: u64,
    pub devices: BTreeMap<u64, XmlDevice>,
}

fn attr<T: std::str::FromStr>(node: roxmltree::Node, name: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    node.attribute(name)
        .unwrap_or_else(|| panic!("missing attribute {name}"))
        .parse()
        .unwrap()
}

/// Parses thin_dump XML, expanding ranges.
pub fn parse_dump(xml: &str) -> XmlDump {
    let doc = roxmltree::Document::parse(xml).unwrap();
    let sb = doc.root_element();
    assert_eq!(sb.tag_name().name(), "superblock");
    let mut dump = XmlDump {
        time: attr(sb, "time"),
        transaction: attr(sb, "transaction"),
        flags: sb.attribute("flags").map_or(0, |f| f.parse().unwrap()),
        data_block_size: attr(sb, "data_block_size"),
        nr_data_blocks: attr(sb, "nr_data_blocks"),
        devices: BTreeMap::new(),
    };
    for dev in sb.children().filter(|n| n.is_element()) {
        assert_eq!(dev.tag_name().name(), "device");
        let mut device = XmlDevice {
            mapped_blocks: attr(dev, "mapped_blocks"),
            transaction: attr(dev, "transaction"),
            creation_time: attr(dev, "creation_time"),
            snap_time: attr(dev, "snap_time"),
            mappings: BTreeMap::new(),
        };
        for m in dev.children().filter(|n| n.is_element()) {
            match m.tag_name().name() {
                "single_mapping" => {
                    device.mappings.insert(
                        attr(m, "origin_block"),
                        (attr(m, "data_block"), attr(m, "time")),
                    );
                }
                "range_mapping" => {
                    let origin: u64 = attr(m, "origin_begin");
                    let data: u64 = attr(m, "data_begin");
                    let len: u64 = attr(m, "length");
                    let time: u32 = attr(m, "time");
                    for i in 0..len {
                        device.mappings.insert(origin + i, (data + i, time));
                    }
                }
                other => panic!("unexpected element {other}"),
            }
        }
        dump.devices.insert(attr(dev, "dev_id"), device);
    }
    dump
}

/// Runs thin_dump (with extra arguments such as `-m`) and parses the result.
pub fn thin_dump(path: &Path, extra: &[&str]) -> XmlDump {
    let mut args: Vec<&str> = extra.to_vec();
    args.push(path.to_str().unwrap());
    let out = run("thin_dump", &args);
    assert_eq!(out.status, 0, "thin_dump failed: {}", out.stderr);
    parse_dump(&out.stdout)
}

/// Our own dump of the live metadata, parsed.
pub fn our_dump(md: &mut ThinMetadata) -> XmlDump {
    let mut xml = String::new();
    md.dump_xml(&mut xml).unwrap();
    parse_dump(&xml)
}
