//! The serial console contract, read from the harness side: where the prompt is, which
//! lines are a command's reply, which are asynchronous events, and when the kernel
//! panicked. Pure functions over the bytes received so far, so they are tested
//! without QEMU.
//!
//! A reply to command `c` is: the echoed line ending in `c`, the output lines, then the
//! prompt at the start of a line. `event: ` lines may appear anywhere: while a command
//! runs they are plain lines; while the prompt is on screen the kernel erases the
//! prompt line (`\r`, `ESC [K`), prints the event and redraws the prompt and the
//! partially typed line, so the echo of a command may follow a redrawn prompt.

/// The kernel's prompt, printed at the start of a line when it is ready for a command.
pub const PROMPT: &str = "thinbox> ";
const EVENT: &str = "event: ";
const PANIC: &str = "KERNEL PANIC: ";

/// The part of a command's reply a caller wants.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Reply {
    pub output: Vec<String>,
    pub events: Vec<String>,
}

/// Finds the first prompt at the start of a line: returns how many bytes it ends at and
/// the non-empty lines printed before it (the boot log).
pub(crate) fn find_prompt(pending: &[u8]) -> Option<(usize, Vec<String>)> {
    let mut log = Vec::new();
    let mut pos = 0;
    loop {
        if pending[pos..].starts_with(PROMPT.as_bytes()) {
            return Some((pos + PROMPT.len(), log));
        }
        let end = newline(pending, pos)?;
        let line = clean_line(&pending[pos..end]);
        if !line.is_empty() {
            log.push(line);
        }
        pos = end + 1;
    }
}

/// Finds the complete reply to `command` at the start of `pending`: returns how many
/// bytes it spans (through the closing prompt) and its output and event lines.
pub(crate) fn find_reply(pending: &[u8], command: &str) -> Option<(usize, Reply)> {
    let mut reply = Reply::default();
    let mut pos = 0;
    loop {
        let end = newline(pending, pos)?;
        let line = clean_line(&pending[pos..end]);
        pos = end + 1;
        if line.starts_with(EVENT) {
            reply.events.push(line);
        } else if without_prompts(&line).ends_with(command) {
            break;
        }
    }
    loop {
        if pending[pos..].starts_with(PROMPT.as_bytes()) {
            return Some((pos + PROMPT.len(), reply));
        }
        let end = newline(pending, pos)?;
        let line = clean_line(&pending[pos..end]);
        pos = end + 1;
        if line.starts_with(EVENT) {
            reply.events.push(line);
        } else {
            reply.output.push(line);
        }
    }
}

/// The `KERNEL PANIC: ` line (as much of it as has arrived), if there is one.
pub(crate) fn panic_line(pending: &[u8]) -> Option<String> {
    let mut pos = 0;
    loop {
        let end = newline(pending, pos).unwrap_or(pending.len());
        let line = clean_line(&pending[pos..end]);
        if line.starts_with(PANIC) {
            return Some(line);
        }
        if end == pending.len() {
            return None;
        }
        pos = end + 1;
    }
}

/// The last `count` lines of a transcript, cleaned for reading.
pub(crate) fn tail(transcript: &[u8], count: usize) -> String {
    let lines: Vec<String> = transcript
        .split(|&byte| byte == b'\n')
        .map(clean_line)
        .collect();
    let start = lines.len().saturating_sub(count);
    lines[start..].join("\n")
}

/// One received line as a terminal would show it: no line ending, no escape sequences,
/// backspaces applied, and only what follows the last carriage return.
pub(crate) fn clean_line(raw: &[u8]) -> String {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let text = String::from_utf8_lossy(raw);
    let mut line = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => skip_escape(&mut chars),
            '\x08' | '\x7f' => {
                line.pop();
            }
            '\r' => line.clear(),
            c if c.is_control() && c != '\t' => {}
            c => line.push(c),
        }
    }
    line
}

/// Skips the rest of an escape sequence: CSI (`ESC [ params final`) or a two-byte one.
fn skip_escape(chars: &mut std::str::Chars<'_>) {
    if chars.next() == Some('[') {
        for c in chars.by_ref() {
            if ('\x40'..='\x7e').contains(&c) {
                break;
            }
        }
    }
}

fn without_prompts(mut line: &str) -> &str {
    while let Some(rest) = line.strip_prefix(PROMPT) {
        line = rest;
    }
    line
}

