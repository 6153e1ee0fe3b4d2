//! Store tests: round trips, group commit, the torn-tail and corruption
//! rules, snapshot crash points, the lock, and a model-based property test.
//! Timing figures come from the `#[ignore]`d tests at the end (run them with
//! `cargo test --release --lib state::tests::timing -- --ignored --nocapture`).

use super::*;
use proptest::prelude::*;
use std::collections::HashMap;
use std::io::Write as _;
use tempfile::TempDir;

fn contact(i: u32) -> ContactRecord {
    ContactRecord {
        uri: format!(
            "sip:user{i:07}@10.{}.{}.{}:5060;transport=udp",
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff
        ),
        ..Default::default()
    }
}

fn full_contact(i: u32, owner: &str) -> ContactRecord {
    ContactRecord {
        uri: format!("sip:u{i}@192.0.2.{}:5060", i % 250),
        aor: Some(format!("sip:u{i}@example.com")),
        received: Some(format!("198.51.100.{}:{}", i % 250, 10_000 + i)),
        path: Some("<sip:edge1.example.com;lr>,<sip:core.example.com;lr>".into()),
        interval_ms: Some(30_000 + i),
        owner: Some(owner.into()),
        socket: Some("udp:203.0.113.10:5060".into()),
        source: i.is_multiple_of(2).then(|| "socket".into()),
        keepalive: i.is_multiple_of(3).then(|| "crlf".into()),
        registrar_expires: None,
    }
}

fn history(i: u32) -> History {
    History {
        state: 2,
        misses: (i % 3) as u16,
        sent: 100 + i,
        answered: 99 + i,
        rtt_last_us: 1_000 + i,
        rtt_min_us: 500,
        rtt_max_us: 9_000,
        srtt_us: 1_200,
        rttvar_us: 300,
        last_code: 200,
        last_ping_ms: 1_700_000_000_000 + u64::from(i),
        last_reply_ms: 1_700_000_000_010 + u64::from(i),
    }
}

/// A temporary directory to use as a state directory: 0750, as kaping
/// would make it (a plain TempDir is 0755, which open tightens with a
/// warning).
fn state_tmp() -> TempDir {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .permissions(fs::Permissions::from_mode(0o750))
        .tempdir()
        .unwrap()
}

fn open(dir: &Path) -> (Store, Restored) {
    match Store::open(dir) {
        Ok(r) => r,
        Err(e) => panic!("open {}: {e}", dir.display()),
    }
}

fn reopen(dir: &Path) -> Restored {
    open(dir).1
}

fn segments(dir: &Path) -> Vec<(u64, PathBuf)> {
    dir::list(dir).unwrap().segments
}

fn snapshots(dir: &Path) -> Vec<(u64, PathBuf)> {
    dir::list(dir).unwrap().snapshots
}

fn last_segment(dir: &Path) -> PathBuf {
    segments(dir).pop().unwrap().1
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

fn flip_byte(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x20;
    fs::write(path, bytes).unwrap();
}

/// Copies every regular file of `from` except the lock into a new temp dir.
fn copy_dir(from: &Path) -> TempDir {
    let to = state_tmp();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != dir::LOCK_FILE {
            fs::copy(entry.path(), to.path().join(entry.file_name())).unwrap();
        }
    }
    to
}

fn as_map(
    contacts: &[(ContactRecord, Option<History>)],
) -> HashMap<String, (ContactRecord, Option<History>)> {
    contacts
        .iter()
        .map(|(c, h)| (c.key(), (c.clone(), *h)))
        .collect()
}

#[test]
fn contact_key_joins_aor_and_uri() {
    assert_eq!(contact_key(None, "sip:a@h"), "\nsip:a@h");
    assert_eq!(
        contact_key(Some("sip:a@example.com"), "sip:a@h"),
        "sip:a@example.com\nsip:a@h"
    );
    assert_eq!(
        full_contact(1, "r").key(),
        contact_key(Some("sip:u1@example.com"), "sip:u1@192.0.2.1:5060")
    );
}

#[test]
fn empty_directory_opens_empty_and_is_created() {
    let tmp = state_tmp();
    let dir = tmp.path().join("state").join("nested");
    let (store, restored) = open(&dir);
    assert!(restored.contacts.is_empty());
    assert!(restored.warnings.is_empty());
    assert_eq!(
        (restored.snapshot_contacts, restored.journal_records),
        (0, 0)
    );
    assert_eq!(store.journal_records(), 0);
    assert_eq!(segments(&dir).len(), 1);
}

#[test]
fn every_op_kind_round_trips_in_order() {
    let tmp = state_tmp();
    let (mut store, _) = open(tmp.path());
    let a = full_contact(1, "reg-a");
    let b = full_contact(2, "reg-b");
    let c = full_contact(3, "reg-a");
    let d = contact(4);
    let e = contact(5);
    store
        .commit(&[
            Op::Add(a.clone()),
            Op::Add(b.clone()),
            Op::Add(c.clone()),
            Op::Add(d.clone()),
        ])
        .unwrap();
    // Replace a's parameters (a NAT rebinding): same key, same position.
    let a2 = ContactRecord {
        received: Some("203.0.113.9:40000".into()),
        interval_ms: None,
        ..a.clone()
    };
    store.commit(&[Op::Add(a2.clone())]).unwrap();
    store.commit(&[Op::Del { key: b.key() }]).unwrap();
    store.commit(&[Op::Add(e.clone())]).unwrap();
    drop(store);

    let restored = reopen(tmp.path());
    assert_eq!(restored.journal_records, 7);
    assert!(restored.warnings.is_empty(), "{:?}", restored.warnings);
    let got: Vec<_> = restored
        .contacts
        .iter()
        .map(|(c, h)| {
            assert_eq!(*h, None);
            c.clone()
        })
        .collect();
    assert_eq!(got, vec![a2.clone(), c.clone(), d.clone(), e.clone()]);

    // Flush one owner, then everything, each across a reopen.
    let (mut store, _) = open(tmp.path());
    store
        .commit(&[Op::Flush {
            owner: Some("reg-a".into()),
        }])
        .unwrap();
    drop(store);
    let got: Vec<_> = reopen(tmp.path())
        .contacts
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    assert_eq!(got, vec![d, e]);
    let (mut store, _) = open(tmp.path());
    store
        .commit(&[Op::Flush { owner: None }, Op::Add(b.clone())])
        .unwrap();
    drop(store);
    let restored = reopen(tmp.path());
    assert_eq!(restored.contacts, vec![(b, None)]);
    assert_eq!(restored.journal_records, 10);
}

