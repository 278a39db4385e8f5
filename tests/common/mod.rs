//! What the offline end-to-end tests share: appliances on image files driven through
//! `thinbox offline --exec`, the parts of their transcripts the tests read, and a
//! deterministic generator so failures replay.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qemu_test::{HostServer, Scratch, qemu_img_read};

pub const THINBOX: &str = env!("CARGO_BIN_EXE_thinbox");
/// Pool data block: 64 KiB.
pub const BLOCK: u64 = 64 << 10;

pub const SETUP: [&str; 2] = ["config init vda", "pool create pool vdb vdc"];

/// Configuration, metadata and data images for one appliance.
pub fn appliance(scratch: &Scratch, tag: &str) -> Vec<PathBuf> {
    [("cfg", 4u64), ("meta", 16), ("data", 512)]
        .iter()
        .map(|(name, mib)| {
            let path = scratch.path().join(format!("{tag}-{name}.img"));
            fs::File::create(&path).unwrap().set_len(mib << 20).unwrap();
            path
        })
        .collect()
}

pub fn exec(disks: &[PathBuf], commands: &[&str]) -> Output {
    let mut command = Command::new(THINBOX);
    command.arg("offline");
    for disk in disks {
        command.arg("--disk").arg(disk);
    }
    for line in commands {
        command.args(["--exec", line]);
    }
    command.output().unwrap()
}

/// Serves every device of the appliance on `disks` after running `commands`.
pub fn serve(disks: &[PathBuf], commands: &[String]) -> HostServer {
    let paths: Vec<&Path> = disks.iter().map(PathBuf::as_path).collect();
    HostServer::offline(Path::new(THINBOX), &paths, commands).unwrap()
}

pub fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The `thin ls` row of `name`.
pub fn ls_row<'a>(transcript: &'a str, name: &str) -> &'a str {
    transcript
        .lines()
        .find(|line| {
            let mut words = line.split_whitespace();
            words.next().is_some_and(|dev| dev.parse::<u64>().is_ok()) && words.next() == Some(name)
        })
        .unwrap_or_else(|| panic!("no {name} in {transcript}"))
}

/// The MAPPED column of a `thin ls` row ("20.00 MiB").
pub fn mapped_column(row: &str) -> String {
    row.split_whitespace()
        .skip(2)
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// What an import or sync summary says it copied ("... in 0.500 s: 70.00 MiB
/// copied (...)").
pub fn copied(transcript: &str) -> &str {
    transcript
        .split(" s: ")
        .nth(1)
        .and_then(|rest| rest.split(" copied").next())
        .unwrap_or_else(|| panic!("no summary in {transcript}"))
}

/// The thin volume `name` of the appliance on `disks`, read over NBD.
pub fn volume_content(scratch: &Scratch, disks: &[PathBuf], name: &str) -> Vec<u8> {
    let served = serve(disks, &[]);
    qemu_img_read(
        &served.uri(name),
        &scratch.path().join(format!("{name}.raw")),
    )
}

/// A small deterministic generator, so failures replay.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}
