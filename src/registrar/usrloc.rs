//! dmq_usrloc bodies: the JSON that carries location-table changes.
//!
//! Owns: [`parse_body`], [`sync_request_body`], [`Change`], [`UsrlocMsg`],
//! [`UsrlocReject`].
//!
//! The shapes, as `usrloc_sync.c` of Kamailio 5.6.3 writes them (captured
//! in `tests/data/dmq/`):
//! * `{"action":3}`: "send me all your contacts" (`usrloc_dmq_request_sync`).
//! * one record, `{"action":1|2,"aor":..,"ruid":..,"c":..,"received":..,
//!   "path":..,"callid":..,"user_agent":..,"instance":..,"expires":..,
//!   "cseq":..,"flags":..,"cflags":..,"q":..,"last_modified":..,
//!   "methods":..,"reg_id":..,"server_id":..}`: every live insert/update
//!   (1) and delete (2) (`usrloc_dmq_send_contact`). An expiry is not sent.
//! * `{"multi":{"1":{record},"2":{record},..}}`: a sync answer when
//!   `batch_msg_contacts` > 1 (`usrloc_dmq_send_multi_contact`), flushed at
//!   `batch_msg_contacts` records or `batch_msg_size` estimated bytes.
//!
//! Ground rules:
//! * Never panics; the body is at most [`BODY_LEN_MAX`] bytes, at most
//!   [`CHANGES_MAX`] records, each string at most [`FIELD_LEN_MAX`] bytes.
//! * Unknown fields are ignored (newer Kamailio adds `sockname`, kept as
//!   [`Change::socket`]); an empty string is an absent value, as Kamailio
//!   writes `""` for what a contact lacks.
//! * Numbers must be JSON integers in range; `q` is signed (`-1` =
//!   unspecified, Kamailio's `Q_UNSPECIFIED`).
//!
//! Callers: the DMQ node runtime, after [`super::dmq::parse_message`].
//!
//! [`parse_body`] reads the JSON in one pass with serde visitors straight
//! into records: keys and unescaped strings are borrowed from the body, and
//! only the fields a [`Change`] keeps are copied (a `serde_json::Value`
//! tree cost ~10 µs a record in maps and strings thrown away).
//! [`parse_body_values`] is that tree reader, kept as the reference the
//! tests hold [`parse_body`] to and the benchmark compares it with.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Largest body accepted (the largest UDP payload).
pub const BODY_LEN_MAX: usize = 65_535;
/// Most records in one `multi` batch. A 64 KiB datagram holds about 200
/// records of 300 bytes; Kamailio numbers batch entries with at most 4
/// digits (`char idx[5]`).
pub const CHANGES_MAX: usize = 1024;
/// Longest string field (a Path of several hops is the longest in practice).
pub const FIELD_LEN_MAX: usize = 2048;

/// `DMQ_UPDATE`, `DMQ_RM`, `DMQ_SYNC` of `usrloc_sync.h`.
const ACTION_NONE: u64 = 0;
const ACTION_UPDATE: u64 = 1;
const ACTION_RM: u64 = 2;
const ACTION_SYNC: u64 = 3;

/// The sync request body, byte for byte what Kamailio sends
/// (`srjson_PrintUnformatted` of `{"action":3}`).
pub fn sync_request_body() -> &'static [u8] {
    br#"{"action":3}"#
}

/// What a change does to the location table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Action 1: insert, or update the contact with this ruid.
    Upsert,
    /// Action 2: delete the contact with this ruid.
    Delete,
}

/// One location record change. Text fields are as Kamailio stored them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub action: Action,
    /// Address of record (the user part only, or `user@domain` with
    /// `use_domain`).
    pub aor: String,
    /// usrloc's unique record id: the key of updates and deletes.
    pub ruid: String,
    /// The Contact URI (`c`); empty only in a delete that lacks it.
    pub contact: String,
    /// Source address the REGISTER came from, when NAT was detected.
    pub received: Option<String>,
    /// The Path header value (RFC 3327).
    pub path: Option<String>,
    /// Kamailio's local socket (`sockname`, newer versions only).
    pub socket: Option<String>,
    /// Absolute expiry, unix seconds; 0 = permanent.
    pub expires: u64,
    pub callid: Option<String>,
    pub cseq: u32,
    pub flags: u32,
    pub cflags: u32,
    /// Contact q scaled by 1000, -1 unspecified.
    pub q: i32,
    /// Unix seconds.
    pub last_modified: u64,
    pub server_id: u32,
    pub user_agent: Option<String>,
    /// `+sip.instance` (RFC 5626).
    pub instance: Option<String>,
    pub reg_id: u32,
    /// Allowed methods bitmap (`0xffffffff` = all).
    pub methods: u32,
}

