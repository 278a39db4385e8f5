//! The client's handshake: greeting, structured replies, metadata contexts, `GO`
//! (or `EXPORT_NAME` with servers that do not know `GO`).

use alloc::format;
use alloc::vec::Vec;

use super::{Client, ClientError, MAX_OPTION_REPLY, Phase, RemoteExport, option_header, protocol};
use crate::wire::*;

/// Bytes after `EXPORT_NAME`: size, flags, and the padding unless left out.
const EXPORT_NAME_REPLY: usize = 10;
const EXPORT_NAME_PADDING: usize = 124;
/// Maximum payload assumed when the server advertises none (the spec's safe value).
const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

impl Client {
    pub(super) fn parse_greeting(&mut self) -> Result<bool, ClientError> {
        let bytes = self.unparsed();
        if bytes.len() < GREETING_LEN {
            return Ok(false);
        }
        if be_u64(bytes) != NBDMAGIC {
            return Err(protocol(
                "the server did not greet with NBDMAGIC (not an NBD server?)",
            ));
        }
        if be_u64(&bytes[8..]) != IHAVEOPT {
            return Err(protocol(
                "the server speaks the old-style handshake, which has no export names",
            ));
        }
        let flags = be_u16(&bytes[16..]);
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol(
                "the server does not speak the fixed newstyle handshake",
            ));
        }
        self.consumed += GREETING_LEN;
        self.no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let mut client_flags = CLIENT_FIXED_NEWSTYLE;
        if self.no_zeroes {
            client_flags |= CLIENT_NO_ZEROES;
        }
        self.output.extend_from_slice(&client_flags.to_be_bytes());
        self.send_option(OPT_STRUCTURED_REPLY, &[]);
        Ok(true)
    }

    fn send_option(&mut self, option: u32, data: &[u8]) {
        option_header(&mut self.output, option, data.len() as u32);
        self.output.extend_from_slice(data);
        self.phase = Phase::Option(option);
    }

    /// Export name with its 4-byte length, as `GO` and `SET_META_CONTEXT` start.
    fn named(&self) -> Vec<u8> {
        let mut data = Vec::new();
        data.extend_from_slice(&(self.export_name.len() as u32).to_be_bytes());
        data.extend_from_slice(self.export_name.as_bytes());
        data
    }

    fn send_set_meta_context(&mut self) {
        let mut data = self.named();
        data.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for query in &self.queries {
            data.extend_from_slice(&(query.len() as u32).to_be_bytes());
            data.extend_from_slice(query.as_bytes());
        }
        self.send_option(OPT_SET_META_CONTEXT, &data);
    }

    fn send_go(&mut self) {
        let mut data = self.named();
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(OPT_GO, &data);
    }

    pub(super) fn parse_option_reply(&mut self, option: u32) -> Result<bool, ClientError> {
        let bytes = self.unparsed();
        if bytes.len() < 20 {
            return Ok(false);
        }
        if be_u64(bytes) != OPTION_REPLY_MAGIC {
            return Err(protocol("bad option reply magic"));
        }
        let answered = be_u32(&bytes[8..]);
        let reply_type = be_u32(&bytes[12..]);
        let len = be_u32(&bytes[16..]);
        if answered != option {
            return Err(protocol(format!(
                "the server answered option {answered} while option {option} was asked"
            )));
        }
        if len > MAX_OPTION_REPLY {
            return Err(protocol(format!(
                "an option reply of {len} bytes is too long"
            )));
        }
        if bytes.len() < 20 + len as usize {
            return Ok(false);
        }
        let data = bytes[20..20 + len as usize].to_vec();
        self.consumed += 20 + len as usize;
        if reply_type & REP_ERR_BIT != 0 {
            self.option_error(option, reply_type, &data)?;
            return Ok(true);
        }
        match (option, reply_type) {
            (_, REP_ACK) if !data.is_empty() => Err(protocol("an ACK carried data")),
            (OPT_STRUCTURED_REPLY, REP_ACK) => {
                self.structured = true;
                if self.queries.is_empty() {
                    self.send_go();
                } else {
                    self.send_set_meta_context();
                }
                Ok(true)
            }
            (OPT_SET_META_CONTEXT, REP_META_CONTEXT) => {
                self.meta_context(&data)?;
                Ok(true)
            }
            (OPT_SET_META_CONTEXT, REP_ACK) => {
                self.send_go();
                Ok(true)
            }
            (OPT_GO, REP_INFO) => {
                self.info(&data)?;
                Ok(true)
            }
            (OPT_GO, REP_ACK) => {
                let Some((size, flags)) = self.size else {
                    return Err(protocol("GO succeeded without telling the export's size"));
                };
                self.start_transmission(size, flags)?;
                Ok(true)
            }
            _ => Err(protocol(format!(
                "unexpected reply type {reply_type:#x} to option {option}"
            ))),
        }
    }

    /// An error reply to `option`: some are answered by carrying on without the
    /// feature, the rest end the connection with the server's message.
    fn option_error(&mut self, option: u32, error: u32, data: &[u8]) -> Result<(), ClientError> {
        let message = super::text(data);
        let export = &self.export_name;
        match (option, error) {
            (OPT_STRUCTURED_REPLY, _) => {
                // Plain replies only: reads still work, block status does not.
                self.send_go();
                Ok(())
            }
            (_, REP_ERR_UNKNOWN) => Err(ClientError::Refused(format!(
                "the server has no export '{export}'{}",
                with_reason(&message)
            ))),
            (OPT_SET_META_CONTEXT, REP_ERR_UNSUP | REP_ERR_INVALID | REP_ERR_POLICY) => {
                self.context_ids.clear();
                self.send_go();
                Ok(())
            }
            (OPT_GO, REP_ERR_UNSUP) => {
                self.output.extend_from_slice(&IHAVEOPT.to_be_bytes());
                self.output
                    .extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
                self.output
                    .extend_from_slice(&(self.export_name.len() as u32).to_be_bytes());
                self.output.extend_from_slice(self.export_name.as_bytes());
                self.phase = Phase::ExportName;
                Ok(())
            }
            (OPT_GO, REP_ERR_SHUTDOWN) => Err(ClientError::Refused(format!(
                "the server is shutting down{}",
                with_reason(&message)
            ))),
            (OPT_GO, _) => Err(ClientError::Refused(format!(
                "the server refused export '{export}' (error {error:#x}){}",
                with_reason(&message)
            ))),
            _ => Err(protocol(format!(
                "option {option} failed with {error:#x}{}",
                with_reason(&message)
            ))),
        }
    }

    fn meta_context(&mut self, data: &[u8]) -> Result<(), ClientError> {
        if data.len() < 5 {
            return Err(protocol("a metadata context reply is too short"));
        }
        let id = be_u32(data);
        let name = &data[4..];
        let Some(index) = self
            .queries
            .iter()
            .position(|query| query.as_bytes() == name)
        else {
            return Err(protocol(format!(
                "the server selected metadata context '{}', which was not asked for",
                super::text(name)
            )));
        };
        if self
            .context_ids
            .iter()
            .any(|&(known, other)| known == id || other == index)
        {
            return Err(protocol("the server gave a metadata context id twice"));
        }
        self.context_ids.push((id, index));
        Ok(())
    }

    fn info(&mut self, data: &[u8]) -> Result<(), ClientError> {
        if data.len() < 2 {
            return Err(protocol("an information reply is too short"));
        }
        match be_u16(data) {
            INFO_EXPORT => {
                if data.len() != 12 {
                    return Err(protocol("export information is not 12 bytes"));
                }
                self.size = Some((be_u64(&data[2..]), be_u16(&data[10..])));
            }
            INFO_BLOCK_SIZE => {
                if data.len() != 14 {
                    return Err(protocol("block size information is not 14 bytes"));
                }
                let (min, preferred, max) =
                    (be_u32(&data[2..]), be_u32(&data[6..]), be_u32(&data[10..]));
                if !min.is_power_of_two()
                    || min > 64 * 1024
                    || !preferred.is_power_of_two()
                    || preferred < min
                    || max < min
                {
                    return Err(protocol(format!(
                        "block sizes {min}/{preferred}/{max} break the protocol's rules"
                    )));
                }
                self.block_sizes = Some((min, max));
            }
            // Names, descriptions and what the protocol may add later.
            _ => {}
        }
        Ok(())
    }

    pub(super) fn parse_export_name(&mut self) -> Result<bool, ClientError> {
        let need = EXPORT_NAME_REPLY
            + if self.no_zeroes {
                0
            } else {
                EXPORT_NAME_PADDING
            };
        let bytes = self.unparsed();
        if bytes.len() < need {
            return Ok(false);
        }
        let (size, flags) = (be_u64(bytes), be_u16(&bytes[8..]));
        self.consumed += need;
        // Without GO there were no structured replies or contexts worth keeping.
        self.structured = false;
        self.context_ids.clear();
        self.start_transmission(size, flags)?;
        Ok(true)
    }

    fn start_transmission(&mut self, size: u64, flags: u16) -> Result<(), ClientError> {
        if flags & TFLAG_HAS_FLAGS == 0 {
            return Err(protocol("the export's transmission flags lack HAS_FLAGS"));
        }
        let (min_block, max_payload) = self.block_sizes.unwrap_or((1, DEFAULT_MAX_PAYLOAD));
        let mut contexts = alloc::vec![false; self.queries.len()];
        if self.structured {
            for &(_, index) in &self.context_ids {
                contexts[index] = true;
            }
        } else {
            self.context_ids.clear();
        }
        self.export = Some(RemoteExport {
            size,
            flags,
            min_block,
            max_payload: max_payload.min(super::MAX_REQUEST),
            structured: self.structured,
            contexts,
        });
        self.phase = Phase::Transmission;
        Ok(())
    }
}

/// ": MESSAGE" when the server gave one.
fn with_reason(message: &str) -> alloc::string::String {
    if message.is_empty() {
        alloc::string::String::new()
    } else {
        format!(": {message}")
    }
}
