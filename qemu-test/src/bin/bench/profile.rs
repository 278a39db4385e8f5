//! `--network --profile`: where the appliance spends its time on the network path.
//! For each NIC on a tap interface (root only), with the standard MTU and with jumbo
//! frames, one boot with QEMU's monitor on a socket; while `nbdcopy` copies the volume in and then out, a thread asks the
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
use std::time::{Duration, Instant};

use host_tools::Tool;
use qemu_test::{Appliance, KERNEL_ELF, Nic, Scratch, TapNetwork, monitor_command, stat_cpu_ticks};

use crate::network::{JUMBO_MTU, STANDARD_MTU, boot, serve, set_mtu};
use crate::{Client, EXPORT_BYTES, MIB, Result, fio_iops, timed, write_random};

/// Where the bootloader puts the kernel's image (position independent, loaded at
/// the first free address from 1 TiB on).
const KERNEL_BASE: u64 = 1 << 40;
/// Functions printed per copy.
const TOP: usize = 12;
/// Length of each 4 KiB random I/O run.
const RANDOM_SECONDS: u32 = 10;

pub fn bench() -> Result<()> {
    host_tools::require(&[Tool::Qemu, Tool::NbdCopy])
        .map_err(|missing| format!("missing tools: {}", missing.install_command()))?;
    let symbols = Symbols::read(Path::new(KERNEL_ELF))?;
    let scratch = Scratch::new().map_err(|e| format!("scratch directory: {e}"))?;
    let source = scratch.path().join("random.img");
    write_random(&source, EXPORT_BYTES)?;
    for (nic, mtu) in [Nic::Virtio, Nic::E1000e]
        .into_iter()
        .flat_map(|nic| [(nic, STANDARD_MTU), (nic, JUMBO_MTU)])
    {
        let link = match mtu {
            STANDARD_MTU => format!("{nic}, tap"),
            _ => format!("{nic}, tap, MTU {mtu}"),
        };
        let mut network = TapNetwork::create().map_err(|why| format!("{nic}: {why}"))?;
        let monitor = scratch.path().join("monitor.sock");
        let mut appliance = boot(&scratch, nic, Some(&network), Some(&monitor))?;
        let (client, uri) = serve(&mut appliance, Some(&mut network))?;
        if let (Client::Namespace(network), JUMBO_MTU) = (client, mtu) {
            set_mtu(&mut appliance, network, mtu)?;
        }
        let source = source.display().to_string();
        let copies = [
            ("in", vec!["nbdcopy", "--flush", &source, &uri]),
            ("out", vec!["nbdcopy", &uri, "null:"]),
        ];
        let profiler = Profiler {
            monitor: &monitor,
            qemu: appliance.pid(),
            symbols: &symbols,
        };
        for (direction, command) in copies {
            let before = ApplianceCpu::read(&mut appliance)?;
            let (seconds, samples, cpu) = profiler.sample(|| timed(client, &command))?;
            let mb_s = EXPORT_BYTES as f64 / 1e6 / seconds;
            let heading = format!(
                "{link}: copying {} MiB {direction} ({mb_s:.1} MB/s)",
                EXPORT_BYTES / MIB
            );
            profiler.report(&heading, &samples, &cpu);
            ApplianceCpu::read(&mut appliance)?.print_since(&before);
        }
        for pattern in ["randread", "randwrite"] {
            let before = ApplianceCpu::read(&mut appliance)?;
            let label = format!("{link}: 4k {pattern} QD16");
            profiler.fio(client, &uri, pattern, RANDOM_SECONDS, &label)?;
            ApplianceCpu::read(&mut appliance)?.print_since(&before);
        }
        appliance
            .shutdown()
            .map_err(|e| format!("shutdown: {e:?}"))?;
    }
    Ok(())
}

/// The appliance's own CPU figures from `net`'s `cpu:` line (`32 % busy since
/// start-up (4210 M of 12800 M cycles), 48211 NBD requests, 30112 disk interrupts`).
struct ApplianceCpu {
    busy_mcycles: u64,
    total_mcycles: u64,
    requests: u64,
    disk_interrupts: u64,
}

