//! Many connections, one backend: the transport-agnostic server.
//!
//! A transport (smoltcp sockets in the kernel, std TCP on the host) owns the sockets
//! and moves bytes: it calls [`Server::connect`] for each accepted connection, offers
//! received bytes to [`Server::receive`] (which may take fewer when the connection is
//! busy), sends what [`Server::output`] yields and reports it with
//! [`Server::consume_output`], and calls [`Server::poll`] to move requests to the
//! backend and completions back. Nothing here blocks.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::net::SocketAddr;

use crate::backend::{Access, Backend, QueueFull, TlsFailure};
use crate::budget::{MemoryBudget, MemoryUse};
use crate::connection::{Connection, Ending, Limits, Shared};
use crate::tls::TlsSession;

/// Names one connection of a [`Server`]; never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnectionId(u64);

/// An NBD server over any [`Backend`].
pub struct Server<B> {
    backend: B,
    limits: Limits,
    connections: BTreeMap<ConnectionId, Connection>,
    /// The TLS session of every connection that started one.
    sessions: BTreeMap<ConnectionId, TlsSession>,
    /// Which connection each request in the backend belongs to, by tag.
    routes: BTreeMap<u64, ConnectionId>,
    next_connection: u64,
    next_tag: u64,
    /// The connection whose request the backend last refused goes first next time.
    submit_first: ConnectionId,
    shutting_down: bool,
    /// The backend's access generation the open connections were last checked at.
    access_generation: u64,
    /// Memory all connections may hold; `others` is set whenever it is lent.
    memory: MemoryBudget,
    /// Bytes all connections hold (exact after each poll, kept current in between).
    held: usize,
    /// The parked connection that gets memory first next time.
    resume_first: ConnectionId,
}

impl<B: Backend> Server<B> {
    pub fn new(backend: B, limits: Limits) -> Self {
        Server {
            access_generation: backend.access_generation(),
            backend,
            limits,
            connections: BTreeMap::new(),
            sessions: BTreeMap::new(),
            routes: BTreeMap::new(),
            next_connection: 0,
            next_tag: 0,
            submit_first: ConnectionId(0),
            shutting_down: false,
            memory: MemoryBudget::new(),
            held: 0,
            resume_first: ConnectionId(0),
        }
    }

    /// Bounds the bytes all connections together hold in request buffers and queued
    /// replies (no bound unless set). A read or write that does not fit waits, its
    /// connection parked, until completions free memory; one larger than the bound
    /// with nothing else held is refused with `ENOMEM`. The transport may change
    /// the bound at any time, e.g. from the free memory it sees.
    pub fn set_memory_limit(&mut self, bytes: usize) {
        self.memory.limit = bytes;
    }

