//! The command interpreter: one function per command, each printing its output
//! lines or returning the single error line.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use blockdev::SECTOR_SIZE;
use core::fmt::Write;
use dm::human_bytes;

use crate::disk_test::{DiskTest, DiskTestOptions};
use crate::units::seconds;
use crate::{CommandError, Console, Crash, Platform, outln};

/// `help` lines: usage and what the command is for.
pub(crate) const HELP: &[(&str, &str)] = &[
    ("help", "list the commands"),
    (
        "disks",
        "list the disks: name, size, model, serial, and what each failed (if anything)",
    ),
    ("mem", "show heap and DMA memory use"),
    ("uptime", "show time since boot"),
    (
        "disk-test DISK [MIB] [--force]",
        "write, flush and verify a pattern over the first MIB MiB (default 16) of a disk or \
         device; destroys data",
    ),
    (
        "disk-reset DISK",
        "reset a disk's device while its devices keep serving: requests in flight finish \
         (up to 5 s), the disk is flushed, reset and set up again",
    ),
    (
        "create NAME [--readonly] [--background] --table T",
        "create a device from a table \"START LENGTH TARGET ARGS\" (segments end to end, \
         separated by ;): linear DEV OFFSET, thin-pool META DATA BLOCK_SECTORS LOW_WATER \
         [N FEATURES], thin POOL ID [ORIGIN]; follows a large pool's metadata format unless \
         --background",
    ),
    (
        "remove NAME [--force]",
        "remove a device (--force: even with NBD clients)",
    ),
    (
        "suspend NAME",
        "finish and flush the device's I/O, then hold new I/O",
    ),
    (
        "reload NAME --table T",
        "load an inactive table (alias load; same checks as create); resume swaps it in",
    ),
    (
        "resume NAME",
        "swap in the inactive table if there is one (suspending first), then release I/O \
         held by suspend",
    ),
    ("clear NAME", "drop the inactive table"),
    (
        "rename OLD NEW",
        "rename a device (tables that use it follow; NBD clients stay connected)",
    ),
    (
        "message NAME 0 MESSAGE",
        "send a pool message: create_thin ID, create_snap ID ORIGIN_ID, delete ID, \
         set_transaction_id OLD NEW, reserve_metadata_snap, release_metadata_snap",
    ),
    (
        "pool create NAME META DATA",
        "create a pool on whole devices [--block-size SECTORS] [--low-water-mark BLOCKS] \
         [--format] [--background]",
    ),
    (
        "thin create NAME POOL",
        "create a thin device with the next free id [--size SIZE] [--origin DEVICE]",
    ),
    (
        "thin resize NAME SIZE",
        "grow or shrink a thin device (reload with the new length and resume)",
    ),
    (
        "pool extend POOL --data|--metadata DEV",
        "append a disk or linear device to the pool's data or metadata device and grow the \
         pool onto it",
    ),
    (
        "snap create NAME ORIGIN",
        "snapshot a thin device into a new active device",
    ),
    (
        "snap create NAME ORIGIN --cow DEV",
        "snapshot a linear device or a disk (which gets DISK-origin over it), copying \
         changed chunks to DEV (dm-snapshot, LVM's ORIGIN-real stack) [--chunk-size \
         SECTORS] [--force: DEV holds data]",
    ),
    (
        "snap merge NAME [--into THIN] [--background]",
        "merge a snapshot back: a thin snapshot's content goes to the device it was taken \
         of (or THIN) at once, online; a COW snapshot merges into its origin in the \
         background while it serves I/O, followed (Ctrl-C detaches) unless --background",
    ),
    (
        "snap remove NAME [--force]",
        "remove a COW snapshot (the origin returns to its own table with the last one)",
    ),
    (
        "thin merge-origin NAME [--background]",
        "copy the thin device's blocks into its external origin while it serves I/O, until \
         it maps nothing; followed (Ctrl-C detaches) unless --background",
    ),
    (
        "thin delete NAME [--background]",
        "remove a thin device and delete it from its pool; follows the release of its \
         blocks (Ctrl-C detaches) unless --background",
    ),
    (
        "jobs [cancel ID]",
        "list background jobs (progress, rate, time left); cancel one where that is safe",
    ),
    (
        "thin delta A B [--xml] [--verbose]",
        "where thin devices A and B of a pool differ, from a metadata snapshot (taken and \
         released, or the held one with --metadata-snap); --xml prints thin_delta's XML",
    ),
    (
        "thin ls POOL",
        "mapped, exclusive and shared space of each thin device",
    ),
    (
        "thin import NAME POOL --from nbd://HOST[:PORT]/EXPORT|DEVICE [--size SIZE]",
        "new thin volume copied from an NBD export or a thin device, holes left unmapped",
    ),
    (
        "thin import --resume NAME",
        "continue an import stopped by a power cut or a lost connection",
    ),
    (
        "thin sync NAME --from nbd://HOST[:PORT]/EXPORT --changed-since BASE",
        "copy what the export changed since BASE (thinbox:changed:BASE) into NAME",
    ),
    (
        "dump POOL [--metadata-snap]",
        "print the pool's metadata (or the held metadata snapshot) as thin_dump XML",
    ),
    ("ls", "list the devices and their kinds"),
    (
        "table [--inactive] [NAME]",
        "show table lines (--inactive: the tables reload loaded)",
    ),
    ("status [NAME]", "show status lines"),
    (
        "info [NAME]",
        "show state, size, dependencies, users and NBD clients",
    ),
    (
        "config init DISK [--force]",
        "keep the configuration in the first MiB of DISK (once); saved after every change",
    ),
    (
        "config show",
        "show the configuration disk, its copies and the saved devices",
    ),
    ("net", "show the network address, link and traffic counters"),
    (
        "net set ADDRESS/PREFIX GATEWAY",
        "use a static IPv4 address, e.g. net set 10.0.2.15/24 10.0.2.2",
    ),
    ("net dhcp", "get the IPv4 address by DHCP (the default)"),
    (
        "net mtu BYTES",
        "set the MTU, 68 to 9000 (jumbo frames need a network that carries them)",
    ),
    (
        "net offload on|off",
        "let the NIC compute and check TCP/UDP checksums, where it can",
    ),
    (
        "nbd allow EXPORT CLIENTS [ro]",
        "let CLIENTS (ADDRESS[/PREFIX], or a TLS client certificate: cert:SHA256 or \
         subject:DN) use EXPORT (a device, or * for all), read-only with ro",
    ),
    (
        "nbd deny EXPORT CLIENTS [hide]",
        "refuse EXPORT to CLIENTS (hide: tell them it does not exist); their connections \
         close",
    ),
    (
        "nbd forget EXPORT CLIENTS",
        "drop the rule for EXPORT and CLIENTS: broader rules or the default apply",
    ),
    (
        "nbd default allow [ro]|deny [hide]",
        "what clients no rule matches get (allow unless set)",
    ),
    (
        "nbd acl [EXPORT]",
        "show the default and the rules (those concerning EXPORT)",
    ),
    ("nbd clients", "show the NBD clients of each export"),
    (
        "nbd tls [off|on|require]",
        "show TLS state and certificate fingerprint, or set whether clients may (on) or must \
         (require) use TLS",
    ),
    (
        "nbd tls generate [NAME...]",
        "make an Ed25519 key and a self-signed certificate for the DNS names or addresses",
    ),
    (
        "nbd tls import",
        "paste a PEM certificate chain and its private key, then a line: end",
    ),
    (
        "nbd tls clients [off]",
        "paste the CA certificates that must issue every TLS client's certificate, then a \
         line: end (off: ask for none)",
    ),
    ("shutdown [--force]", "flush every disk and power off"),
];

