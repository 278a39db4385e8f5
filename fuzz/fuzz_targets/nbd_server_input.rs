//! Arbitrary bytes into one connection of a server, starting before the handshake,
//! in the option phase or in transmission, offered in varying piece sizes, with the
//! client sometimes not reading replies. Any panic, wedge or leaked export fails.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../kernel/nbd/tests/support/feed.rs"]
mod feed;

use feed::{Start, feed_and_check};

fuzz_target!(|data: &[u8]| {
    let [selector, piece, flags, input @ ..] = data else {
        return;
    };
    let start = match selector % 3 {
        0 => Start::Greeting,
        1 => Start::Options,
        _ => Start::Transmission,
    };
    let piece = usize::from(*piece) + 1;
    let pieces = [piece, piece * 7 % 251 + 1, 4096];
    let reads = [flags & 1 == 0, flags & 2 == 0, true];
    feed_and_check(u64::from(*flags), start, input, &pieces, &reads);
});
