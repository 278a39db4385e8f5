//! A client sending arbitrary bytes, in arbitrary pieces, to the NBD server over an
//! in-memory thin-like export: the server answers, refuses or drops the connection,
//! with bounded output, and never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::{Limits, MemoryBackend, MemoryExport, Server};

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let mut backend = MemoryBackend::default();
    backend.add_export(MemoryExport::new("disk", 2048));
    let mut server = Server::new(
        backend,
        Limits {
            max_requests: 8,
            max_buffered_bytes: 1 << 20,
        },
    );
    let id = server.connect();
    // Pieces of 1..=64 bytes, their length chosen by the first byte.
    let piece = usize::from(split % 64) + 1;
    let mut offset = 0;
    while offset < stream.len() && !server.should_close(id) {
        let mut progress = server.poll();
        if server.wants_input(id) {
            let end = (offset + piece).min(stream.len());
            let taken = server.receive(id, &stream[offset..end]);
            offset += taken;
            progress |= taken > 0;
        }
        let pending = server.output_len(id);
        server.consume_output(id, pending);
        if !progress && pending == 0 {
            // Neither input taken nor work done: the rest would never be read.
            break;
        }
    }
    server.peer_closed(id);
    while server.poll() {}
    server.release(id);
});
