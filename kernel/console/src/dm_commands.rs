//! Device-mapper commands (`create`, `reload`, `clear`, `remove`, `suspend`, `resume`,
//! `rename`, `message`, `status`, `table`, `ls`, `info`) and `config`, spoken the way
//! `dmsetup` speaks:
//! a leading `dmsetup` and `/dev/` or `/dev/mapper/` in front of names are accepted.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use dm::config::SlotState;
use dm::{Device, DeviceMapper, Format, State, bare_name, human_bytes};

use crate::{CommandError, Console, Platform, outln};

impl<P: Platform> Console<P> {
    /// Commands of the device mapper; anything else is unknown.
    pub(crate) fn run_dm(
        &mut self,
        command: &str,
        args: &[String],
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        match command {
            "create" => self.create(args, out),
            "remove" => self.remove(args),
            "suspend" => {
                let name = one_name("suspend", args)?;
                Ok(self.dm.borrow_mut().suspend(name)?)
            }
            "resume" => {
                let name = one_name("resume", args)?;
                let notes = self.dm.borrow_mut().resume(name)?;
                for note in notes {
                    outln!(out, "{}: {note}", bare_name(name));
                }
                Ok(())
            }
            "reload" | "load" => {
                let (name, _, table) = name_and_table(command, args, false)?;
                Ok(self.dm.borrow_mut().reload(name, &table)?)
            }
            "clear" => {
                let name = one_name("clear", args)?;
                Ok(self.dm.borrow_mut().clear(name)?)
            }
            "rename" => match args {
                [old, new] if !old.starts_with('-') && !new.starts_with('-') => {
                    Ok(self.dm.borrow_mut().rename(old, bare_name(new))?)
                }
                _ => Err("usage: rename OLD_NAME NEW_NAME".into()),
            },
            "message" => self.message(args),
            "ls" => match args {
                [] => {
                    list(&self.dm.borrow(), out);
                    Ok(())
                }
                [extra, ..] => Err(format!("ls takes no arguments (got '{extra}')").into()),
            },
            "table" | "status" | "info" => self.show(command, args, out),
            "config" => self.config(args, out),
            "pool" => self.pool_command(args, out),
            "thin" => self.thin_command(args, out),
            "snap" => self.snap_command(args, out),
            "dump" => self.dump_command(args, out),
            other => Err(format!("unknown command '{other}' (try help)").into()),
        }
    }

    fn create(&mut self, args: &[String], out: &mut dyn Write) -> Result<(), CommandError> {
        let background = args.iter().any(|word| word == "--background");
        let args: Vec<String> = args
            .iter()
            .filter(|word| *word != "--background")
            .cloned()
            .collect();
        let (name, read_only, table) = name_and_table("create", &args, true)?;
        let notes = self
            .dm
            .borrow_mut()
            .create(name, read_only, &table, Format::IfBlank)?;
        for note in notes {
            outln!(out, "{name}: {note}");
        }
        self.follow_format(name, background, out);
        Ok(())
    }

    fn remove(&mut self, args: &[String]) -> Result<(), CommandError> {
        let (force, names): (Vec<&String>, Vec<&String>) = args
            .iter()
            .partition(|word| *word == "--force" || *word == "-f");
        match names.as_slice() {
            [name] if !name.starts_with('-') => {
                Ok(self.dm.borrow_mut().remove(name, !force.is_empty())?)
            }
            _ => Err("usage: remove NAME [--force]".into()),
        }
    }

    fn message(&mut self, args: &[String]) -> Result<(), CommandError> {
        const USAGE: &str = "usage: message NAME 0 \"MESSAGE\"";
        let [name, sector, words @ ..] = args else {
            return Err(format!("message: device, sector and message are needed ({USAGE})").into());
        };
        if sector != "0" {
            return Err(format!(
                "message: sector '{sector}' must be 0 (messages go to the device's only \
                 segment; {USAGE})"
            )
            .into());
        }
        if words.is_empty() {
            return Err(format!("message: which message? ({USAGE})").into());
        }
        let text: Vec<&str> = words.iter().map(String::as_str).collect();
        Ok(self.dm.borrow_mut().message(name, &text.join(" "))?)
    }