/// A parsed dmq_usrloc body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UsrlocMsg {
    /// `{"action":3}`: the sender wants every contact we hold. A passive
    /// node holds none of its own: it answers 200 and sends nothing.
    SyncRequest,
    /// One record or a `multi` batch, in the sender's order. Records with
    /// action 0 (`DMQ_NONE`, which Kamailio ignores) are left out.
    Changes(Vec<Change>),
}

/// Why a body was not accepted. Discriminant order is stable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum UsrlocReject {
    #[error("body longer than {BODY_LEN_MAX} bytes")]
    Oversized,
    #[error("body is not JSON")]
    NotJson,
    #[error("body or record is not a JSON object")]
    NotObject,
    #[error("\"multi\" is not an object of records")]
    BadBatch,
    #[error("more than {CHANGES_MAX} records")]
    TooManyChanges,
    #[error("unknown action")]
    UnknownAction,
    #[error("sync request inside a batch")]
    SyncInBatch,
    #[error("missing field {0}")]
    MissingField(&'static str),
    #[error("field {0} has the wrong type or is out of range")]
    BadField(&'static str),
    #[error("field {0} longer than {FIELD_LEN_MAX} bytes")]
    FieldTooLong(&'static str),
}

impl UsrlocReject {
    /// Stable snake_case name of the cause (not of the field), for counters.
    pub const fn name(self) -> &'static str {
        match self {
            UsrlocReject::Oversized => "oversized",
            UsrlocReject::NotJson => "not_json",
            UsrlocReject::NotObject => "not_object",
            UsrlocReject::BadBatch => "bad_batch",
            UsrlocReject::TooManyChanges => "too_many_changes",
            UsrlocReject::UnknownAction => "unknown_action",
            UsrlocReject::SyncInBatch => "sync_in_batch",
            UsrlocReject::MissingField(_) => "missing_field",
            UsrlocReject::BadField(_) => "bad_field",
            UsrlocReject::FieldTooLong(_) => "field_too_long",
        }
    }
}

/// Parses a dmq_usrloc body. Never panics; work is bounded by the limits.
pub fn parse_body(body: &[u8]) -> Result<UsrlocMsg, UsrlocReject> {
    if body.len() > BODY_LEN_MAX {
        return Err(UsrlocReject::Oversized);
    }
    // UTF-8 is checked whole first: serde_json does not check the strings
    // of members it skips, and the `Value` reader refuses them (found by
    // fuzzing). serde_json bounds nesting at 128 levels, skipped values
    // included.
    let text = std::str::from_utf8(body).map_err(|_| UsrlocReject::NotJson)?;
    let root: Root = serde_json::from_str(text).map_err(|_| UsrlocReject::NotJson)?;
    let Root::Object { record, multi } = root else {
        return Err(UsrlocReject::NotObject);
    };
    if let Some(multi) = multi {
        let Multi::Records { mut records, more } = multi else {
            return Err(UsrlocReject::BadBatch);
        };
        if more {
            return Err(UsrlocReject::TooManyChanges);
        }
        // Kamailio numbers entries "1".."n" in send order; sort numerically
        // (other keys after, by name), as a map keyed by name would not
        // keep the order. Stable: the last of duplicate keys stays last.
        records.sort_by(|(a, _), (b, _)| {
            (a.parse::<u64>().unwrap_or(u64::MAX), a.as_ref())
                .cmp(&(b.parse::<u64>().unwrap_or(u64::MAX), b.as_ref()))
        });
        // A duplicate key counts once, its last value (as a JSON object).
        records.dedup_by(|later, earlier| {
            if later.0 == earlier.0 {
                std::mem::swap(later, earlier);
                true
            } else {
                false
            }
        });
        let mut changes = Vec::with_capacity(records.len());
        for (_, r) in &records {
            let RecordOrNot::Record(record) = r else {
                return Err(UsrlocReject::BadBatch);
            };
            match record.action()? {
                ACTION_SYNC => return Err(UsrlocReject::SyncInBatch),
                ACTION_NONE => {}
                a => changes.push(record.change(a)?),
            }
        }
        return Ok(UsrlocMsg::Changes(changes));
    }
    match record.action()? {
        ACTION_SYNC => Ok(UsrlocMsg::SyncRequest),
        ACTION_NONE => Ok(UsrlocMsg::Changes(Vec::new())),
        a => Ok(UsrlocMsg::Changes(vec![record.change(a)?])),
    }
}

/// A JSON value where a record field may be: scalars kept (strings
/// borrowed when they have no escapes), anything else only noted.
#[derive(Debug)]
enum Scalar<'a> {
    Null,
    Str(Cow<'a, str>),
    UInt(u64),
    Int(i64),
    /// A float, a boolean, an array or an object: a wrong type for every
    /// field kaping reads.
    Other,
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Scalar::UInt(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(u64::try_from(v).map_or(Scalar::Int(v), Scalar::UInt))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

/// A map key, borrowed unless it has escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// The fields of one record kaping reads; the rest are skipped unread.
#[derive(Debug, Default)]
struct Record<'a> {
    fields: [Option<Scalar<'a>>; FIELDS.len()],
}

/// Every field a record may carry that kaping reads, by index in
/// [`Record::fields`].
pub(crate) const FIELDS: [&str; 19] = [
    "action",
    "aor",
    "ruid",
    "c",
    "received",
    "path",
    "sockname",
    "expires",
    "callid",
    "cseq",
    "flags",
    "cflags",
    "q",
    "last_modified",
    "server_id",
    "user_agent",
    "instance",
    "reg_id",
    "methods",
];

/// Reads a record's entries into `record`; the value of `multi`, when
/// `multi` is given, goes there instead (the root only).
fn read_record<'de, A: MapAccess<'de>>(
    map: &mut A,
    record: &mut Record<'de>,
    mut multi: Option<&mut Option<Multi<'de>>>,
) -> Result<(), A::Error> {
    while let Some(Key(k)) = map.next_key::<Key>()? {
        if let Some(i) = FIELDS.iter().position(|f| *f == k) {
            record.fields[i] = Some(map.next_value()?);
        } else if let (Some(m), "multi") = (multi.as_deref_mut(), k.as_ref()) {
            *m = Some(map.next_value()?);
        } else {
            map.next_value::<IgnoredAny>()?;
        }
    }
    Ok(())
}

/// The body: a record (or a sync request), maybe a `multi` batch.
// Made once a body, on the stack: a box would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Root<'a> {
    Object {
        record: Record<'a>,
        multi: Option<Multi<'a>>,
    },
    NotObject,
}

impl<'de> Deserialize<'de> for Root<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RootVisitor;
        impl<'de> Visitor<'de> for RootVisitor {
            type Value = Root<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut record = Record::default();
                let mut multi = None;
                read_record(&mut map, &mut record, Some(&mut multi))?;
                Ok(Root::Object { record, multi })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Root::NotObject)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Root::NotObject)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Root::NotObject)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Root::NotObject)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Root::NotObject)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Root::NotObject)
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Root::NotObject)
            }
        }
        d.deserialize_any(RootVisitor)
    }
}

