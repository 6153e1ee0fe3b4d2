//! Helpers shared by the tests that start daemons and responders.

use std::net::UdpSocket;

/// A base port such that `base..base+count` are free for UDP on the IPv4
/// wildcard address (checked, then released).
#[allow(dead_code)] // each test binary uses its share of these helpers
pub fn free_ports(count: u16) -> u16 {
    free_ports_on(count, false)
}

/// [`free_ports`] on the IPv6 wildcard when `v6`.
pub fn free_ports_on(count: u16, v6: bool) -> u16 {
    // Seeded by pid and wall clock: tests of one binary run in parallel,
    // and a second run of the same binary must not retry the same ports.
    let mut x = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
        ^ 0x9E37_79B9;
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let base = 20_000 + (x % 40_000) as u16;
        let ok = (0..count).all(|i| {
            if v6 {
                UdpSocket::bind(("::", base + i)).is_ok()
            } else {
                UdpSocket::bind(("0.0.0.0", base + i)).is_ok()
            }
        });
        if ok {
            return base;
        }
    }
    panic!("no free port range of {count}");
}

/// Waits for `child` to exit; kills it (and fails the test) past `limit`.
#[allow(dead_code)] // each test binary uses its share of these helpers
pub fn wait_with_deadline(
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process did not stop within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
