//! The live view: a scraping thread feeds snapshots over a channel, and
//! this thread draws them with ratatui (crossterm backend) and reads keys,
//! so a slow or unreachable endpoint never delays `q`.

use std::io::IsTerminal;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table, Wrap};
use ratatui::Frame;

use super::format::{self, QUEUE_COLUMNS, QUEUE_COLUMNS_SHORT, SHARD_COLUMNS};
use super::model::{self, Snapshot, SortKey, View};
use super::scrape::Endpoint;

/// What the scraping thread sends: when the answer came, and the figures.
type Scraped = (Instant, Result<Snapshot, String>);

struct App {
    source: String,
    interval: Duration,
    sort: SortKey,
    /// The last scrape, kept for the next one's rates.
    last: Option<(Instant, Snapshot)>,
    view: Option<View>,
    updated: Option<Instant>,
    error: Option<String>,
    /// First queue row shown.
    scroll: usize,
    /// Queue rows that fit (from the last draw), for paging.
    page: usize,
}

impl App {
    fn take(&mut self, (at, scraped): Scraped) {
        match scraped {
            Ok(snapshot) => {
                let earlier = self
                    .last
                    .as_ref()
                    .map(|(t, s)| (at.duration_since(*t).as_secs_f64(), s));
                let mut view = model::view(earlier.map(|(_, s)| s), &snapshot, earlier.map_or(0.0, |(dt, _)| dt));
                model::sort_queues(&mut view.queues, self.sort);
                self.view = Some(view);
                self.last = Some((at, snapshot));
                self.updated = Some(at);
                self.error = None;
            }
            Err(e) => self.error = Some(e),
        }
    }

    fn sort_by(&mut self, key: SortKey) {
        self.sort = key;
        if let Some(v) = self.view.as_mut() {
            model::sort_queues(&mut v.queues, key);
        }
    }

    fn scroll_by(&mut self, delta: isize) {
        let rows = self.view.as_ref().map_or(0, |v| v.queues.len());
        let max = rows.saturating_sub(self.page.max(1));
        self.scroll = self.scroll.saturating_add_signed(delta).min(max);
    }

    /// Handles a key; false to quit.
    fn key(&mut self, k: KeyEvent) -> bool {
        if k.kind != KeyEventKind::Press {
            return true;
        }
        if let KeyCode::Char(c) = k.code {
            if let Some(key) = SortKey::from_key(c) {
                self.sort_by(key);
                return true;
            }
        }
        let page = self.page.max(1) as isize;
        match k.code {
            KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => return false,
            KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc => return false,
            KeyCode::Down | KeyCode::Char('j') => self.scroll_by(1),
            KeyCode::Up | KeyCode::Char('k') => self.scroll_by(-1),
            KeyCode::PageDown | KeyCode::Char(' ') => self.scroll_by(page),
            KeyCode::PageUp => self.scroll_by(-page),
            KeyCode::Home | KeyCode::Char('g') => self.scroll = 0,
            KeyCode::End | KeyCode::Char('G') => self.scroll_by(isize::MAX),
            _ => {}
        }
        true
    }
}

/// Scrapes every `interval` until the receiver is gone.
fn scraper(endpoint: Endpoint, interval: Duration, tx: mpsc::Sender<Scraped>) {
    // A scrape may take as long as the interval, and at least a second (a
    // short interval must not make a busy server look unreachable).
    let timeout = interval.max(Duration::from_secs(1));
    loop {
        let started = Instant::now();
        let result = endpoint
            .get(timeout)
            .and_then(|text| Snapshot::parse(&text).map_err(|e| e.to_string()));
        if tx.send((Instant::now(), result)).is_err() {
            return;
        }
        std::thread::sleep(interval.saturating_sub(started.elapsed()));
    }
}

