//! Host transport: serves a [`Server`] over std TCP sockets (feature `std`).
//!
//! One thread runs everything: non-blocking sockets are watched with `mio`, bytes move
//! between sockets and the server until nothing moves, then the thread sleeps until a
//! socket becomes ready (or, while the backend holds requests, for at most a
//! millisecond, unless [`Controller::wake`] wakes it sooner, e.g. from a disk's
//! thread). Sockets use `TCP_NODELAY`.
//! Other threads act on the server through a [`Controller`].

use std::boxed::Box;
use std::collections::BTreeMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;
use std::vec::Vec;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::backend::Backend;
use crate::connection::Limits;
use crate::server::{ConnectionId, Server};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_SOCKET: usize = 2;
/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Slices handed to one vectored write.
const WRITE_SLICES: usize = 64;
/// Longest sleep while the backend holds requests.
const BACKEND_POLL: Duration = Duration::from_millis(1);

type Job<B> = Box<dyn FnOnce(&mut Server<B>) + Send>;

enum Control<B> {
    Run(Job<B>),
    Stop,
}

/// Acts on a running [`TcpServer`] from other threads.
pub struct Controller<B> {
    jobs: Sender<Control<B>>,
    waker: Arc<Waker>,
}

impl<B> Clone for Controller<B> {
    fn clone(&self) -> Self {
        Controller {
            jobs: self.jobs.clone(),
            waker: Arc::clone(&self.waker),
        }
    }
}

impl<B: 'static> Controller<B> {
    /// Runs `job` on the server's thread (e.g. to add or remove exports) and returns
    /// its result; `None` if the server has stopped.
    pub fn with_server<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Server<B>) -> R + Send + 'static,
    ) -> Option<R> {
        let (reply, result) = sync_channel(1);
        let job: Job<B> = Box::new(move |server| {
            let _ = reply.send(job(server));
        });
        self.jobs.send(Control::Run(job)).ok()?;
        self.waker.wake().ok()?;
        result.recv().ok()
    }

    /// Makes the server's thread look at its backend now instead of after its poll
    /// interval (e.g. a disk finished a request on another thread).
    pub fn wake(&self) {
        let _ = self.waker.wake();
    }

    /// Makes [`TcpServer::run`] return, closing every connection.
    pub fn stop(&self) {
        let _ = self.jobs.send(Control::Stop);
        let _ = self.waker.wake();
    }
}

struct Socket {
    stream: TcpStream,
    id: ConnectionId,
    readable: bool,
    writable: bool,
    end_of_input: bool,
    input: Box<[u8]>,
    /// Received bytes the server has not taken yet: `input[start..end]`.
    start: usize,
    end: usize,
}

/// A TCP listener and its connections, serving one backend.
pub struct TcpServer<B> {
    server: Server<B>,
    listener: TcpListener,
    poll: Poll,
    sockets: BTreeMap<Token, Socket>,
    next_token: usize,
    jobs: Receiver<Control<B>>,
    controller: Controller<B>,
}