#[test]
fn del_of_unknown_key_and_empty_commit_are_harmless() {
    let tmp = state_tmp();
    let (mut store, _) = open(tmp.path());
    let seg = last_segment(tmp.path());
    let before = file_len(&seg);
    store.commit(&[]).unwrap();
    assert_eq!(file_len(&seg), before, "an empty commit writes nothing");
    assert_eq!(store.commits(), 0);
    store
        .commit(&[
            Op::Del {
                key: contact(9).key(),
            },
            Op::Add(contact(1)),
        ])
        .unwrap();
    drop(store);
    assert_eq!(reopen(tmp.path()).contacts, vec![(contact(1), None)]);
}

#[test]
fn group_commit_writes_one_contiguous_batch() {
    let tmp = state_tmp();
    let (mut store, _) = open(tmp.path());
    let seg = last_segment(tmp.path());
    let ops: Vec<Op> = (0..1000).map(|i| Op::Add(contact(i))).collect();
    let mut expected = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        journal::encode_record(&mut expected, 1 + i as u64, op).unwrap();
    }
    store.commit(&ops).unwrap();
    assert_eq!(store.commits(), 1);
    assert_eq!(store.journal_records(), 1000);
    // The segment is its header followed by exactly the batch's bytes.
    let bytes = fs::read(&seg).unwrap();
    assert_eq!(
        &bytes[journal::SEGMENT_HEADER_LEN as usize..],
        &expected[..]
    );
    // The next batch follows on with the next sequence number.
    store
        .commit(&[Op::Del {
            key: contact(0).key(),
        }])
        .unwrap();
    assert_eq!(store.commits(), 2);
    drop(store);
    let restored = reopen(tmp.path());
    assert_eq!(restored.contacts.len(), 999);
    assert_eq!(restored.journal_records, 1001);
}

#[test]
fn oversized_record_is_refused_and_the_store_stays_usable() {
    let tmp = state_tmp();
    let (mut store, _) = open(tmp.path());
    let huge = ContactRecord {
        uri: "x".repeat(journal::RECORD_PAYLOAD_MAX),
        ..Default::default()
    };
    let err = store
        .commit(&[Op::Add(contact(1)), Op::Add(huge)])
        .unwrap_err();
    assert!(matches!(err, StateError::RecordTooLarge { .. }), "{err}");
    store.commit(&[Op::Add(contact(2))]).unwrap();
    drop(store);
    assert_eq!(reopen(tmp.path()).contacts, vec![(contact(2), None)]);
}

/// Three commits; returns the directory and the byte range of the last
/// record (the last commit's only record).
fn three_commits() -> (TempDir, u64, u64) {
    let tmp = state_tmp();
    let (mut store, _) = open(tmp.path());
    store
        .commit(&[Op::Add(contact(1)), Op::Add(contact(2))])
        .unwrap();
    store.commit(&[Op::Add(full_contact(3, "r"))]).unwrap();
    let start = file_len(&last_segment(tmp.path()));
    store.commit(&[Op::Add(contact(4))]).unwrap();
    let end = file_len(&last_segment(tmp.path()));
    (tmp, start, end)
}

#[test]
fn torn_last_record_at_every_truncation_point_is_cut_with_a_warning() {
    let (tmp, start, end) = three_commits();
    let earlier = vec![
        (contact(1), None),
        (contact(2), None),
        (full_contact(3, "r"), None),
    ];
    for cut in start..end {
        let copy = copy_dir(tmp.path());
        let seg = last_segment(copy.path());
        File::options()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let (mut store, restored) = open(copy.path());
        assert_eq!(restored.contacts, earlier, "cut at {cut}");
        assert_eq!(restored.journal_records, 3);
        if cut == start {
            // Cut exactly at a record boundary: nothing torn.
            assert!(restored.warnings.is_empty(), "{:?}", restored.warnings);
            continue;
        }
        assert_eq!(restored.warnings.len(), 1, "cut at {cut}");
        let w = &restored.warnings[0];
        assert!(
            w.contains("torn") && w.contains(&format!("byte offset {start}")),
            "{w}"
        );
        assert!(w.contains(&seg.display().to_string()), "{w}");
        assert_eq!(file_len(&seg), start, "the torn bytes are cut off");
        // Appends resume cleanly where the torn record was.
        store.commit(&[Op::Add(contact(5))]).unwrap();
        drop(store);
        let restored = reopen(copy.path());
        assert!(restored.warnings.is_empty());
        assert_eq!(restored.contacts.len(), 4);
        assert_eq!(restored.contacts[3], (contact(5), None));
    }
}

