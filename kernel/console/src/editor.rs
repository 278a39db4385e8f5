//! The serial line editor: turns the raw bytes a terminal sends into finished
//! command lines, echoing what the operator types.
//!
//! It speaks to dumb terminals and scripted harnesses alike, so it needs no cursor
//! movement beyond carriage return, backspace and "erase to end of line".

use alloc::string::String;
use core::fmt::{self, Write};

/// Printed before every command line.
pub const PROMPT: &str = "thinbox> ";

/// Longest line the editor keeps; further characters are refused with a bell, so a
/// runaway sender cannot exhaust memory.
pub const MAX_LINE: usize = 4096;

const CTRL_C: u8 = 0x03;
const BACKSPACE: u8 = 0x08;
const BELL: char = '\x07';
const ESCAPE: u8 = 0x1b;
const DELETE: u8 = 0x7f;

/// Where the editor is inside a terminal escape sequence (arrow keys and the like),
/// whose bytes are swallowed rather than inserted as text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Escape {
    None,
    /// Saw ESC.
    Start,
    /// Saw ESC `[` or ESC `O`: parameters follow until a final byte.
    Sequence,
}

/// What one input byte did.
#[derive(Debug, PartialEq, Eq)]
pub enum Edit {
    /// Nothing to do beyond the echo already written.
    Pending,
    /// The operator finished a line (without its terminator).
    Line(String),
}

/// Line-editing state: the partial line and the terminal's last end-of-line byte.
#[derive(Debug)]
pub struct LineEditor {
    line: String,
    /// The previous byte was CR, so an LF right after it is the same line end.
    after_cr: bool,
    escape: Escape,
}

impl Default for LineEditor {
    fn default() -> Self {
        Self::new()
    }
}

impl LineEditor {
    pub fn new() -> Self {
        LineEditor {
            line: String::new(),
            after_cr: false,
            escape: Escape::None,
        }
    }

    /// Text typed so far on the current line.
    pub fn partial(&self) -> &str {
        &self.line
    }

    /// Writes a fresh prompt.
    pub fn prompt(&self, out: &mut dyn Write) -> fmt::Result {
        out.write_str(PROMPT)
    }

    /// Handles one byte from the terminal, echoing to `out`. A finished line's echo
    /// ends with `\r\n`; the caller runs the line and prints the next prompt.
    pub fn feed(&mut self, byte: u8, out: &mut dyn Write) -> Result<Edit, fmt::Error> {
        let after_cr = core::mem::replace(&mut self.after_cr, false);
        match self.escape {
            Escape::Start => {
                self.escape = if matches!(byte, b'[' | b'O') {
                    Escape::Sequence
                } else {
                    Escape::None
                };
                return Ok(Edit::Pending);
            }
            Escape::Sequence => {
                if (0x40..=0x7e).contains(&byte) {
                    self.escape = Escape::None;
                }
                return Ok(Edit::Pending);
            }
            Escape::None => {}
        }
        match byte {
            b'\n' if after_cr => {}
            b'\r' | b'\n' => {
                self.after_cr = byte == b'\r';
                out.write_str("\r\n")?;
                return Ok(Edit::Line(core::mem::take(&mut self.line)));
            }
            BACKSPACE | DELETE => {
                if self.line.pop().is_some() {
                    out.write_str("\x08 \x08")?;
                }
            }
            CTRL_C => {
                self.line.clear();
                out.write_str("^C\r\n")?;
                self.prompt(out)?;
            }
            ESCAPE => self.escape = Escape::Start,
            0x20..=0x7e => {
                if self.line.len() < MAX_LINE {
                    self.line.push(char::from(byte));
                    out.write_char(char::from(byte))?;
                } else {
                    out.write_char(BELL)?;
                }
            }
            _ => {}
        }
        Ok(Edit::Pending)
    }

    /// Prints an asynchronous event line while the prompt is on screen: erases the
    /// prompt line, prints `event: <text>`, then redraws the prompt and whatever the
    /// operator had typed, so typing continues where it was.
    pub fn show_event(&self, text: &str, out: &mut dyn Write) -> fmt::Result {
        write!(out, "\r\x1b[Kevent: {text}\r\n{PROMPT}{}", self.line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn type_bytes(editor: &mut LineEditor, bytes: &[u8]) -> (String, Vec<String>) {
        let mut echo = String::new();
        let mut lines = Vec::new();
        for &b in bytes {
            if let Edit::Line(line) = editor.feed(b, &mut echo).unwrap() {
                lines.push(line);
            }
        }
        (echo, lines)
    }

    #[test]
    fn echoes_printable_and_finishes_on_cr() {
        let mut editor = LineEditor::new();
        let (echo, lines) = type_bytes(&mut editor, b"disks\r");
        assert_eq!(echo, "disks\r\n");
        assert_eq!(lines, ["disks"]);
        assert_eq!(editor.partial(), "");
    }

    #[test]
    fn crlf_is_one_line_end_but_lf_lf_is_two() {
        let mut editor = LineEditor::new();
        let (_, lines) = type_bytes(&mut editor, b"a\r\nb\n\nc\r\r");
        assert_eq!(lines, ["a", "b", "", "c", ""]);
    }

    #[test]
    fn backspace_and_delete_erase_one_character() {
        let mut editor = LineEditor::new();
        let (echo, lines) = type_bytes(&mut editor, b"dixx\x08\x7fsks\r");
        assert_eq!(lines, ["disks"]);
        assert_eq!(echo, "dixx\x08 \x08\x08 \x08sks\r\n");
    }

    #[test]
    fn backspace_on_empty_line_echoes_nothing() {
        let mut editor = LineEditor::new();
        let (echo, _) = type_bytes(&mut editor, b"\x08\x7f");
        assert_eq!(echo, "");
    }

    #[test]
    fn ctrl_c_clears_the_line_and_prompts_again() {
        let mut editor = LineEditor::new();
        let (echo, lines) = type_bytes(&mut editor, b"shutdo\x03help\r");
        assert_eq!(echo, "shutdo^C\r\nthinbox> help\r\n");
        assert_eq!(lines, ["help"]);
    }

    #[test]
    fn escape_sequences_and_control_bytes_are_ignored() {
        let mut editor = LineEditor::new();
        let (echo, lines) = type_bytes(&mut editor, b"up\x1b[A\x1bOB\x1b[1;5Ctime\x01\t\r");
        assert_eq!(lines, ["uptime"]);
        assert_eq!(echo, "uptime\r\n");
    }

    #[test]
    fn overlong_lines_ring_the_bell() {
        let mut editor = LineEditor::new();
        let input = alloc::vec![b'x'; MAX_LINE + 2];
        let (echo, _) = type_bytes(&mut editor, &input);
        assert_eq!(editor.partial().len(), MAX_LINE);
        assert!(echo.ends_with("x\x07\x07"));
    }

    #[test]
    fn event_redraws_prompt_and_partial_line() {
        let mut editor = LineEditor::new();
        type_bytes(&mut editor, b"mess");
        let mut out = String::new();
        editor
            .show_event("pool 0 low water mark", &mut out)
            .unwrap();
        assert_eq!(out, "\r\x1b[Kevent: pool 0 low water mark\r\nthinbox> mess");
        let (_, lines) = type_bytes(&mut editor, b"age\r");
        assert_eq!(lines, ["message"]);
    }
}