/// The value of `multi`: records by their key, in body order, at most
/// [`CHANGES_MAX`] (`more`: there were others, skipped unread).
enum Multi<'a> {
    Records {
        records: Vec<(Cow<'a, str>, RecordOrNot<'a>)>,
        more: bool,
    },
    NotObject,
}

// One per batch entry in one vector: a box each would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum RecordOrNot<'a> {
    Record(Record<'a>),
    NotObject,
}

impl<'de> Deserialize<'de> for Multi<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MultiVisitor;
        impl<'de> Visitor<'de> for MultiVisitor {
            type Value = Multi<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut records = Vec::new();
                let mut more = false;
                while let Some(Key(k)) = map.next_key::<Key>()? {
                    if records.len() == CHANGES_MAX {
                        more = true;
                        map.next_value::<IgnoredAny>()?;
                    } else {
                        records.push((k, map.next_value()?));
                    }
                }
                Ok(Multi::Records { records, more })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Multi::NotObject)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Multi::NotObject)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Multi::NotObject)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Multi::NotObject)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Multi::NotObject)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Multi::NotObject)
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Multi::NotObject)
            }
        }
        d.deserialize_any(MultiVisitor)
    }
}

impl<'de> Deserialize<'de> for RecordOrNot<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RecordVisitor;
        impl<'de> Visitor<'de> for RecordVisitor {
            type Value = RecordOrNot<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut record = Record::default();
                read_record(&mut map, &mut record, None)?;
                Ok(RecordOrNot::Record(record))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(RecordOrNot::NotObject)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(RecordOrNot::NotObject)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(RecordOrNot::NotObject)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(RecordOrNot::NotObject)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(RecordOrNot::NotObject)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(RecordOrNot::NotObject)
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(RecordOrNot::NotObject)
            }
        }
        d.deserialize_any(RecordVisitor)
    }
}