    /// What connections hold now and how often requests waited for memory.
    pub fn memory_use(&self) -> MemoryUse {
        MemoryUse {
            held: self.held,
            limit: self.memory.limit,
            waiting: self
                .connections
                .values()
                .filter(|connection| connection.awaiting_memory())
                .count(),
            waits: self.memory.waits,
            refused: self.memory.refused,
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, e.g. for the management plane to add or remove exports.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// A client connected from `peer`; its greeting is queued as output.
    pub fn connect(&mut self, peer: SocketAddr) -> ConnectionId {
        let id = ConnectionId(self.next_connection);
        self.next_connection += 1;
        let mut connection = Connection::new(peer);
        if self.shutting_down {
            connection.stop(false);
        }
        self.connections.insert(id, connection);
        id
    }

    /// Offers received bytes; returns how many were taken. The rest must be offered
    /// again later (after [`Server::poll`] made room).
    pub fn receive(&mut self, id: ConnectionId, data: &[u8]) -> usize {
        let limits = self.limits;
        let mut session = self.sessions.remove(&id);
        let before = session.as_ref().map_or(0, TlsSession::footprint);
        let used = self
            .with_memory(id, before, |connection, shared| {
                if let Some(session) = session.as_mut() {
                    return session.receive(data, connection, &limits, shared);
                }
                let used = connection.receive(data, &limits, shared);
                let Some(config) = connection.tls_pending.take() else {
                    return used;
                };
                let Ok(mut started) = TlsSession::new(config, &mut connection.out) else {
                    connection.stop(true);
                    return data.len();
                };
                connection.tls_active = true;
                let rest = started.receive(&data[used..], connection, &limits, shared);
                session = Some(started);
                used + rest
            })
            .unwrap_or(0);
        if let Some(session) = session {
            self.held += session.footprint();
            self.sessions.insert(id, session);
        }
        used
    }

    /// Runs `work` on connection `id` with the memory budget lent to it, and keeps
    /// the held total current but for the connection's TLS session, whose
    /// `session_bytes` (before the work) the caller adds back as they are after it;
    /// a request it parks counts as a wait.
    fn with_memory<R>(
        &mut self,
        id: ConnectionId,
        session_bytes: usize,
        work: impl FnOnce(&mut Connection, &mut Shared<'_, B>) -> R,
    ) -> Option<R> {
        let connection = self.connections.get_mut(&id)?;
        let parked = connection.awaiting_memory();
        self.memory.others = self
            .held
            .saturating_sub(connection.footprint())
            .saturating_sub(session_bytes);
        let mut shared = Shared {
            backend: &mut self.backend,
            next_tag: &mut self.next_tag,
            memory: &mut self.memory,
        };
        let result = work(connection, &mut shared);
        if !parked && connection.awaiting_memory() {
            self.memory.waits += 1;
        }
        self.held = self.memory.others + connection.footprint();
        Some(result)
    }

    /// Whether the connection takes input now (false while it is back-pressured or
    /// ending): a transport need not read its socket otherwise.
    pub fn wants_input(&self, id: ConnectionId) -> bool {
        let session_wants = self.sessions.get(&id).is_none_or(TlsSession::wants_input);
        session_wants
            && self
                .connections
                .get(&id)
                .is_some_and(|connection| connection.wants_input(&self.limits))
    }

    /// The bytes waiting to be sent, in order, as consecutive slices (ciphertext once
    /// the connection has started TLS).
    pub fn output(&self, id: ConnectionId) -> impl Iterator<Item = &[u8]> {
        let session = self.sessions.get(&id);
        let plain = self.connections.get(&id).filter(|_| session.is_none());
        let encrypted = session
            .map(TlsSession::output)
            .filter(|bytes| !bytes.is_empty());
        plain
            .into_iter()
            .flat_map(|connection| connection.out.chunks())
            .chain(encrypted)
    }

    /// Number of bytes waiting to be sent.
    pub fn output_len(&self, id: ConnectionId) -> usize {
        if let Some(session) = self.sessions.get(&id) {
            return session.output().len();
        }
        self.connections
            .get(&id)
            .map_or(0, |connection| connection.out.len())
    }

    /// `count` bytes from the front of [`Server::output`] were sent.
    pub fn consume_output(&mut self, id: ConnectionId, count: usize) {
        if let Some(session) = self.sessions.get_mut(&id) {
            session.consume_output(count);
        } else if let Some(connection) = self.connections.get_mut(&id) {
            connection.out.consume(count);
            self.held = self.held.saturating_sub(count);
        }
    }

    /// Whether the connection is still negotiating: no export chosen yet, TLS
    /// handshake included, and not ending. A transport bounds how long that may take.
    pub fn negotiating(&self, id: ConnectionId) -> bool {
        self.connections.get(&id).is_some_and(|connection| {
            connection.export.is_none() && connection.ending == Ending::No
        })
    }

    /// The peer closed its sending side: requests already received are finished and
    /// answered, then the connection ends. A client that leaves in the middle of its
    /// TLS handshake is reported as a failed session: GnuTLS clients that do not trust
    /// the server's certificate just close the connection.
    pub fn peer_closed(&mut self, id: ConnectionId) {
        let Some(connection) = self.connections.get_mut(&id) else {
            return;
        };
        let handshaking = self.sessions.get(&id).is_some_and(TlsSession::handshaking);
        if handshaking && connection.ending == Ending::No {
            let failure = TlsFailure {
                handshaking: true,
                reason: String::from(
                    "the client closed the connection (a client that does not trust the \
                     server's certificate may do that)",
                ),
            };
            self.backend.tls_failed(connection.peer.address, &failure);
        }
        connection.stop(false);
    }

    /// The transport should close the socket: the connection has ended and everything
    /// it had to say has been sent.
    pub fn should_close(&self, id: ConnectionId) -> bool {
        let Some(connection) = self.connections.get(&id) else {
            return true;
        };
        let unsent = self
            .sessions
            .get(&id)
            .is_some_and(|session| !session.output().is_empty());
        connection.finished() && (connection.ending == Ending::Now || !unsent)
    }

    /// The transport has closed the socket (normally, or because it failed). Requests
    /// in the backend finish unanswered; the export is closed once they have.
    pub fn release(&mut self, id: ConnectionId) {
        if let Some(connection) = self.connections.get_mut(&id) {
            connection.detach();
        }
        self.sessions.remove(&id);
        self.reap();
    }

    /// Moves queued requests to the backend and completions back to their
    /// connections. Returns whether anything happened.
    pub fn poll(&mut self) -> bool {
        let mut progress = self.check_access();
        progress |= self.submit();
        while let Some(done) = self.backend.poll() {
            progress = true;
            let Some(id) = self.routes.remove(&done.tag) else {
                continue;
            };
            if let Some(connection) = self.connections.get_mut(&id) {
                connection.complete(done.tag, done.result);
            }
        }
        progress |= self.exchange_tls();
        self.reap();
        for connection in self.connections.values_mut() {
            if connection.in_flight.is_empty() && connection.out.is_empty() {
                connection.out.release_spares();
            }
        }
        let connections: usize = self.connections.values().map(Connection::footprint).sum();
        let sessions: usize = self.sessions.values().map(TlsSession::footprint).sum();
        self.held = connections + sessions;
        progress |= self.resume_parked();
        progress
    }

    /// Gives freed memory to parked connections, taking turns across polls.
    fn resume_parked(&mut self) -> bool {
        let mut ids: Vec<ConnectionId> = self
            .connections
            .iter()
            .filter(|(_, connection)| connection.awaiting_memory())
            .map(|(id, _)| *id)
            .collect();
        let first = ids.iter().position(|id| *id >= self.resume_first);
        ids.rotate_left(first.unwrap_or(0));
        let mut progress = false;
        for id in ids {
            let session_bytes = self.sessions.get(&id).map_or(0, TlsSession::footprint);
            let resumed = self.with_memory(id, session_bytes, |connection, shared| {
                connection.resume(shared);
                !connection.awaiting_memory()
            });
            self.held += session_bytes;
            if resumed == Some(true) {
                progress = true;
                self.resume_first = ConnectionId(id.0 + 1);
            }
        }
        progress
    }

    /// Encrypts what TLS connections have to say and hands them the plaintext they
    /// could not take before. Returns whether anything moved.
    fn exchange_tls(&mut self) -> bool {
        let limits = self.limits;
        let ids: Vec<ConnectionId> = self.sessions.keys().copied().collect();
        let mut progress = false;
        for id in ids {
            let Some(mut session) = self.sessions.remove(&id) else {
                continue;
            };
            progress |= self
                .with_memory(id, session.footprint(), |connection, shared| {
                    session.exchange(connection, &limits, shared)
                })
                .unwrap_or(false);
            self.held += session.footprint();
            self.sessions.insert(id, session);
        }
        progress
    }

    /// Stops taking requests: every connection finishes what it has received, sends
    /// its replies and ends; new connections end after the greeting.
    pub fn shut_down(&mut self) {
        self.shutting_down = true;
        for connection in self.connections.values_mut() {
            connection.stop(false);
        }
    }

    /// Connections not yet released, plus released ones still waiting for the backend.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Requests handed to the backend since start-up (each took the next tag).
    pub fn requests_taken(&self) -> u64 {
        self.next_tag
    }

    /// Requests handed to the backend and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.routes.len()
    }

    /// After the backend's access rules changed: every connection whose client lost
    /// what its export was opened with (all access, or writing) stops taking requests,
    /// finishes the ones it has and closes. Returns whether any did.
    fn check_access(&mut self) -> bool {
        let generation = self.backend.access_generation();
        if generation == self.access_generation {
            return false;
        }
        self.access_generation = generation;
        let mut closed = false;
        for connection in self.connections.values_mut() {
            let Some(export) = &connection.export else {
                continue;
            };
            let keeps = match self.backend.open_access(export.handle, &connection.peer) {
                Access::ReadWrite => true,
                Access::ReadOnly => export.info.read_only,
                Access::Refused | Access::Hidden => false,
            };
            if !keeps && connection.ending == Ending::No {
                connection.stop(false);
                closed = true;
            }
        }
        closed
    }

    /// Submits queued requests, one per connection in turn, until the backend is full.
    fn submit(&mut self) -> bool {
        let mut ids: Vec<ConnectionId> = self
            .connections
            .iter()
            .filter(|(_, connection)| !connection.queued.is_empty())
            .map(|(id, _)| *id)
            .collect();
        let first = ids.iter().position(|id| *id >= self.submit_first);
        ids.rotate_left(first.unwrap_or(0));
        let mut progress = false;
        let mut more = true;
        while more {
            more = false;
            for id in &ids {
                let Some(connection) = self.connections.get_mut(id) else {
                    continue;
                };
                let Some(request) = connection.queued.pop_front() else {
                    continue;
                };
                let tag = request.tag;
                match self.backend.submit(request) {
                    Ok(()) => {
                        self.routes.insert(tag, *id);
                        progress = true;
                        more = true;
                    }
                    Err(QueueFull(request)) => {
                        connection.queued.push_front(request);
                        self.submit_first = *id;
                        return progress;
                    }
                }
            }
        }
        progress
    }

    /// Forgets released connections whose requests have all come back, closing their
    /// exports.
    fn reap(&mut self) {
        let done: Vec<ConnectionId> = self
            .connections
            .iter()
            .filter(|(_, connection)| connection.detached && connection.in_flight.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            if let Some(connection) = self.connections.remove(&id)
                && let Some(export) = connection.export
            {
                for (_, context) in export.contexts.others {
                    self.backend.close_context(context);
                }
                self.backend.close(export.handle, connection.peer.address);
            }
        }
    }
}
