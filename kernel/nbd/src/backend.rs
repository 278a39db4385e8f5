//! What the server needs from whatever holds the data: the [`Backend`] trait.
//!
//! The device mapper (`dm`: thin volumes of a pool, linear regions of disks)
//! implements it. The server never touches data itself:
//! it turns NBD requests into [`IoOp`]s, submits them with a tag of its choosing and
//! routes each [`IoCompletion`] back to the connection that asked, so one backend serves
//! every connection and completions may arrive in any order.
//!
//! Addresses and lengths are in 512-byte sectors, like [`blockdev`]: the server
//! advertises a minimum block size of 512 and rejects unaligned requests itself.

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use blockdev::{Extent, IoBuf, IoError, SectorRun};
use core::net::SocketAddr;
use rustls::ServerConfig;

/// Description of one export, as listed to clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Canonical name (what `NBD_OPT_LIST` shows and `NBD_INFO_NAME` returns).
    pub name: String,
    /// Free text for `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`; may be empty.
    pub description: String,
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// Writes, trims and write-zeroes fail with EPERM and the export is advertised
    /// read-only.
    pub read_only: bool,
    /// Size and alignment, in bytes, that avoid read-modify-write in the backend (e.g.
    /// the largest power of two dividing a pool's data block size). The server rounds
    /// it to a power of two between 512 bytes and the maximum payload.
    pub preferred_block_size: u32,
    /// [`IoOp::Trim`] does something useful (advertised as `SEND_TRIM`).
    pub trim: bool,
    /// [`IoOp::WriteZeroes`] is supported (advertised as `SEND_WRITE_ZEROES`).
    pub write_zeroes: bool,
    /// [`IoOp::WriteZeroes`] honours `fast_only` (advertised as `SEND_FAST_ZERO`).
    pub fast_zero: bool,
    /// A flush on one connection makes writes completed on every connection durable:
    /// true when all connections share one engine and no per-connection cache exists
    /// (advertised as `CAN_MULTI_CONN`).
    pub multi_conn: bool,
}

impl ExportInfo {
    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.sectors * blockdev::SECTOR_SIZE as u64
    }
}

/// The backend's name for an open export; returned by [`Backend::open`] and passed back
/// with every request on that connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExportHandle(pub u64);

/// The backend's name for a metadata context (other than `base:allocation`) opened
/// for one connection; returned by [`Backend::open_context`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ContextHandle(pub u64);

/// Why an export could not be opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenError {
    /// No export has that name (any more).
    NotFound,
    /// The export exists but may not be opened now; the text tells the client why.
    Refused(String),
}

/// What one client may do with one export, as the backend's access rules decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read and write, as far as the export itself allows.
    ReadWrite,
    /// Served with `NBD_FLAG_READ_ONLY`; writes, trims and write-zeroes fail with
    /// `EPERM`.
    ReadOnly,
    /// Left out of `NBD_OPT_LIST`; `NBD_OPT_INFO`/`NBD_OPT_GO` fail with
    /// `NBD_REP_ERR_POLICY`.
    Refused,
    /// Refused, and the client is told the export does not exist
    /// (`NBD_REP_ERR_UNKNOWN`), so it learns nothing about it.
    Hidden,
}

impl Access {
    /// The client may open the export.
    pub fn admits(self) -> bool {
        matches!(self, Access::ReadWrite | Access::ReadOnly)
    }
}

/// One operation on an open export.
#[derive(Debug)]
pub enum IoOp {
    /// Fill `buf` from `sector` on.
    Read { sector: u64, buf: IoBuf },
    /// Store `buf` at `sector`; with `fua` complete only once the data (and any mapping
    /// the write created) is durable.
    Write { sector: u64, buf: IoBuf, fua: bool },
    /// Make every write that completed before this was submitted durable.
    Flush,
    /// The range is no longer needed; the backend may unmap all, part or none of it.
    Trim {
        sector: u64,
        sectors: u64,
        fua: bool,
    },
    /// Make the range read as zeroes. `may_unmap`: holes may be punched (false means
    /// the range must end up allocated). `fast_only`: fail with
    /// [`BackendError::NotFast`] unless zeroing is cheaper than writing, leaving the
    /// contents unchanged.
    WriteZeroes {
        sector: u64,
        sectors: u64,
        fua: bool,
        may_unmap: bool,
        fast_only: bool,
    },
    /// Hint: the range will be read soon. May do nothing.
    Cache { sector: u64, sectors: u64 },
    /// Report `base:allocation` status from `sector` on: consecutive [`Extent`]s, at
    /// most `max_extents` of them, covering at least one sector. The last one may run
    /// past the requested range.
    BlockStatus {
        sector: u64,
        sectors: u64,
        max_extents: u32,
    },
}