impl Record<'_> {
    fn get(&self, name: &'static str) -> Option<&Scalar<'_>> {
        let i = FIELDS.iter().position(|f| *f == name)?;
        self.fields[i].as_ref()
    }

    fn action(&self) -> Result<u64, UsrlocReject> {
        let a = self
            .uint("action", u64::MAX)?
            .ok_or(UsrlocReject::MissingField("action"))?;
        if a > ACTION_SYNC {
            return Err(UsrlocReject::UnknownAction);
        }
        Ok(a)
    }

    fn uint(&self, name: &'static str, max: u64) -> Result<Option<u64>, UsrlocReject> {
        match self.get(name) {
            None | Some(Scalar::Null) => Ok(None),
            Some(Scalar::UInt(n)) if *n <= max => Ok(Some(*n)),
            Some(_) => Err(UsrlocReject::BadField(name)),
        }
    }

    fn text(&self, name: &'static str) -> Result<Option<String>, UsrlocReject> {
        match self.get(name) {
            None | Some(Scalar::Null) => Ok(None),
            Some(Scalar::Str(s)) if s.is_empty() => Ok(None),
            Some(Scalar::Str(s)) if s.len() > FIELD_LEN_MAX => {
                Err(UsrlocReject::FieldTooLong(name))
            }
            Some(Scalar::Str(s)) => Ok(Some(s.as_ref().to_owned())),
            Some(_) => Err(UsrlocReject::BadField(name)),
        }
    }

    fn required(&self, name: &'static str) -> Result<String, UsrlocReject> {
        self.text(name)?.ok_or(UsrlocReject::MissingField(name))
    }

    fn change(&self, action: u64) -> Result<Change, UsrlocReject> {
        let upsert = action == ACTION_UPDATE;
        debug_assert!(upsert || action == ACTION_RM, "action {action}");
        let u32_field = |name| -> Result<u32, UsrlocReject> {
            Ok(self.uint(name, u32::MAX as u64)?.unwrap_or(0) as u32)
        };
        let q = match self.get("q") {
            None | Some(Scalar::Null) => 0,
            Some(Scalar::UInt(q)) => i32::try_from(*q).map_err(|_| UsrlocReject::BadField("q"))?,
            Some(Scalar::Int(q)) => i32::try_from(*q).map_err(|_| UsrlocReject::BadField("q"))?,
            Some(_) => return Err(UsrlocReject::BadField("q")),
        };
        let expires = self.uint("expires", u64::MAX)?;
        Ok(Change {
            action: if upsert {
                Action::Upsert
            } else {
                Action::Delete
            },
            aor: self.required("aor")?,
            ruid: self.required("ruid")?,
            contact: if upsert {
                self.required("c")?
            } else {
                self.text("c")?.unwrap_or_default()
            },
            received: self.text("received")?,
            path: self.text("path")?,
            socket: self.text("sockname")?,
            expires: match (upsert, expires) {
                (true, None) => return Err(UsrlocReject::MissingField("expires")),
                (_, e) => e.unwrap_or(0),
            },
            callid: self.text("callid")?,
            cseq: u32_field("cseq")?,
            flags: u32_field("flags")?,
            cflags: u32_field("cflags")?,
            q,
            last_modified: self.uint("last_modified", u64::MAX)?.unwrap_or(0),
            server_id: u32_field("server_id")?,
            user_agent: self.text("user_agent")?,
            instance: self.text("instance")?,
            reg_id: u32_field("reg_id")?,
            methods: u32_field("methods")?,
        })
    }
}

