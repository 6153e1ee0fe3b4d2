//! `kaping-stat top`: a live full-screen view redrawn every second.
//!
//! Each tick takes a [`Snapshot`] (rates against the previous one), and one
//! pass over the slots keeps the [`TOP_K`] worst contacts by smoothed RTT, by
//! loss and the Down ones in bounded heaps (`contacts::scan_worst`): a million
//! slots cost one sequential read of the slot region and `O(K)` memory, never
//! a per-contact buffer. Only the listed contacts have their strings read.
//!
//! The terminal is restored on every way out: `q`, `Esc`, `Ctrl-C` (raw mode
//! delivers it as a key), an error (a guard's `Drop`), and a panic (the hook
//! `ratatui::try_init` installs). A daemon restart replaces the file; the view
//! notices the new inode and reopens it.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use kaping::shm::layout::Counter;
use kaping::shm::reader::ShmReader;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{BarChart, Block, Paragraph, Row, Table};
use ratatui::Frame;

use super::contacts::{resolve, scan_worst, state_name, Contact, Worst};
use super::prom::LE_BOUNDS_US;
use super::snapshot::{open_error_line, rate, rtt_quantile_us, Snapshot, EVENTS, QUANTILES};
use super::summary::{grouped, human_duration_ms, liveness_line, ms};
use kaping::shm::layout::bucket_bounds;
use kaping::timefmt::rfc3339_ms;

/// Rows kept per list.
pub const TOP_K: usize = 20;

/// Restores the terminal when dropped (normal exit and `?` alike).
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// The file as currently opened, with the identity of the inode behind it.
struct Source {
    shm: ShmReader,
    ino: (u64, u64),
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn open(path: &Path) -> Result<Source, String> {
    let ino = identity(path).unwrap_or((0, 0));
    let shm = ShmReader::open(path).map_err(|e| open_error_line(path, &e))?;
    Ok(Source { shm, ino })
}

/// What one tick shows.
struct View {
    snap: Snapshot,
    prev: Option<Snapshot>,
    worst: Worst,
    by_rtt: Vec<Contact>,
    by_loss: Vec<Contact>,
    down: Vec<Contact>,
    scan_ms: u128,
}

fn gather(src: &Source, prev: Option<Snapshot>) -> View {
    let snap = Snapshot::take(&src.shm);
    // A counter going backwards means another file: do not show rates across it.
    let prev = prev.filter(|p| p.header.start_ms == snap.header.start_ms);
    let t0 = Instant::now();
    let worst = scan_worst(&src.shm, TOP_K);
    let scan_ms = t0.elapsed().as_millis();
    let by_rtt = resolve_all(&src.shm, &worst.by_rtt);
    let by_loss = resolve_all(&src.shm, &worst.by_loss);
    let down = resolve_all(&src.shm, &worst.down);
    View {
        snap,
        prev,
        worst,
        by_rtt,
        by_loss,
        down,
        scan_ms,
    }
}

fn resolve_all<K>(shm: &ShmReader, list: &[(K, u32, u32)]) -> Vec<Contact> {
    list.iter()
        .filter_map(|&(_, w, s)| resolve(shm, w, s))
        .collect()
}

/// Run the view until the user quits.
pub fn run(path: &Path, refresh: Duration) -> Result<(), String> {
    // Fail before touching the terminal if there is nothing to show.
    let mut src = open(path)?;
    let mut terminal =
        ratatui::try_init().map_err(|e| format!("cannot set up the terminal: {e}"))?;
    let _guard = TerminalGuard;
    let mut prev: Option<Snapshot> = None;
    let mut error: Option<String> = None;
    loop {
        if identity(path) != Some(src.ino) {
            match open(path) {
                Ok(s) => {
                    src = s;
                    prev = None;
                    error = None;
                }
                Err(e) => error = Some(e),
            }
        }
        let view = gather(&src, prev.take());
        terminal
            .draw(|f| draw(f, path, &view, error.as_deref()))
            .map_err(|e| format!("terminal: {e}"))?;
        prev = Some(view.snap);
        let next = Instant::now() + refresh;
        while let Some(left) = next.checked_duration_since(Instant::now()) {
            if !event::poll(left).map_err(|e| format!("terminal: {e}"))? {
                break;
            }
            if let Event::Key(k) = event::read().map_err(|e| format!("terminal: {e}"))? {
                let ctrl_c =
                    k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                if k.kind == KeyEventKind::Press
                    && (ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc))
                {
                    return Ok(());
                }
            }
        }
    }
}

