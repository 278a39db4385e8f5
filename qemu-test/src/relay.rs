//! TCP relays on 127.0.0.1: one in front of QEMU's user-network NBD forward, so that
//! bursts of clients get in, and one that counts what a server sends, for tests and
//! benchmarks that measure the bytes a copy really moved over the network.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// Bytes of the NBD server's first message (magic, `IHAVEOPT`, handshake flags).
const GREETING_BYTES: usize = 18;

/// How long the front waits for a connection's greeting: a client beyond the
/// appliance's free sockets waits in its backlog until one frees.
const GREETING_WAIT: Duration = Duration::from_secs(120);

/// The host end of the NBD service on QEMU's user network. QEMU's port forward
/// listens with a backlog of one: when a burst of clients overflows it, Linux leaves
/// some of them believing they are connected although QEMU never accepted them, and an
/// NBD client in that state waits for a greeting forever. The front accepts every
/// client at once (with the host's usual backlog) and connects them onwards one at a
/// time, each only after the previous one got its greeting, so the forward's queue is
/// empty whenever a connection reaches it. Clients are served in the order they came.
pub struct NbdFront {
    port: u16,
    target: Arc<AtomicU16>,
}

impl NbdFront {
    /// Serves `listener` until the process ends; connections go nowhere (they are
    /// closed) until [`NbdFront::forward_to`] names the forward's port.
    pub fn start(listener: TcpListener) -> io::Result<NbdFront> {
        let port = listener.local_addr()?.port();
        let target = Arc::new(AtomicU16::new(0));
        let (accepted, waiting) = mpsc::channel::<TcpStream>();
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if accepted.send(client).is_err() {
                    return;
                }
            }
        });
        let forward = Arc::clone(&target);
        thread::spawn(move || {
            for client in waiting {
                let port = forward.load(Ordering::Relaxed);
                if port == 0 {
                    continue;
                }
                if let Ok((server, greeting)) = connect_with_greeting(port) {
                    splice(client, server, greeting);
                }
            }
        });
        Ok(NbdFront { port, target })
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends the connections from now on to 127.0.0.1:`port`, QEMU's forward.
    pub fn forward_to(&self, port: u16) {
        self.target.store(port, Ordering::Relaxed);
    }
}

/// A connection to `port` and the greeting read from it.
fn connect_with_greeting(port: u16) -> io::Result<(TcpStream, [u8; GREETING_BYTES])> {
    let mut server = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    server.set_read_timeout(Some(GREETING_WAIT))?;
    let mut greeting = [0; GREETING_BYTES];
    server.read_exact(&mut greeting)?;
    server.set_read_timeout(None)?;
    Ok((server, greeting))
}

/// Sends `greeting` to `client`, then copies bytes both ways until either side
/// closes.
fn splice(mut client: TcpStream, server: TcpStream, greeting: [u8; GREETING_BYTES]) {
    if client.write_all(&greeting).is_err() {
        return;
    }
    let (Ok(client_reader), Ok(server_writer)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    thread::spawn(move || pump(client_reader, server_writer));
    thread::spawn(move || pump(server, client));
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// Forwards every connection made to [`CountingRelay::port`] to the server's port.
pub struct CountingRelay {
    port: u16,
    from_server: Arc<AtomicU64>,
}

impl CountingRelay {
    /// A relay on a free port of 127.0.0.1 to 127.0.0.1:`server`; it runs until the
    /// process ends.
    pub fn start(server: u16) -> io::Result<CountingRelay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let from_server = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&from_server);
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let counted = Arc::clone(&counted);
                thread::spawn(move || relay(client, server, &counted));
            }
        });
        Ok(CountingRelay { port, from_server })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Bytes the server has sent through the relay so far.
    pub fn from_server(&self) -> u64 {
        self.from_server.load(Ordering::Relaxed)
    }
}

fn relay(mut client: TcpStream, port: u16, counted: &AtomicU64) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let (Ok(upstream), Ok(mut server_reader)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    thread::spawn(move || pump(upstream, server));
    let mut buf = vec![0; 1 << 16];
    while let Ok(got) = server_reader.read(&mut buf) {
        if got == 0 || client.write_all(&buf[..got]).is_err() {
            break;
        }
        counted.fetch_add(got as u64, Ordering::Relaxed);
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server_reader.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A server that greets each connection after a pause, from a thread of its own,
    /// then echoes; it records the most connections ever accepted but not yet greeted.
    fn slow_greeting_server() -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let waiting = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&most);
        thread::spawn(move || {
            for mut client in listener.incoming().flatten() {
                let now = waiting.fetch_add(1, Ordering::SeqCst) + 1;
                seen.fetch_max(now, Ordering::SeqCst);
                let waiting = Arc::clone(&waiting);
                thread::spawn(move || {
                    thread::sleep(Duration::from_millis(5));
                    waiting.fetch_sub(1, Ordering::SeqCst);
                    client.write_all(&[7; GREETING_BYTES]).unwrap();
                    let mut line = [0; 8];
                    client.read_exact(&mut line).unwrap();
                    client.write_all(&line).unwrap();
                });
            }
        });
        (port, most)
    }

    #[test]
    fn a_burst_of_clients_reaches_the_server_one_greeting_at_a_time() {
        let (server, most_waiting) = slow_greeting_server();
        let front = NbdFront::start(TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap()).unwrap();
        front.forward_to(server);
        let port = front.port();
        let clients: Vec<_> = (0..40u64)
            .map(|index| {
                thread::spawn(move || {
                    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
                    let mut greeting = [0; GREETING_BYTES];
                    stream.read_exact(&mut greeting).unwrap();
                    stream.write_all(&index.to_le_bytes()).unwrap();
                    let mut echo = [0; 8];
                    stream.read_exact(&mut echo).unwrap();
                    (greeting, u64::from_le_bytes(echo))
                })
            })
            .collect();
        for (index, client) in clients.into_iter().enumerate() {
            assert_eq!(client.join().unwrap(), ([7; GREETING_BYTES], index as u64));
        }
        assert_eq!(most_waiting.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn clients_before_the_forward_is_known_are_closed() {
        let front = NbdFront::start(TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap()).unwrap();
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, front.port())).unwrap();
        let mut byte = [0; 1];
        assert_eq!(stream.read(&mut byte).unwrap(), 0);
    }
}
