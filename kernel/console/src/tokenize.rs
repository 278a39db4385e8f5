//! Splits a command line into words the way a shell would, so dm-style messages
//! can be passed as one argument: `message pool 0 "create_thin 0"`.
//!
//! Double quotes group words and honour `\"` and `\\`; single quotes group words
//! literally; quoted and unquoted parts next to each other join into one word.

use alloc::string::String;
use alloc::vec::Vec;

/// Why a line could not be split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizeError {
    /// A quote opened at this character position was never closed.
    Unterminated { quote: char, at: usize },
}

impl core::fmt::Display for TokenizeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TokenizeError::Unterminated { quote, at } => write!(
                f,
                "unterminated {quote} quote opened at column {} (close it with {quote})",
                at + 1
            ),
        }
    }
}

/// Splits `line` into words.
pub fn tokenize(line: &str) -> Result<Vec<String>, TokenizeError> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(done) = word.take() {
                    words.push(done);
                }
            }
            '"' | '\'' => {
                let current = word.get_or_insert_with(String::new);
                let mut closed = false;
                while let Some((_, inner)) = chars.next() {
                    match inner {
                        _ if inner == c => {
                            closed = true;
                            break;
                        }
                        '\\' if c == '"' && matches!(chars.peek(), Some((_, '"' | '\\'))) => {
                            let (_, escaped) = chars.next().expect("peeked");
                            current.push(escaped);
                        }
                        _ => current.push(inner),
                    }
                }
                if !closed {
                    return Err(TokenizeError::Unterminated { quote: c, at });
                }
            }
            _ => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        tokenize(line).unwrap()
    }

    #[test]
    fn splits_on_any_whitespace() {
        assert_eq!(words("  disk-test\tvda   16 "), ["disk-test", "vda", "16"]);
        assert!(words("   ").is_empty());
    }

    #[test]
    fn double_quotes_group_words() {
        assert_eq!(
            words(r#"message pool 0 "create_thin 0""#),
            ["message", "pool", "0", "create_thin 0"]
        );
    }

    #[test]
    fn single_quotes_are_literal() {
        assert_eq!(words(r#"say 'a "b" \n'"#), ["say", r#"a "b" \n"#]);
    }

    #[test]
    fn escapes_inside_double_quotes() {
        assert_eq!(words(r#""a \"b\" \\ \n""#), [r#"a "b" \ \n"#]);
    }

    #[test]
    fn adjacent_parts_join_and_empty_quotes_make_empty_words() {
        assert_eq!(words(r#"a"b c"'d' "" x"#), ["ab cd", "", "x"]);
    }

    #[test]
    fn unterminated_quotes_are_errors() {
        let err = tokenize(r#"message pool 0 "create_thin 0"#).unwrap_err();
        assert_eq!(err, TokenizeError::Unterminated { quote: '"', at: 15 });
        assert_eq!(
            alloc::format!("{err}"),
            "unterminated \" quote opened at column 16 (close it with \")"
        );
        assert!(tokenize("a 'b").is_err());
    }
}