fn draw(f: &mut Frame, path: &Path, v: &View, error: Option<&str>) {
    let [head, mid, lists, foot] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Length(13),
        Constraint::Min(5),
        Constraint::Length(1),
    ])
    .areas(f.area());
    draw_head(f, head, path, v, error);
    let [rates, hist] =
        Layout::horizontal([Constraint::Length(46), Constraint::Min(20)]).areas(mid);
    draw_rates(f, rates, v);
    draw_hist(f, hist, v);
    let [a, b, c] = Layout::horizontal([Constraint::Ratio(1, 3); 3]).areas(lists);
    draw_list(
        f,
        a,
        "worst RTT (srtt)",
        &v.by_rtt,
        |c| ms(Some(c.rec.srtt_us as u64)),
        v.worst.by_rtt.len(),
    );
    draw_list(
        f,
        b,
        "worst loss (misses / unanswered)",
        &v.by_loss,
        |c| format!("{} / {}", c.rec.misses, super::contacts::unanswered(&c.rec)),
        v.worst.by_loss.len(),
    );
    draw_list(
        f,
        c,
        &format!("down: {}", grouped(v.worst.down_count)),
        &v.down,
        |c| {
            if c.rec.last_reply_ms == 0 {
                "never answered".into()
            } else {
                rfc3339_ms(c.rec.last_reply_ms)[11..19].to_owned()
            }
        },
        v.worst.down.len(),
    );
    f.render_widget(
        Paragraph::new(format!(
            " q/Esc/Ctrl-C quit   {} contacts scanned in {} ms   {}",
            grouped(v.worst.live_count),
            v.scan_ms,
            rfc3339_ms(v.snap.now_ms)
        ))
        .style(Style::new().add_modifier(Modifier::DIM)),
        foot,
    );
}

fn draw_head(f: &mut Frame, area: Rect, path: &Path, v: &View, error: Option<&str>) {
    let s = &v.snap;
    let h = &s.header;
    let t = &s.total;
    let status_style = if s.liveness.running() {
        Style::new().fg(Color::Green)
    } else {
        Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
    };
    let mut rtt = vec![Span::raw("rtt ")];
    for (q, name) in QUANTILES {
        rtt.push(Span::raw(format!(
            "{} {}  ",
            super::summary::label(name),
            ms(rtt_quantile_us(&t.hist, q))
        )));
    }
    rtt.push(Span::raw(format!(
        "max {}",
        ms(rtt_quantile_us(&t.hist, 1.0))
    )));
    let mut lines = vec![
        Line::from(vec![
            Span::raw(format!("kaping {:?} {} ", h.instance, path.display())).bold(),
            Span::styled(liveness_line(s), status_style),
        ]),
        Line::from(format!(
            "up {}, backend {}, {} workers, {} slots",
            human_duration_ms(s.uptime_ms()),
            h.backend,
            h.workers,
            grouped(s.capacity())
        )),
        Line::from(vec![
            Span::raw(format!("contacts {}  ", grouped(t.contacts()))),
            Span::styled(
                format!("up {}  ", grouped(t.get(Counter::ContactsUp))),
                Style::new().fg(Color::Green),
            ),
            Span::styled(
                format!("down {}  ", grouped(t.get(Counter::ContactsDown))),
                Style::new().fg(Color::Red),
            ),
            Span::raw(format!(
                "unknown {}  removed {}",
                grouped(t.get(Counter::ContactsUnknown)),
                grouped(t.get(Counter::ContactsRemoved))
            )),
        ]),
        Line::from(rtt),
    ];
    if let Some(e) = error {
        lines[1] = Line::from(Span::styled(e.to_owned(), Style::new().fg(Color::Red)));
    }
    f.render_widget(Paragraph::new(lines), area);
}