/// A request as submitted: the server's tag, the export it targets, the operation.
#[derive(Debug)]
pub struct IoRequest {
    /// Chosen by the server, unique among its requests in flight; only echoed.
    pub tag: u64,
    pub export: ExportHandle,
    pub op: IoOp,
}

/// The backend cannot take more requests now; the request is handed back unchanged.
#[derive(Debug)]
pub struct QueueFull(pub IoRequest);

/// A finished request.
#[derive(Debug)]
pub struct IoCompletion {
    pub tag: u64,
    pub result: Result<IoOutput, BackendError>,
}

/// What a successful request produced.
#[derive(Debug)]
pub enum IoOutput {
    /// Reads: the data, plus the runs that are known to read as zeroes because nothing
    /// is allocated there (so structured replies can send them as holes without the
    /// server racing a concurrent write by asking separately). Every byte of `buf`
    /// holds the data, zero runs included.
    Read {
        buf: IoBuf,
        zero_holes: Vec<SectorRun>,
    },
    /// Block status: consecutive extents starting at the requested sector.
    Extents(Vec<Extent>),
    /// Everything else.
    Done,
}

/// Why a request failed; the server maps each to an NBD error value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendError {
    /// Media or engine failure (`EIO`); the text goes to the client.
    Io(&'static str),
    /// Out of data space (`ENOSPC`).
    NoSpace,
    /// The export is read-only (`EPERM`).
    ReadOnly,
    /// The request is invalid for this export (`EINVAL`), e.g. past its end.
    Invalid,
    /// Fast zeroing is not possible for this range (`ENOTSUP`).
    NotFast,
    /// The export was removed while the client was connected (`ESHUTDOWN`).
    Gone,
}

impl BackendError {
    /// The NBD error value sent to the client.
    pub fn nbd_error(self) -> u32 {
        use crate::wire::{EINVAL, EIO, ENOSPC, ENOTSUP, EPERM, ESHUTDOWN};
        match self {
            BackendError::Io(_) => EIO,
            BackendError::NoSpace => ENOSPC,
            BackendError::ReadOnly => EPERM,
            BackendError::Invalid => EINVAL,
            BackendError::NotFast => ENOTSUP,
            BackendError::Gone => ESHUTDOWN,
        }
    }

    /// Human-readable explanation for structured error replies.
    pub fn message(self) -> &'static str {
        match self {
            BackendError::Io(what) => what,
            BackendError::NoSpace => "no space left in the pool",
            BackendError::ReadOnly => "export is read-only",
            BackendError::Invalid => "request is invalid for this export",
            BackendError::NotFast => "zeroing this range is not faster than writing it",
            BackendError::Gone => "export was removed",
        }
    }
}

/// Block-device errors from the layers below map onto the NBD ones.
impl From<IoError> for BackendError {
    fn from(error: IoError) -> Self {
        match error {
            IoError::OutOfRange | IoError::TooLarge | IoError::Unsupported => BackendError::Invalid,
            IoError::ReadOnly => BackendError::ReadOnly,
            IoError::NoSpace => BackendError::NoSpace,
            IoError::Gone => BackendError::Gone,
            IoError::Device(what) => BackendError::Io(what),
        }
    }
}

/// The server's TLS policy, with the configuration it offers.
#[derive(Clone, Debug, Default)]
pub enum Tls {
    /// `NBD_OPT_STARTTLS` is refused by policy.
    #[default]
    Off,
    /// Clients may start TLS.
    On(Arc<ServerConfig>),
    /// Clients must start TLS before anything else: every other option is answered
    /// `NBD_REP_ERR_TLS_REQD` (as qemu-nbd's `--tls-creds` does).
    Require(Arc<ServerConfig>),
}

/// Who a connection's client is: the address it connects from and, once it has
/// proven over TLS that it holds one, its certificate (DER, as the TLS
/// configuration's client verifier accepted it). Without client certificates, or
/// before TLS, there is only the address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub address: SocketAddr,
    pub certificate: Option<Arc<[u8]>>,
}

impl Peer {
    /// A client known by its address alone.
    pub fn at(address: SocketAddr) -> Peer {
        Peer {
            address,
            certificate: None,
        }
    }
}