/// MiB that `disk-test` covers when no size is given.
const DEFAULT_TEST_MIB: u64 = 16;

impl<P: Platform> Console<P> {
    /// `jobs` lists the background jobs; `jobs cancel ID`.
    fn jobs(&mut self, args: &[String], out: &mut dyn Write) -> Result<(), CommandError> {
        match args {
            [] => {
                crate::background::list(&self.dm.borrow(), self.platform.now_ns(), out);
                Ok(())
            }
            [verb, id] if verb == "cancel" => {
                crate::background::cancel(&mut self.dm.borrow_mut(), id, out)
            }
            _ => Err("usage: jobs | jobs cancel ID".into()),
        }
    }

    pub(crate) fn run_words(
        &mut self,
        words: &[String],
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        // `dmsetup create ...` is `create ...`.
        let words = match words.split_first() {
            Some((first, rest)) if first == "dmsetup" => rest,
            _ => words,
        };
        let Some((command, args)) = words.split_first() else {
            return Ok(());
        };
        match command.as_str() {
            "help" => no_args(command, args).map(|()| help(out)),
            "disks" => no_args(command, args).map(|()| self.list_disks(out)),
            "mem" => no_args(command, args).and_then(|()| self.mem(out)),
            "uptime" => no_args(command, args).map(|()| self.uptime(out)),
            "disk-test" => self.disk_test(args),
            "disk-reset" => self.disk_reset(args, out),
            "net" => self.net(args, out),
            "nbd" => self.nbd_command(args, out),
            "shutdown" => self.shutdown(args, out),
            "debug" => self.debug(args),
            "jobs" => self.jobs(args, out),
            other => self.run_dm(other, args, out),
        }
    }

