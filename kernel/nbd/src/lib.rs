//! NBD (Network Block Device) server, and the client the appliance imports with
//! ([`client`]).
//!
//! The protocol is a state machine over byte streams ([`Server`]): bytes in, bytes out,
//! no blocking, bounded memory per connection. It serves the exports of a [`Backend`],
//! which the management plane implements over thin volumes and linear regions; the
//! kernel drives it with smoltcp sockets, the host with std TCP ([`tcp`], feature
//! `std`). [`MemoryBackend`] is an in-memory reference backend with thin-volume
//! behaviour (holes, external origins, out-of-space) for tests and offline use.
//!
//! Spoken: fixed newstyle handshake with `NO_ZEROES`; options `EXPORT_NAME`, `LIST`,
//! `INFO`, `GO`, `ABORT`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and
//! `SET_META_CONTEXT` (`base:allocation` and whatever contexts the backend offers,
//! [`Backend::meta_contexts`]); `STARTTLS` as the backend's policy says ([`Tls`]:
//! off, on, or required before any other option) with rustls' sans-I/O server
//! session per connection; extended headers are unsupported. Commands `READ`, `WRITE`, `FLUSH`, `TRIM`,
//! `CACHE`, `WRITE_ZEROES` and `BLOCK_STATUS` with simple or structured replies,
//! completed out of order; `DISC`. The minimum block size is 512 bytes and the maximum
//! payload 32 MiB; a write longer than that has its payload skipped and gets `EINVAL`.
//!
//! Every connection knows its peer's address (and, over TLS with client certificates,
//! the certificate the client proved it holds), and the backend decides per export and
//! peer what it may do ([`Access`]): exports a client may not use are left out of its
//! list and refused (or reported missing) when it asks for them, read-only grants are
//! served read-only, and when the rules change every open connection is checked again.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

mod backend;
mod budget;
pub mod client;
mod connection;
mod contexts;
mod memory;
mod options;
mod output;
mod reply;
mod requests;
mod server;
#[cfg(feature = "std")]
pub mod tcp;
mod tls;
pub mod wire;

pub use backend::{
    Access, Backend, BackendError, ContextHandle, ExportHandle, ExportInfo, IoCompletion, IoOp,
    IoOutput, IoRequest, OpenError, Peer, QueueFull, Tls, TlsFailure,
};
pub use blockdev::{Extent, SectorRun};
pub use budget::MemoryUse;
pub use connection::Limits;
pub use memory::{CompletionOrder, MemoryBackend, MemoryExport, MemoryStats};
pub use options::{MAX_OPTION_DATA, MAX_PAYLOAD, MIN_BLOCK_SIZE};
pub use requests::MAX_EXTENTS;
pub use rustls;
pub use server::{ConnectionId, Server};