#[test]
fn bad_checksum_of_the_final_record_and_a_zeroed_tail_are_torn() {
    let (tmp, start, end) = three_commits();
    for offset in start..end {
        let copy = copy_dir(tmp.path());
        flip_byte(&last_segment(copy.path()), offset);
        if offset < start + 4 {
            // A damaged length no longer ends at end of file: it cannot be
            // told from damage before the end, so it is refused.
            let err = Store::open(copy.path()).err().expect("bad length accepted");
            assert!(
                matches!(err, StateError::CorruptJournal { offset: at, .. } if at == start),
                "{err}"
            );
            continue;
        }
        let restored = reopen(copy.path());
        assert_eq!(restored.contacts.len(), 3, "flip at {offset}");
        assert_eq!(restored.warnings.len(), 1, "flip at {offset}");
    }
    // A tail extended with zeros (size updated, data never written).
    let copy = copy_dir(tmp.path());
    let seg = last_segment(copy.path());
    let mut f = File::options().append(true).open(&seg).unwrap();
    f.write_all(&[0u8; 300]).unwrap();
    drop(f);
    let restored = reopen(copy.path());
    assert_eq!(restored.contacts.len(), 4);
    assert_eq!(restored.warnings.len(), 1);
    assert_eq!(file_len(&seg), end);
}

#[test]
fn flipped_byte_in_a_middle_record_is_refused_naming_the_offset() {
    let (tmp, start, end) = three_commits();
    let seg = last_segment(tmp.path());
    // The middle record is the second commit's: it ends where the last begins.
    let bytes = fs::read(&seg).unwrap();
    let first_len = journal::RECORD_HEADER_LEN as u64
        + u64::from(u32::from_le_bytes(bytes[32..36].try_into().unwrap()))
        + journal::RECORD_TRAILER_LEN as u64;
    let second_len = journal::RECORD_HEADER_LEN as u64
        + u64::from(u32::from_le_bytes(
            bytes[(32 + first_len) as usize..][..4].try_into().unwrap(),
        ))
        + journal::RECORD_TRAILER_LEN as u64;
    let middle = 32 + first_len + second_len;
    let middle_len = start - middle;
    for offset in middle..start {
        let copy = copy_dir(tmp.path());
        let seg = last_segment(copy.path());
        flip_byte(&seg, offset);
        let err = Store::open(copy.path())
            .err()
            .unwrap_or_else(|| panic!("flip at {offset} accepted"));
        let StateError::CorruptJournal {
            file,
            offset: at,
            record,
            ..
        } = &err
        else {
            panic!("flip at {offset}: {err}");
        };
        assert_eq!((file, *at, *record), (&seg, middle, 3), "flip at {offset}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("byte offset {middle}")) && msg.contains("record 3"),
            "{msg}"
        );
        assert!(msg.contains("truncate -s"), "{msg}");
        // Nothing was cut: the operator decides.
        assert_eq!(file_len(&seg), end, "flip at {offset}");
    }
    assert!(middle_len > 40);
}

#[test]
fn damage_in_an_older_segment_is_never_taken_for_a_torn_tail() {
    let tmp = state_tmp();
    let (mut store, _) = open(tmp.path());
    store
        .commit(&[Op::Add(contact(1)), Op::Add(contact(2))])
        .unwrap();
    let job = store.begin_snapshot().unwrap();
    store.commit(&[Op::Add(contact(3))]).unwrap();
    drop(job); // abandoned: the old segment stays and is replayed
    drop(store);
    let old = segments(tmp.path())[0].1.clone();
    let len = file_len(&old);
    File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let err = Store::open(tmp.path())
        .err()
        .expect("truncated older segment accepted");
    assert!(matches!(err, StateError::CorruptJournal { .. }), "{err}");
    assert!(err.to_string().contains("not the newest segment"), "{err}");
}

#[test]
fn a_missing_segment_is_a_gap_error() {
    let tmp = state_tmp();
    let (mut store, _) = open(tmp.path());
    for i in 0..3 {
        store.commit(&[Op::Add(contact(i))]).unwrap();
        drop(store.begin_snapshot().unwrap()); // rotate, never write
    }
    store.commit(&[Op::Add(contact(9))]).unwrap();
    drop(store);
    let segs = segments(tmp.path());
    assert_eq!(segs.len(), 4);
    fs::remove_file(&segs[1].1).unwrap();
    let err = Store::open(tmp.path()).err().expect("gap accepted");
    assert!(matches!(err, StateError::JournalGap { .. }), "{err}");
    fs::remove_file(&segs[0].1).unwrap();
    let err = Store::open(tmp.path()).err().expect("gap accepted");
    assert!(
        err.to_string().contains("records 1..3 are missing"),
        "{err}"
    );
}

#[test]
fn add_of_an_existing_key_keeps_the_snapshot_history() {
    let tmp = state_tmp();
    let (mut store, _) = open(tmp.path());
    let a = full_contact(1, "r");
    let b = full_contact(2, "r");
    store
        .commit(&[Op::Add(a.clone()), Op::Add(b.clone())])
        .unwrap();
    let job = store.begin_snapshot().unwrap();
    job.write(&[(a.clone(), Some(history(1))), (b.clone(), Some(history(2)))])
        .unwrap();
    let a2 = ContactRecord {
        received: Some("203.0.113.1:1024".into()),
        ..a.clone()
    };
    // Re-add a with new params; delete and re-add b (a new contact: no history).
    store
        .commit(&[
            Op::Add(a2.clone()),
            Op::Del { key: b.key() },
            Op::Add(b.clone()),
        ])
        .unwrap();
    drop(store);
    let restored = reopen(tmp.path());
    assert_eq!(restored.snapshot_contacts, 2);
    assert_eq!(restored.journal_records, 3);
    assert_eq!(restored.contacts, vec![(a2, Some(history(1))), (b, None)]);
}

#[test]
fn registrar_contacts_come_back_from_a_snapshot_with_their_expiry() {
    let tmp = state_tmp();
    let (mut store, _) = open(tmp.path());
    let control = full_contact(1, "r");
    store.commit(&[Op::Add(control.clone())]).unwrap();
    let fed = |i: u32, expires: u32| ContactRecord {
        registrar_expires: Some(expires),
        ..contact(i)
    };
    let (a, b) = (fed(10, 1_900_000_000), fed(11, 0));
    let job = store.begin_snapshot().unwrap();
    job.write(&[
        (control.clone(), Some(history(1))),
        (a.clone(), Some(history(2))),
        (b.clone(), None),
    ])
    .unwrap();
    // The operator adds b through the control socket: it is theirs now.
    let b_control = ContactRecord {
        registrar_expires: None,
        ..b.clone()
    };
    store.commit(&[Op::Add(b_control.clone())]).unwrap();
    drop(store);
    let restored = reopen(tmp.path());
    assert_eq!(
        restored.contacts,
        vec![
            (control, Some(history(1))),
            (a, Some(history(2))),
            (b_control, None)
        ]
    );
}

