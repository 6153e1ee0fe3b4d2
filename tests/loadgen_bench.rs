//! `kaping-loadgen bench` end to end, small: 20,000 contacts for 3 s with the
//! debug binaries. It checks that every figure of the JSON report is there
//! and sane (no timing assertions beyond that: the machine is shared), and
//! that the run is bounded in time and leaves no child or file behind.

mod common;
use common::output_within;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The whole bench (ceiling, loading, warm-up, window, stop) must end by then.
const TIME_LIMIT: Duration = Duration::from_secs(60);

#[test]
fn small_bench_reports_sane_figures() {
    let child = Command::new(env!("CARGO_BIN_EXE_kaping-loadgen"))
        .args([
            "bench",
            "--contacts",
            "20000",
            "--seconds",
            "3",
            "--warmup",
            "1",
            "--ceiling-seconds",
            "2",
            "--latency",
            "1ms",
            // A modest rate a debug daemon sustains on a busy 2-core machine.
            "--interval",
            "2s",
            "--workers",
            "2",
            "--json",
            "--kaping",
            env!("CARGO_BIN_EXE_kaping"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kaping-loadgen bench");
    let (status, out, err) = output_within(child, TIME_LIMIT, "bench");
    assert!(status.success(), "bench failed: {status}\n{err}");

    let r: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    let f = |k: &str| {
        r[k].as_f64()
            .unwrap_or_else(|| panic!("field {k} missing or not a number in {r}"))
    };
    assert_eq!(f("contacts"), 20000.0);
    assert_eq!(f("loaded"), 20000.0);
    assert_eq!(f("skipped"), 0.0);
    assert_eq!(f("workers"), 2.0);
    assert!(
        r["backend"]
            .as_str()
            .is_some_and(|b| b == "uring" || b == "mmsg"),
        "{r}"
    );
    assert!(
        f("request_bytes") > 300.0 && f("request_bytes") < 400.0,
        "{r}"
    );
    assert!(f("ceiling_rtps") > 0.0, "{r}");
    assert_eq!(f("interval_s"), 2.0);
    // Half the interval, at most 1 s.
    assert_eq!(f("reply_timeout_s"), 1.0);
    // The raw sender's CPU per round trip, and kaping's multiple of it.
    assert!(f("ceiling_sender_cpu_us_per_round_trip") > 0.0, "{r}");
    assert!(f("cpu_over_raw_sender") > 0.0, "{r}");
    // The raw sender paced at the offered rate (10,000/s over 2 workers:
    // 5 pings a ms each, rounds of 16 pings: 4 ms), and kaping over it.
    assert!(f("paced_sender_cpu_us_per_round_trip") > 0.0, "{r}");
    assert_eq!(f("paced_round_ms"), 4.0, "{r}");
    assert!(f("cpu_over_paced_sender") > 0.0, "{r}");
    assert!(f("load_seconds") >= 0.0, "{r}");
    // Rates: 20,000 contacts every 2 s offer 10,000 pings/s.
    assert!(f("sent_per_s") > 0.0 && f("matched_per_s") > 0.0, "{r}");
    assert_eq!(
        r["sent_per_second"].as_array().map(Vec::len),
        Some(3),
        "{r}"
    );
    // Every contact answers: only pings sent in the window's last RTT can
    // still be waiting for their reply when it closes, and replies to pings
    // sent just before it opened count in it: the ratio is 1 ± a few RTTs'
    // worth of pings.
    let ratio = f("match_ratio");
    assert!(ratio > 0.95 && ratio < 1.05, "{r}");
    assert!(f("ratio_to_ceiling") > 0.0, "{r}");
    assert!(
        f("rate_max_over_mean") >= 1.0 && f("rate_min_over_mean") <= 1.0,
        "{r}"
    );
    assert!(f("rate_min_over_mean") > 0.0, "{r}");
    // The RTT includes the injected latency; the histogram's buckets are
    // within ~3% of the sample, so allow that much below.
    assert_eq!(f("latency_us"), 1000.0);
    assert!(f("rtt_p50_us") >= 970.0, "{r}");
    assert!(f("rtt_p99_us") >= f("rtt_p50_us"), "{r}");
    assert_eq!(f("forged"), 0.0, "{r}");
    assert_eq!(f("stray"), 0.0, "{r}");
    assert!(f("cpu_us_per_answered") > 0.0, "{r}");
    assert!(
        f("rss_bytes") > 0.0 && f("rss_per_contact_bytes") > 0.0,
        "{r}"
    );
    // URIs are `sip:u<i>@127.0.a.b:PPPPP`: between 22 and 30 bytes.
    let uri = f("uri_bytes_per_contact");
    assert!(uri > 20.0 && uri < 32.0, "{r}");
    assert!(
        r["responder"]["answered"].as_u64().is_some_and(|a| a > 0),
        "{r}"
    );
}
