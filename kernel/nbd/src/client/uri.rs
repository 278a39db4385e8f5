//! `nbd://HOST[:PORT]/EXPORT` addresses, as libnbd and qemu write them.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an export lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub host: String,
    pub port: u16,
    /// The export name: the path without its leading `/`, percent-escapes decoded.
    pub export: String,
}

impl NbdUri {
    /// Parses `nbd://HOST[:PORT][/EXPORT]`; the reason for a refusal is one line.
    pub fn parse(text: &str) -> Result<NbdUri, String> {
        let rest = text.strip_prefix("nbd://").ok_or_else(|| {
            format!("'{text}' is not an nbd:// address (nbd://HOST[:PORT]/EXPORT)")
        })?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|&port| port != 0)
                    .ok_or_else(|| format!("'{port}' in {text} is not a TCP port"))?;
                (host, port)
            }
            None => (authority, DEFAULT_PORT),
        };
        if host.is_empty() {
            return Err(format!("{text} names no host"));
        }
        let export = decode(path).ok_or_else(|| format!("{text} has a bad %-escape"))?;
        Ok(NbdUri {
            host: String::from(host),
            port,
            export,
        })
    }
}

impl core::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "nbd://{}:{}/", self.host, self.port)?;
        for byte in self.export.bytes() {
            if byte.is_ascii_alphanumeric() || b"-._~/:".contains(&byte) {
                write!(f, "{}", byte as char)?;
            } else {
                write!(f, "%{byte:02X}")?;
            }
        }
        Ok(())
    }
}

/// Decodes %-escapes; `None` for a broken one or a result that is not UTF-8.
fn decode(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = core::str::from_utf8(bytes.get(index + 1..index + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn addresses_parse_like_libnbd_reads_them() {
        let uri = NbdUri::parse("nbd://127.0.0.1:10900/disk").unwrap();
        assert_eq!(
            (uri.host.as_str(), uri.port, uri.export.as_str()),
            ("127.0.0.1", 10900, "disk")
        );
        let uri = NbdUri::parse("nbd://host").unwrap();
        assert_eq!((uri.port, uri.export.as_str()), (DEFAULT_PORT, ""));
        assert_eq!(NbdUri::parse("nbd://h//x").unwrap().export, "/x");
        assert_eq!(NbdUri::parse("nbd://h/a%20b").unwrap().export, "a b");
        assert_eq!(
            NbdUri::parse("nbd://h:1/a%20b").unwrap().to_string(),
            "nbd://h:1/a%20b"
        );
        for bad in [
            "http://h/x",
            "nbd:///x",
            "nbd://h:0/x",
            "nbd://h:99999/x",
            "nbd://h/%zz",
        ] {
            assert!(NbdUri::parse(bad).is_err(), "{bad}");
        }
    }
}
