//! The plain format: `sip:uri [ip:port]` per line, `#` comments, blank
//! lines ignored. The optional second field is where to send the pings
//! (when it is not what the URI says, e.g. a NAT binding known out of band).

use crate::contact::ContactSpec;

/// `None` for a blank or comment line.
pub(super) fn parse(line: &str) -> Option<Result<ContactSpec, String>> {
    let content = match line.find('#') {
        Some(i) => &line[..i],
        None => line,
    };
    let mut fields = content.split_ascii_whitespace();
    let uri = fields.next()?;
    let mut spec = ContactSpec::from_uri(uri);
    if let Some(dest) = fields.next() {
        match dest.parse() {
            Ok(addr) => spec.send_to = Some(addr),
            Err(_) => {
                return Some(Err(format!(
                    "destination '{dest}' is not ip:port (IPv6 as [addr]:port)"
                )))
            }
        }
    }
    if let Some(extra) = fields.next() {
        return Some(Err(format!(
            "unexpected '{extra}' after the destination (format: sip:uri [ip:port])"
        )));
    }
    Some(Ok(spec))
}