    fn list_disks(&self, out: &mut dyn Write) {
        let dm = self.dm.borrow();
        if dm.disks().is_empty() {
            outln!(out, "no disks found");
        }
        for entry in dm.disks() {
            let info = entry.info();
            let sectors = entry.sectors();
            let config = if entry.holds_config() {
                "  (first MiB holds the configuration)"
            } else {
                ""
            };
            outln!(
                out,
                "{:<8} {:>12} sectors  {:>10}  {}  {}{config}",
                entry.name(),
                sectors,
                human_bytes(sectors * SECTOR_SIZE as u64),
                or_dash(&info.model),
                or_dash(&info.serial)
            );
            let errors = entry.errors();
            if errors.any() {
                outln!(out, "{:<8} errors: {errors}", "");
            }
        }
    }

    fn mem(&self, out: &mut dyn Write) -> Result<(), CommandError> {
        let stats = self.platform.memory().ok_or(
            "mem reports the appliance's heap and DMA frames; offline mode has neither \
             (it uses the host's memory)",
        )?;
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
        Ok(())
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
        let (name, device) = self
            .dm
            .borrow()
            .test_target(name)
            .map_err(|why| format!("disk-test: {why}"))?;
        let info = device.info();
        if info.read_only {
            return Err(format!("disk-test: {name} is read-only").into());
        }
        let sectors = mib * (1 << 20) / SECTOR_SIZE as u64;
        if sectors > info.sectors {
            return Err(format!(
                "disk-test: {name} holds only {}; choose at most {} MiB",
                human_bytes(info.bytes()),
                info.bytes() >> 20
            )
            .into());
        }
        let options = DiskTestOptions {
            sectors,
            force,
            seed: self.platform.now_ns(),
        };
        self.job = Some(Box::new(DiskTest::new(name, device, options)));
        Ok(())
    }

    fn shutdown(&mut self, args: &[String], out: &mut dyn Write) -> Result<(), CommandError> {
        let force = match args {
            [] => false,
            [flag] if flag == "--force" => true,
            _ => return Err("usage: shutdown [--force]".into()),
        };
        if let Err((disk, error)) = self.dm.borrow_mut().flush_disks()
            && !force
        {
            return Err(format!(
                "flushing {disk} failed ({error}), its last writes may be lost; \
                 shutdown --force powers off anyway"
            )
            .into());
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
        outln!(out, "{usage:<36} {what}");
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
