//! `net mtu BYTES` and `net offload on|off`: the NIC's frame size and checksum
//! offload, and the lines `net` shows about them.

use alloc::format;
use core::fmt::Write;

use super::{NetStatus, Network};
use crate::{CommandError, outln};

/// The smallest IPv4 MTU (RFC 791) and the largest jumbo frame's.
const MTU_RANGE: core::ops::RangeInclusive<usize> = 68..=9000;

/// Applies `net mtu` or `net offload` and prints the link's settings after it.
pub(super) fn configure(
    network: &mut dyn Network,
    setting: &str,
    value: &str,
    out: &mut dyn Write,
) -> Result<(), CommandError> {
    let current = network.status().link;
    let (mtu, checksum_offload) = if setting == "mtu" {
        let mtu = value
            .parse()
            .ok()
            .filter(|mtu| MTU_RANGE.contains(mtu))
            .ok_or_else(|| {
                format!(
                    "net mtu: '{value}' is not an MTU between {} and {} bytes",
                    MTU_RANGE.start(),
                    MTU_RANGE.end()
                )
            })?;
        (mtu, current.checksum_offload)
    } else {
        let on = match value {
            "on" => true,
            "off" => false,
            _ => return Err(format!("net offload: '{value}' is neither on nor off").into()),
        };
        (current.mtu, on)
    };
    network
        .configure_link(mtu, checksum_offload)
        .map_err(|why| format!("net {setting}: {why}"))?;
    let link = network.status().link;
    outln!(
        out,
        "{}: mtu {}, checksum offload {}",
        link.driver,
        link.mtu,
        on_off(link.checksum_offload)
    );
    Ok(())
}

/// `net stall-tx`: a test aid (not in the usage line) that makes the transmit ring
/// stop as a hung device's would, so that the watchdog's reset can be watched.
pub(super) fn stall_transmitter(
    network: &mut dyn Network,
    out: &mut dyn Write,
) -> Result<(), CommandError> {
    let driver = network
        .stall_transmitter()
        .map_err(|why| format!("net stall-tx: {why}"))?;
    outln!(
        out,
        "{driver}: transmitter stopped; the watchdog resets the rings once frames wait 2 s"
    );
    Ok(())
}

fn on_off(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

/// The driver's settings and its recovery counters.
pub(super) fn show(status: &NetStatus, out: &mut dyn Write) {
    let link = &status.link;
    let nic = &status.counters.nic;
    outln!(
        out,
        "link:    {}, mtu {}, checksum offload {}",
        link.driver,
        link.mtu,
        on_off(link.checksum_offload)
    );
    outln!(
        out,
        "nic:     {} missed (no buffer), {} send drops, {} ring resets",
        nic.rx_missed,
        nic.tx_dropped,
        nic.ring_resets
    );
}
