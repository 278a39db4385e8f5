//! `--network --profile`: where the appliance spends its time on the network path.
//! For each NIC on a tap interface (root only), one boot with QEMU's monitor on a
//! socket; while `nbdcopy` copies the volume in and then out, a thread asks the
//! monitor for the CPU's registers (`info registers`) as often as it answers and
//! keeps the instruction pointer. The samples are attributed to the kernel's
//! functions (`nm` on its ELF file) and the busiest are printed per copy.
//!
//! Under TCG the instruction pointer QEMU reports is where the CPU last left
//! translated code: a register write that traps into a device model (a NIC's
//! doorbell) is charged the device's work, which is what that write costs the
//! appliance, and such writes are favoured over plain computation, which leaves
//! translated code less often. The profile shows where the appliance waits on the
//! emulator, and how that changes, rather than an unbiased split of its cycles.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use host_tools::Tool;
use qemu_test::{KERNEL_ELF, Nic, Scratch, TapNetwork, monitor_command};

use crate::network::{boot, serve};
use crate::{EXPORT_BYTES, MIB, Result, timed, write_random};

/// Where the bootloader puts the kernel's image (position independent, loaded at
/// the first free address from 1 TiB on).
const KERNEL_BASE: u64 = 1 << 40;
/// Functions printed per copy.
const TOP: usize = 12;

pub fn bench() -> Result<()> {
    host_tools::require(&[Tool::Qemu, Tool::NbdCopy])
        .map_err(|missing| format!("missing tools: {}", missing.install_command()))?;
    let symbols = Symbols::read(Path::new(KERNEL_ELF))?;
    let scratch = Scratch::new().map_err(|e| format!("scratch directory: {e}"))?;
    let source = scratch.path().join("random.img");
    write_random(&source, EXPORT_BYTES)?;
    for nic in [Nic::Virtio, Nic::E1000e] {
        let mut network = TapNetwork::create().map_err(|why| format!("{nic}: {why}"))?;
        let monitor = scratch.path().join("monitor.sock");
        let mut appliance = boot(&scratch, nic, Some(&network), Some(&monitor))?;
        let (client, uri) = serve(&mut appliance, Some(&mut network))?;
        let source = source.display().to_string();
        let copies = [
            ("in", vec!["nbdcopy", "--flush", &source, &uri]),
            ("out", vec!["nbdcopy", &uri, "null:"]),
        ];
        for (direction, command) in copies {
            let (seconds, samples) = sampled(&monitor, || timed(client, &command))?;
            let mb_s = EXPORT_BYTES as f64 / 1e6 / seconds;
            println!(
                "{nic}, tap: copying {} MiB {direction} ({mb_s:.1} MB/s), {} samples",
                EXPORT_BYTES / MIB,
                samples.len()
            );
            symbols.print_top(&samples);
        }
        appliance
            .shutdown()
            .map_err(|e| format!("shutdown: {e:?}"))?;
    }
    Ok(())
}

/// Runs `work` while sampling the guest's instruction pointer through the monitor
/// on `socket`; returns how long `work` took in seconds and the samples.
pub fn sampled(
    socket: &Path,
    work: impl FnOnce() -> Result<std::time::Duration>,
) -> Result<(f64, Vec<u64>)> {
    let done = AtomicBool::new(false);
    thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut samples = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let registers = monitor_command(socket, "info registers")
                    .map_err(|e| format!("QEMU's monitor: {e}"))?;
                samples.extend(instruction_pointer(&registers));
            }
            Ok::<_, String>(samples)
        });
        let took = work();
        done.store(true, Ordering::Relaxed);
        let samples = sampler.join().expect("the sampler does not panic")?;
        Ok((took?.as_secs_f64(), samples))
    })
}

/// `RIP=...` from `info registers`.
fn instruction_pointer(registers: &str) -> Option<u64> {
    let at = registers.find("RIP=")? + 4;
    let hex = registers.get(at..at + 16)?;
    u64::from_str_radix(hex, 16).ok()
}

/// The kernel's functions by address (offsets into its image).
pub struct Symbols {
    starts: Vec<u64>,
    names: Vec<String>,
}

impl Symbols {
    /// Reads the function symbols of the ELF file at `elf` with `nm`.
    pub fn read(elf: &Path) -> Result<Symbols> {
        let listed = Command::new("nm")
            .args(["--numeric-sort", "--demangle", "--defined-only"])
            .arg(elf)
            .output()
            .map_err(|e| format!("nm: {e}"))?;
        let mut symbols = Symbols {
            starts: Vec::new(),
            names: Vec::new(),
        };
        for line in String::from_utf8_lossy(&listed.stdout).lines() {
            let mut fields = line.splitn(3, ' ');
            let (Some(address), Some(kind), Some(name)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if matches!(kind, "t" | "T" | "w" | "W")
                && let Ok(address) = u64::from_str_radix(address, 16)
            {
                symbols.starts.push(address);
                symbols.names.push(name.to_string());
            }
        }
        if symbols.starts.is_empty() {
            return Err(format!("nm found no functions in {}", elf.display()));
        }
        Ok(symbols)
    }

    /// The function holding guest address `address`, if it is in the kernel.
    fn function(&self, address: u64) -> Option<&str> {
        let offset = address.checked_sub(KERNEL_BASE)?;
        let index = self.starts.partition_point(|&start| start <= offset);
        (index > 0).then(|| self.names[index - 1].as_str())
    }

    /// Prints the [`TOP`] functions with the most samples and their shares.
    pub fn print_top(&self, samples: &[u64]) {
        for (share, function) in self.top(samples, TOP) {
            println!("  {:5.1} %  {function}", share * 100.0);
        }
    }

    /// The `count` functions with the most samples, with their share of all.
    fn top(&self, samples: &[u64], count: usize) -> Vec<(f64, String)> {
        let mut by_function: HashMap<&str, usize> = HashMap::new();
        for &address in samples {
            let function = self.function(address).unwrap_or("(outside the kernel)");
            *by_function.entry(function).or_default() += 1;
        }
        let mut ranked: Vec<(&str, usize)> = by_function.into_iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        ranked
            .into_iter()
            .take(count)
            .map(|(function, hits)| {
                let name: String = function.chars().take(110).collect();
                (hits as f64 / samples.len() as f64, name)
            })
            .collect()
    }
}
