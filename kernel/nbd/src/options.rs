//! The handshake: client flags and option haggling up to `NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME`.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::backend::{Access, Backend, ExportHandle, ExportInfo, OpenError, Tls};
use crate::connection::{Connection, OpenExport, Phase, Shared};
use crate::contexts::OpenContexts;
use crate::reply::{info_reply, option_error, option_reply};
use crate::wire::*;

/// Option data larger than this is skipped and answered with `ERR_TOO_BIG` (names and
/// queries are at most 4096 bytes each).
pub const MAX_OPTION_DATA: u32 = 64 * 1024;

/// Largest request payload and read reply the server accepts (advertised).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Smallest addressable unit (advertised): clients align to it.
pub const MIN_BLOCK_SIZE: u32 = 512;

/// Context id given to `base:allocation` when a client selects it.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Export names in error messages are cut to this many characters.
const NAME_IN_MESSAGE: usize = 256;

impl Connection {
    pub(crate) fn on_client_flags(&mut self) {
        let flags = be_u32(&self.header);
        if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
            // The spec requires dropping a client that sets unknown flags.
            self.stop(true);
            return;
        }
        self.fixed_newstyle = flags & CLIENT_FIXED_NEWSTYLE != 0;
        self.no_zeroes = flags & CLIENT_NO_ZEROES != 0;
        self.phase = Phase::OptionHeader;
    }

    pub(crate) fn on_option_header<B: Backend>(&mut self, shared: &mut Shared<'_, B>) {
        let magic = be_u64(&self.header);
        let code = be_u32(&self.header[8..]);
        let len = be_u32(&self.header[12..]);
        if magic != IHAVEOPT || (!self.fixed_newstyle && code != OPT_EXPORT_NAME) {
            // Framing is lost, or a non-fixed-newstyle client sent something other than
            // EXPORT_NAME: the only answer the protocol allows is closing.
            self.stop(true);
        } else if len > MAX_OPTION_DATA {
            if code == OPT_EXPORT_NAME {
                self.stop(false);
            } else {
                self.phase = Phase::OptionSkip {
                    code,
                    remaining: u64::from(len),
                };
            }
        } else if len == 0 {
            self.on_option(code, &[], shared);
        } else {
            self.option_data = Vec::with_capacity(len as usize);
            self.phase = Phase::OptionData {
                code,
                len: len as usize,
            };
        }
    }

    pub(crate) fn option_too_big(&mut self, code: u32) {
        let message = format!("option data longer than {MAX_OPTION_DATA} bytes");
        option_error(&mut self.out, code, REP_ERR_TOO_BIG, &message);
    }

    pub(crate) fn on_option<B: Backend>(
        &mut self,
        code: u32,
        data: &[u8],
        shared: &mut Shared<'_, B>,
    ) {
        let tls = shared.backend.tls();
        if !self.tls_active
            && matches!(tls, Tls::Require(_))
            && code != OPT_STARTTLS
            && code != OPT_ABORT
        {
            if code == OPT_EXPORT_NAME {
                // No error reply exists for EXPORT_NAME: the spec says close.
                self.stop(false);
            } else {
                let message = "TLS is required: start it with NBD_OPT_STARTTLS first";
                option_error(&mut self.out, code, REP_ERR_TLS_REQD, message);
            }
            return;
        }
        match code {
            OPT_EXPORT_NAME => self.export_name(data, shared),
            OPT_ABORT => {
                option_reply(&mut self.out, code, REP_ACK, &[]);
                self.stop(false);
            }
            OPT_LIST => self.list(data, shared),
            OPT_STARTTLS => self.start_tls(data, tls),
            OPT_INFO | OPT_GO => self.info_or_go(code, data, shared),
            OPT_STRUCTURED_REPLY if !data.is_empty() => option_error(
                &mut self.out,
                code,
                REP_ERR_INVALID,
                "NBD_OPT_STRUCTURED_REPLY takes no data",
            ),
            OPT_STRUCTURED_REPLY => {
                self.structured = true;
                option_reply(&mut self.out, code, REP_ACK, &[]);
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(code, data, shared),
            OPT_EXTENDED_HEADERS => option_error(
                &mut self.out,
                code,
                REP_ERR_UNSUP,
                "extended headers are not supported by this server",
            ),
            _ => {
                let message = format!("option {code} is not supported by this server");
                option_error(&mut self.out, code, REP_ERR_UNSUP, &message);
            }
        }
    }

    /// `NBD_OPT_STARTTLS`: acknowledged in plaintext, then the server hands the
    /// connection's bytes to a TLS session; everything negotiated before is forgotten.
    fn start_tls(&mut self, data: &[u8], tls: Tls) {
        let (error, message) = match tls {
            Tls::Off => (REP_ERR_POLICY, "TLS is not enabled on this server"),
            _ if !data.is_empty() => (REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data"),
            _ if self.tls_active => (REP_ERR_INVALID, "TLS is already in use"),
            Tls::On(config) | Tls::Require(config) => {
                option_reply(&mut self.out, OPT_STARTTLS, REP_ACK, &[]);
                self.structured = false;
                self.meta = None;
                self.tls_pending = Some(config);
                return;
            }
        };
        option_error(&mut self.out, OPT_STARTTLS, error, message);
    }

    /// `NBD_OPT_EXPORT_NAME`: no way to report an error, so failures close.
    fn export_name<B: Backend>(&mut self, data: &[u8], shared: &mut Shared<'_, B>) {
        let Ok(name) = core::str::from_utf8(data) else {
            self.stop(false);
            return;
        };
        let Ok((_, access)) = self.permitted(name, shared.backend) else {
            self.stop(false);
            return;
        };
        let Ok((handle, mut info)) = shared.backend.open_by(name, &self.peer) else {
            self.stop(false);
            return;
        };
        info.read_only |= access == Access::ReadOnly;
        let Ok(contexts) = self.open_contexts(handle, &info, shared) else {
            shared.backend.close(handle, self.peer.address);
            self.stop(false);
            return;
        };
        let flags = self.transmission_flags(&info);
        self.out.push(&info.bytes().to_be_bytes());
        self.out.push(&flags.to_be_bytes());
        if !self.no_zeroes {
            self.out.push(&[0; 124]);
        }
        self.attach(handle, info, flags, contexts);
    }

    fn attach(
        &mut self,
        handle: ExportHandle,
        info: ExportInfo,
        flags: u16,
        contexts: OpenContexts,
    ) {
        self.export = Some(OpenExport {
            handle,
            info,
            flags,
            contexts,
        });
        self.phase = Phase::RequestHeader;
    }

    fn list<B: Backend>(&mut self, data: &[u8], shared: &mut Shared<'_, B>) {
        if !data.is_empty() {
            let message = "NBD_OPT_LIST takes no data";
            option_error(&mut self.out, OPT_LIST, REP_ERR_INVALID, message);
            return;
        }
        let exports = shared.backend.exports();
        let visible = exports
            .iter()
            .filter(|export| shared.backend.access(&export.name, &self.peer).admits());
        for export in visible {
            let mut entry = Vec::with_capacity(4 + export.name.len() + export.description.len());
            entry.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
            entry.extend_from_slice(export.name.as_bytes());
            entry.extend_from_slice(export.description.as_bytes());
            option_reply(&mut self.out, OPT_LIST, REP_SERVER, &entry);
        }
        option_reply(&mut self.out, OPT_LIST, REP_ACK, &[]);
    }

    fn info_or_go<B: Backend>(&mut self, code: u32, data: &[u8], shared: &mut Shared<'_, B>) {
        let (name, requests) = match parse_info_request(data) {
            Ok(parsed) => parsed,
            Err(message) => {
                option_error(&mut self.out, code, REP_ERR_INVALID, message);
                return;
            }
        };
        let (info, access) = match self.permitted(&name, shared.backend) {
            Ok(permitted) => permitted,
            Err((error, message)) => {
                option_error(&mut self.out, code, error, &message);
                return;
            }
        };
        let (handle, mut info) = if code == OPT_GO {
            match shared.backend.open_by(&name, &self.peer) {
                Ok((handle, info)) => (Some(handle), info),
                Err(OpenError::NotFound) => {
                    option_error(&mut self.out, code, REP_ERR_UNKNOWN, &not_present(&name));
                    return;
                }
                Err(OpenError::Refused(why)) => {
                    option_error(&mut self.out, code, REP_ERR_POLICY, &why);
                    return;
                }
            }
        } else {
            (None, info)
        };
        info.read_only |= access == Access::ReadOnly;
        let handle = match handle {
            Some(handle) => match self.open_contexts(handle, &info, shared) {
                Ok(contexts) => Some((handle, contexts)),
                Err(why) => {
                    shared.backend.close(handle, self.peer.address);
                    option_error(&mut self.out, code, REP_ERR_POLICY, &why);
                    return;
                }
            },
            None => None,
        };
        let flags = self.transmission_flags(&info);
        let mut export = [0u8; 10];
        export[..8].copy_from_slice(&info.bytes().to_be_bytes());
        export[8..].copy_from_slice(&flags.to_be_bytes());
        info_reply(&mut self.out, code, INFO_EXPORT, &export);
        if requests.contains(&INFO_NAME) || info.name != name {
            info_reply(&mut self.out, code, INFO_NAME, info.name.as_bytes());
        }
        if requests.contains(&INFO_DESCRIPTION) && !info.description.is_empty() {
            let description = info.description.as_bytes();
            info_reply(&mut self.out, code, INFO_DESCRIPTION, description);
        }
        let mut sizes = [0u8; 12];
        sizes[..4].copy_from_slice(&MIN_BLOCK_SIZE.to_be_bytes());
        sizes[4..8].copy_from_slice(&preferred_block_size(&info).to_be_bytes());
        sizes[8..].copy_from_slice(&MAX_PAYLOAD.to_be_bytes());
        info_reply(&mut self.out, code, INFO_BLOCK_SIZE, &sizes);
        option_reply(&mut self.out, code, REP_ACK, &[]);
        if let Some((handle, contexts)) = handle {
            self.attach(handle, info, flags, contexts);
        }
    }

    /// What this connection's client may do with the export a client calls `name`, or
    /// the error reply when it may not use it (or it does not exist): a hidden export
    /// gets the same reply as a missing one.
    pub(crate) fn permitted<B: Backend>(
        &self,
        name: &str,
        backend: &B,
    ) -> Result<(ExportInfo, Access), (u32, String)> {
        let Some(info) = backend.lookup(name) else {
            return Err((REP_ERR_UNKNOWN, not_present(name)));
        };
        match backend.access(&info.name, &self.peer) {
            Access::Hidden => Err((REP_ERR_UNKNOWN, not_present(name))),
            Access::Refused => Err((
                REP_ERR_POLICY,
                format!(
                    "access to export '{}' is denied to {}",
                    shorten(name),
                    self.peer.address.ip()
                ),
            )),
            access => Ok((info, access)),
        }
    }

    /// Transmission flags for `info` as this connection has negotiated so far.
    pub(crate) fn transmission_flags(&self, info: &ExportInfo) -> u16 {
        let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_CACHE;
        if self.structured {
            flags |= TFLAG_SEND_DF;
        }
        if info.multi_conn {
            flags |= TFLAG_CAN_MULTI_CONN;
        }
        if info.read_only {
            flags |= TFLAG_READ_ONLY;
        } else {
            if info.trim {
                flags |= TFLAG_SEND_TRIM;
            }
            if info.write_zeroes {
                flags |= TFLAG_SEND_WRITE_ZEROES;
                if info.fast_zero {
                    flags |= TFLAG_SEND_FAST_ZERO;
                }
            }
        }
        flags
    }
}

/// The preferred block size to advertise: a power of two between the minimum block
/// size and the maximum payload.
pub fn preferred_block_size(info: &ExportInfo) -> u32 {
    let wanted = info.preferred_block_size.clamp(MIN_BLOCK_SIZE, MAX_PAYLOAD);
    // The largest power of two dividing it (data block sizes need not be powers of two).
    1 << wanted.trailing_zeros()
}

/// Splits `NBD_OPT_INFO`/`NBD_OPT_GO` data into the export name and the info requests.
fn parse_info_request(data: &[u8]) -> Result<(String, Vec<u16>), &'static str> {
    const MALFORMED: &str = "malformed NBD_OPT_INFO/NBD_OPT_GO data";
    if data.len() < 6 {
        return Err(MALFORMED);
    }
    let name_len = be_u32(data) as usize;
    if name_len > data.len() - 6 {
        return Err(MALFORMED);
    }
    let name = &data[4..4 + name_len];
    let rest = &data[4 + name_len..];
    let count = usize::from(be_u16(rest));
    if rest.len() != 2 + 2 * count {
        return Err(MALFORMED);
    }
    let name = core::str::from_utf8(name).map_err(|_| "export name is not valid UTF-8")?;
    let requests = rest[2..]
        .as_chunks::<2>()
        .0
        .iter()
        .map(|code| u16::from_be_bytes(*code))
        .collect();
    Ok((String::from(name), requests))
}

