//! `thinbox offline`: the appliance's console over disk image files on this host.
//!
//! The same command interpreter, device mapper, configuration and NBD protocol code
//! as the appliance run here; only the disks (image files, `blockdev::FileDisk`) and
//! the NBD transport (std TCP) differ. Disks are named `vda`, `vdb`, … in the order
//! given, and the configuration is found on them as the appliance finds it, so disks
//! prepared here boot on the appliance with the same devices and the other way round.
//!
//! With `--nbd ADDRESS` the devices are served while the console runs. The console
//! then lives on the server's thread (the device mapper is single-threaded, as on the
//! appliance) and this thread hands it one command at a time; between commands it
//! ticks the console so timed work and events go on. Serving continues after the
//! commands or standard input have ended, until `shutdown` or a signal stops the
//! process.

use std::cell::RefCell;
use std::io::{self, BufRead, IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::rc::Rc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blockdev::{FileDisk, SyncWake};
use clap::Args;
use console::{Console, Crash, MemoryStats, Platform};
use dm::{DeviceMapper, Disk, NbdBackend};
use nbd::tcp::{Controller, TcpServer};

use crate::Failure;

#[derive(Args, Debug, Clone)]
pub struct OfflineArgs {
    /// A disk image file (repeatable, at least one); named vda, vdb, ... in order.
    #[arg(long = "disk", value_name = "PATH", required = true)]
    pub disks: Vec<PathBuf>,
    /// Serve the devices over NBD on this address (e.g. 127.0.0.1:10809), until
    /// `shutdown` or a signal, also after the commands have ended.
    #[arg(long, value_name = "ADDRESS")]
    pub nbd: Option<SocketAddr>,
    /// Run this console command (repeatable) instead of reading standard input; stops
    /// at the first command that fails, with a non-zero exit status.
    #[arg(long = "exec", value_name = "COMMAND")]
    pub exec: Vec<String>,
}

/// The host as the console's platform: a monotonic clock; `shutdown` ends the run.
struct HostPlatform {
    started: Instant,
    powered_off: bool,
}

impl Platform for HostPlatform {
    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }
    fn memory(&self) -> Option<MemoryStats> {
        None
    }
    fn power_off(&mut self) {
        self.powered_off = true;
    }
    fn crash(&mut self, how: Crash) {
        panic!("deliberate crash requested on the console: {how:?}")
    }
    fn connector(&mut self) -> Box<dm::Connector<'static>> {
        Box::new(|uri: &nbd::client::NbdUri| {
            connect_tcp(&uri.host, uri.port)
                .map_err(|error| format!("cannot connect to {}:{}: {error}", uri.host, uri.port))
        })
    }
}

/// The host's clock, which client certificates are checked against.
fn host_time() -> Option<u64> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|since| since.as_secs())
}

/// How long connecting to an NBD server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A non-blocking TCP stream to `host`:`port`, Nagle off (NBD replies are small
/// messages answered at once).
fn connect_tcp(host: &str, port: u16) -> io::Result<Box<dyn nbd::client::Stream>> {
    use std::net::{TcpStream, ToSocketAddrs};
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
    for address in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&address, CONNECT_TIMEOUT) {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                stream.set_nonblocking(true)?;
                return Ok(Box::new(stream));
            }
            Err(error) => last = error,
        }
    }
    Err(last)
}

/// The console and the device mapper it manages, whose NBD backend serves the devices.
pub struct Plane {
    console: Console<HostPlatform>,
    backend: NbdBackend,
}

impl nbd::Backend for Plane {
    fn exports(&self) -> Vec<nbd::ExportInfo> {
        self.backend.exports()
    }
    fn access(&self, name: &str, peer: &nbd::Peer) -> nbd::Access {
        self.backend.access(name, peer)
    }
    fn open_access(&self, export: nbd::ExportHandle, peer: &nbd::Peer) -> nbd::Access {
        self.backend.open_access(export, peer)
    }
    fn access_generation(&self) -> u64 {
        self.backend.access_generation()
    }
    fn tls(&self) -> nbd::Tls {
        self.backend.tls()
    }
    fn tls_failed(&mut self, peer: SocketAddr, failure: &nbd::TlsFailure) {
        self.backend.tls_failed(peer, failure)
    }
    fn open(
        &mut self,
        name: &str,
        peer: SocketAddr,
    ) -> Result<(nbd::ExportHandle, nbd::ExportInfo), nbd::OpenError> {
        self.backend.open(name, peer)
    }
    fn open_by(
        &mut self,
        name: &str,
        peer: &nbd::Peer,
    ) -> Result<(nbd::ExportHandle, nbd::ExportInfo), nbd::OpenError> {
        self.backend.open_by(name, peer)
    }
    fn close(&mut self, export: nbd::ExportHandle, peer: SocketAddr) {
        self.backend.close(export, peer)
    }
    fn submit(&mut self, request: nbd::IoRequest) -> Result<(), nbd::QueueFull> {
        self.backend.submit(request)
    }
    fn poll(&mut self) -> Option<nbd::IoCompletion> {
        self.backend.poll()
    }
    fn meta_contexts(&self, export: &str) -> Vec<String> {
        self.backend.meta_contexts(export)
    }
    fn open_context(
        &mut self,
        export: nbd::ExportHandle,
        name: &str,
    ) -> Result<nbd::ContextHandle, String> {
        self.backend.open_context(export, name)
    }
    fn close_context(&mut self, context: nbd::ContextHandle) {
        self.backend.close_context(context)
    }
    fn context_status(
        &mut self,
        context: nbd::ContextHandle,
        sector: u64,
        sectors: u64,
        max_extents: u32,
        extent: &mut dyn FnMut(u64, u32),
    ) -> Result<(), nbd::BackendError> {
        self.backend
            .context_status(context, sector, sectors, max_extents, extent)
    }
}

