//! The reply of Kamailio's `ul.dump` RPC (usrloc, 5.x):
//! `result.Domains[].Domain.AoRs[].Info.Contacts[].Contact`, each contact
//! with `Address`, `Received`, `Path`, `Socket`, `Ruid`... where an empty
//! field reads `[not set]`. The bare `result` object is accepted too, as is
//! `kamcmd`'s habit of printing several domains.
//!
//! Fields we do not use are ignored: the dump carries many (Expires, Q,
//! CSeq, User-Agent, Methods...) and new Kamailio versions add more.

use serde::Deserialize;

use super::Place;
use crate::contact::ContactSpec;

#[derive(Deserialize)]
struct Reply {
    result: Option<Dump>,
    error: Option<serde_json::Value>,
    #[serde(rename = "Domains")]
    domains: Option<Vec<DomainEntry>>,
}

#[derive(Deserialize)]
struct Dump {
    #[serde(rename = "Domains", default)]
    domains: Vec<DomainEntry>,
}

#[derive(Deserialize)]
struct DomainEntry {
    #[serde(rename = "Domain")]
    domain: Domain,
}

#[derive(Deserialize)]
struct Domain {
    #[serde(rename = "AoRs", default)]
    aors: Vec<AorEntry>,
}

#[derive(Deserialize)]
struct AorEntry {
    #[serde(rename = "Info")]
    info: AorInfo,
}

#[derive(Deserialize)]
struct AorInfo {
    #[serde(rename = "AoR")]
    aor: String,
    #[serde(rename = "Contacts", default)]
    contacts: Vec<ContactEntry>,
}

#[derive(Deserialize)]
struct ContactEntry {
    #[serde(rename = "Contact")]
    contact: UlContact,
}

#[derive(Deserialize)]
struct UlContact {
    #[serde(rename = "Address")]
    address: Option<String>,
    #[serde(rename = "Received")]
    received: Option<String>,
    #[serde(rename = "Path")]
    path: Option<String>,
    #[serde(rename = "Socket")]
    socket: Option<String>,
    #[serde(rename = "Ruid")]
    ruid: Option<String>,
}

/// Calls `f` for every contact until it returns false. A document that is
/// not a `ul.dump` reply at all is an error for the whole file.
pub(super) fn parse(
    text: &[u8],
    mut f: impl FnMut(Result<ContactSpec, String>, Place) -> bool,
) -> Result<(), String> {
    let reply: Reply =
        serde_json::from_slice(text).map_err(|e| format!("not a ul.dump reply: {e}"))?;
    if let Some(err) = reply.error {
        return Err(format!("the RPC reply is an error: {err}"));
    }
    let domains = match (reply.result, reply.domains) {
        (Some(dump), _) => dump.domains,
        (None, Some(domains)) => domains,
        (None, None) => {
            return Err("no \"result\" or \"Domains\" member: not a ul.dump reply".into())
        }
    };
    for entry in domains {
        for aor_entry in entry.domain.aors {
            let info = aor_entry.info;
            for (i, c) in info.contacts.into_iter().enumerate() {
                let c = c.contact;
                let ruid = super::optional(c.ruid.as_deref());
                let place = Place::UlContact {
                    aor: info.aor.clone(),
                    index: i + 1,
                    ruid: ruid.clone(),
                };
                let spec = match super::optional(c.address.as_deref()) {
                    None => Err("no Address".to_string()),
                    Some(uri) => Ok(ContactSpec {
                        uri,
                        aor: Some(info.aor.clone()),
                        received: super::optional(c.received.as_deref()),
                        path: super::optional(c.path.as_deref()),
                        socket: super::optional(c.socket.as_deref()),
                        interval: None,
                        send_to: None,
                        ruid,
                        ..ContactSpec::default()
                    }),
                };
                if !f(spec, place) {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}
