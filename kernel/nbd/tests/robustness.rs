//! Property tests: arbitrary, truncated and structured-but-hostile input never panics
//! or wedges the server, and data written through it reads back exactly.

mod support;

use nbd::wire::*;
use nbd::{CompletionOrder, Limits, MemoryBackend, MemoryExport, Server};
use proptest::prelude::*;
use support::feed::{Start, feed_and_check};
use support::{Peer, pattern, request};

fn start() -> impl Strategy<Value = Start> {
    prop_oneof![
        Just(Start::Greeting),
        Just(Start::Options),
        Just(Start::Transmission)
    ]
}

/// One message of a plausible but hostile client.
fn message() -> impl Strategy<Value = Vec<u8>> {
    let name = prop_oneof![
        Just(String::from("vol0")),
        Just(String::from("ro")),
        Just(String::new()),
        "[a-z:]{0,12}",
    ];
    let code = prop_oneof![1u32..=12, any::<u32>()];
    let raw = prop::collection::vec(any::<u8>(), 0..64);
    let info = (
        prop_oneof![Just(OPT_INFO), Just(OPT_GO)],
        name.clone(),
        prop::collection::vec(0u16..5, 0..4),
    )
        .prop_map(|(code, name, infos)| support::option(code, &support::info_data(&name, &infos)));
    let queries = prop::collection::vec(
        prop_oneof![
            Just("base:allocation"),
            Just("base:"),
            Just("x:y"),
            Just("thinbox:changed:vol0"),
            Just("thinbox:"),
        ],
        0..3,
    );
    let meta = (
        prop_oneof![Just(OPT_LIST_META_CONTEXT), Just(OPT_SET_META_CONTEXT)],
        name,
        queries,
    )
        .prop_map(|(code, name, queries)| {
            support::option(code, &support::meta_data(&name, &queries))
        });
    let offset = prop_oneof![(0u64..4096).prop_map(|sector| sector * 512), any::<u64>(),];
    let len = prop_oneof![(0u32..300).prop_map(|sectors| sectors * 512), any::<u32>()];
    let command = prop_oneof![0u16..=9, any::<u16>()];
    let flags = prop_oneof![0u16..32, any::<u16>()];
    let requests = (flags, command, any::<u64>(), offset, len, any::<u8>()).prop_map(
        |(flags, command, cookie, offset, len, fill)| {
            let mut bytes = request(flags, command, cookie, offset, len);
            if command == CMD_WRITE && len <= 256 * 1024 {
                bytes.extend(vec![fill; len as usize]);
            }
            bytes
        },
    );
    prop_oneof![
        raw.clone(),
        (code, raw).prop_map(|(code, data)| support::option(code, &data)),
        info,
        meta,
        requests.clone(),
        requests.clone(),
        requests,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_or_wedge(
        seed in any::<u64>(),
        start in start(),
        input in prop::collection::vec(any::<u8>(), 0..2048),
        pieces in prop::collection::vec(1usize..300, 1..8),
        reads in prop::collection::vec(any::<bool>(), 1..4),
    ) {
        feed_and_check(seed, start, &input, &pieces, &reads);
    }

    #[test]
    fn hostile_message_streams_never_panic_or_wedge(
        seed in any::<u64>(),
        start in start(),
        messages in prop::collection::vec(message(), 0..24),
        cut in any::<prop::sample::Index>(),
        pieces in prop::collection::vec(1usize..4096, 1..8),
        reads in prop::collection::vec(any::<bool>(), 1..4),
    ) {
        let input: Vec<u8> = messages.concat();
        // Truncate anywhere, including mid-header and mid-payload.
        let input = &input[..cut.index(input.len() + 1)];
        feed_and_check(seed, start, input, &pieces, &reads);
    }
}

/// A random operation on the model export.
#[derive(Clone, Debug)]
enum Op {
    Write {
        sector: u64,
        sectors: u32,
        seed: u64,
        fua: bool,
    },
    Read {
        sector: u64,
        sectors: u32,
        df: bool,
    },
    Trim {
        sector: u64,
        sectors: u32,
    },
    Zero {
        sector: u64,
        sectors: u32,
        no_hole: bool,
    },
    Flush,
}

const MODEL_SECTORS: u64 = 1024;

fn op() -> impl Strategy<Value = Op> {
    let range = (0..MODEL_SECTORS)
        .prop_flat_map(|sector| (Just(sector), 1..=((MODEL_SECTORS - sector).min(300) as u32)));
    prop_oneof![
        3 => (range.clone(), any::<u64>(), any::<bool>())
            .prop_map(|((sector, sectors), seed, fua)| Op::Write { sector, sectors, seed, fua }),
        3 => (range.clone(), any::<bool>()).prop_map(|((sector, sectors), df)| Op::Read { sector, sectors, df }),
        1 => range.clone().prop_map(|(sector, sectors)| Op::Trim { sector, sectors }),
        1 => (range, any::<bool>()).prop_map(|((sector, sectors), no_hole)| Op::Zero { sector, sectors, no_hole }),
        1 => Just(Op::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Pipelined batches with completions in random order: every read returns exactly
    /// what the model says (bytes after a trim are unspecified until rewritten).
    #[test]
    fn data_reads_back_as_written(
        structured in any::<bool>(),
        seed in any::<u64>(),
        batches in prop::collection::vec(prop::collection::vec(op(), 1..12), 1..8),
    ) {
        let mut backend = MemoryBackend::default();
        let mut export = MemoryExport::new("model", MODEL_SECTORS);
        export.block_sectors = 16;
        backend.add_export(export);
        backend.set_completion_order(CompletionOrder::Shuffled(seed));
        let mut server = Server::new(backend, Limits::default());
        let mut peer = Peer::handshake(&mut server, CLIENT_FIXED_NEWSTYLE);
        peer.open(&mut server, "model", structured);
        let size = (MODEL_SECTORS * 512) as usize;
        let mut model = vec![0u8; size];
        let mut known = vec![true; size];
        for batch in batches {
            let mut expected = std::collections::HashMap::new();
            for (index, op) in batch.iter().enumerate() {
                let cookie = index as u64;
                let span = |sector: u64, sectors: u32| (sector as usize * 512, sectors as usize * 512);
                match *op {
                    Op::Write { sector, sectors, seed, fua } => {
                        let (at, len) = span(sector, sectors);
                        let data = pattern(seed, len);
                        model[at..at + len].copy_from_slice(&data);
                        known[at..at + len].fill(true);
                        let flags = if fua { CMD_FLAG_FUA } else { 0 };
                        peer.send_request(&mut server, &request(flags, CMD_WRITE, cookie, at as u64, len as u32), &data);
                        expected.insert(cookie, None);
                    }
                    Op::Read { sector, sectors, df } => {
                        let (at, len) = span(sector, sectors);
                        let flags = if df && structured { CMD_FLAG_DF } else { 0 };
                        peer.send_request(&mut server, &request(flags, CMD_READ, cookie, at as u64, len as u32), &[]);
                        expected.insert(cookie, Some((at, model[at..at + len].to_vec(), known[at..at + len].to_vec())));
                    }
                    Op::Trim { sector, sectors } => {
                        let (at, len) = span(sector, sectors);
                        known[at..at + len].fill(false);
                        peer.send_request(&mut server, &request(0, CMD_TRIM, cookie, at as u64, len as u32), &[]);
                        expected.insert(cookie, None);
                    }
                    Op::Zero { sector, sectors, no_hole } => {
                        let (at, len) = span(sector, sectors);
                        model[at..at + len].fill(0);
                        known[at..at + len].fill(true);
                        let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 };
                        peer.send_request(&mut server, &request(flags, CMD_WRITE_ZEROES, cookie, at as u64, len as u32), &[]);
                        expected.insert(cookie, None);
                    }
                    Op::Flush => {
                        peer.send_request(&mut server, &request(0, CMD_FLUSH, cookie, 0, 0), &[]);
                        expected.insert(cookie, None);
                    }
                }
            }
            peer.collect(&mut server);
            for _ in 0..batch.len() {
                // Simple replies carry no length: peek at the cookie to know it.
                let reply = peer.reply_for(|cookie| match &expected[&cookie] {
                    Some((_, data, _)) => data.len(),
                    None => 0,
                });
                prop_assert_eq!(reply.error, 0);
                if let Some(Some((at, data, known))) = expected.remove(&reply.cookie) {
                    let back = reply.read_data(at as u64, data.len());
                    for i in 0..data.len() {
                        if known[i] {
                            prop_assert_eq!(back[i], data[i], "byte {} of the read at {}", i, at);
                        }
                    }
                }
            }
            prop_assert_eq!(peer.available(), 0);
        }
    }
}