/// How long one turn of the console may run before the NBD server gets its thread back.
const TURN: Duration = Duration::from_millis(50);
/// Pause between ticks while nothing is typed.
const TICK: Duration = Duration::from_millis(100);

/// What a turn printed, and whether a command is still running.
struct Turn {
    output: String,
    busy: bool,
    failures: u64,
    powered_off: bool,
}

impl Plane {
    fn new(disks: Vec<(String, FileDisk)>) -> Plane {
        let platform = HostPlatform {
            started: Instant::now(),
            powered_off: false,
        };
        let mut mapper = DeviceMapper::new(
            disks
                .into_iter()
                .map(|(name, device)| Disk {
                    name,
                    device: Box::new(device),
                })
                .collect(),
        );
        mapper.set_wall_clock(host_time);
        mapper.set_record_ciphers(dm::tls::suites::ordered(
            rustls::crypto::ring::ALL_CIPHER_SUITES,
        ));
        let devices = Rc::new(RefCell::new(mapper));
        let backend = NbdBackend::new(Rc::clone(&devices));
        Plane {
            console: Console::new(platform, devices),
            backend,
        }
    }

    /// Runs `line` (if any), then polls for at most [`TURN`].
    fn turn(&mut self, line: Option<&str>) -> Turn {
        let mut output = String::new();
        if let Some(line) = line {
            self.console.run_line(line, &mut output);
        }
        let deadline = Instant::now() + TURN;
        let mut busy = self.console.poll(&mut output);
        while busy && self.console.busy() && Instant::now() < deadline {
            busy = self.console.poll(&mut output);
        }
        // A command that ran as a job ends with the console's prompt; the transcript
        // prints its own.
        if !self.console.busy()
            && let Some(rest) = output.strip_suffix(console::PROMPT)
        {
            output.truncate(rest.len());
        }
        Turn {
            output,
            busy: self.console.busy(),
            failures: self.console.failures(),
            powered_off: self.console.platform().powered_off,
        }
    }
}

/// Where the console runs: here, or on the NBD server's thread.
enum Host {
    Local(Box<Plane>),
    Served {
        controller: Controller<Plane>,
        thread: Option<JoinHandle<io::Result<()>>>,
    },
}

impl Host {
    fn with<R: Send + 'static>(&mut self, job: impl FnOnce(&mut Plane) -> R + Send + 'static) -> R {
        match self {
            Host::Local(plane) => job(plane),
            Host::Served { controller, .. } => controller
                .with_server(move |server| job(server.backend_mut()))
                .expect("the NBD server thread runs until we stop it"),
        }
    }

    /// Runs one command to the end, handing its output to `show` as it comes. Returns
    /// whether it succeeded and whether it powered the appliance off.
    fn command(&mut self, line: &str, show: &mut dyn FnMut(&str)) -> (bool, bool) {
        let owned = line.to_string();
        let mut turn = self.with(move |plane| {
            let before = plane.console.failures();
            (plane.turn(Some(&owned)), before)
        });
        let before = turn.1;
        loop {
            show(&turn.0.output);
            if !turn.0.busy {
                return (turn.0.failures == before, turn.0.powered_off);
            }
            turn.0 = self.with(|plane| plane.turn(None));
        }
    }

    /// Lets timed work run and prints what it reported (events).
    fn tick(&mut self) {
        let turn = self.with(|plane| plane.turn(None));
        print_output(&turn.output);
    }

    fn stop(self) -> Result<(), Failure> {
        if let Host::Served { controller, thread } = self {
            controller.stop();
            if let Some(thread) = thread {
                thread
                    .join()
                    .map_err(|_| Failure::failed("the NBD server thread panicked"))?
                    .map_err(|error| Failure::failed(format!("NBD server: {error}")))?;
            }
        }
        Ok(())
    }
}