impl ApplianceCpu {
    fn read(appliance: &mut Appliance) -> Result<ApplianceCpu> {
        let shown = appliance
            .console_ok("net")
            .map_err(|e| format!("net: {e:?}"))?;
        let figures = shown
            .lines()
            .find_map(|line| line.strip_prefix("cpu:"))
            .and_then(|line| {
                let (_, cycles) = line.split_once('(')?;
                let (busy, rest) = cycles.split_once(" M of ")?;
                let (total, rest) = rest.split_once(" M cycles), ")?;
                let (requests, rest) = rest.split_once(" NBD requests, ")?;
                let disk_interrupts = rest.strip_suffix(" disk interrupts")?;
                Some(ApplianceCpu {
                    busy_mcycles: busy.parse().ok()?,
                    total_mcycles: total.parse().ok()?,
                    requests: requests.parse().ok()?,
                    disk_interrupts: disk_interrupts.parse().ok()?,
                })
            });
        figures.ok_or_else(|| format!("no cpu: figures in `net`: {shown}"))
    }

    /// Prints how busy the appliance's CPU was since `before`, its busy cycles per
    /// NBD request, and how many disk interrupts woke it.
    fn print_since(&self, before: &ApplianceCpu) {
        let busy = self.busy_mcycles - before.busy_mcycles;
        let total = (self.total_mcycles - before.total_mcycles).max(1);
        let requests = (self.requests - before.requests).max(1);
        let disk_interrupts = self.disk_interrupts - before.disk_interrupts;
        println!(
            "  appliance: {:.0} % busy, {:.1} k cycles per NBD request ({requests} requests), \
             {:.2} disk interrupts per request",
            busy as f64 * 100.0 / total as f64,
            busy as f64 * 1000.0 / requests as f64,
            disk_interrupts as f64 / requests as f64
        );
    }
}

/// A booted appliance to sample: QEMU's monitor socket and process, and the
/// kernel's functions.
pub struct Profiler<'a> {
    pub monitor: &'a Path,
    pub qemu: u32,
    pub symbols: &'a Symbols,
}

impl Profiler<'_> {
    /// Runs `work` while sampling the guest's instruction pointer through the
    /// monitor; returns how long `work` took in seconds, the samples, and the host
    /// CPU that QEMU and everything else used meanwhile.
    pub fn sample(
        &self,
        work: impl FnOnce() -> Result<Duration>,
    ) -> Result<(f64, Vec<u64>, CpuUse)> {
        let done = AtomicBool::new(false);
        let threads_before = ThreadTimes::read(self.qemu)?;
        let host_before = HostTimes::read()?;
        let (seconds, samples) = thread::scope(|scope| {
            let sampler = scope.spawn(|| {
                let mut samples = Vec::new();
                while !done.load(Ordering::Relaxed) {
                    let registers = monitor_command(self.monitor, "info registers")
                        .map_err(|e| format!("QEMU's monitor: {e}"))?;
                    samples.extend(instruction_pointer(&registers));
                }
                Ok::<_, String>(samples)
            });
            let took = work();
            done.store(true, Ordering::Relaxed);
            let samples = sampler.join().expect("the sampler does not panic")?;
            Ok::<_, String>((took?.as_secs_f64(), samples))
        })?;
        let cpu = CpuUse {
            threads: ThreadTimes::read(self.qemu)?.since(&threads_before),
            host: HostTimes::read()?.since(&host_before),
        };
        Ok((seconds, samples, cpu))
    }

    /// Prints `heading` with the sample count, the busiest functions and the CPU use.
    pub fn report(&self, heading: &str, samples: &[u64], cpu: &CpuUse) {
        println!("{heading}, {} samples", samples.len());
        self.symbols.print_top(samples);
        cpu.print();
    }

    /// Runs fio's 4 KiB `pattern` at QD16 on `uri` for `seconds` while sampling,
    /// reports it under `label` and returns its IOPS.
    pub fn fio(
        &self,
        client: Client,
        uri: &str,
        pattern: &str,
        seconds: u32,
        label: &str,
    ) -> Result<f64> {
        let mut iops = 0.0;
        let (_, samples, cpu) = self.sample(|| {
            let started = Instant::now();
            iops = fio_iops(client, uri, pattern, seconds)?;
            Ok(started.elapsed())
        })?;
        self.report(&format!("{label}: {iops:.0} IOPS"), &samples, &cpu);
        Ok(iops)
    }
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
    fn print_top(&self, samples: &[u64]) {
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

/// Clock ticks of CPU time per thread of a process, by thread id, with its name.
struct ThreadTimes(HashMap<u32, (String, u64)>);

impl ThreadTimes {
    /// utime + stime of every thread of `pid` (`/proc/PID/task/TID/stat`).
    fn read(pid: u32) -> Result<ThreadTimes> {
        let tasks = format!("/proc/{pid}/task");
        let mut times = HashMap::new();
        for entry in std::fs::read_dir(&tasks).map_err(|e| format!("{tasks}: {e}"))? {
            let path = entry.map_err(|e| format!("{tasks}: {e}"))?.path();
            let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
                continue; // the thread ended
            };
            if let Some((tid, name, ticks)) = stat_cpu_ticks(&stat) {
                times.insert(tid, (name, ticks));
            }
        }
        Ok(ThreadTimes(times))
    }

    /// Ticks used since `before`, summed by thread name.
    fn since(&self, before: &ThreadTimes) -> Vec<(String, u64)> {
        let mut by_name: HashMap<&str, u64> = HashMap::new();
        for (tid, (name, ticks)) in &self.0 {
            let earlier = before.0.get(tid).map_or(0, |(_, ticks)| *ticks);
            *by_name.entry(name).or_default() += ticks - earlier;
        }
        let mut used: Vec<(String, u64)> = by_name
            .into_iter()
            .filter(|(_, ticks)| *ticks > 0)
            .map(|(name, ticks)| (name.to_string(), ticks))
            .collect();
        used.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        used
    }
}

