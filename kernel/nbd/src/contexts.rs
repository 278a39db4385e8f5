//! Metadata contexts: `base:allocation` (answered through the backend's request
//! queue like any I/O) and the contexts the backend offers besides it
//! ([`Backend::meta_contexts`], answered at once). LIST and SET queries, opening the
//! selected contexts when the export is opened, and their BLOCK_STATUS chunks.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::backend::{Backend, BackendError, ContextHandle, ExportHandle, ExportInfo};
use crate::connection::{Connection, Shared};
use crate::options::{BASE_ALLOCATION_ID, parse_meta_request};
use crate::reply::{chunk_header, option_error, option_reply};
use crate::wire::*;

const SECTOR: u64 = blockdev::SECTOR_SIZE as u64;

/// Most contexts one connection may select (each may pin state in the backend).
pub const MAX_CONTEXTS: usize = 16;

/// What the last `NBD_OPT_SET_META_CONTEXT` selected.
pub(crate) struct Selection {
    /// Canonical name of the export it named.
    pub export: String,
    pub base_allocation: bool,
    /// The backend's contexts, in id order from `BASE_ALLOCATION_ID + 1`.
    pub others: Vec<String>,
}

/// The contexts open on an attached export.
#[derive(Default)]
pub(crate) struct OpenContexts {
    pub base_allocation: bool,
    /// Context id and the backend's handle.
    pub others: Vec<(u32, ContextHandle)>,
}

impl OpenContexts {
    pub fn any(&self) -> bool {
        self.base_allocation || !self.others.is_empty()
    }
}

/// Whether context `name` answers `query`. LIST takes a query ending in `:` as a
/// prefix (`base:`, `thinbox:changed:`); SET takes exact names only.
fn answers(query: &[u8], name: &str, list: bool) -> bool {
    query == name.as_bytes()
        || (list && query.last() == Some(&b':') && name.as_bytes().starts_with(query))
}

impl Connection {
    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
    pub(crate) fn meta_context<B: Backend>(
        &mut self,
        code: u32,
        data: &[u8],
        shared: &mut Shared<'_, B>,
    ) {
        let set = code == OPT_SET_META_CONTEXT;
        if set {
            // Every SET replaces the selection, even one that fails.
            self.meta = None;
        }
        if !self.structured {
            let message = "negotiate structured replies before metadata contexts";
            option_error(&mut self.out, code, REP_ERR_INVALID, message);
            return;
        }
        let (name, queries) = match parse_meta_request(data) {
            Ok(parsed) => parsed,
            Err(message) => {
                option_error(&mut self.out, code, REP_ERR_INVALID, message);
                return;
            }
        };
        let info = match self.permitted(name, shared.backend) {
            Ok((info, _)) => info,
            Err((error, message)) => {
                option_error(&mut self.out, code, error, &message);
                return;
            }
        };
        let mut available = shared.backend.meta_contexts(&info.name);
        available.insert(0, BASE_ALLOCATION.to_string());
        let chosen: Vec<&String> = available
            .iter()
            .filter(|name| {
                (!set && queries.is_empty()) || queries.iter().any(|q| answers(q, name, !set))
            })
            .collect();
        if set && chosen.len() > MAX_CONTEXTS {
            let message = format!("at most {MAX_CONTEXTS} metadata contexts per connection");
            option_error(&mut self.out, code, REP_ERR_TOO_BIG, &message);
            return;
        }
        let mut next_id = BASE_ALLOCATION_ID + 1;
        for context in &chosen {
            // LIST replies carry id 0; SET gives base:allocation its fixed id and the
            // others the ids `open_contexts` uses.
            let id = match (set, context.as_str()) {
                (false, _) => 0,
                (true, BASE_ALLOCATION) => BASE_ALLOCATION_ID,
                (true, _) => {
                    next_id += 1;
                    next_id - 1
                }
            };
            let mut reply = Vec::with_capacity(4 + context.len());
            reply.extend_from_slice(&id.to_be_bytes());
            reply.extend_from_slice(context.as_bytes());
            option_reply(&mut self.out, code, REP_META_CONTEXT, &reply);
        }
        if set {
            let base_allocation = chosen.first().is_some_and(|c| *c == BASE_ALLOCATION);
            let others = chosen[usize::from(base_allocation)..]
                .iter()
                .map(|c| (*c).clone())
                .collect();
            self.meta = Some(Selection {
                export: info.name,
                base_allocation,
                others,
            });
        }
        option_reply(&mut self.out, code, REP_ACK, &[]);
    }