#[test]
fn snapshot_replaces_journal_and_removes_what_it_covers() {
    let tmp = state_tmp();
    let (mut store, _) = open(tmp.path());
    let view: Vec<_> = (0..100)
        .map(|i| (full_contact(i, "r"), Some(history(i))))
        .collect();
    let ops: Vec<_> = view.iter().map(|(c, _)| Op::Add(c.clone())).collect();
    store.commit(&ops).unwrap();
    let job = store.begin_snapshot().unwrap();
    assert_eq!(job.covered_seq(), 100);
    assert_eq!(store.journal_records(), 0);
    assert!(matches!(
        store.begin_snapshot(),
        Err(StateError::SnapshotBusy)
    ));
    // Commits go on while the job runs on another thread.
    let handle = std::thread::spawn(move || job.write(&view).map(|s| (s, view)));
    store
        .commit(&[Op::Del {
            key: full_contact(0, "r").key(),
        }])
        .unwrap();
    let (stats, view) = handle.join().unwrap().unwrap();
    assert_eq!(stats.contacts, 100);
    assert_eq!(stats.bytes, file_len(&snapshots(tmp.path())[0].1));
    assert_eq!(store.journal_records(), 1);
    assert_eq!(segments(tmp.path()).len(), 1, "the covered segment is gone");
    // The next snapshot (same store) replaces the first one.
    let job = store.begin_snapshot().unwrap();
    job.write(&view[1..]).unwrap();
    assert_eq!(snapshots(tmp.path()).len(), 1);
    drop(store);
    let restored = reopen(tmp.path());
    assert_eq!(restored.snapshot_contacts, 99);
    assert_eq!(restored.journal_records, 0);
    assert_eq!(restored.contacts, view[1..].to_vec());
}

#[test]
fn begin_snapshot_without_new_records_reuses_the_empty_segment() {
    let tmp = state_tmp();
    let (mut store, _) = open(tmp.path());
    store.commit(&[Op::Add(contact(1))]).unwrap();
    store
        .begin_snapshot()
        .unwrap()
        .write(&[(contact(1), None)])
        .unwrap();
    store
        .begin_snapshot()
        .unwrap()
        .write(&[(contact(1), None)])
        .unwrap();
    assert_eq!(segments(tmp.path()).len(), 1);
    assert_eq!(snapshots(tmp.path()).len(), 1);
    store.commit(&[Op::Add(contact(2))]).unwrap();
    drop(store);
    let restored = reopen(tmp.path());
    assert_eq!(
        restored.contacts,
        vec![(contact(1), None), (contact(2), None)]
    );
}

#[test]
fn corrupt_snapshot_is_refused_with_file_offset_and_entry() {
    let tmp = state_tmp();
    let (mut store, _) = open(tmp.path());
    let view: Vec<_> = (0..10)
        .map(|i| (full_contact(i, "r"), Some(history(i))))
        .collect();
    store
        .commit(
            &view
                .iter()
                .map(|(c, _)| Op::Add(c.clone()))
                .collect::<Vec<_>>(),
        )
        .unwrap();
    store.begin_snapshot().unwrap().write(&view).unwrap();
    drop(store);
    let snap = snapshots(tmp.path())[0].1.clone();
    let len = file_len(&snap);
    // Every byte: header, entries, trailer.
    for offset in 0..len {
        let copy = copy_dir(tmp.path());
        let snap = snapshots(copy.path())[0].1.clone();
        flip_byte(&snap, offset);
        let err = Store::open(copy.path())
            .err()
            .unwrap_or_else(|| panic!("flip at {offset} accepted"));
        let StateError::BadSnapshot {
            file, offset: at, ..
        } = &err
        else {
            panic!("flip at {offset}: {err}");
        };
        assert_eq!(file, &snap);
        assert!(*at <= offset.max(56), "flip at {offset} reported at {at}");
        assert!(
            err.to_string().contains("restore this file from a backup"),
            "{err}"
        );
    }
    // A truncated snapshot, and one with bytes appended.
    for new_len in [len - 1, len - 24, 100, 10] {
        let copy = copy_dir(tmp.path());
        let snap = snapshots(copy.path())[0].1.clone();
        File::options()
            .write(true)
            .open(&snap)
            .unwrap()
            .set_len(new_len)
            .unwrap();
        assert!(matches!(
            Store::open(copy.path()),
            Err(StateError::BadSnapshot { .. })
        ));
    }
    let copy = copy_dir(tmp.path());
    let snap = snapshots(copy.path())[0].1.clone();
    File::options()
        .append(true)
        .open(&snap)
        .unwrap()
        .write_all(b"x")
        .unwrap();
    assert!(matches!(
        Store::open(copy.path()),
        Err(StateError::BadSnapshot { .. })
    ));
    // Intact, it restores every entry with its history.
    assert_eq!(reopen(tmp.path()).contacts, view);
}

