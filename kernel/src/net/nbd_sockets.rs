//! The NBD service's TCP sockets: a pool of listeners on [`NBD_PORT`] and the
//! connections they accepted, each driven through the [`nbd::Server`].
//!
//! smoltcp has no listen backlog (a socket accepts exactly one connection), so a
//! few sockets listen at all times and a new one is armed whenever one is taken.
//! The pool is sized from memory: a quarter of the heap goes to socket buffers,
//! the first sockets get large buffers and later ones smaller (so hundreds of
//! connections fit in 256 MiB), and no socket is armed while the heap is short.
//! Clients beyond the sockets listening wait in a backlog (see `backlog.rs`).
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
const LISTENERS: usize = 8;
/// Most sockets, whatever the memory: smoltcp scans every socket for every packet.
const MAX_SOCKETS: usize = 512;
/// Buffer sizes (receive, send) of a new socket, largest first, each with the
/// share of the socket budget the pool may have used when one is armed. The
/// largest receive buffer stays below what the NIC's receive queue holds (256
/// frames of 1460 bytes), so a full window never overruns it; its send buffer has
/// room for a couple of 256 KiB read replies in flight.
const BUFFER_TIERS: [(usize, usize, Share); 3] = [
    (256 * 1024, 512 * 1024, Share(1, 2)),
    (32 * 1024, 64 * 1024, Share(3, 4)),
    (8 * 1024, 16 * 1024, Share(1, 1)),
];
/// Part of the heap socket buffers may use.
const SOCKET_SHARE: Share = Share(1, 4);
/// Probe an idle peer this often, and give up on one that stops answering.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
const TIMEOUT: Duration = Duration::from_secs(60);
/// How long a closed connection may wait for the peer to close its side before it
/// is reset (a peer that never does would hold the socket forever).
const LINGER: Duration = Duration::from_secs(60);
/// How long a client may take from connecting to choosing an export (TLS handshake
/// included) before it is cut off, as qemu-nbd's handshake limit does (its 10 s is
/// tight for an emulated appliance on a loaded host): keep-alive drops peers that
/// vanish, this drops live ones that stall.
const NEGOTIATION_LIMIT: Duration = Duration::from_secs(60);

/// A fraction, numerator over denominator.
#[derive(Clone, Copy)]
struct Share(usize, usize);

impl Share {
    fn of(self, bytes: usize) -> usize {
        bytes / self.1 * self.0
    }
}

/// What one socket is doing.
enum Role {
    /// Waiting for a client (also during the TCP handshake).
    Listening,
    /// Serving a client as connection `id` of the NBD server, accepted at `since`.
    Serving {
        id: ConnectionId,
        peer_closed: bool,
        since: Instant,
    },
    /// Released from the server at `since`; waiting for TCP to finish closing.
    Closing { since: Instant },
}

struct Slot {
    handle: SocketHandle,
    role: Role,
    /// Bytes of its buffers.
    bytes: usize,
}

pub struct NbdSockets {
    slots: Vec<Slot>,
    accepted: u64,
    /// Bytes socket buffers may take, and take now.
    budget: usize,
    buffer_bytes: usize,
}

/// The heap as the pool sees it when arming sockets.
#[derive(Clone, Copy)]
pub struct Heap {
    pub free: usize,
    /// Free heap no new socket may take.
    pub reserve: usize,
}

impl NbdSockets {
    /// A pool for a heap of `heap_bytes`, its first listeners armed.
    pub fn new(sockets: &mut SocketSet<'static>, heap_bytes: usize, heap: Heap) -> Self {
        let mut pool = NbdSockets {
            slots: Vec::new(),
            accepted: 0,
            budget: SOCKET_SHARE.of(heap_bytes),
            buffer_bytes: 0,
        };
        pool.arm_listeners(sockets, heap);
        pool
    }

    /// Sockets now, and the most there can be (every further one with the
    /// smallest buffers).
    pub fn sockets(&self) -> (usize, usize) {
        let (rx, tx, _) = BUFFER_TIERS[BUFFER_TIERS.len() - 1];
        let more = self.unused_budget() / (rx + tx);
        let max = (self.slots.len() + more).min(MAX_SOCKETS);
        (self.slots.len(), max.max(self.slots.len()))
    }

    /// Bytes of socket buffers now.
    pub fn buffer_bytes(&self) -> usize {
        self.buffer_bytes
    }

