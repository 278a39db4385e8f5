//! A TCP relay on 127.0.0.1 that counts what a server sends: how tests and benchmarks
//! measure the bytes a copy really moved over the network.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

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
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let (Ok(mut upstream), Ok(mut server_reader)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    thread::spawn(move || {
        let _ = io::copy(&mut upstream, &mut server);
        let _ = server.shutdown(Shutdown::Write);
    });
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