/// Builds: contacts 0..50 snapshotted (with histories) in an earlier
/// round, 50..70 committed, a job begun (its view gives every contact a new
/// history), then contact 0 deleted and 70..74 added while the job is
/// simulated crashing at `stop`. Returns the directory and the exact
/// restore expected if the new snapshot, or else the old one, is in force.
type Contacts = Vec<(ContactRecord, Option<History>)>;
fn crash_during_snapshot(stop: JobStop) -> (TempDir, Contacts, Contacts) {
    let tmp = state_tmp();
    let (mut store, _) = open(tmp.path());
    let first: Contacts = (0..50).map(|i| (contact(i), Some(history(i)))).collect();
    let adds: Vec<_> = first.iter().map(|(c, _)| Op::Add(c.clone())).collect();
    store.commit(&adds).unwrap();
    store.begin_snapshot().unwrap().write(&first).unwrap();
    for i in 50..70 {
        store.commit(&[Op::Add(contact(i))]).unwrap();
    }
    let job = store.begin_snapshot().unwrap();
    let view: Contacts = (0..70)
        .map(|i| (contact(i), Some(history(1000 + i))))
        .collect();
    let del = Op::Del {
        key: contact(0).key(),
    };
    store.commit(&[del]).unwrap();
    for i in 70..74 {
        store.commit(&[Op::Add(contact(i))]).unwrap();
    }
    let finished = job.write_until(&view, stop).unwrap().is_some();
    assert_eq!(finished, stop == JobStop::At(snapshot::Stop::Never));
    drop(job);
    drop(store); // the "crash": nothing more runs

    let newer = (70..74).map(|i| (contact(i), None));
    let with_new = view[1..].iter().cloned().chain(newer.clone()).collect();
    let with_old = first[1..]
        .iter()
        .cloned()
        .chain((50..70).map(|i| (contact(i), None)))
        .chain(newer)
        .collect();
    (tmp, with_new, with_old)
}

#[test]
fn a_crash_at_every_step_of_a_snapshot_loses_nothing() {
    use snapshot::Stop;
    let stops = [
        (JobStop::At(Stop::TempPartial), false),
        (JobStop::At(Stop::TempSynced), false),
        (JobStop::At(Stop::Renamed), true),
        (JobStop::AfterFirstDelete, true),
        (JobStop::At(Stop::Never), true),
    ];
    for (stop, new_snapshot) in stops {
        let (tmp, with_new, with_old) = crash_during_snapshot(stop);
        let restored = reopen(tmp.path());
        if new_snapshot {
            assert_eq!(restored.contacts, with_new, "{stop:?}");
            assert_eq!(restored.snapshot_contacts, 70, "{stop:?}");
        } else {
            assert_eq!(restored.contacts, with_old, "{stop:?}");
            assert_eq!(restored.snapshot_contacts, 50, "{stop:?}");
        }
        // Every leftover was cleaned: one snapshot, no temp, no covered
        // segment (with the old snapshot, records 51..=70 are still needed).
        let listing = dir::list(tmp.path()).unwrap();
        assert!(listing.temps.is_empty(), "{stop:?}");
        assert_eq!(listing.snapshots.len(), 1, "{stop:?}");
        let segments_left = if new_snapshot { 1 } else { 2 };
        assert_eq!(listing.segments.len(), segments_left, "{stop:?}");
        // And a second open sees the same thing, with no warnings left.
        let again = reopen(tmp.path());
        assert_eq!(again.contacts, restored.contacts, "{stop:?}");
        assert!(again.warnings.is_empty(), "{stop:?}: {:?}", again.warnings);
    }
}

#[test]
fn an_unfinished_segment_creation_is_removed_on_open() {
    let tmp = state_tmp();
    let (mut store, _) = open(tmp.path());
    store.commit(&[Op::Add(contact(1))]).unwrap();
    drop(store);
    let temp = tmp
        .path()
        .join(format!("{}{}", dir::journal_name(2), dir::TEMP_SUFFIX));
    fs::write(&temp, b"KAPJ").unwrap();
    let restored = reopen(tmp.path());
    assert_eq!(restored.contacts, vec![(contact(1), None)]);
    assert_eq!(restored.warnings.len(), 1);
    assert!(!temp.exists());
}