    /// Opens the contexts the last SET selected, if it named the export `info`
    /// that `handle` has just opened. On failure nothing stays open.
    pub(crate) fn open_contexts<B: Backend>(
        &self,
        handle: ExportHandle,
        info: &ExportInfo,
        shared: &mut Shared<'_, B>,
    ) -> Result<OpenContexts, String> {
        let mut open = OpenContexts::default();
        let Some(selection) = self.meta.as_ref().filter(|s| s.export == info.name) else {
            return Ok(open);
        };
        if !self.structured {
            return Ok(open);
        }
        open.base_allocation = selection.base_allocation;
        for (index, name) in selection.others.iter().enumerate() {
            match shared.backend.open_context(handle, name) {
                Ok(context) => {
                    let id = BASE_ALLOCATION_ID + 1 + index as u32;
                    open.others.push((id, context));
                }
                Err(why) => {
                    for (_, context) in open.others {
                        shared.backend.close_context(context);
                    }
                    return Err(why);
                }
            }
        }
        Ok(open)
    }

    /// Writes one BLOCK_STATUS chunk per backend context for a request of `len`
    /// bytes at `sector`; the last carries DONE when `done` (no `base:allocation`
    /// chunk follows).
    pub(crate) fn context_chunks<B: Backend>(
        &mut self,
        cookie: u64,
        (sector, len): (u64, u32),
        max_extents: u32,
        done: bool,
        shared: &mut Shared<'_, B>,
    ) -> Result<(), BackendError> {
        let count = self.export.as_ref().map_or(0, |e| e.contexts.others.len());
        let mut descriptors = core::mem::take(&mut self.descriptors);
        for index in 0..count {
            let Some(&(id, context)) = self.export.as_ref().map(|e| &e.contexts.others[index])
            else {
                break;
            };
            descriptors.clear();
            let mut covered = 0u32;
            let mut stopped = false;
            let sectors = u64::from(len) / SECTOR;
            let mut extent = |extent_sectors: u64, flags: u32| {
                let piece = extent_sectors
                    .saturating_mul(SECTOR)
                    .min(u64::from(len - covered)) as u32;
                if piece == 0 || stopped {
                    return;
                }
                let full = descriptors.len() >= max_extents as usize;
                match descriptors.last_mut() {
                    Some((last, last_flags)) if *last_flags == flags => *last += piece,
                    _ if full => {
                        stopped = true;
                        return;
                    }
                    _ => descriptors.push((piece, flags)),
                }
                covered += piece;
            };
            let answered =
                shared
                    .backend
                    .context_status(context, sector, sectors, max_extents, &mut extent);
            if let Err(error) = answered {
                self.descriptors = descriptors;
                return Err(error);
            }
            if descriptors.is_empty() {
                self.descriptors = descriptors;
                return Err(BackendError::Io("metadata context reported no status"));
            }
            let flags = if done && index + 1 == count {
                REPLY_FLAG_DONE
            } else {
                0
            };
            let payload = 4 + 8 * descriptors.len() as u32;
            chunk_header(
                &mut self.out,
                cookie,
                flags,
                REPLY_TYPE_BLOCK_STATUS,
                payload,
            );
            self.out.push(&id.to_be_bytes());
            for (length, status) in &descriptors {
                self.out.push(&length.to_be_bytes());
                self.out.push(&status.to_be_bytes());
            }
        }
        self.descriptors = descriptors;
        Ok(())
    }
}
