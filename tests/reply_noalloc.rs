//! The per-packet paths (`token::encode`, `token::decode`, `reply::parse`,
//! `reply::match_reply`) must never allocate, on success or on any rejection.
//! A counting global allocator (per thread, so the test harness's own threads
//! do not interfere) proves it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use kaping::wire::reply::{match_reply, parse, Reject};
use kaping::wire::token::{decode, encode, TokenFields, TokenKey, TOKEN_LEN};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call unchanged to the system allocator; the only
// addition is a thread-local counter increment, which does not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

#[test]
fn hot_paths_do_not_allocate() {
    // The counter does see allocations on this thread.
    assert_eq!(
        allocations_during(|| drop(std::hint::black_box(vec![1u8; 8]))),
        1
    );

    let key = TokenKey::new(*b"no-alloc-secret!", 42);
    let fields = TokenFields {
        worker: 1,
        slot: 99,
        generation: 2,
        seq: 3,
        sent_us: 4,
    };
    let mut tok = [0u8; TOKEN_LEN];
    assert_eq!(allocations_during(|| encode(&key, &fields, &mut tok)), 0);
    assert_eq!(
        allocations_during(|| assert_eq!(decode(&key, &tok), Ok(fields))),
        0
    );

    let t = std::str::from_utf8(&tok).unwrap();
    let good = format!(
        "SIP/2.0 200 OK\r\n\
         Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK{t};rport=5060\r\n\
         From: \"kaping\"\r\n <sip:kaping@10.0.0.5;tag=x>;tag={t}\r\n\
         To: <sip:1001@example.com>;tag=1\r\n\
         Call-ID: {t}@10.0.0.5\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    );
    let mut forged = good.clone().into_bytes();
    let last_tag_char = good.find(&format!(">;tag={t}")).unwrap() + ">;tag=".len() + TOKEN_LEN - 1;
    forged[last_tag_char] = if forged[last_tag_char] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let inputs: [(&[u8], Result<(), Reject>); 6] = [
        (good.as_bytes(), Ok(())),
        (&forged, Err(Reject::Forged)),
        (&good.as_bytes()[..200], Err(Reject::Truncated)),
        (b"OPTIONS sip:a@b SIP/2.0\r\n\r\n", Err(Reject::Request)),
        (b"\x00\x00\x00\x00", Err(Reject::NotSip)),
        (&[b'x'; 5000], Err(Reject::Oversized)),
    ];
    for (input, want) in inputs {
        let n = allocations_during(|| {
            let got = match_reply(&key, b"OPTIONS", input).map(|_| ());
            assert!(got == want, "unexpected result {got:?}");
            let _ = parse(input);
        });
        assert_eq!(
            n,
            0,
            "{:?}",
            String::from_utf8_lossy(&input[..input.len().min(40)])
        );
    }
}
