//! An NBD server's export as the source of a copy, read over several connections
//! when the server allows it (`NBD_FLAG_CAN_MULTI_CONN`, as `nbdcopy` does): the
//! first connection's handshake learns the export, then [`CONNECTIONS`] − 1 more are
//! opened; each read goes to the ready connection with the fewest requests in
//! flight (at most [`PER_CONNECTION`] each, so the first does not take every read
//! while the others are in their handshake), block status to the first. Where a read came back from does not matter
//! to the checkpoints: the copy saves one only when every read and write below it
//! has finished (see `copy`), whichever connection carried them.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use blockdev::IoBuf;
use nbd::client::{Client, Connection, NbdUri, RemoteExport, Reply, Stream};
use nbd::wire::{STATE_ZERO, TFLAG_CAN_MULTI_CONN};

use super::Connector;
use super::source::{Answer, Run};

/// Connections to a server that allows several (`nbdcopy` opens as many).
pub(crate) const CONNECTIONS: usize = 4;
/// Requests in flight on one of several connections.
const PER_CONNECTION: usize = 16;

/// The export of an NBD server, over one or more connections.
pub(crate) struct Remote {
    uri: NbdUri,
    contexts: Vec<String>,
    connect: Box<Connector<'static>>,
    /// Connection `i` answers with tags `cookie * CONNECTIONS + i`. A slot is
    /// emptied when an extra connection fails before it carried anything.
    links: Vec<Option<Connection<Box<dyn Stream>>>>,
    /// Whether more connections were asked for (once the first is ready).
    widened: bool,
    answers: VecDeque<Answer>,
}

impl Remote {
    /// Connects to the server at `uri` (the handshake goes on in the background),
    /// to select the metadata `contexts`.
    pub(crate) fn new(
        uri: NbdUri,
        contexts: &[&str],
        mut connect: Box<Connector<'static>>,
    ) -> Result<Self, String> {
        let stream = connect(&uri)?;
        let client = Client::new(&uri.export, contexts);
        Ok(Remote {
            contexts: contexts.iter().map(|name| String::from(*name)).collect(),
            links: alloc::vec![Some(Connection::new(client, stream))],
            uri,
            connect,
            widened: false,
            answers: VecDeque::new(),
        })
    }

    /// The export, once the first connection's handshake is over.
    pub(crate) fn export(&self) -> Option<&RemoteExport> {
        self.links.first()?.as_ref()?.export()
    }

    /// How many connections are open (ready or still in their handshake).
    pub(crate) fn connections(&self) -> usize {
        self.links.iter().flatten().count()
    }

    /// Opens the other connections if the server allows several; a connection that
    /// cannot be opened is done without.
    pub(crate) fn widen(&mut self) {
        if self.widened {
            return;
        }
        self.widened = true;
        if self
            .export()
            .is_none_or(|export| export.flags & TFLAG_CAN_MULTI_CONN == 0)
        {
            return;
        }
        let contexts: Vec<&str> = self.contexts.iter().map(String::as_str).collect();
        for _ in 1..CONNECTIONS {
            let Ok(stream) = (self.connect)(&self.uri) else {
                break;
            };
            let client = Client::new(&self.uri.export, &contexts);
            self.links.push(Some(Connection::new(client, stream)));
        }
    }

    /// Asks for the runs from `offset` on (at most `length` bytes' worth).
    pub(crate) fn status(&mut self, offset: u64, length: u32) -> Result<u64, String> {
        let link = self.links[0]
            .as_mut()
            .ok_or("the first connection is gone")?;
        let cookie = link
            .client()
            .block_status(offset, length)
            .map_err(|error| format!("{error}"))?;
        Ok(cookie * CONNECTIONS as u64)
    }

    /// The connection the next read goes to: ready, with room, the least busy.
    pub(crate) fn reader(&self) -> Option<usize> {
        let size = self.export()?.size;
        let room = match self.connections() {
            1 => usize::MAX,
            _ => PER_CONNECTION,
        };
        self.links
            .iter()
            .enumerate()
            .filter_map(|(index, link)| Some((index, link.as_ref()?)))
            .filter(|(_, link)| {
                link.export().is_some_and(|export| export.size == size) && link.in_flight() < room
            })
            .min_by_key(|(_, link)| link.in_flight())
            .map(|(index, _)| index)
    }

