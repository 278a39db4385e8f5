//! The `nbd` command: which clients may use which exports (the device mapper's access
//! list), and who is connected.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use dm::access::{Access, Rule, describe, describe_peer};

use crate::{CommandError, Console, Platform, outln};

const USAGE: &str = "usage: nbd allow EXPORT CLIENTS [ro] | nbd deny EXPORT CLIENTS [hide] | nbd \
                     forget EXPORT CLIENTS | nbd default allow [ro]|deny [hide] | nbd acl \
                     [EXPORT] | nbd clients (CLIENTS: ADDRESS[/PREFIX], cert:SHA256 or \
                     subject:DN)";

impl<P: Platform> Console<P> {
    pub(crate) fn nbd_command(
        &mut self,
        args: &[String],
        out: &mut dyn Write,
    ) -> Result<(), CommandError> {
        let words: Vec<&str> = args.iter().map(String::as_str).collect();
        if let ["tls", rest @ ..] = words.as_slice() {
            return self.nbd_tls_command(rest, out);
        }
        let mut dm = self.dm.borrow_mut();
        let result = match words.as_slice() {
            ["allow" | "deny", export, clients, rest @ ..] => {
                let access = access(words[0], rest)?;
                dm.set_access(export, clients, access)
            }
            ["forget", export, clients] => dm.forget_access(export, clients),
            ["default", verb, rest @ ..] => dm.set_default_access(access(verb, rest)?),
            ["acl"] => {
                show_rules(dm.access_list().default, &dm.access_list().rules, out);
                Ok(())
            }
            ["acl", export] => dm.device(export).map(|device| {
                let list = dm.access_list();
                let rules: Vec<Rule> = list.rules_for(device.name()).cloned().collect();
                show_rules(list.default, &rules, out);
            }),
            ["clients"] => {
                show_clients(&dm.nbd_clients(), out);
                Ok(())
            }
            [verb, ..] => {
                let verb = *verb;
                return Err(format!("nbd {verb}: wrong arguments ({USAGE})").into());
            }
            [] => return Err(USAGE.into()),
        };
        result.map_err(|error| format!("nbd {}: {}", words[0], error.0).into())
    }
}

/// `allow` or `deny` and their optional word.
fn access(verb: &str, rest: &[&str]) -> Result<Access, CommandError> {
    match (verb, rest) {
        ("allow", []) => Ok(Access::ReadWrite),
        ("allow", ["ro"]) => Ok(Access::ReadOnly),
        ("deny", []) => Ok(Access::Refused),
        ("deny", ["hide"]) => Ok(Access::Hidden),
        ("allow" | "deny", [word, ..]) => {
            Err(format!("nbd {verb}: unexpected '{word}' (allow takes ro, deny takes hide)").into())
        }
        _ => Err(format!("nbd default: '{verb}' is neither allow nor deny ({USAGE})").into()),
    }
}

fn show_rules(default: Access, rules: &[Rule], out: &mut dyn Write) {
    outln!(out, "default: {}", describe(default));
    if rules.is_empty() {
        outln!(out, "no rules: every client gets the default");
        return;
    }
    let networks: Vec<String> = rules
        .iter()
        .map(|rule| format!("{}", rule.clients))
        .collect();
    let export_width = rules
        .iter()
        .map(|rule| rule.export.len())
        .chain(["EXPORT".len()])
        .max()
        .unwrap_or(0);
    let network_width = networks
        .iter()
        .map(String::len)
        .chain(["CLIENTS".len()])
        .max()
        .unwrap_or(0);
    outln!(
        out,
        "{:<export_width$}  {:<network_width$}  ACCESS",
        "EXPORT",
        "CLIENTS"
    );
    for (rule, network) in rules.iter().zip(&networks) {
        outln!(
            out,
            "{:<export_width$}  {network:<network_width$}  {}",
            rule.export,
            describe(rule.access)
        );
    }
}

fn show_clients(clients: &[(&str, &nbd::Peer)], out: &mut dyn Write) {
    if clients.is_empty() {
        outln!(out, "no NBD clients");
        return;
    }
    let width = clients
        .iter()
        .map(|(export, _)| export.len())
        .max()
        .unwrap_or(0)
        .max("EXPORT".len());
    outln!(out, "{:<width$}  CLIENT", "EXPORT");
    for (export, peer) in clients {
        outln!(out, "{export:<width$}  {}", describe_peer(peer));
    }
}