#[test]
fn second_open_of_a_locked_directory_fails_naming_it() {
    let tmp = state_tmp();
    let (store, _) = open(tmp.path());
    let err = Store::open(tmp.path())
        .err()
        .expect("second open succeeded");
    assert!(matches!(err, StateError::Locked { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    assert!(msg.contains("--state-dir"), "{msg}");
    drop(store);
    open(tmp.path());
}

#[test]
fn a_snapshot_job_is_send() {
    fn send<T: Send>(_: &T) {}
    let tmp = state_tmp();
    let (mut store, _) = open(tmp.path());
    let job = store.begin_snapshot().unwrap();
    send(&job);
}

/// One step of the property test.
#[derive(Clone, Debug)]
enum Step {
    Commit(Vec<Op>),
    /// Begin a snapshot; write it after `delay` more steps (or never).
    Snapshot {
        delay: usize,
        write: bool,
    },
    Reopen,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    // Few keys and owners, so replaces, deletes and flushes hit.
    let contact = (
        0u32..12,
        proptest::option::of(0u32..3),
        0u32..3,
        proptest::option::of(any::<u32>()),
        proptest::option::of(0u32..3),
    )
        .prop_map(|(i, aor, owner, interval_ms, ext)| ContactRecord {
            uri: format!("sip:c{i}@192.0.2.{i}"),
            aor: aor.map(|a| format!("sip:a{a}@example.com")),
            received: interval_ms.map(|v| format!("198.51.100.1:{}", v % 65536)),
            path: None,
            interval_ms,
            owner: Some(format!("o{owner}")),
            socket: ext.map(|e| format!("udp:203.0.113.{e}:5060")),
            source: ext.filter(|&e| e == 1).map(|_| "socket".into()),
            keepalive: ext.filter(|&e| e == 2).map(|_| "null".into()),
            registrar_expires: None,
        });
    prop_oneof![
        6 => contact.clone().prop_map(Op::Add),
        3 => contact.prop_map(|c| Op::Del { key: c.key() }),
        1 => proptest::option::of(0u32..3).prop_map(|o| Op::Flush { owner: o.map(|o| format!("o{o}")) }),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => proptest::collection::vec(op_strategy(), 1..6).prop_map(Step::Commit),
        2 => (0usize..4, proptest::bool::weighted(0.8)).prop_map(|(delay, write)| Step::Snapshot { delay, write }),
        1 => Just(Step::Reopen),
    ]
}

/// The model: key → (contact, history), first-insertion order, and a
/// generation per key that changes when a key is deleted and added again
/// (a new contact: a snapshot view taken before must not lend it history).
#[derive(Default, Clone)]
struct Model {
    map: HashMap<String, (ContactRecord, Option<History>)>,
    order: Vec<String>,
    generation: HashMap<String, u64>,
    next_generation: u64,
}

/// A snapshot view plus the generation of each of its contacts.
type View = (Vec<(ContactRecord, Option<History>)>, Vec<u64>);

impl Model {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::Add(c) => match self.map.get_mut(&c.key()) {
                Some(slot) => slot.0 = c.clone(),
                None => {
                    self.map.insert(c.key(), (c.clone(), None));
                    self.order.push(c.key());
                    self.next_generation += 1;
                    self.generation.insert(c.key(), self.next_generation);
                }
            },
            Op::Del { key } => {
                self.map.remove(key);
            }
            Op::Flush { owner } => self
                .map
                .retain(|_, (c, _)| owner.is_some() && c.owner != *owner),
        }
        let map = &self.map;
        self.order.retain(|k| map.contains_key(k));
    }

    fn view(&self, seed: u32) -> View {
        self.order
            .iter()
            .enumerate()
            .map(|(i, k)| {
                (
                    (self.map[k].0.clone(), Some(history(seed + i as u32))),
                    self.generation[k],
                )
            })
            .unzip()
    }

    /// A written snapshot's histories become the restored ones for every
    /// contact still the same one (same generation) as in the view.
    fn snapshot_written(&mut self, view: View) {
        for ((c, h), generation) in view.0.into_iter().zip(view.1) {
            let key = c.key();
            if self.generation.get(&key) == Some(&generation) {
                if let Some(slot) = self.map.get_mut(&key) {
                    slot.1 = h;
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn restore_equals_the_model(steps in proptest::collection::vec(step_strategy(), 1..40)) {
        let tmp = state_tmp();
        let (mut store, _) = open(tmp.path());
        let mut model = Model::default();
        // A begun job, its view, and the steps left before it is written.
        let mut pending: Option<(SnapshotJob, View, usize, bool)> = None;
        for (n, step) in steps.iter().enumerate() {
            if let Some((_, _, left, _)) = &mut pending {
                if *left == 0 {
                    let (job, view, _, write) = pending.take().unwrap();
                    if write {
                        job.write(&view.0).unwrap();
                        model.snapshot_written(view);
                    }
                } else {
                    *left -= 1;
                }
            }
            match step {
                Step::Commit(ops) => {
                    store.commit(ops).unwrap();
                    for op in ops {
                        model.apply(op);
                    }
                }
                Step::Snapshot { delay, write } => {
                    if pending.is_none() {
                        let job = store.begin_snapshot().unwrap();
                        pending = Some((job, model.view(n as u32 * 100), *delay, *write));
                    }
                }
                Step::Reopen => {
                    // A restart abandons an unwritten job.
                    pending = None;
                    drop(store);
                    let (s, restored) = open(tmp.path());
                    store = s;
                    prop_assert!(restored.warnings.is_empty(), "{:?}", restored.warnings);
                    prop_assert_eq!(as_map(&restored.contacts), model.map.clone());
                }
            }
        }
        drop(pending);
        drop(store);
        let restored = reopen(tmp.path());
        prop_assert!(restored.warnings.is_empty(), "{:?}", restored.warnings);
        prop_assert_eq!(as_map(&restored.contacts), model.map.clone());
        // Order: snapshot order, then journal order for newer keys, which
        // is the model's first-insertion order.
        let order: Vec<_> = restored.contacts.iter().map(|(c, _)| c.key()).collect();
        prop_assert_eq!(order, model.order);
    }
}

/// Commit of 1,000 Adds with ~50-byte URIs, fdatasync included. Prints the
/// figures; asserts nothing about time (the VM's disk decides).
#[test]
#[ignore = "timing: run with --release --ignored --nocapture"]
fn timing_commit_1000_adds() {
    let tmp = TempDir::new_in(
        std::env::var_os("KAPING_STATE_BENCH_DIR").unwrap_or_else(|| std::env::temp_dir().into()),
    )
    .unwrap();
    let (mut store, _) = open(tmp.path());
    let batches: Vec<Vec<Op>> = (0..50)
        .map(|b| (0..1000).map(|i| Op::Add(contact(b * 1000 + i))).collect())
        .collect();
    assert!(batches[0]
        .iter()
        .all(|op| matches!(op, Op::Add(c) if (40..=60).contains(&c.uri.len()))));
    let mut times = Vec::new();
    for ops in &batches {
        let t = Instant::now();
        store.commit(ops).unwrap();
        times.push(t.elapsed());
    }
    // Encoding alone, for the split.
    let mut buf = Vec::new();
    let mut encode = Duration::MAX;
    for _ in 0..10 {
        buf.clear();
        let t = Instant::now();
        for (i, op) in batches[0].iter().enumerate() {
            journal::encode_record(&mut buf, i as u64, op).unwrap();
        }
        encode = encode.min(t.elapsed());
    }
    // The device's share: a bare pwrite + fdatasync of the same bytes.
    let bare = File::create(tmp.path().join("bare")).unwrap();
    let mut device = Vec::new();
    for n in 0..batches.len() as u64 {
        let t = Instant::now();
        bare.write_all_at(&buf, n * buf.len() as u64).unwrap();
        bare.sync_data().unwrap();
        device.push(t.elapsed());
    }
    let quantiles = |mut v: Vec<Duration>| {
        v.sort();
        let n = v.len();
        format!(
            "min {:?} median {:?} p90 {:?} max {:?}",
            v[0],
            v[n / 2],
            v[n * 9 / 10],
            v[n - 1]
        )
    };
    println!(
        "commit of 1000 adds ({} bytes): {}; encode+checksum alone {:?}; \
         bare pwrite+fdatasync of the same bytes: {}",
        buf.len(),
        quantiles(times),
        encode,
        quantiles(device)
    );
}

/// Snapshot of 1M contacts with histories, then a restore of it. Prints
/// the figures.
#[test]
#[ignore = "timing: run with --release --ignored --nocapture"]
fn timing_snapshot_1m() {
    let tmp = TempDir::new_in(
        std::env::var_os("KAPING_STATE_BENCH_DIR").unwrap_or_else(|| std::env::temp_dir().into()),
    )
    .unwrap();
    let (mut store, _) = open(tmp.path());
    let view: Vec<_> = (0..1_000_000u32)
        .map(|i| {
            let mut c = contact(i);
            c.aor = Some(format!("sip:user{i:07}@example.com"));
            c.owner = Some("registrar-1".into());
            (c, Some(history(i)))
        })
        .collect();
    store.commit(&[Op::Add(view[0].0.clone())]).unwrap();
    let job = store.begin_snapshot().unwrap();
    let stats = job.write(&view).unwrap();
    println!(
        "snapshot of {} contacts: {} bytes in {:?} ({:.0} MB/s)",
        stats.contacts,
        stats.bytes,
        stats.elapsed,
        stats.bytes as f64 / stats.elapsed.as_secs_f64() / 1e6
    );
    drop(store);
    let t = Instant::now();
    let restored = reopen(tmp.path());
    println!(
        "restore of {} contacts: {:?}",
        restored.contacts.len(),
        t.elapsed()
    );
    assert_eq!(restored.contacts.len(), 1_000_000);
}

/// The journal and snapshot fuzz targets start from real files: a store's
/// segment and snapshot after every kind of op, each raw (mode byte 0) and
/// as framed chunks (odd mode byte, see `state::fuzz`).
/// `KAPING_BLESS_SEEDS=1 cargo test --lib state::tests::fuzz_seeds` writes
/// them to `fuzz/seeds/`; without it, the seeds there must restore.
#[test]
fn fuzz_seeds_are_real_state_files() {
    let tmp = state_tmp();
    let (mut store, _) = open(tmp.path());
    let ops = vec![
        Op::Add(full_contact(1, "r1")),
        Op::Add(contact(2)),
        Op::Add(ContactRecord {
            registrar_expires: Some(1_700_000_123),
            ..full_contact(3, "registrar")
        }),
        Op::Del {
            key: contact(2).key(),
        },
        Op::Flush {
            owner: Some("r9".into()),
        },
    ];
    store.commit(&ops).unwrap();
    let segment = fs::read(last_segment(tmp.path())).unwrap();
    let mut framed_ops = vec![1u8];
    for op in &ops {
        let mut payload = Vec::new();
        codec::put_op(&mut payload, op);
        framed_ops.push(codec::op_kind_len(op).0);
        framed_ops.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        framed_ops.extend_from_slice(&payload);
    }

    let restored = reopen_after(store, tmp.path());
    let contacts: Vec<_> = restored
        .into_iter()
        .enumerate()
        .map(|(i, (c, _))| (c, (i == 0).then(|| history(1))))
        .collect();
    let (mut store, _) = open(tmp.path());
    store.begin_snapshot().unwrap().write(&contacts).unwrap();
    let snap = fs::read(&snapshots(tmp.path()).pop().unwrap().1).unwrap();
    let mut framed_entries = vec![5u8]; // version 3
    for (c, h) in &contacts {
        let mut body = Vec::new();
        codec::put_contact(&mut body, c);
        codec::put_contact_ext(&mut body, c);
        codec::put_history(&mut body, h.as_ref());
        codec::put_registrar(&mut body, c);
        framed_entries.push(0);
        framed_entries.extend_from_slice(&(body.len() as u16).to_le_bytes());
        framed_entries.extend_from_slice(&body);
    }
    drop(store);

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let seeds = [
        ("journal", "segment", [&[0u8][..], &segment].concat()),
        ("journal", "framed-ops", framed_ops),
        ("snapshot", "snapshot", [&[0u8][..], &snap].concat()),
        ("snapshot", "framed-entries", framed_entries),
    ];
    for (target, name, bytes) in seeds {
        let path = root.join(target).join(name);
        if std::env::var_os("KAPING_BLESS_SEEDS").is_some() {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, &bytes).unwrap();
        }
        let seed = fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (KAPING_BLESS_SEEDS=1 writes it)", path.display()));
        // The seed decodes to what was written (created_ms aside).
        let dir = state_tmp();
        let (file, body) = match target {
            "journal" if seed[0] == 0 => (dir::journal_name(1), seed[1..].to_vec()),
            "snapshot" if seed[0] == 0 => {
                let covered = u64::from_le_bytes(seed[17..25].try_into().unwrap());
                (dir::snapshot_name(covered), seed[1..].to_vec())
            }
            _ => continue, // framed seeds: the same payloads as the raw ones
        };
        fs::write(dir.path().join(file), body).unwrap();
        let got: Vec<_> = reopen(dir.path())
            .contacts
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        let want: Vec<_> = contacts.iter().map(|(c, _)| c.clone()).collect();
        assert_eq!(got, want, "{}", path.display());
        super::fuzz::journal(&seed);
        super::fuzz::snapshot(&seed);
    }
}

fn reopen_after(store: Store, dir: &Path) -> Vec<(ContactRecord, Option<History>)> {
    drop(store);
    reopen(dir).contacts
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().mode() & 0o7777
}

/// (name, mode, gid) of every entry of `dir`, sorted by name.
fn entries(dir: &Path) -> Vec<(String, u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let mut all: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                meta.mode() & 0o7777,
                meta.gid(),
            )
        })
        .collect();
    all.sort();
    all
}

/// Leaves every kind of file the store creates in `dir`: the lock, journal
/// segments (each made as a temp file and renamed), a snapshot, and a
/// snapshot temp file (a job stopped before its rename).
fn every_kind_of_file(dir: &Path, group: Option<&Group>) {
    let (mut store, _) = Store::open_with_group(dir, group).unwrap();
    store.commit(&[Op::Add(contact(1))]).unwrap();
    store
        .begin_snapshot()
        .unwrap()
        .write(&[(contact(1), None)])
        .unwrap();
    store.commit(&[Op::Add(contact(2))]).unwrap();
    let job = store.begin_snapshot().unwrap();
    let stop = JobStop::At(snapshot::Stop::TempSynced);
    assert!(job.write_until(&[], stop).unwrap().is_none());
    let names: Vec<_> = entries(dir).into_iter().map(|(n, ..)| n).collect();
    assert!(
        names.iter().any(|n| n.starts_with("journal-"))
            && names.iter().any(|n| n.ends_with(".snap"))
            && names.iter().any(|n| n.ends_with(".snap.tmp"))
            && names.iter().any(|n| n == dir::LOCK_FILE),
        "{names:?}"
    );
}

#[test]
fn the_directory_is_0750_and_every_file_0640_whatever_the_umask() {
    for mask in [0o000, 0o077] {
        let tmp = state_tmp();
        let dir = tmp.path().join("state");
        crate::access::with_umask(mask, || every_kind_of_file(&dir, None));
        assert_eq!(mode_of(&dir), 0o750, "umask {mask:03o}");
        for (name, mode, _) in entries(&dir) {
            assert_eq!(mode, 0o640, "{name}, umask {mask:03o}");
        }
        // Nothing to tighten on the next open (the snapshot temp file is
        // removed, with its own warning).
        let warnings = reopen(&dir).warnings;
        assert!(
            warnings.len() == 1 && warnings[0].contains("removed an unfinished file"),
            "{warnings:?}"
        );
    }
}

#[test]
fn an_existing_directory_open_to_others_is_tightened_with_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = state_tmp();
    let dir = tmp.path().join("state");
    let (mut store, _) = open(&dir);
    store.commit(&[Op::Add(contact(1))]).unwrap();
    drop(store);
    // As an older kaping and a careless operator left it (setgid kept).
    let set = |p: &Path, mode| fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    set(&dir, 0o2777);
    let segment = last_segment(&dir);
    set(&segment, 0o644);
    set(&dir.join(dir::LOCK_FILE), 0o666);

    let restored = reopen(&dir);
    assert_eq!(restored.contacts, vec![(contact(1), None)]);
    assert_eq!(mode_of(&dir), 0o2750);
    assert_eq!(mode_of(&segment), 0o640);
    assert_eq!(mode_of(&dir.join(dir::LOCK_FILE)), 0o640);
    let [d, f] = &restored.warnings[..] else {
        panic!("two warnings: {:?}", restored.warnings);
    };
    assert!(
        d.contains("was mode 2777 (open to every local user, writable by its group)")
            && d.contains("set it to 2750"),
        "{d}"
    );
    let name = segment.file_name().unwrap().to_string_lossy();
    assert!(
        f.contains("set 1 state file(s)") && f.contains(&format!("{name} 0644")),
        "{f}"
    );
    assert!(reopen(&dir).warnings.is_empty());

    // Only "other" execute, or a directory stricter than 0750, is left as
    // is when no group is set: 0700 keeps even the group out.
    set(&dir, 0o701);
    assert_eq!(reopen(&dir).warnings.len(), 1);
    assert_eq!(mode_of(&dir), 0o700);
    assert!(reopen(&dir).warnings.is_empty());
}

