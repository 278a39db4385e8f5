//! The saved configuration's content: the disks the devices are built on, each
//! device's table line and the NBD access list, as text lines (the payload of a
//! configuration area slot).

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::Write;

use super::origins::OriginRecord;
use super::thin_links::ThinLink;
use super::{acl, clientcert, tls};
use crate::access::AccessList;
use crate::import::ImportRecord;
use crate::tls::TlsSettings;

/// A disk a configuration refers to, as it was when the configuration was saved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskRecord {
    pub name: String,
    /// Usable sectors (after the configuration area, on the configuration disk).
    pub sectors: u64,
    /// Empty when the disk reports none.
    pub serial: String,
}

/// A device as saved: its name, whether it is read-only, its table line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRecord {
    pub name: String,
    pub read_only: bool,
    pub table: String,
}

/// Everything a configuration holds. Encoded as text lines:
/// `disk NAME SECTORS SERIAL` (serial percent-encoded, `-` when empty) and
/// `device NAME rw|ro TABLE` (segments separated by `; `), devices in creation order
/// (each only refers to disks and to devices before it), then one
/// [`ImportRecord`] line per unfinished import, then the `origin` records, then the
/// links between thin devices (see [`ThinLink`]), then the access list's records (see
/// `acl.rs`), the TLS records (`tls.rs`) and the client certificate records
/// (`clientcert.rs`). A configuration without any of these (written before they existed) loads
/// with none (and allows every client everything).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub disks: Vec<DiskRecord>,
    pub devices: Vec<DeviceRecord>,
    /// Unfinished imports (`import NAME CHECKPOINT SOURCE` lines).
    pub imports: Vec<ImportRecord>,
    pub origins: Vec<OriginRecord>,
    pub thin_links: Vec<ThinLink>,
    pub access: AccessList,
    pub tls: TlsSettings,
}

impl Snapshot {
    pub fn encode(&self) -> String {
        let mut text = String::new();
        for disk in &self.disks {
            let _ = writeln!(
                text,
                "disk {} {} {}",
                disk.name,
                disk.sectors,
                encode_serial(&disk.serial)
            );
        }
        for device in &self.devices {
            let mode = if device.read_only { "ro" } else { "rw" };
            let _ = writeln!(text, "device {} {mode} {}", device.name, device.table);
        }
        for import in &self.imports {
            let _ = writeln!(text, "{}", import.encode());
        }
        for origin in &self.origins {
            let _ = writeln!(text, "{}", origin.encode());
        }
        for link in &self.thin_links {
            let _ = writeln!(text, "{}", link.encode());
        }
        acl::encode(&self.access, &mut text);
        tls::encode(&self.tls, &mut text);
        clientcert::encode(&self.access, &self.tls, &mut text);
        text
    }

    pub fn decode(text: &str) -> Result<Self, String> {
        let mut snapshot = Snapshot::default();
        // Records end at '\n' only: a '\r' before it belongs to the record, so what
        // decodes encodes back to the same text.
        for (number, line) in text.split_terminator('\n').enumerate() {
            let bad = || format!("line {} is malformed: {line}", number + 1);
            let mut words = line.splitn(4, ' ');
            match (words.next(), words.next(), words.next(), words.next()) {
                (Some("disk"), Some(name), Some(sectors), Some(serial)) => {
                    snapshot.disks.push(DiskRecord {
                        name: name.to_string(),
                        sectors: sectors.parse().map_err(|_| bad())?,
                        serial: decode_serial(serial).ok_or_else(bad)?,
                    })
                }
                (Some("device"), Some(name), Some(mode @ ("rw" | "ro")), Some(table)) => {
                    snapshot.devices.push(DeviceRecord {
                        name: name.to_string(),
                        read_only: mode == "ro",
                        table: table.to_string(),
                    })
                }
                (Some("import"), Some(name), Some(checkpoint), Some(source)) => snapshot
                    .imports
                    .push(ImportRecord::decode(name, checkpoint, source).ok_or_else(bad)?),
                (Some("origin"), ..) => snapshot
                    .origins
                    .push(OriginRecord::decode(line).ok_or_else(bad)?),
                (
                    Some(kind @ ("thin-origin" | "thin-merge" | "thin-merge-origin")),
                    Some(pool),
                    Some(snap),
                    origin,
                ) => {
                    let link = ThinLink::decode(kind, pool, snap, origin).ok_or_else(bad)?;
                    snapshot.thin_links.push(link);
                }
                _ => match acl::decode(line, &mut snapshot.access)
                    .or_else(|| tls::decode(line, &mut snapshot.tls))
                    .or_else(|| clientcert::decode(line, &mut snapshot.access, &mut snapshot.tls))
                {
                    Some(true) => {}
                    Some(false) | None => return Err(bad()),
                },
            }
        }
        Ok(snapshot)
    }
}

fn encode_serial(serial: &str) -> String {
    if serial.is_empty() {
        return "-".to_string();
    }
    let mut out = String::new();
    for byte in serial.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'+' | b':') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

fn decode_serial(text: &str) -> Option<String> {
    if text == "-" {
        return Some(String::new());
    }
    let mut bytes = Vec::new();
    let mut rest = text.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'%' {
            let hex = core::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(first);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            disks: alloc::vec![
                DiskRecord {
                    name: "vda".into(),
                    sectors: 131072,
                    serial: "QM 0001/x".into(),
                },
                DiskRecord {
                    name: "vdb".into(),
                    sectors: 4096,
                    serial: String::new(),
                },
            ],
            devices: alloc::vec![DeviceRecord {
                name: "base".into(),
                read_only: true,
                table: "0 4096 linear vdb 0".into(),
            }],
            imports: alloc::vec![ImportRecord {
                name: "vm1".into(),
                source: "nbd://10.0.2.2:10809/disk%201".into(),
                checkpoint: 67108864,
            }],
            origins: Vec::new(),
            thin_links: Vec::new(),
            access: AccessList::default(),
            tls: TlsSettings::default(),
        }
    }

    #[test]
    fn snapshot_text_round_trips() {
        let text = sample().encode();
        assert_eq!(
            text,
            "disk vda 131072 QM%200001%2Fx\ndisk vdb 4096 -\ndevice base ro 0 4096 linear vdb 0\n\
             import vm1 67108864 nbd://10.0.2.2:10809/disk%201\n"
        );
        assert_eq!(Snapshot::decode(&text).unwrap(), sample());
        assert!(Snapshot::decode("disk vda x -\n").is_err());
        assert!(Snapshot::decode("device a maybe 0 1 linear vda 0\n").is_err());
        assert!(Snapshot::decode("disk vda 1 %4").is_err());
    }

    #[test]
    fn a_carriage_return_stays_part_of_its_record() {
        let text = "device a rw 0 8 linear vdb 0\r\n";
        let snapshot = Snapshot::decode(text).unwrap();
        assert_eq!(snapshot.devices[0].table, "0 8 linear vdb 0\r");
        assert_eq!(snapshot.encode(), text);
    }
}