/// [`parse_body`] through a `serde_json::Value` tree: the reference it is
/// tested against, and what the benchmark compares it with.
pub fn parse_body_values(body: &[u8]) -> Result<UsrlocMsg, UsrlocReject> {
    if body.len() > BODY_LEN_MAX {
        return Err(UsrlocReject::Oversized);
    }
    // serde_json bounds nesting at 128 levels: no recursion blow-up.
    let root: Value = serde_json::from_slice(body).map_err(|_| UsrlocReject::NotJson)?;
    let root = root.as_object().ok_or(UsrlocReject::NotObject)?;
    if let Some(multi) = root.get("multi") {
        let multi = multi.as_object().ok_or(UsrlocReject::BadBatch)?;
        if multi.len() > CHANGES_MAX {
            return Err(UsrlocReject::TooManyChanges);
        }
        // Kamailio numbers entries "1".."n" in send order; a map does not
        // keep order, so sort numerically (other keys after, by name).
        let mut entries: Vec<(&String, &Value)> = multi.iter().collect();
        entries.sort_by_key(|(k, _)| (k.parse::<u64>().unwrap_or(u64::MAX), k.as_str()));
        let mut changes = Vec::with_capacity(entries.len());
        for (_, v) in entries {
            let record = v.as_object().ok_or(UsrlocReject::BadBatch)?;
            match action_of(record)? {
                ACTION_SYNC => return Err(UsrlocReject::SyncInBatch),
                ACTION_NONE => {}
                a => changes.push(change(record, a)?),
            }
        }
        return Ok(UsrlocMsg::Changes(changes));
    }
    match action_of(root)? {
        ACTION_SYNC => Ok(UsrlocMsg::SyncRequest),
        ACTION_NONE => Ok(UsrlocMsg::Changes(Vec::new())),
        a => Ok(UsrlocMsg::Changes(vec![change(root, a)?])),
    }
}

fn action_of(r: &Map<String, Value>) -> Result<u64, UsrlocReject> {
    let a = uint(r, "action", u64::MAX)?.ok_or(UsrlocReject::MissingField("action"))?;
    if a > ACTION_SYNC {
        return Err(UsrlocReject::UnknownAction);
    }
    Ok(a)
}

/// An unsigned integer field at most `max`; `None` when absent or null.
fn uint(r: &Map<String, Value>, name: &'static str, max: u64) -> Result<Option<u64>, UsrlocReject> {
    match r.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|&n| n <= max)
            .map(Some)
            .ok_or(UsrlocReject::BadField(name)),
    }
}

/// A string field: `None` when absent, null or empty.
fn text(r: &Map<String, Value>, name: &'static str) -> Result<Option<String>, UsrlocReject> {
    match r.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s.len() > FIELD_LEN_MAX => Err(UsrlocReject::FieldTooLong(name)),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(UsrlocReject::BadField(name)),
    }
}

fn required(r: &Map<String, Value>, name: &'static str) -> Result<String, UsrlocReject> {
    text(r, name)?.ok_or(UsrlocReject::MissingField(name))
}

fn change(r: &Map<String, Value>, action: u64) -> Result<Change, UsrlocReject> {
    let upsert = action == ACTION_UPDATE;
    debug_assert!(upsert || action == ACTION_RM, "action {action}");
    let u32_field = |name| -> Result<u32, UsrlocReject> {
        Ok(uint(r, name, u32::MAX as u64)?.unwrap_or(0) as u32)
    };
    let q = match r.get("q") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_i64()
            .and_then(|q| i32::try_from(q).ok())
            .ok_or(UsrlocReject::BadField("q"))?,
    };
    let expires = uint(r, "expires", u64::MAX)?;
    Ok(Change {
        action: if upsert {
            Action::Upsert
        } else {
            Action::Delete
        },
        aor: required(r, "aor")?,
        ruid: required(r, "ruid")?,
        contact: if upsert {
            required(r, "c")?
        } else {
            text(r, "c")?.unwrap_or_default()
        },
        received: text(r, "received")?,
        path: text(r, "path")?,
        socket: text(r, "sockname")?,
        expires: match (upsert, expires) {
            (true, None) => return Err(UsrlocReject::MissingField("expires")),
            (_, e) => e.unwrap_or(0),
        },
        callid: text(r, "callid")?,
        cseq: u32_field("cseq")?,
        flags: u32_field("flags")?,
        cflags: u32_field("cflags")?,
        q,
        last_modified: uint(r, "last_modified", u64::MAX)?.unwrap_or(0),
        server_id: u32_field("server_id")?,
        user_agent: text(r, "user_agent")?,
        instance: text(r, "instance")?,
        reg_id: u32_field("reg_id")?,
        methods: u32_field("methods")?,
    })
}