/// A group the test process may give files to that is not its own: root
/// gives them to nogroup (gid 65534); anyone else skips, saying so.
fn another_group(dir: &Path) -> Option<Group> {
    use std::os::unix::fs::MetadataExt;
    if fs::metadata(dir).unwrap().uid() != 0 {
        println!("SKIP: giving files to another group needs root");
        return None;
    }
    let group = Group::resolve("state_group", "65534").unwrap();
    assert_ne!(group.gid, fs::metadata(dir).unwrap().gid());
    Some(group)
}

#[test]
fn state_group_gets_the_directory_and_every_file() {
    let tmp = state_tmp();
    let Some(group) = another_group(tmp.path()) else {
        return;
    };
    let dir = tmp.path().join("state");
    every_kind_of_file(&dir, Some(&group));
    let gid = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(p).unwrap().gid()
    };
    assert_eq!((mode_of(&dir), gid(&dir)), (0o750, group.gid));
    for (name, mode, file_gid) in entries(&dir) {
        assert_eq!((mode, file_gid), (0o640, group.gid), "{name}");
    }

    // A directory made before the setting: its files and the directory are
    // given to the group at the next open, and the group may enter a 0700
    // directory from then on.
    let tmp = state_tmp();
    let dir = tmp.path().join("state");
    let (mut store, _) = open(&dir);
    store.commit(&[Op::Add(contact(1))]).unwrap();
    drop(store);
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    let (_store, restored) = Store::open_with_group(&dir, Some(&group)).unwrap();
    assert_eq!((mode_of(&dir), gid(&dir)), (0o750, group.gid));
    for (name, mode, file_gid) in entries(&dir) {
        assert_eq!((mode, file_gid), (0o640, group.gid), "{name}");
    }
    let [w] = &restored.warnings[..] else {
        panic!("one warning: {:?}", restored.warnings);
    };
    assert!(
        w.contains("was mode 0700 (not readable by the state_group, ")
            && w.contains("(gid 65534)); set it to 0750"),
        "{w}"
    );
}