/// Console output uses the serial line's `\r\n`; a host terminal wants `\n`.
fn print_output(text: &str) {
    if text.is_empty() {
        return;
    }
    let mut stdout = io::stdout().lock();
    let _ = stdout.write_all(text.replace("\r\n", "\n").as_bytes());
    let _ = stdout.flush();
}

/// The prompt and `line` as one transcript line, for commands nobody typed here.
fn echo(line: &str) {
    print_output(&format!("{}{line}\n", console::PROMPT));
}

/// Writes an empty configuration area on the image at `path`, as `config init` does,
/// so that the appliance finds it as its configuration disk at the next boot.
pub fn init_config_disk(path: &Path) -> Result<(), String> {
    let disk = FileDisk::open(path, false).map_err(|error| error.to_string())?;
    let mut host = Host::Local(Box::new(Plane::new(vec![(String::from("vda"), disk)])));
    host.with(|plane| plane.console.start(&mut String::new()));
    for line in ["config init vda", "shutdown"] {
        let mut output = String::new();
        let (ok, _) = host.command(line, &mut |text| output.push_str(text));
        if !ok {
            return Err(output.trim().replace("\r\n", "; "));
        }
    }
    Ok(())
}

pub fn offline(args: &OfflineArgs) -> Result<ExitCode, Failure> {
    if let Some(address) = args.nbd
        && !address.ip().is_loopback()
    {
        return Err(Failure::usage(format!(
            "--nbd {address}: offline mode serves loopback addresses only (127.0.0.1:PORT)"
        )));
    }
    let mut seen = Vec::new();
    for path in &args.disks {
        let canonical = std::fs::canonicalize(path)
            .map_err(|error| Failure::usage(format!("opening {}: {error}", path.display())))?;
        if seen.contains(&canonical) {
            return Err(Failure::usage(format!(
                "{} is given twice; each image is one disk",
                path.display()
            )));
        }
        seen.push(canonical);
    }
    // Served, the disks' syncs end on their own threads and wake the server's.
    let wake = SyncWake::default();
    let mut disks = Vec::new();
    for (index, path) in args.disks.iter().enumerate() {
        let mut disk = FileDisk::open(path, false)
            .map_err(|error| Failure::usage(format!("opening {}: {error}", path.display())))?;
        disk.wake_with(std::sync::Arc::clone(&wake));
        disks.push((format!("vd{}", console::disk_letters(index)), disk));
    }
    let mut host = match args.nbd {
        None => Host::Local(Box::new(Plane::new(disks))),
        Some(address) => {
            let (bound, controller, thread) =
                TcpServer::spawn(address, move || Plane::new(disks), nbd::Limits::default())
                    .map_err(|error| {
                        Failure::failed(format!("serving NBD on {address}: {error}"))
                    })?;
            println!("serving NBD on {bound}");
            let server = controller.clone();
            let _ = wake.set(Box::new(move || server.wake()));
            Host::Served {
                controller,
                thread: Some(thread),
            }
        }
    };
    let notes = host.with(|plane| {
        let mut out = String::new();
        plane.console.start(&mut out);
        out
    });
    print_output(notes.strip_suffix(console::PROMPT).unwrap_or(&notes));

    let serving = args.nbd.is_some();
    let mut failed = false;
    let mut powered_off = false;
    if args.exec.is_empty() {
        // A terminal echoes what is typed after the prompt; commands from a pipe or a
        // file are echoed after it here, so each reads as a transcript line.
        let typed = io::stdin().is_terminal();
        let lines = stdin_lines();
        if typed {
            print_output(console::PROMPT);
        }
        loop {
            match lines.recv_timeout(TICK) {
                Ok(line) => {
                    if !typed && !host.with(|plane| plane.console.pasting()) {
                        echo(&line);
                    }
                    let (_, off) = host.command(&line, &mut print_output);
                    if off {
                        powered_off = true;
                        break;
                    }
                    if typed {
                        print_output(console::PROMPT);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => host.tick(),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    } else {
        for line in &args.exec {
            echo(line);
            let (ok, off) = host.command(line, &mut print_output);
            if off {
                powered_off = true;
                break;
            }
            if !ok {
                failed = true;
                break;
            }
        }
    }
    if serving && !powered_off && !failed {
        println!("\nstill serving NBD; type shutdown or send a signal to stop");
        loop {
            std::thread::sleep(TICK);
            host.tick();
        }
    }
    if !powered_off {
        // Leave the images as `shutdown` would: everything flushed.
        let (ok, _) = host.command("shutdown", &mut print_output);
        failed |= !ok;
    }
    host.stop()?;
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Standard input's lines, read on their own thread so the console keeps ticking
/// while nothing is typed.
fn stdin_lines() -> std::sync::mpsc::Receiver<String> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}