/// Runs the live view until the person quits.
pub fn run(endpoint: Endpoint, interval: Duration, sort: SortKey) -> Result<(), String> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err("the live view needs a terminal; for scripts use --once (with --json)".into());
    }
    let (tx, rx) = mpsc::channel();
    let source = endpoint.url();
    std::thread::Builder::new()
        .name("top-scrape".into())
        .spawn(move || scraper(endpoint, interval, tx))
        .map_err(|e| format!("cannot start the scraping thread: {e}"))?;
    let mut app = App {
        source,
        interval,
        sort,
        last: None,
        view: None,
        updated: None,
        error: None,
        scroll: 0,
        page: 1,
    };
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            ratatui::restore();
            return Err(format!("cannot set up the terminal: {e}"));
        }
    };
    let outcome = (|| -> std::io::Result<()> {
        let mut dirty = true;
        loop {
            if dirty {
                terminal.draw(|f| draw(f, &mut app))?;
                dirty = false;
            }
            if event::poll(Duration::from_millis(100))? {
                match event::read()? {
                    Event::Key(k) => {
                        if !app.key(k) {
                            return Ok(());
                        }
                        dirty = true;
                    }
                    Event::Resize(..) => dirty = true,
                    _ => {}
                }
            }
            while let Ok(scraped) = rx.try_recv() {
                app.take(scraped);
                dirty = true;
            }
        }
    })();
    ratatui::restore();
    outcome.map_err(|e| format!("terminal: {e}"))
}

fn header_style() -> Style {
    Style::new().add_modifier(Modifier::BOLD).fg(Color::Cyan)
}

fn right(s: String) -> Cell<'static> {
    Cell::from(Line::from(s).right_aligned())
}

fn width(s: &str) -> u16 {
    u16::try_from(s.chars().count()).unwrap_or(u16::MAX)
}

/// Column widths that fit the headers and every cell.
fn fitted<const N: usize>(headers: &[String; N], rows: &[[String; N]]) -> [u16; N] {
    let mut widths = headers.each_ref().map(|h| width(h));
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(width(cell));
        }
    }
    widths
}

fn server_spans(app: &App) -> Vec<Span<'static>> {
    let Some(v) = &app.view else {
        return Vec::new();
    };
    let mut spans = Vec::new();
    for (label, value) in format::server_fields(v) {
        spans.push(Span::from(format!("{label} ")).fg(Color::Cyan));
        spans.push(Span::from(format!("{value}   ")).bold());
    }
    spans
}