    /// `table`, `status` and `info`, for one device or all.
    fn show(
        &mut self,
        command: &str,
        args: &[String],
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        let dm = self.dm.borrow();
        let inactive = command == "table" && args.first().is_some_and(|word| word == "--inactive");
        let args = if inactive { &args[1..] } else { args };
        if let Some(flag) = args.iter().find(|word| word.starts_with('-')) {
            return Err(format!(
                "{command}: unknown option '{flag}' (usage: {command}{} [NAME])",
                if command == "table" {
                    " [--inactive]"
                } else {
                    ""
                }
            )
            .into());
        }
        if inactive {
            return show_inactive(&dm, args, out);
        }
        match args {
            [] => {
                if dm.devices().next().is_none() {
                    outln!(out, "No devices found");
                }
                for (index, device) in dm.devices().enumerate() {
                    match command {
                        "table" => {
                            for segment in device.table().segments() {
                                outln!(out, "{}: {segment}", device.name());
                            }
                        }
                        "status" => {
                            for line in dm.status_lines(device) {
                                outln!(out, "{}: {line}", device.name());
                            }
                        }
                        _ => {
                            if index > 0 {
                                outln!(out, "");
                            }
                            info(&dm, device, out);
                        }
                    }
                }
                Ok(())
            }
            [name] => {
                let device = dm.device(name)?;
                match command {
                    "table" => {
                        for segment in device.table().segments() {
                            outln!(out, "{segment}");
                        }
                    }
                    "status" => {
                        if let State::Inactive(why) = device.state() {
                            return Err(format!("{} is inactive ({why})", device.name()).into());
                        }
                        for line in dm.status_lines(device) {
                            outln!(out, "{line}");
                        }
                    }
                    _ => info(&dm, device, out),
                }
                Ok(())
            }
            [_, extra, ..] => {
                Err(format!("{command} takes at most one device name (got '{extra}')").into())
            }
        }
    }

    fn config(&mut self, args: &[String], out: &mut dyn Write) -> Result<(), CommandError> {
        const USAGE: &str = "usage: config show | config init DISK [--force]";
        let words: Vec<&str> = args.iter().map(String::as_str).collect();
        match words.as_slice() {
            ["show"] => {
                show_config(&self.dm.borrow(), out);
                Ok(())
            }
            ["init", disk] | ["init", disk, "--force"] | ["init", "--force", disk]
                if !disk.starts_with('-') =>
            {
                let force = words.contains(&"--force");
                let id = area_id(self.platform.now_ns(), disk);
                let mut dm = self.dm.borrow_mut();
                dm.config_init(disk, id, force)?;
                let (entry, _) = dm.config().expect("just made");
                outln!(
                    out,
                    "configuration area written on {}: its first MiB is reserved, {} now offers \
                     {} sectors; changes are saved from now on",
                    entry.name(),
                    entry.name(),
                    entry.sectors()
                );
                Ok(())
            }
            _ => Err(USAGE.into()),
        }
    }
}

/// `NAME [--readonly] --table LINE` of `create` (and of `reload`, which keeps the
/// device's read-only setting, without `--readonly`).
fn name_and_table<'a>(
    command: &str,
    args: &'a [String],
    read_only_allowed: bool,
) -> Result<(&'a str, bool, String), CommandError> {
    let usage = if read_only_allowed {
        format!("usage: {command} NAME [--readonly] --table \"0 LENGTH TARGET ARGS...\"")
    } else {
        format!("usage: {command} NAME --table \"0 LENGTH TARGET ARGS...\"")
    };
    let mut name = None;
    let mut read_only = false;
    let mut table: Option<String> = None;
    let mut words = args.iter();
    while let Some(word) = words.next() {
        match word.as_str() {
            "--readonly" | "-r" if read_only_allowed => read_only = true,
            "--readonly" | "-r" => {
                return Err(format!(
                    "{command}: a reload keeps the device's read-only setting (remove the \
                     device and create it with --readonly to change it)"
                )
                .into());
            }
            "--table" => {
                // Unquoted, the rest of the line is the table.
                let rest: Vec<&str> = words.by_ref().map(String::as_str).collect();
                if rest.is_empty() {
                    return Err(format!("{command}: --table needs the table line ({usage})").into());
                }
                table = Some(rest.join(" "));
            }
            flag if flag.starts_with('-') => {
                return Err(format!("{command}: unknown option '{flag}' ({usage})").into());
            }
            device if name.is_none() => name = Some(bare_name(device)),
            extra => {
                return Err(format!("{command}: unexpected '{extra}' ({usage})").into());
            }
        }
    }
    match (name, table) {
        (Some(name), Some(table)) => Ok((name, read_only, table)),
        _ => Err(format!("{command}: name and --table are both needed ({usage})").into()),
    }
}

fn one_name<'a>(command: &str, args: &'a [String]) -> Result<&'a str, CommandError> {
    match args {
        [name] if !name.starts_with('-') => Ok(name),
        _ => Err(format!("usage: {command} NAME").into()),
    }
}

/// A device's kind, with its state when it is not simply running.
fn kind_and_state(device: &Device) -> String {
    let kind = device.table().kind();
    match device.state() {
        State::Inactive(_) => format!("{kind}, inactive"),
        State::Active(active) if active.suspended() => format!("{kind}, suspended"),
        State::Active(_) => kind.into(),
    }
}

/// `table --inactive [NAME]`: the tables `reload` loaded, as `table` shows live ones.
fn show_inactive(
    dm: &DeviceMapper,
    args: &[String],
    out: &mut dyn Write,
) -> Result<(), CommandError> {
    match args {
        [] => {
            for device in dm.devices() {
                for segment in device
                    .inactive_table()
                    .into_iter()
                    .flat_map(|t| t.segments())
                {
                    outln!(out, "{}: {segment}", device.name());
                }
            }
            Ok(())
        }
        [name] => {
            let device = dm.device(name)?;
            for segment in device
                .inactive_table()
                .into_iter()
                .flat_map(|t| t.segments())
            {
                outln!(out, "{segment}");
            }
            Ok(())
        }
        [_, extra, ..] => {
            Err(format!("table takes at most one device name (got '{extra}')").into())
        }
    }
}