impl<B: Backend + 'static> TcpServer<B> {
    /// Listens on `address` (port 0 picks a free port).
    pub fn bind(address: SocketAddr, backend: B, limits: Limits) -> io::Result<Self> {
        let poll = Poll::new()?;
        let mut listener = TcpListener::bind(address)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (sender, jobs) = channel();
        Ok(TcpServer {
            server: Server::new(backend, limits),
            listener,
            poll,
            sockets: BTreeMap::new(),
            next_token: FIRST_SOCKET,
            jobs,
            controller: Controller {
                jobs: sender,
                waker,
            },
        })
    }

    /// Starts a server on its own thread, building the backend there (so it need not
    /// be `Send`). Returns the bound address, a controller and the thread.
    pub fn spawn(
        address: SocketAddr,
        make_backend: impl FnOnce() -> B + Send + 'static,
        limits: Limits,
    ) -> io::Result<(SocketAddr, Controller<B>, JoinHandle<io::Result<()>>)> {
        let (ready, started) = sync_channel(1);
        let thread = std::thread::spawn(move || {
            let server = match TcpServer::bind(address, make_backend(), limits) {
                Ok(server) => server,
                Err(error) => {
                    let kind = error.kind();
                    let _ = ready.send(Err(error));
                    return Err(kind.into());
                }
            };
            let _ = ready.send(server.local_addr().map(|addr| (addr, server.controller())));
            server.run()
        });
        let (addr, controller) = started
            .recv()
            .map_err(|_| io::Error::other("server thread died while starting"))??;
        Ok((addr, controller, thread))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn controller(&self) -> Controller<B> {
        self.controller.clone()
    }

    /// Serves until [`Controller::stop`] is called.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = (self.server.in_flight() > 0).then_some(BACKEND_POLL);
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept()?,
                    WAKER => {}
                    token => {
                        if let Some(socket) = self.sockets.get_mut(&token) {
                            socket.readable |= event.is_readable() || event.is_read_closed();
                            socket.writable |= event.is_writable() || event.is_write_closed();
                        }
                    }
                }
            }
            while let Ok(control) = self.jobs.try_recv() {
                match control {
                    Control::Run(job) => job(&mut self.server),
                    Control::Stop => return Ok(()),
                }
            }
            self.pump();
        }
    }

    fn accept(&mut self) -> io::Result<()> {
        loop {
            let (mut stream, peer) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                // A connection that failed while queued (e.g. reset) concerns nobody else.
                Err(error) if error.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(error) => return Err(error),
            };
            // Replies go out as soon as they are complete (see the NBD spec on Nagle).
            stream.set_nodelay(true)?;
            let token = Token(self.next_token);
            self.next_token += 1;
            self.poll.registry().register(
                &mut stream,
                token,
                Interest::READABLE | Interest::WRITABLE,
            )?;
            let id = self.server.connect(peer);
            self.sockets.insert(
                token,
                Socket {
                    stream,
                    id,
                    readable: true,
                    writable: true,
                    end_of_input: false,
                    input: std::vec![0; READ_CHUNK].into_boxed_slice(),
                    start: 0,
                    end: 0,
                },
            );
        }
    }

    /// Moves bytes and completions until nothing moves.
    fn pump(&mut self) {
        loop {
            let mut progress = false;
            let tokens: Vec<Token> = self.sockets.keys().copied().collect();
            for token in &tokens {
                progress |= self.read_socket(*token);
            }
            progress |= self.server.poll();
            for token in &tokens {
                progress |= self.write_socket(*token);
            }
            for token in tokens {
                let finished = self
                    .sockets
                    .get(&token)
                    .is_some_and(|socket| self.server.should_close(socket.id));
                if finished {
                    self.close(token);
                }
            }
            if !progress {
                return;
            }
        }
    }

    /// Offers buffered and newly read bytes to the server. Returns whether any moved.
    fn read_socket(&mut self, token: Token) -> bool {
        let Some(socket) = self.sockets.get_mut(&token) else {
            return false;
        };
        let mut progress = false;
        loop {
            if socket.start < socket.end {
                let taken = self
                    .server
                    .receive(socket.id, &socket.input[socket.start..socket.end]);
                socket.start += taken;
                progress |= taken > 0;
                if socket.start < socket.end {
                    return progress;
                }
            }
            if socket.end_of_input || !socket.readable || !self.server.wants_input(socket.id) {
                return progress;
            }
            match socket.stream.read(&mut socket.input) {
                Ok(0) => {
                    socket.end_of_input = true;
                    self.server.peer_closed(socket.id);
                    return true;
                }
                Ok(count) => {
                    socket.start = 0;
                    socket.end = count;
                    progress = true;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    socket.readable = false;
                    return progress;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(token);
                    return true;
                }
            }
        }
    }

    /// Sends what the server has queued. Returns whether any bytes moved.
    fn write_socket(&mut self, token: Token) -> bool {
        let Some(socket) = self.sockets.get_mut(&token) else {
            return false;
        };
        let mut progress = false;
        while socket.writable && self.server.output_len(socket.id) > 0 {
            let slices: Vec<IoSlice<'_>> = self
                .server
                .output(socket.id)
                .take(WRITE_SLICES)
                .map(IoSlice::new)
                .collect();
            match socket.stream.write_vectored(&slices) {
                Ok(0) => {
                    self.close(token);
                    return true;
                }
                Ok(count) => {
                    self.server.consume_output(socket.id, count);
                    progress = true;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    socket.writable = false;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(token);
                    return true;
                }
            }
        }
        progress
    }

    fn close(&mut self, token: Token) {
        if let Some(mut socket) = self.sockets.remove(&token) {
            let _ = self.poll.registry().deregister(&mut socket.stream);
            let _ = socket.stream.shutdown(Shutdown::Both);
            self.server.release(socket.id);
        }
    }
}