fn newline(bytes: &[u8], from: usize) -> Option<usize> {
    bytes[from..]
        .iter()
        .position(|&byte| byte == b'\n')
        .map(|offset| from + offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(pending: &str, command: &str) -> Option<(usize, Reply)> {
        find_reply(pending.as_bytes(), command)
    }

    #[test]
    fn boot_prompt_after_the_banner() {
        let text = "\x1b[2J\x1b[01;01Hfirmware noise\r\nthinbox 0.1.0 ready\r\nthinbox> ";
        let (end, log) = find_prompt(text.as_bytes()).unwrap();
        assert_eq!(end, text.len());
        assert_eq!(log, ["firmware noise", "thinbox 0.1.0 ready"]);
    }

    #[test]
    fn no_boot_prompt_until_it_starts_a_line() {
        assert_eq!(find_prompt(b"thinbox 0.1.0 ready\r\nthinbox"), None);
        assert_eq!(find_prompt(b"say thinbox> \r\n"), None);
    }

    #[test]
    fn reply_is_the_lines_between_echo_and_prompt() {
        let text = "status\r\npool 0: ok\r\nthin 1: ok\r\nthinbox> ";
        let (end, reply) = reply(text, "status").unwrap();
        assert_eq!(end, text.len());
        assert_eq!(reply.output, ["pool 0: ok", "thin 1: ok"]);
        assert!(reply.events.is_empty());
    }

    #[test]
    fn empty_reply() {
        let (end, reply) = reply("remove 0\r\nthinbox> ", "remove 0").unwrap();
        assert_eq!(end, 19);
        assert!(reply.output.is_empty());
    }

    #[test]
    fn incomplete_reply_waits() {
        assert_eq!(reply("stat", "status"), None);
        assert_eq!(reply("status\r\npool 0: ok\r\n", "status"), None);
        assert_eq!(reply("status\r\npool 0: ok\r\nthinbox", "status"), None);
    }

    #[test]
    fn text_after_the_prompt_is_left_for_later() {
        let text = "help\r\nusage\r\nthinbox> \r\x1b[Kevent: later\r\nthinbox> ";
        let (end, reply) = reply(text, "help").unwrap();
        assert_eq!(&text[end..], "\r\x1b[Kevent: later\r\nthinbox> ");
        assert_eq!(reply.output, ["usage"]);
    }

    #[test]
    fn events_at_the_prompt_before_the_echo_are_collected() {
        let text = "\r\x1b[Kevent: low water\r\nthinbox> status\r\nok\r\nthinbox> ";
        let (_, reply) = reply(text, "status").unwrap();
        assert_eq!(reply.output, ["ok"]);
        assert_eq!(reply.events, ["event: low water"]);
    }

    #[test]
    fn events_while_a_command_runs_are_plain_lines() {
        let text = "copy\r\nstarted\r\nevent: pool 0 low\r\ndone\r\nthinbox> ";
        let (end, busy) = reply(text, "copy").unwrap();
        assert_eq!(end, text.len());
        assert_eq!(busy.output, ["started", "done"]);
        assert_eq!(busy.events, ["event: pool 0 low"]);
        let text = "copy\r\nevent: pool 0 low\r\nthinbox> ";
        let (end, quiet) = reply(text, "copy").unwrap();
        assert_eq!(end, text.len());
        assert!(quiet.output.is_empty());
    }

    #[test]
    fn echo_completing_a_partly_typed_line() {
        let text = "stat\r\x1b[Kevent: x\r\nthinbox> status\r\nok\r\nthinbox> ";
        let (_, reply) = reply(text, "us").unwrap();
        assert_eq!(reply.output, ["ok"]);
        assert_eq!(reply.events, ["event: x"]);
    }

    #[test]
    fn panic_line_is_found_even_before_its_end() {
        assert_eq!(panic_line(b"status\r\nok\r\n"), None);
        let text = b"status\r\nKERNEL PANIC: page fault at 0x10";
        assert_eq!(
            panic_line(text).as_deref(),
            Some("KERNEL PANIC: page fault at 0x10")
        );
        assert_eq!(panic_line(b"say KERNEL PANIC: no\r\n"), None);
    }

    #[test]
    fn lines_are_cleaned_like_a_terminal_shows_them() {
        assert_eq!(clean_line(b"abc\x08 \x08d\r"), "abd");
        assert_eq!(clean_line(b"\x1b[2K\x1b[=3hthinbox> x"), "thinbox> x");
        assert_eq!(clean_line(b"old\rnew"), "new");
        assert_eq!(clean_line(b"bad \xff byte"), "bad \u{fffd} byte");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail(b"a\r\nb\r\nc\r\nthinbox> ", 2), "c\nthinbox> ");
        assert_eq!(tail(b"only", 5), "only");
    }
}