/// Why a TLS session failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFailure {
    /// The handshake was not done yet (so the client got no further than TLS).
    pub handshaking: bool,
    /// rustls' account of the error, e.g. "invalid peer certificate: UnknownIssuer".
    pub reason: String,
}

/// Whatever holds the exports: one instance serves every connection.
pub trait Backend {
    /// Every export on offer now, in listing order.
    fn exports(&self) -> Vec<ExportInfo>;

    /// The export a client names, if it exists. The empty name is the default export,
    /// if the backend has one.
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.exports()
            .into_iter()
            .find(|export| export.name == name)
    }

    /// What the client `peer` may do with the export called `name` (its canonical
    /// name). Everything, unless the backend keeps access rules.
    fn access(&self, name: &str, peer: &Peer) -> Access {
        let _ = (name, peer);
        Access::ReadWrite
    }

    /// What the client `peer` may now do with an export it has open: asked again for
    /// every open connection whenever [`Backend::access_generation`] changes, and a
    /// connection that lost what it was given is closed.
    fn open_access(&self, export: ExportHandle, peer: &Peer) -> Access {
        let _ = (export, peer);
        Access::ReadWrite
    }

    /// Changes whenever the access rules change.
    fn access_generation(&self) -> u64 {
        0
    }

    /// Whether clients may or must switch to TLS (`NBD_OPT_STARTTLS`), asked at every
    /// option a client sends before it has: a change applies to connections still
    /// haggling.
    fn tls(&self) -> Tls {
        Tls::Off
    }

    /// The TLS session with the client at `peer` failed and the connection is being
    /// closed: `failure` says why (rustls' words: a refused client certificate, a
    /// protocol error, an alert the client sent). For the operator; ignored by default.
    fn tls_failed(&mut self, peer: SocketAddr, failure: &TlsFailure) {
        let _ = (peer, failure);
    }

    /// Opens an export for the client at `peer`. The returned info is what the client
    /// is told (the server keeps it for the connection's lifetime).
    fn open(
        &mut self,
        name: &str,
        peer: SocketAddr,
    ) -> Result<(ExportHandle, ExportInfo), OpenError>;

    /// Opens an export for the client `peer`: what the server calls. A backend that
    /// shows who has its exports open overrides it to keep the client's certificate
    /// too; by default it is [`Backend::open`] with the peer's address.
    fn open_by(
        &mut self,
        name: &str,
        peer: &Peer,
    ) -> Result<(ExportHandle, ExportInfo), OpenError> {
        self.open(name, peer.address)
    }

    /// The connection from `peer` is gone and none of its requests is in flight any
    /// more.
    fn close(&mut self, export: ExportHandle, peer: SocketAddr);

    /// Queues a request. Invalid requests (including requests on an export removed
    /// since it was opened, which fail with [`BackendError::Gone`]) are accepted and
    /// complete with an error; only a full queue refuses.
    fn submit(&mut self, request: IoRequest) -> Result<(), QueueFull>;

    /// One finished request, if any, without blocking; any order.
    fn poll(&mut self) -> Option<IoCompletion>;

    /// Metadata contexts export `export` offers besides `base:allocation`, as full
    /// names (`namespace:leaf`). The server lists and selects among them.
    fn meta_contexts(&self, export: &str) -> Vec<String> {
        let _ = export;
        Vec::new()
    }

    /// Opens context `name` (one [`Backend::meta_contexts`] offered) for a
    /// connection that has just opened `export`: whatever the context shows is
    /// fixed now, for the connection's life. The error text refuses the export.
    fn open_context(&mut self, export: ExportHandle, name: &str) -> Result<ContextHandle, String> {
        let _ = export;
        Err(alloc::format!("metadata context {name} is not available"))
    }

    /// The connection that opened `context` is gone.
    fn close_context(&mut self, context: ContextHandle) {
        let _ = context;
    }

    /// Block status of an opened context from `sector` on, answered at once:
    /// consecutive extents `(sectors, status flags)` given to `extent`, at least one
    /// and at most `max_extents`; the last may run past `sector + sectors`.
    fn context_status(
        &mut self,
        context: ContextHandle,
        sector: u64,
        sectors: u64,
        max_extents: u32,
        extent: &mut dyn FnMut(u64, u32),
    ) -> Result<(), BackendError> {
        let _ = (context, sector, sectors, max_extents, extent);
        Err(BackendError::Invalid)
    }
}