/// Splits `NBD_OPT_{LIST,SET}_META_CONTEXT` data into the export name and the queries.
pub(crate) fn parse_meta_request(data: &[u8]) -> Result<(&str, Vec<&[u8]>), &'static str> {
    const MALFORMED: &str = "malformed metadata context request";
    let (name, mut rest) = take_string(data).ok_or(MALFORMED)?;
    if rest.len() < 4 {
        return Err(MALFORMED);
    }
    let count = be_u32(rest);
    rest = &rest[4..];
    let mut queries = Vec::new();
    for _ in 0..count {
        let (query, after) = take_string(rest).ok_or(MALFORMED)?;
        queries.push(query);
        rest = after;
    }
    if !rest.is_empty() {
        return Err(MALFORMED);
    }
    let name = core::str::from_utf8(name).map_err(|_| "export name is not valid UTF-8")?;
    Ok((name, queries))
}

/// A 4-byte length followed by that many bytes; returns them and what follows.
fn take_string(data: &[u8]) -> Option<(&[u8], &[u8])> {
    if data.len() < 4 {
        return None;
    }
    let len = be_u32(data) as usize;
    let rest = &data[4..];
    (len <= rest.len()).then(|| rest.split_at(len))
}

/// The reply text for an export that does not exist (or is hidden).
fn not_present(name: &str) -> String {
    format!("export '{}' not present", shorten(name))
}

/// A name short enough to quote in an error message.
pub(crate) fn shorten(name: &str) -> &str {
    match name.char_indices().nth(NAME_IN_MESSAGE) {
        Some((end, _)) => &name[..end],
        None => name,
    }
}