    /// Bytes of the socket budget not taken yet.
    pub fn unused_budget(&self) -> usize {
        self.budget.saturating_sub(self.buffer_bytes)
    }

    /// Sockets listening for a client now (a SYN each may take).
    pub fn listening(&self, sockets: &SocketSet<'static>) -> usize {
        self.slots
            .iter()
            .filter(|slot| {
                matches!(slot.role, Role::Listening)
                    && sockets.get::<tcp::Socket>(slot.handle).state() == tcp::State::Listen
            })
            .count()
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
        heap: Heap,
        now: Instant,
    ) -> bool {
        let mut moved = false;
        for slot in &mut self.slots {
            let socket = sockets.get_mut::<tcp::Socket>(slot.handle);
            moved |= accept(slot, socket, server, &mut self.accepted, now);
            if let Role::Serving {
                id, peer_closed, ..
            } = &mut slot.role
            {
                moved |= receive(socket, *id, peer_closed, server);
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
            self.buffer_bytes -= slot.bytes;
            false
        });
        moved |= self.slots.len() != before;
        let freed = self.retire_small_listener(sockets, heap);
        let heap = Heap {
            free: heap.free + freed,
            ..heap
        };
        self.arm_listeners(sockets, heap);
        moved
    }

    /// Removes one idle listener whose buffers are smaller than a new socket would
    /// get now (it was armed while memory was short), so that [`Self::arm_listeners`]
    /// replaces it and later clients do not keep small buffers. Returns the bytes
    /// freed.
    fn retire_small_listener(&mut self, sockets: &mut SocketSet<'static>, heap: Heap) -> usize {
        let (largest_rx, largest_tx, _) = BUFFER_TIERS[0];
        let Some(index) = self.slots.iter().position(|slot| {
            matches!(slot.role, Role::Listening)
                && slot.bytes < largest_rx + largest_tx
                && sockets.get::<tcp::Socket>(slot.handle).state() == tcp::State::Listen
        }) else {
            return 0;
        };
        let bytes = self.slots[index].bytes;
        self.buffer_bytes -= bytes;
        let spare = heap.free.saturating_sub(heap.reserve) + bytes;
        if self
            .next_buffers(spare)
            .is_some_and(|(rx, tx)| rx + tx > bytes)
        {
            sockets.remove(self.slots.swap_remove(index).handle);
            bytes
        } else {
            self.buffer_bytes += bytes;
            0
        }
    }

    /// Tops the listeners up to [`LISTENERS`] while the socket budget and the heap
    /// have room.
    fn arm_listeners(&mut self, sockets: &mut SocketSet<'static>, heap: Heap) {
        let mut listening = self
            .slots
            .iter()
            .filter(|slot| matches!(slot.role, Role::Listening))
            .count();
        let mut free = heap.free;
        while listening < LISTENERS && self.slots.len() < MAX_SOCKETS {
            let Some((rx, tx)) = self.next_buffers(free.saturating_sub(heap.reserve)) else {
                return;
            };
            free -= rx + tx;
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; rx]),
                tcp::SocketBuffer::new(vec![0; tx]),
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
                bytes: rx + tx,
            });
            self.buffer_bytes += rx + tx;
            listening += 1;
        }
    }

    /// The buffer sizes of the next socket: the largest tier the budget's share
    /// and `spare` heap bytes allow.
    fn next_buffers(&self, spare: usize) -> Option<(usize, usize)> {
        BUFFER_TIERS.iter().find_map(|&(rx, tx, share)| {
            let fits = self.buffer_bytes + rx + tx <= share.of(self.budget) && rx + tx <= spare;
            fits.then_some((rx, tx))
        })
    }
}

/// Hands a listener whose handshake completed to the server as a new connection.
fn accept<B: Backend>(
    slot: &mut Slot,
    socket: &mut tcp::Socket<'static>,
    server: &mut Server<B>,
    accepted: &mut u64,
    now: Instant,
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
                since: now,
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
) -> bool {
    let mut moved = false;
    while socket.can_recv() && server.wants_input(id) {
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
    let Role::Serving { id, since, .. } = slot.role else {
        return false;
    };
    if server.negotiating(id) && now - since >= NEGOTIATION_LIMIT {
        // A FIN rather than a reset: the socket leaves the set before a reset would
        // be sent, and the peer must learn that the connection is over.
        socket.close();
        server.release(id);
        slot.role = Role::Closing { since: now };
        return true;
    }
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
