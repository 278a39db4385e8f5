//! NBD servers on the host: `thinbox offline` over image files, or any other server,
//! for benchmarks and for reading disks a test has put together.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

/// How long a host server may take to answer.
const READY: Duration = Duration::from_secs(10);

/// An NBD server running on the host, killed (like a power cut) when dropped.
pub struct HostServer {
    child: Child,
    port: u16,
    /// Kept open so that the server never writes to a closed pipe.
    _stdout: Option<BufReader<ChildStdout>>,
    /// What `thinbox offline` printed while it ran its commands (empty for others).
    transcript: String,
}

impl HostServer {
    /// Starts `command`, a server told to listen on 127.0.0.1:`port`, and waits for
    /// its greeting.
    pub fn start(mut command: Command, port: u16) -> Result<HostServer, String> {
        let program = command.get_program().to_string_lossy().into_owned();
        command.stdin(Stdio::null()).stdout(Stdio::null());
        let child = crate::spawn_tied(command).map_err(|e| format!("starting {program}: {e}"))?;
        let server = HostServer {
            child,
            port,
            _stdout: None,
            transcript: String::new(),
        };
        crate::wait_for_greeting(port, READY)?;
        Ok(server)
    }

    /// `qemu-nbd` serving the qcow2 `image` read-only as export `disk` on a free port,
    /// to `clients` connections at a time (more than one: it offers
    /// `NBD_FLAG_CAN_MULTI_CONN`, and clients that use it open several).
    pub fn qcow2_read_only(image: &Path, clients: u32) -> Result<HostServer, String> {
        let port = crate::free_port().map_err(|e| format!("picking a port: {e}"))?;
        let mut command = Command::new("qemu-nbd");
        command
            .args([
                "--read-only",
                "--persistent",
                "--format=qcow2",
                "--bind=127.0.0.1",
                "--export-name=disk",
            ])
            .arg(format!("--shared={clients}"))
            .arg(format!("--port={port}"))
            .arg(image);
        HostServer::start(command, port)
    }

    /// Runs `thinbox offline` (the runner at `thinbox`) over the image files `disks`
    /// (`vda`, `vdb`, ... in this order): it runs the console `commands` and then
    /// serves every device over NBD on a free port. Fails with the console transcript
    /// if a command fails.
    pub fn offline(
        thinbox: &Path,
        disks: &[&Path],
        commands: &[String],
    ) -> Result<HostServer, String> {
        let mut command = Command::new(thinbox);
        command.arg("offline");
        for disk in disks {
            command.arg("--disk").arg(disk);
        }
        command.args(["--nbd", "127.0.0.1:0"]);
        for line in commands {
            command.args(["--exec", line]);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child =
            crate::spawn_tied(command).map_err(|e| format!("starting thinbox offline: {e}"))?;
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut transcript = String::new();
        let mut port = None;
        // The port comes first; the commands have all run once it says it keeps serving.
        loop {
            let mut line = String::new();
            if stdout.read_line(&mut line).unwrap_or(0) == 0 {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                return Err(format!(
                    "thinbox offline stopped ({status}):\n{transcript}{stderr}"
                ));
            }
            if let Some(address) = line.trim().strip_prefix("serving NBD on 127.0.0.1:") {
                port = address.parse().ok();
            }
            let serving = line.starts_with("still serving NBD");
            transcript.push_str(&line);
            if serving {
                break;
            }
        }
        let port = port.ok_or_else(|| format!("thinbox offline named no port:\n{transcript}"))?;
        let server = HostServer {
            child,
            port,
            _stdout: Some(stdout),
            transcript,
        };
        crate::wait_for_greeting(port, READY)?;
        Ok(server)
    }

    /// What `thinbox offline` printed up to serving (its commands' output), e.g. the
    /// certificate `nbd tls generate` made.
    pub fn transcript(&self) -> &str {
        &self.transcript
    }

    /// The port it listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nbd://127.0.0.1:PORT/EXPORT` (the default export for an empty `export`).
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }
}

impl Drop for HostServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
