//! Arbitrary server bytes into the NBD client, from the greeting on or after a
//! well-formed handshake with a read and a block status in flight, offered in
//! varying piece sizes, read data either through `receive` or put straight into
//! the read's buffer. Any panic fails; so does a reply that does not match its
//! request (a read of the wrong length, extents beyond the request).

#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::client::{Client, Reply};
use nbd::wire::*;

/// Greeting, structured replies, `base:allocation` as context 1, a 1 MiB export.
fn handshake() -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&NBDMAGIC.to_be_bytes());
    bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
    bytes.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    let mut reply = |option: u32, reply_type: u32, data: &[u8]| {
        bytes.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        bytes.extend_from_slice(&option.to_be_bytes());
        bytes.extend_from_slice(&reply_type.to_be_bytes());
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(data);
    };
    reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, b"\0\0\0\x01base:allocation");
    reply(OPT_SET_META_CONTEXT, REP_ACK, &[]);
    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&(1u64 << 20).to_be_bytes());
    export.extend_from_slice(&TFLAG_HAS_FLAGS.to_be_bytes());
    reply(OPT_GO, REP_INFO, &export);
    reply(OPT_GO, REP_ACK, &[]);
    bytes
}

fuzz_target!(|data: &[u8]| {
    let [selector, piece, input @ ..] = data else {
        return;
    };
    let mut client = Client::new("disk", &["base:allocation"]);
    let mut requests = Vec::new();
    if selector & 1 == 1 {
        client.receive(&handshake()).expect("a well-formed handshake");
        requests.push((client.read(4096, 8192).expect("read"), 8192u64));
        requests.push((client.block_status(0, 65536).expect("status"), 65536));
    }
    for piece in input.chunks(usize::from(*piece) + 1) {
        // Bit 1: read data goes in the way a transport puts it, straight into the
        // read's buffer.
        let fed = match client.payload_space().filter(|_| selector & 2 == 2) {
            Some(space) => {
                let count = space.len().min(piece.len());
                space[..count].copy_from_slice(&piece[..count]);
                client
                    .payload_filled(count)
                    .and_then(|()| client.receive(&piece[count..]))
            }
            None => client.receive(piece),
        };
        if fed.is_err() {
            break;
        }
    }
    while let Some(reply) = client.next_reply() {
        let length = requests
            .iter()
            .find(|(cookie, _)| *cookie == reply.cookie())
            .map(|(_, length)| *length)
            .expect("replies answer requests");
        match reply {
            Reply::Read { data, .. } => assert_eq!(data.len() as u64, length),
            Reply::Status { contexts, .. } => {
                for extents in contexts {
                    assert!(extents.iter().map(|extent| extent.length).sum::<u64>() <= length);
                }
            }
            Reply::Failed { .. } => {}
        }
    }
});