/// The host's busy, stolen and total clock ticks over all cores (`/proc/stat`).
/// Stolen ticks are those the hypervisor under this machine gave to others: a
/// measurement they are large in measured a busy neighbour too.
struct HostTimes {
    busy: u64,
    stolen: u64,
    total: u64,
}

impl HostTimes {
    fn read() -> Result<HostTimes> {
        let stat = std::fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("cpu "))
            .ok_or("/proc/stat has no cpu line")?
            .split_whitespace()
            .filter_map(|field| field.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...: idle and iowait are not
        // busy, and steal is time this machine did not get.
        let field = |index: usize| ticks.get(index).copied().unwrap_or(0);
        let total: u64 = ticks.iter().sum();
        let stolen = field(7);
        Ok(HostTimes {
            busy: total - field(3) - field(4) - stolen,
            stolen,
            total,
        })
    }

    fn since(&self, before: &HostTimes) -> HostTimes {
        HostTimes {
            busy: self.busy - before.busy,
            stolen: self.stolen - before.stolen,
            total: self.total - before.total,
        }
    }
}

/// What the host's CPUs did during a measurement.
pub struct CpuUse {
    /// Ticks per QEMU thread name, busiest first.
    threads: Vec<(String, u64)>,
    host: HostTimes,
}

impl CpuUse {
    /// Prints each QEMU thread's CPU use as a share of one core over the
    /// measurement, and how many of the host's cores were busy.
    fn print(&self) {
        let (threads, host) = (&self.threads, &self.host);
        let cores = thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        // The copy's length in ticks of one core.
        let span = host.total.max(1) as f64 / cores;
        let qemu: u64 = threads.iter().map(|(_, ticks)| ticks).sum();
        let shares: Vec<String> = threads
            .iter()
            .map(|(name, ticks)| format!("{name} {:.0} %", *ticks as f64 / span * 100.0))
            .collect();
        println!("  host CPU: {}", shares.join(", "));
        println!(
            "  host cores busy: {:.2} of {cores:.0} (QEMU {:.2}, the client and the rest {:.2}), \
             {:.2} stolen by the hypervisor",
            host.busy as f64 / span,
            qemu as f64 / span,
            host.busy.saturating_sub(qemu) as f64 / span,
            host.stolen as f64 / span
        );
    }
}
