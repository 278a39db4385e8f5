//! The command interpreter: one function per command, each printing its output
//! lines or returning the single error line.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use blockdev::{Command, SECTOR_SIZE};
use core::fmt::Write;

use crate::disk_test::{DiskTest, DiskTestOptions};
use crate::units::{human_bytes, seconds};
use crate::{CommandError, Console, Crash, Platform, outln};

/// `help` lines: usage and what the command is for.
pub(crate) const HELP: &[(&str, &str)] = &[
    ("help", "list the commands"),
    ("disks", "list the disks: name, size, model, serial"),
    ("mem", "show heap and DMA memory use"),
    ("uptime", "show time since boot"),
    (
        "disk-test DISK [MIB] [--force]",
        "write, flush and verify a pattern over the first MIB MiB (default 16); destroys data",
    ),
    ("net", "show the network address, link and traffic counters"),
    (
        "net set ADDRESS/PREFIX GATEWAY",
        "use a static IPv4 address, e.g. net set 10.0.2.15/24 10.0.2.2",
    ),
    ("net dhcp", "get the IPv4 address by DHCP (the default)"),
    ("shutdown [--force]", "flush every disk and power off"),
];

/// MiB that `disk-test` covers when no size is given.
const DEFAULT_TEST_MIB: u64 = 16;

impl<P: Platform> Console<P> {
    pub(crate) fn run_words(
        &mut self,
        words: &[String],
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        let Some((command, args)) = words.split_first() else {
            return Ok(());
        };
        match command.as_str() {
            "help" => no_args(command, args).map(|()| help(out)),
            "disks" => no_args(command, args).map(|()| self.list_disks(out)),
            "mem" => no_args(command, args).map(|()| self.mem(out)),
            "uptime" => no_args(command, args).map(|()| self.uptime(out)),
            "disk-test" => self.disk_test(args),
            "net" => self.net(args, out),
            "shutdown" => self.shutdown(args, out),
            "debug" => self.debug(args),
            other => Err(format!("unknown command '{other}' (try help)").into()),
        }
    }

    /// Finds a disk by name; `/dev/vda` means `vda`.
    pub(crate) fn disk_index(&self, name: &str) -> Result<usize, CommandError> {
        let bare = name.strip_prefix("/dev/").unwrap_or(name);
        self.disks
            .iter()
            .position(|disk| disk.name == bare)
            .ok_or_else(|| format!("unknown disk '{name}' (see disks)").into())
    }

    fn list_disks(&self, out: &mut dyn Write) {
        if self.disks.is_empty() {
            outln!(out, "no disks found");
        }
        for disk in &self.disks {
            let info = disk.device.info();
            outln!(
                out,
                "{:<8} {:>12} sectors  {:>10}  {}  {}",
                disk.name,
                info.sectors,
                human_bytes(info.bytes()),
                or_dash(&info.model),
                or_dash(&info.serial)
            );
        }
    }

    fn mem(&self, out: &mut dyn Write) {
        let stats = self.platform.memory();
        outln!(
            out,
            "heap: {} used, {} free, {} total",
            human_bytes(stats.heap_used as u64),
            human_bytes(stats.heap_free as u64),
            human_bytes((stats.heap_used + stats.heap_free) as u64)
        );
        outln!(
            out,
            "dma:  {} frames used, {} free ({} each, {} total)",
            stats.dma_frames_used,
            stats.dma_frames_free,
            human_bytes(stats.frame_size as u64),
            human_bytes(
                ((stats.dma_frames_used + stats.dma_frames_free) * stats.frame_size) as u64
            )
        );
    }

    fn uptime(&self, out: &mut dyn Write) {
        let ns = self.platform.now_ns();
        let total = ns / 1_000_000_000;
        outln!(
            out,
            "up {} ({}d {:02}:{:02}:{:02})",
            seconds(ns),
            total / 86_400,
            total / 3600 % 24,
            total / 60 % 60,
            total % 60
        );
    }

    fn disk_test(&mut self, args: &[String]) -> Result<(), CommandError> {
        const USAGE: &str = "usage: disk-test DISK [MIB] [--force]";
        let mut force = false;
        let mut positional = alloc::vec::Vec::new();
        for arg in args {
            match arg.as_str() {
                "--force" => force = true,
                flag if flag.starts_with("--") => {
                    return Err(format!("disk-test: unknown option '{flag}' ({USAGE})").into());
                }
                _ => positional.push(arg),
            }
        }
        let (name, mib) = match positional.as_slice() {
            [name] => (*name, DEFAULT_TEST_MIB),
            [name, mib] => (*name, parse_mib(mib)?),
            [] => return Err(format!("disk-test: which disk? ({USAGE})").into()),
            _ => return Err(format!("disk-test: too many arguments ({USAGE})").into()),
        };
        let index = self.disk_index(name)?;
        let disk = &self.disks[index];
        let info = disk.device.info();
        if info.read_only {
            return Err(format!("disk-test: {} is read-only", disk.name).into());
        }
        let sectors = mib * (1 << 20) / SECTOR_SIZE as u64;
        if sectors > info.sectors {
            return Err(format!(
                "disk-test: {} holds only {}; choose at most {} MiB",
                disk.name,
                human_bytes(info.bytes()),
                info.bytes() >> 20
            )
            .into());
        }
        if disk.device.in_flight() != 0 {
            return Err(format!("disk-test: {} is busy; try again", disk.name).into());
        }
        let options = DiskTestOptions {
            disk: index,
            sectors,
            force,
            seed: self.platform.now_ns(),
        };
        self.job = Some(Box::new(DiskTest::new(&self.disks, options)));
        Ok(())
    }

    fn shutdown(&mut self, args: &[String], out: &mut dyn Write) -> Result<(), CommandError> {
        let force = match args {
            [] => false,
            [flag] if flag == "--force" => true,
            _ => return Err("usage: shutdown [--force]".into()),
        };
        for disk in &mut self.disks {
            if let Err(error) = blockdev::run_sync(disk.device.as_mut(), Command::Flush)
                && !force
            {
                return Err(format!(
                    "flushing {} failed ({error}), its last writes may be lost; \
                     shutdown --force powers off anyway",
                    disk.name
                )
                .into());
            }
        }
        outln!(out, "powering off");
        self.platform.power_off();
        Ok(())
    }

    fn debug(&mut self, args: &[String]) -> Result<(), CommandError> {
        let how = match args {
            [what] if what == "panic" => Crash::Panic,
            [what] if what == "page-fault" => Crash::PageFault,
            [what] if what == "stack-overflow" => Crash::StackOverflow,
            _ => {
                return Err("usage: debug panic|page-fault|stack-overflow (crashes the \
                            appliance on purpose)"
                    .into());
            }
        };
        self.platform.crash(how);
        Ok(())
    }
}

fn help(out: &mut dyn Write) {
    for (usage, what) in HELP {
        outln!(out, "{usage:<32} {what}");
    }
}

fn no_args(command: &str, args: &[String]) -> Result<(), CommandError> {
    match args.first() {
        None => Ok(()),
        Some(extra) => Err(format!("{command} takes no arguments (got '{extra}')").into()),
    }
}

fn parse_mib(text: &str) -> Result<u64, CommandError> {
    match text.parse::<u64>() {
        Ok(mib) if (1..=1 << 20).contains(&mib) => Ok(mib),
        _ => Err(format!(
            "disk-test: size '{text}' is not a whole number of MiB between 1 and 1048576"
        )
        .into()),
    }
}

fn or_dash(text: &str) -> &str {
    if text.is_empty() { "-" } else { text }
}
