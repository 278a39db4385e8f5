//! Pool messages (`dmsetup message <pool> 0 "..."`): parsing with dm-thin's argument
//! rules, and the errors they report, each with the errno dm-thin would return.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use crate::config::{parse_decimal, parse_dev_id};

/// A parsed pool message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    CreateThin { dev: u64 },
    CreateSnap { dev: u64, origin: u64 },
    Delete { dev: u64 },
    SetTransactionId { current: u64, new: u64 },
    ReserveMetadataSnap,
    ReleaseMetadataSnap,
}

impl Message {
    /// Parses a message: first word case-insensitive, exact argument counts, decimal
    /// 24-bit device ids.
    pub fn parse(text: &str) -> Result<Self, MessageError> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let Some(first) = words.first() else {
            return Err(MessageError::new(Errno::Einval, "empty pool message"));
        };
        let name = first.to_ascii_lowercase();
        let expect = |count: usize| -> Result<(), MessageError> {
            if words.len() == count {
                return Ok(());
            }
            Err(MessageError::new(
                Errno::Einval,
                alloc::format!(
                    "Message received with {} arguments instead of {count}.",
                    words.len()
                ),
            ))
        };
        let dev_id = |word: &str| {
            parse_dev_id(word).ok_or_else(|| {
                MessageError::new(
                    Errno::Einval,
                    alloc::format!("Message received with invalid device id: {word} (0..16777215)"),
                )
            })
        };
        match name.as_str() {
            "create_thin" => {
                expect(2)?;
                Ok(Message::CreateThin {
                    dev: dev_id(words[1])?,
                })
            }
            "create_snap" => {
                expect(3)?;
                Ok(Message::CreateSnap {
                    dev: dev_id(words[1])?,
                    origin: dev_id(words[2])?,
                })
            }
            "delete" => {
                expect(2)?;
                Ok(Message::Delete {
                    dev: dev_id(words[1])?,
                })
            }
            "set_transaction_id" => {
                expect(3)?;
                let id = |word: &str| {
                    parse_decimal(word).ok_or_else(|| {
                        MessageError::new(
                            Errno::Einval,
                            alloc::format!("set_transaction_id message: Unrecognised id {word}."),
                        )
                    })
                };
                Ok(Message::SetTransactionId {
                    current: id(words[1])?,
                    new: id(words[2])?,
                })
            }
            "reserve_metadata_snap" => {
                expect(1)?;
                Ok(Message::ReserveMetadataSnap)
            }
            "release_metadata_snap" => {
                expect(1)?;
                Ok(Message::ReleaseMetadataSnap)
            }
            _ => Err(MessageError::new(
                Errno::Einval,
                alloc::format!("Unrecognised thin pool target message received: {first}"),
            )),
        }
    }
}

/// The errno a failure corresponds to in dm-thin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Errno {
    Einval,
    Eexist,
    Enodata,
    Ebusy,
    Eopnotsupp,
    Enospc,
    Eio,
}

impl Errno {
    /// The symbolic name (`EINVAL`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Errno::Einval => "EINVAL",
            Errno::Eexist => "EEXIST",
            Errno::Enodata => "ENODATA",
            Errno::Ebusy => "EBUSY",
            Errno::Eopnotsupp => "EOPNOTSUPP",
            Errno::Enospc => "ENOSPC",
            Errno::Eio => "EIO",
        }
    }
}

/// A refused or failed message (or another management operation). Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageError {
    pub errno: Errno,
    pub text: String,
}

impl MessageError {
    pub fn new(errno: Errno, text: impl ToString) -> Self {
        MessageError {
            errno,
            text: text.to_string(),
        }
    }
}

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_message() {
        assert_eq!(
            Message::parse("CREATE_THIN 7"),
            Ok(Message::CreateThin { dev: 7 })
        );
        assert_eq!(
            Message::parse("create_snap 2 +1"),
            Ok(Message::CreateSnap { dev: 2, origin: 1 })
        );
        assert_eq!(Message::parse("delete 0"), Ok(Message::Delete { dev: 0 }));
        assert_eq!(
            Message::parse("set_transaction_id 0 18446744073709551615"),
            Ok(Message::SetTransactionId {
                current: 0,
                new: u64::MAX
            })
        );
        assert_eq!(
            Message::parse("reserve_metadata_snap"),
            Ok(Message::ReserveMetadataSnap)
        );
        assert_eq!(
            Message::parse("Release_Metadata_Snap"),
            Ok(Message::ReleaseMetadataSnap)
        );
    }

    #[test]
    fn argument_errors() {
        let cases = [
            (
                "create_thin",
                "Message received with 1 arguments instead of 2.",
            ),
            (
                "create_thin 1 2",
                "Message received with 3 arguments instead of 2.",
            ),
            (
                "create_thin 16777216",
                "Message received with invalid device id: 16777216",
            ),
            (
                "create_thin -1",
                "Message received with invalid device id: -1",
            ),
            (
                "create_snap 1 x",
                "Message received with invalid device id: x",
            ),
            (
                "set_transaction_id 1 z",
                "set_transaction_id message: Unrecognised id z.",
            ),
            (
                "reserve_metadata_snap now",
                "Message received with 2 arguments instead of 1.",
            ),
            (
                "grow 5",
                "Unrecognised thin pool target message received: grow",
            ),
        ];
        for (text, expected) in cases {
            let error = Message::parse(text).unwrap_err();
            assert_eq!(error.errno, Errno::Einval, "{text}");
            assert!(error.text.starts_with(expected), "{text}: {}", error.text);
        }
    }
}
