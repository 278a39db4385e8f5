//! The NBD service's TCP sockets: a pool of listeners on [`NBD_PORT`] and the
//! connections they accepted, each driven through the [`nbd::Server`].
//!
//! smoltcp has no listen backlog (a socket accepts exactly one connection), so a
//! few sockets listen at all times and a new one is armed whenever one is taken,
//! up to a bound on all sockets (every socket is scanned for every packet, and each
//! holds its buffers). When every socket is busy new clients are refused.
//!
//! Bytes move both ways under back-pressure: received bytes stay in the socket
//! until the server takes them (a full receive buffer closes the TCP window), and
//! replies leave the server only as fast as the socket's send buffer drains.

use alloc::vec;
use alloc::vec::Vec;
use core::net::SocketAddr;
use nbd::{Backend, ConnectionId, Server};
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};

/// NBD's IANA port.
pub const NBD_PORT: u16 = 10809;
/// Sockets kept listening: clients such as nbdcopy and fio open several
/// connections at once.
const LISTENERS: usize = 4;
/// Listening and connected sockets together.
const MAX_SOCKETS: usize = 20;
/// Receive buffer per socket: the largest window a client gets. Kept below what
/// the NIC's receive queue holds (256 frames of 1460 bytes), so a full window never
/// overruns it.
const RX_BUFFER: usize = 256 * 1024;
/// Send buffer per socket: room for a couple of 256 KiB read replies in flight.
const TX_BUFFER: usize = 512 * 1024;
/// Probe an idle peer this often, and give up on one that stops answering.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
const TIMEOUT: Duration = Duration::from_secs(60);
/// How long a closed connection may wait for the peer to close its side before it
/// is reset (a peer that never does would hold the socket forever).
const LINGER: Duration = Duration::from_secs(60);

/// What one socket is doing.
enum Role {
    /// Waiting for a client (also during the TCP handshake).
    Listening,
    /// Serving a client as connection `id` of the NBD server.
    Serving { id: ConnectionId, peer_closed: bool },
    /// Released from the server at `since`; waiting for TCP to finish closing.
    Closing { since: Instant },
}

struct Slot {
    handle: SocketHandle,
    role: Role,
}

pub struct NbdSockets {
    slots: Vec<Slot>,
    accepted: u64,
}

impl NbdSockets {
    pub fn new(sockets: &mut SocketSet<'static>) -> Self {
        let mut pool = NbdSockets {
            slots: Vec::new(),
            accepted: 0,
        };
        pool.arm_listeners(sockets);
        pool
    }

    /// Connections being served now.
    pub fn open_connections(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| matches!(slot.role, Role::Serving { .. }))
            .count()
    }

    /// Connections accepted since start-up.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    /// Accepts, feeds, drains and closes sockets, and polls the server. Returns
    /// whether anything moved.
    pub fn pump<B: Backend>(
        &mut self,
        sockets: &mut SocketSet<'static>,
        server: &mut Server<B>,
        admit: bool,
        now: Instant,
    ) -> bool {
        let mut moved = false;
        for slot in &mut self.slots {
            let socket = sockets.get_mut::<tcp::Socket>(slot.handle);
            moved |= accept(slot, socket, server, &mut self.accepted);
            if let Role::Serving { id, peer_closed } = &mut slot.role {
                moved |= receive(socket, *id, peer_closed, server, admit);
            }
        }
        moved |= server.poll();
        for slot in &mut self.slots {
            let socket = sockets.get_mut::<tcp::Socket>(slot.handle);
            moved |= send_and_close(slot, socket, server, now);
        }
        let before = self.slots.len();
        self.slots.retain(|slot| {
            let Role::Closing { since } = slot.role else {
                return true;
            };
            let socket = sockets.get_mut::<tcp::Socket>(slot.handle);
            let finished = matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait);
            if !finished && now - since < LINGER {
                return true;
            }
            socket.abort();
            sockets.remove(slot.handle);
            false
        });
        moved |= self.slots.len() != before;
        self.arm_listeners(sockets);
        moved
    }

    /// Tops the listeners up to [`LISTENERS`] within [`MAX_SOCKETS`].
    fn arm_listeners(&mut self, sockets: &mut SocketSet<'static>) {
        let mut listening = self
            .slots
            .iter()
            .filter(|slot| matches!(slot.role, Role::Listening))
            .count();
        while listening < LISTENERS && self.slots.len() < MAX_SOCKETS {
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; RX_BUFFER]),
                tcp::SocketBuffer::new(vec![0; TX_BUFFER]),
            );
            // Replies go out whole and at once; ACKs are not held back (a delayed
            // ACK stalls a client waiting for window space).
            socket.set_nagle_enabled(false);
            socket.set_ack_delay(None);
            socket.set_keep_alive(Some(KEEP_ALIVE));
            socket.set_timeout(Some(TIMEOUT));
            socket
                .listen(NBD_PORT)
                .expect("a fresh socket listens on a non-zero port");
            self.slots.push(Slot {
                handle: sockets.add(socket),
                role: Role::Listening,
            });
            listening += 1;
        }
    }
}