fn draw_rates(f: &mut Frame, area: Rect, v: &View) {
    let s = &v.snap;
    let rows = EVENTS.iter().take(11).map(|&(c, _, label)| {
        let per_s = match &v.prev {
            Some(p) => format!(
                "{:.1}",
                rate(&p.total, &s.total, c, s.taken.duration_since(p.taken))
            ),
            None => "-".into(),
        };
        Row::new(vec![label.to_owned(), grouped(s.total.get(c)), per_s])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(14),
            Constraint::Length(16),
            Constraint::Length(12),
        ],
    )
    .header(Row::new(vec!["event", "total", "per second"]).bold())
    .block(Block::bordered().title("events"));
    f.render_widget(table, area);
}

/// Short label of a bound in µs: `250u`, `1m`, `7.5m`, `2s`.
fn short(us: u64) -> String {
    if us < 1000 {
        format!("{us}u")
    } else if us < 1_000_000 {
        let m = us as f64 / 1000.0;
        format!("{m}m")
    } else {
        format!("{}s", us as f64 / 1e6)
    }
}

fn draw_hist(f: &mut Frame, area: Rect, v: &View) {
    let now = &v.snap.total.hist;
    // The last interval's samples when there are any, else all of them.
    let (hist, what): (Vec<u64>, &str) = match &v.prev {
        Some(p) if now.iter().zip(&p.total.hist).any(|(a, b)| a > b) => (
            now.iter()
                .zip(&p.total.hist)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            "RTT, last interval",
        ),
        _ => (now.clone(), "RTT, since start"),
    };
    let mut bins = [0u64; LE_BOUNDS_US.len() + 1];
    for (i, &c) in hist.iter().enumerate() {
        let max_value = bucket_bounds(i).1 - 1;
        let j = LE_BOUNDS_US
            .iter()
            .position(|&le| max_value <= le)
            .unwrap_or(LE_BOUNDS_US.len());
        bins[j] += c;
    }
    let labels: Vec<String> = LE_BOUNDS_US
        .iter()
        .map(|&us| short(us))
        .chain(std::iter::once("inf".to_owned()))
        .collect();
    let data: Vec<(&str, u64)> = labels.iter().map(String::as_str).zip(bins).collect();
    let inner = area.width.saturating_sub(2);
    let bar_width = (inner / bins.len() as u16).saturating_sub(1).max(1);
    f.render_widget(
        BarChart::default()
            .block(Block::bordered().title(format!("{what} (bar = samples <= label)")))
            .data(&data[..])
            .bar_width(bar_width)
            .bar_gap(1)
            .bar_style(Style::new().fg(Color::Cyan))
            .value_style(Style::new().fg(Color::Black).bg(Color::Cyan)),
        area,
    );
}

fn draw_list(
    f: &mut Frame,
    area: Rect,
    title: &str,
    list: &[Contact],
    figure: impl Fn(&Contact) -> String,
    listed: usize,
) {
    let rows = list.iter().map(|c| {
        let who = if c.uri.is_empty() {
            c.rec
                .socket_addr()
                .map_or_else(|| format!("{}:{}", c.worker, c.slot), |a| a.to_string())
        } else {
            c.uri.clone()
        };
        Row::new(vec![figure(c), state_name(c.rec.state).to_owned(), who])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(16),
            Constraint::Length(7),
            Constraint::Fill(1),
        ],
    )
    .block(Block::bordered().title(format!("{title} [{listed}]")));
    f.render_widget(table, area);
}