fn list(dm: &DeviceMapper, out: &mut dyn Write) {
    if dm.devices().next().is_none() {
        outln!(out, "No devices found");
    }
    let width = dm
        .devices()
        .map(|device| device.name().len())
        .max()
        .unwrap_or(0);
    for device in dm.devices() {
        outln!(
            out,
            "{:<width$}  ({})",
            device.name(),
            kind_and_state(device)
        );
    }
}

fn info(dm: &DeviceMapper, device: &Device, out: &mut dyn Write) {
    let users = dm.users_of(device.name());
    let (state, clients) = match device.state() {
        State::Inactive(why) => (format!("INACTIVE ({why})"), 0),
        State::Active(active) if active.suspended() => ("SUSPENDED".into(), active.clients()),
        State::Active(active) => ("ACTIVE".into(), active.clients()),
    };
    let table = device.table();
    let sectors = table.length();
    outln!(out, "Name:              {}", device.name());
    outln!(out, "State:             {state}");
    outln!(
        out,
        "Tables present:    {}",
        if device.inactive_table().is_some() {
            "LIVE & INACTIVE"
        } else {
            "LIVE"
        }
    );
    outln!(
        out,
        "Read only:         {}",
        if device.read_only() { "yes" } else { "no" }
    );
    outln!(
        out,
        "Size:              {sectors} sectors ({})",
        human_bytes(sectors * blockdev::SECTOR_SIZE as u64)
    );
    outln!(out, "Table:             {table}");
    outln!(out, "Open count:        {}", users.len() + clients);
    outln!(
        out,
        "Depends on:        {}",
        table.dependencies().join(", ")
    );
    outln!(
        out,
        "Used by:           {}",
        if users.is_empty() {
            "-".into()
        } else {
            users.join(", ")
        }
    );
    match device.state() {
        State::Active(active) if active.carries_data() => {
            let from: Vec<String> = active
                .client_peers()
                .iter()
                .map(dm::access::describe_peer)
                .collect();
            outln!(
                out,
                "NBD export:        {} ({clients} client{}{}{})",
                device.name(),
                if clients == 1 { "" } else { "s" },
                if from.is_empty() { "" } else { ": " },
                from.join(", ")
            )
        }
        State::Active(_) => outln!(
            out,
            "NBD export:        - (pools carry no data of their own)"
        ),
        State::Inactive(_) => outln!(out, "NBD export:        - (inactive)"),
    }
}

fn show_config(dm: &DeviceMapper, out: &mut dyn Write) {
    match dm.config() {
        None => outln!(
            out,
            "no configuration disk: changes are not saved (config init DISK designates one)"
        ),
        Some((disk, area)) => {
            let name = disk.name();
            match area.current() {
                Some((_, generation, _)) => outln!(
                    out,
                    "configuration disk: {name} (first MiB), generation {generation}"
                ),
                None => outln!(
                    out,
                    "configuration disk: {name} (first MiB), nothing saved yet"
                ),
            }
            for (slot, state) in area.slots().iter().enumerate() {
                match state {
                    SlotState::Empty => outln!(out, "copy {slot}: empty"),
                    SlotState::Valid { generation, .. } => {
                        outln!(out, "copy {slot}: generation {generation}")
                    }
                    SlotState::Damaged(why) => outln!(out, "copy {slot}: damaged ({why})"),
                }
            }
        }
    }
    for disk in dm.saved_disks() {
        outln!(
            out,
            "disk {}: {} sectors, serial {}",
            disk.name,
            disk.sectors,
            if disk.serial.is_empty() {
                "-"
            } else {
                &disk.serial
            }
        );
    }
    for device in dm.devices_in_dependency_order() {
        outln!(
            out,
            "create {}{} --table \"{}\"",
            device.name(),
            if device.read_only() {
                " --readonly"
            } else {
                ""
            },
            device.table()
        );
    }
    for line in dm.thin_link_lines() {
        outln!(out, "{line}");
    }
    for record in dm.origin_records() {
        outln!(out, "{}", record.encode());
    }
    for record in dm.saved_imports() {
        outln!(out, "{}", record.encode());
    }
}

/// An identifier for a new configuration area, different for every disk and moment
/// (splitmix64 of the clock and the disk's name).
fn area_id(now_ns: u64, disk: &str) -> [u8; 16] {
    let mut state = now_ns ^ 0x7468_696e_626f_7800;
    for byte in disk.bytes() {
        state = state.rotate_left(8) ^ u64::from(byte);
    }
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut id = [0; 16];
    id[..8].copy_from_slice(&next().to_le_bytes());
    id[8..].copy_from_slice(&next().to_le_bytes());
    id
}
