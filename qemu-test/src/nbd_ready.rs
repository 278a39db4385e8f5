//! Waiting for the appliance's NBD server through QEMU's port forward.
//!
//! QEMU's user-mode network accepts a host-side connection before anything
//! listens in the guest, so a successful `connect` proves nothing: the server is
//! ready once its 18-byte greeting has arrived.

use std::io::Read;
use std::net::{Ipv4Addr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// Length of the fixed-newstyle greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
const GREETING_LEN: usize = 18;
const GREETING_MAGIC: &[u8] = b"NBDMAGICIHAVEOPT";

/// Waits until an NBD greeting arrives on `127.0.0.1:port`, trying again (each
/// attempt waiting a few seconds) until `timeout` has passed.
pub fn wait_for_greeting(port: u16, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no attempt made");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no NBD greeting on 127.0.0.1:{port} within {timeout:?}: {last}"
            ));
        }
        match read_greeting(port, left.min(Duration::from_secs(5))) {
            Ok(()) => return Ok(()),
            Err(why) => last = why,
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// One attempt: connect and read the greeting within `wait`.
pub fn read_greeting(port: u16, wait: Duration) -> Result<(), String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .map_err(|error| format!("connect: {error}"))?;
    stream
        .set_read_timeout(Some(wait))
        .map_err(|error| format!("set_read_timeout: {error}"))?;
    let mut greeting = [0u8; GREETING_LEN];
    stream
        .read_exact(&mut greeting)
        .map_err(|error| format!("reading the greeting: {error}"))?;
    if !greeting.starts_with(GREETING_MAGIC) {
        return Err(format!("not an NBD greeting: {greeting:02x?}"));
    }
    Ok(())
}