    /// Asks for `length` bytes at `offset`, received into `buf`'s storage.
    pub(crate) fn read(&mut self, offset: u64, length: u32, buf: IoBuf) -> Result<u64, String> {
        let index = self.reader().ok_or("no connection has room for a read")?;
        let link = self.links[index].as_mut().ok_or("the connection is gone")?;
        let cookie = link
            .client()
            .read_into(offset, length, buf)
            .map_err(|error| format!("{error}"))?;
        Ok(cookie * CONNECTIONS as u64 + index as u64)
    }

    /// Moves bytes on every connection and returns the next answer, if any.
    pub(crate) fn poll(&mut self, contexts: usize) -> Result<Option<Answer>, String> {
        if self.answers.is_empty() {
            let size = self.export().map(|export| export.size);
            for (index, slot) in self.links.iter_mut().enumerate() {
                let Some(link) = slot else { continue };
                if let Err(error) = link.pump() {
                    if index > 0 && link.in_flight() == 0 {
                        *slot = None;
                        continue;
                    }
                    return Err(format!("{error}"));
                }
                if index > 0
                    && let Some(other) = link.export()
                    && Some(other.size) != size
                {
                    return Err(format!(
                        "the server's connections disagree on the export's size ({} and {} \
                         bytes)",
                        size.unwrap_or(0),
                        other.size
                    ));
                }
                while let Some(reply) = link.next_reply() {
                    self.answers.push_back(answer(reply, index, contexts)?);
                }
            }
        }
        Ok(self.answers.pop_front())
    }
}

/// Says goodbye on every connection (`NBD_CMD_DISC`), so the server does not wait
/// for a client that is gone; what cannot be sent now is dropped with it.
impl Drop for Remote {
    fn drop(&mut self) {
        for link in self.links.iter_mut().flatten() {
            link.client().disconnect();
            let _ = link.pump();
        }
    }
}

/// A reply of connection `index` as an answer; a failed request fails the copy.
fn answer(reply: Reply, index: usize, contexts: usize) -> Result<Answer, String> {
    let tag = |cookie: u64| cookie * CONNECTIONS as u64 + index as u64;
    match reply {
        Reply::Read { cookie, data, .. } => Ok(Answer::Data {
            tag: tag(cookie),
            data,
        }),
        Reply::Status {
            cookie,
            contexts: found,
            ..
        } => Ok(Answer::Status {
            tag: tag(cookie),
            runs: merge_contexts(&found, contexts),
        }),
        Reply::Failed { error, message, .. } => Err(format!(
            "the server failed a request with error {error}{}",
            if message.is_empty() {
                String::new()
            } else {
                format!(": {message}")
            }
        )),
    }
}

/// Runs from the contexts of one block-status reply: context 0 is
/// `base:allocation` (zero or not); context 1, when asked for, marks changed
/// ranges. The runs cover as far as every context does.
fn merge_contexts(found: &[Vec<nbd::client::StatusExtent>], contexts: usize) -> Vec<Run> {
    let allocation = found.first().map_or(&[][..], Vec::as_slice);
    let changed = found.get(1).filter(|_| contexts > 1);
    let mut runs = Vec::new();
    let (mut a, mut c) = (0, 0);
    let (mut a_left, mut c_left) = (
        allocation.first().map_or(0, |extent| extent.length),
        changed
            .and_then(|extents| extents.first())
            .map_or(u64::MAX, |extent| extent.length),
    );
    while a < allocation.len() && changed.is_none_or(|extents| c < extents.len()) {
        let length = a_left.min(c_left);
        let zero = allocation[a].flags & STATE_ZERO != 0;
        let is_changed = changed.is_none_or(|extents| extents[c].flags & 1 != 0);
        runs.push(Run {
            length,
            zero,
            changed: is_changed,
        });
        a_left -= length;
        c_left -= length;
        if a_left == 0 {
            a += 1;
            a_left = allocation.get(a).map_or(0, |extent| extent.length);
        }
        if c_left == 0
            && let Some(extents) = changed
        {
            c += 1;
            c_left = extents.get(c).map_or(0, |extent| extent.length);
        }
    }
    runs
}