fn draw(f: &mut Frame, app: &mut App) {
    let area = f.area();
    let server = Line::from(server_spans(app));
    // The server line wraps onto a second line in a narrow terminal.
    let server_height = if server.width() > usize::from(area.width) { 2 } else { 1 };
    let shard_rows = app.view.as_ref().map_or(0, |v| v.shards.len()) as u16;
    // Borders and header take 3 lines; shards get at most a third.
    let shard_height = (shard_rows + 3).min((area.height / 3).max(4));
    let [title, server_area, shards, queues, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(server_height),
        Constraint::Length(shard_height),
        Constraint::Min(4),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_title(f, title, app);
    f.render_widget(Paragraph::new(server).wrap(Wrap { trim: true }), server_area);
    draw_shards(f, shards, app);
    draw_queues(f, queues, app);
    draw_footer(f, footer, app);
}

fn draw_title(f: &mut Frame, area: Rect, app: &App) {
    let mut spans = vec![
        Span::from("queueber top").bold(),
        Span::from(format!("  {}  every {:.1}s", app.source, app.interval.as_secs_f64())),
    ];
    match (&app.error, &app.view) {
        (Some(e), _) => {
            let stale = app.updated.map_or(String::new(), |at| {
                format!("figures from {:.0}s ago; ", at.elapsed().as_secs_f64())
            });
            spans.push(Span::from(format!("  {stale}retrying: {e}")).fg(Color::Red));
        }
        (None, None) => spans.push(Span::from("  connecting...")),
        (None, Some(v)) => {
            if v.server.ready == Some(false) {
                spans.push(Span::from("  NOT READY (recovering or stopping)").fg(Color::Yellow));
            }
            if v.interval_s.is_none() {
                spans.push(Span::from("  rates after the next scrape"));
            }
        }
    }
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn draw_shards(f: &mut Frame, area: Rect, app: &App) {
    let cells: Vec<[String; 6]> = app
        .view
        .as_ref()
        .map_or(Vec::new(), |v| v.shards.iter().map(format::shard_cells).collect());
    let headers = SHARD_COLUMNS.map(String::from);
    let widths = fitted(&headers, &cells).map(|w| Constraint::Length(w + 2));
    let header = Row::new(headers.map(right)).style(header_style());
    let rows = cells.into_iter().map(|row| Row::new(row.map(right)));
    let table = Table::new(rows, widths)
        .header(header)
        .block(Block::bordered().title(" shards "));
    f.render_widget(table, area);
}

fn draw_queues(f: &mut Frame, area: Rect, app: &mut App) {
    // Borders and the header row.
    app.page = usize::from(area.height.saturating_sub(3)).max(1);
    let total = app.view.as_ref().map_or(0, |v| v.queues.len());
    app.scroll = app.scroll.min(total.saturating_sub(app.page));
    let cells: Vec<[String; 9]> = app.view.as_ref().map_or(Vec::new(), |v| {
        v.queues
            .iter()
            .skip(app.scroll)
            .take(app.page)
            .map(format::queue_cells)
            .collect()
    });
    let sorted = format::sorted_column(app.sort);
    let marker = if app.sort == SortKey::Name { "▲" } else { "▼" };
    let headers_of = |names: [&str; 9]| -> [String; 9] {
        let mut i = 0;
        names.map(|h| {
            i += 1;
            if i - 1 == sorted {
                format!("{h}{marker}")
            } else {
                h.to_string()
            }
        })
    };
    // Long headers with room between the columns where the queue names
    // (up to 40 characters) still fit; else tighter; else short headers.
    let long = headers_of(QUEUE_COLUMNS);
    let short = headers_of(QUEUE_COLUMNS_SHORT);
    let name_room = |w: &[u16; 9]| w[0].clamp(16, 40);
    let needed = |w: &[u16; 9], pad: u16| name_room(w) + w[1..].iter().map(|w| w + 1 + pad).sum::<u16>() + 2;
    let mut chosen = None;
    for (h, pad) in [(long.clone(), 2), (long, 0), (short, 0)] {
        let w = fitted(&h, &cells);
        let fits = needed(&w, pad) <= area.width;
        chosen = Some((h, w, pad));
        if fits {
            break;
        }
    }
    let Some((headers, widths, pad)) = chosen else {
        return;
    };
    let mut constraints = vec![Constraint::Min(name_room(&widths).min(widths[0]))];
    constraints.extend(widths[1..].iter().map(|&w| Constraint::Length(w + pad)));
    let header = Row::new(headers.into_iter().enumerate().map(|(i, h)| {
        let line = Line::from(h);
        Cell::from(if i == 0 { line } else { line.right_aligned() })
    }))
    .style(header_style());
    let rows = cells.into_iter().map(|[name, rest @ ..]| {
        let mut row = vec![Cell::from(name)];
        row.extend(rest.map(right));
        Row::new(row)
    });
    let shown = if total == 0 {
        " queues: none yet ".to_string()
    } else {
        format!(
            " queues {}-{} of {} ",
            app.scroll + 1,
            (app.scroll + app.page).min(total),
            total
        )
    };
    let table = Table::new(rows, constraints)
        .header(header)
        .block(Block::bordered().title(shown));
    f.render_widget(table, area);
}

fn draw_footer(f: &mut Frame, area: Rect, app: &App) {
    let key = |k: &str| Span::from(k.to_string()).bold().fg(Color::Cyan);
    let mut spans = vec![key("q"), Span::from(" quit | sort: ")];
    for k in SortKey::ALL {
        let label = Span::from(format!(" {}  ", k.label()));
        if k == app.sort {
            spans.push(key(&k.key().to_string()).reversed());
            spans.push(label.bold());
        } else {
            spans.push(key(&k.key().to_string()));
            spans.push(label);
        }
    }
    spans.push(Span::from("| "));
    spans.push(key("↑↓ PgUp PgDn"));
    spans.push(Span::from(" scroll"));
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}
