//! Outgoing TCP connections (`thin import`, `thin sync` pulling from another NBD
//! server): a smoltcp socket in the stack's socket set, moved by the main loop's
//! network poll, read and written by its owner through [`nbd::client::Stream`].

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use core::cell::RefCell;
use core::net::Ipv4Addr;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use smoltcp::wire::IpAddress;

use nbd::client::{Stream, StreamError};

use super::NetStack;

/// Receive buffer: the window the server gets. As for the NBD service's sockets, kept
/// below what the NIC's receive queue holds (256 frames of 1460 bytes): a larger
/// window lets a burst overrun the queue, and every dropped frame stalls the copy
/// until it is sent again.
const RX_BUFFER: usize = 256 * 1024;
/// Send buffer: requests are small.
const TX_BUFFER: usize = 64 * 1024;
/// First local port handed out (the dynamic range).
const FIRST_LOCAL_PORT: u16 = 49152;

impl NetStack {
    /// Starts a connection to `host` (an IPv4 address) port `port`; it completes in
    /// the background (see [`ClientStream`]).
    fn connect(&mut self, host: &str, port: u16) -> Result<SocketHandle, String> {
        let address: Ipv4Addr = host.parse().map_err(|_| {
            format!("'{host}' is not an IPv4 address (the appliance has no name resolution)")
        })?;
        if self.iface.ipv4_addr().is_none() {
            return Err(String::from(
                "the network has no address yet (see net status)",
            ));
        }
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; RX_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TX_BUFFER]),
        );
        socket.set_nagle_enabled(false);
        socket.set_ack_delay(None);
        self.next_local_port = self.next_local_port.wrapping_add(1);
        let local_port = FIRST_LOCAL_PORT + self.next_local_port % (u16::MAX - FIRST_LOCAL_PORT);
        socket
            .connect(
                self.iface.context(),
                (IpAddress::Ipv4(address), port),
                local_port,
            )
            .map_err(|error| format!("cannot connect to {host}:{port}: {error}"))?;
        Ok(self.sockets.add(socket))
    }
}

/// Opens a connection to `host`:`port` on `stack`.
pub fn connect(
    stack: &Rc<RefCell<NetStack>>,
    host: &str,
    port: u16,
) -> Result<Box<dyn Stream>, String> {
    let handle = stack.borrow_mut().connect(host, port)?;
    Ok(Box::new(ClientStream {
        stack: Rc::clone(stack),
        handle,
        peer: format!("{host}:{port}"),
        established: false,
    }))
}

/// One outgoing connection; the socket is removed when it is dropped.
struct ClientStream {
    stack: Rc<RefCell<NetStack>>,
    handle: SocketHandle,
    peer: String,
    /// The connection got through once (so a closed socket means the peer left,
    /// not that it refused).
    established: bool,
}

impl ClientStream {
    fn with_socket<R>(
        &mut self,
        work: impl FnOnce(&mut tcp::Socket<'static>) -> Result<R, StreamError>,
    ) -> Result<R, StreamError> {
        let mut stack = self.stack.borrow_mut();
        let socket = stack.sockets.get_mut::<tcp::Socket>(self.handle);
        match socket.state() {
            tcp::State::Established | tcp::State::CloseWait => self.established = true,
            tcp::State::Closed if !self.established => {
                return Err(StreamError::Failed(format!(
                    "cannot connect to {}: connection refused or unreachable",
                    self.peer
                )));
            }
            _ => {}
        }
        work(socket)
    }
}

impl Stream for ClientStream {
    fn send(&mut self, bytes: &[u8]) -> Result<usize, StreamError> {
        self.with_socket(|socket| {
            if !socket.may_send() {
                return Err(StreamError::Closed);
            }
            socket
                .send_slice(bytes)
                .map_err(|error| StreamError::Failed(format!("sending failed: {error}")))
        })
    }

    fn receive(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
        self.with_socket(|socket| {
            if !socket.may_recv() && socket.recv_queue() == 0 {
                return Err(StreamError::Closed);
            }
            socket
                .recv_slice(buf)
                .map_err(|error| StreamError::Failed(format!("receiving failed: {error}")))
        })
    }

    fn connecting(&self) -> bool {
        let stack = self.stack.borrow();
        let socket = stack.sockets.get::<tcp::Socket>(self.handle);
        matches!(
            socket.state(),
            tcp::State::SynSent | tcp::State::SynReceived
        )
    }
}

impl Drop for ClientStream {
    /// Resets the connection (the reset goes out at the next poll, which then
    /// removes the socket).
    fn drop(&mut self) {
        if let Ok(mut stack) = self.stack.try_borrow_mut() {
            stack.sockets.get_mut::<tcp::Socket>(self.handle).abort();
            stack.closing.push(self.handle);
        }
    }
}

impl NetStack {
    /// Removes the sockets of dropped connections once their reset is out.
    pub(super) fn remove_closed(&mut self) {
        for handle in self.closing.drain(..) {
            self.sockets.remove(handle);
        }
    }
}