/// Hands a listener whose handshake completed to the server as a new connection.
fn accept<B: Backend>(
    slot: &mut Slot,
    socket: &mut tcp::Socket<'static>,
    server: &mut Server<B>,
    accepted: &mut u64,
) -> bool {
    if !matches!(slot.role, Role::Listening) {
        return false;
    }
    match socket.state() {
        tcp::State::Listen | tcp::State::SynReceived => false,
        tcp::State::Established | tcp::State::CloseWait => {
            let Some(peer) = socket.remote_endpoint() else {
                return false;
            };
            slot.role = Role::Serving {
                id: server.connect(SocketAddr::new(peer.addr.into(), peer.port)),
                peer_closed: false,
            };
            *accepted += 1;
            true
        }
        // Reset or closed before it was served: listen again.
        _ => {
            socket.abort();
            socket
                .listen(NBD_PORT)
                .expect("an aborted socket listens again");
            true
        }
    }
}

/// Offers received bytes to the server while it takes them; tells it when the
/// client has closed its side.
fn receive<B: Backend>(
    socket: &mut tcp::Socket<'static>,
    id: ConnectionId,
    peer_closed: &mut bool,
    server: &mut Server<B>,
    admit: bool,
) -> bool {
    let mut moved = false;
    while admit && socket.can_recv() && server.wants_input(id) {
        let taken = socket
            .recv(|data| {
                let taken = server.receive(id, data);
                (taken, taken)
            })
            .unwrap_or(0);
        if taken == 0 {
            break;
        }
        moved = true;
    }
    if !*peer_closed && !socket.may_recv() {
        *peer_closed = true;
        server.peer_closed(id);
        moved = true;
    }
    moved
}

/// Copies queued replies into the socket, and ends connections the server or the
/// network has finished with.
fn send_and_close<B: Backend>(
    slot: &mut Slot,
    socket: &mut tcp::Socket<'static>,
    server: &mut Server<B>,
    now: Instant,
) -> bool {
    let Role::Serving { id, .. } = slot.role else {
        return false;
    };
    let mut moved = false;
    while socket.can_send() && server.output_len(id) > 0 {
        let sent = socket
            .send(|room| {
                let mut filled = 0;
                for chunk in server.output(id) {
                    let count = chunk.len().min(room.len() - filled);
                    room[filled..filled + count].copy_from_slice(&chunk[..count]);
                    filled += count;
                    if filled == room.len() {
                        break;
                    }
                }
                (filled, filled)
            })
            .unwrap_or(0);
        if sent == 0 {
            break;
        }
        server.consume_output(id, sent);
        moved = true;
    }
    if !socket.is_active() {
        // Reset by the peer, timed out, or closed from both sides.
        server.release(id);
        slot.role = Role::Closing { since: now };
        return true;
    }
    if server.should_close(id) {
        // Everything is in the send buffer; the FIN follows it.
        socket.close();
        server.release(id);
        slot.role = Role::Closing { since: now };
        return true;
    }
    moved
}
