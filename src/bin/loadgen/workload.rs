//! The workload: producers, consumers, phases and bookkeeping.
//!
//! Everything runs on one executor thread, so the shared state is plain
//! `Cell`/`RefCell`. Each producer and consumer is its own connection; on
//! it, one task per queue it serves (pipelined on the connection).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use queueber::names::QueueName;
use queueber::storage::NewMessage;
use queueber::types::Lease;

use super::backend::Conn;
use super::procstat;
use super::report::{Latency, Report, ShardCounts};
use super::Args;

/// producer (4) · sequence (8) · intended send time in ns since start (8).
pub const HEADER_BYTES: usize = 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate {
    Added,
    Delivered,
    Removed,
}

struct Histograms {
    end_to_end: Histogram<u64>,
    add: Histogram<u64>,
    /// Open loop: how late the generator itself sent each add (actual minus
    /// intended send time). If this is large, the generator, not the
    /// server, is the bottleneck.
    send_lag: Histogram<u64>,
    poll: Histogram<u64>,
    remove: Histogram<u64>,
}

impl Histograms {
    fn new() -> Self {
        let h = || Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
        Self {
            end_to_end: h(),
            add: h(),
            send_lag: h(),
            poll: h(),
            remove: h(),
        }
    }
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

struct State {
    args: Args,
    start: Instant,
    queues: Vec<QueueName>,
    shard_of: Vec<usize>,
    shards: usize,
    measuring: Cell<bool>,
    producing: Cell<bool>,
    consuming: Cell<bool>,
    unacked: Cell<usize>,
    room: event_listener::Event,
    fates: RefCell<HashMap<(u32, u64), Fate>>,
    histograms: RefCell<Histograms>,
    counts: RefCell<ShardCounts>,
    errors: Cell<u64>,
    duplicates: Cell<u64>,
    total_added: Cell<u64>,
    total_removed: Cell<u64>,
}

impl State {
    fn since_start(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn error(&self, what: &str, e: impl std::fmt::Display) {
        if self.errors.get() < 5 {
            eprintln!("loadgen: {what}: {e}");
        }
        self.errors.set(self.errors.get() + 1);
    }
}

/// Queue names per the placement flags.
fn choose_queues(args: &Args, shards: usize) -> Vec<QueueName> {
    let name = |i: usize| QueueName::new(args.tenant.clone(), format!("lg-{i}"));
    let mut out = Vec::with_capacity(args.queues);
    let mut per_shard = vec![0usize; shards];
    let want_per_shard = args.queues.div_ceil(shards);
    let mut i = 0;
    while out.len() < args.queues {
        let Ok(q) = name(i) else { break };
        i += 1;
        let s = q.shard(shards);
        let keep = match (args.shard, args.per_shard) {
            (Some(k), _) => s == k % shards,
            (None, true) => per_shard[s] < want_per_shard,
            (None, false) => true,
        };
        if keep {
            per_shard[s] += 1;
            out.push(q);
        }
    }
    out
}

/// The queue indexes worker `w` of `workers` serves.
fn assignment(w: usize, workers: usize, queues: usize) -> Vec<usize> {
    if queues <= workers {
        vec![w % queues]
    } else {
        (0..queues).filter(|q| q % workers == w).collect()
    }
}

async fn connect(args: &Args) -> Result<Conn, String> {
    let tls = match &args.tls_ca {
        Some(ca) => Some(queueber::tls::ClientTls::new(Some(ca), None).map_err(|e| e.to_string())?),
        None => None,
    };
    let secure = crate::backend::Secure {
        tls,
        token: args.token.clone(),
    };
    Conn::connect(args.backend, args.addr, &secure).await
}

/// The connection a worker's `nth` task uses: the worker's own when it can be
/// shared or for the first task, a fresh one otherwise.
async fn task_conn(args: &Args, worker: &Conn, nth: usize) -> Result<Conn, String> {
    if nth == 0 || Conn::shareable(args.backend) {
        Ok(worker.clone())
    } else {
        connect(args).await
    }
}

fn payload(state: &State, producer: u32, seq: u64, sent_at_ns: u64) -> Vec<u8> {
    let mut p = vec![0u8; state.args.payload];
    p[..4].copy_from_slice(&producer.to_be_bytes());
    p[4..12].copy_from_slice(&seq.to_be_bytes());
    p[12..20].copy_from_slice(&sent_at_ns.to_be_bytes());
    p
}

fn parse(p: &[u8]) -> Option<(u32, u64, u64)> {
    Some((
        u32::from_be_bytes(p.get(..4)?.try_into().ok()?),
        u64::from_be_bytes(p.get(4..12)?.try_into().ok()?),
        u64::from_be_bytes(p.get(12..20)?.try_into().ok()?),
    ))
}

/// One producer task feeding one queue; `producer` names its sequence stream.
async fn produce(state: Rc<State>, client: Conn, producer: u32, queue: usize, tasks: usize, preload: u64) {
    let b = state.args.batch;
    let mut seq: u64 = 0;
    // Open loop: this task's share of the rate, one batch per interval.
    let interval = state
        .args
        .rate
        .map(|r| Duration::from_secs_f64(b as f64 * tasks as f64 / r.max(1.0)));
    // Tasks start staggered across one interval, so together they send at an
    // even rate instead of in bursts of one batch per task.
    let began = Instant::now()
        + interval.map_or(Duration::ZERO, |every| {
            every.mul_f64(f64::from(producer) / tasks as f64)
        });
    let mut sent_batches: u32 = 0;
    loop {
        if preload > 0 {
            if seq >= preload {
                return;
            }
        } else if !state.producing.get() {
            return;
        }
        let intended = match interval {
            Some(every) => {
                let at = began + every * sent_batches;
                let now = Instant::now();
                if at > now {
                    glommio::timer::sleep(at - now).await;
                }
                at
            }
            None => {
                if preload == 0 {
                    // Closed loop: wait for room under the unacked bound.
                    while state.unacked.get() + b > state.args.max_unacked.max(b) && state.producing.get() {
                        let listener = state.room.listen();
                        if state.unacked.get() + b <= state.args.max_unacked.max(b) {
                            break;
                        }
                        listener.await;
                    }
                    if !state.producing.get() {
                        return;
                    }
                }
                Instant::now()
            }
        };
        sent_batches += 1;
        let sent_at = intended.duration_since(state.start).as_nanos() as u64;
        let n = if preload > 0 {
            (preload - seq).min(b as u64) as usize
        } else {
            b
        };
        let messages: Vec<_> = (0..n as u64)
            .map(|i| NewMessage::new(payload(&state, producer, seq + i, sent_at)))
            .collect();
        state.unacked.set(state.unacked.get() + n);
        if interval.is_some() && state.measuring.get() {
            record(
                &mut state.histograms.borrow_mut().send_lag,
                Instant::now().duration_since(intended),
            );
        }
        match client.add(&state.queues[queue], messages).await {
            Ok(_) => {
                let done = Instant::now();
                if state.measuring.get() {
                    record(&mut state.histograms.borrow_mut().add, done.duration_since(intended));
                    state.counts.borrow_mut().added[state.shard_of[queue]] += n as u64;
                }
                let mut fates = state.fates.borrow_mut();
                for i in 0..n as u64 {
                    // A consumer may already have it (the poll raced the reply).
                    fates.entry((producer, seq + i)).or_insert(Fate::Added);
                }
                state.total_added.set(state.total_added.get() + n as u64);
                seq += n as u64;
            }
            Err(e) => {
                state.unacked.set(state.unacked.get() - n);
                state.error("add", e);
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// One consumer task draining one queue: poll, then remove what came; or,
/// with `--remove-and-poll`, both in one request per batch.
async fn consume(state: Rc<State>, client: Conn, queue: usize) {
    let a = &state.args;
    // With --remove-and-poll: the lease whose messages the next request removes.
    let mut held: Option<Lease> = None;
    while state.consuming.get() {
        let asked = Instant::now();
        let polled = match held.take() {
            // No waiting in the combined request: its answer is also the
            // confirmation of the removes, which producers wait for (at most
            // --max-unacked in flight). When it finds nothing, the next
            // round long-polls on its own.
            Some(done) => match client
                .remove_and_poll(&state.queues[queue], &done, a.batch as u32, a.lease_ms, 0)
                .await
            {
                Ok((flags, lease)) => {
                    removed(&state, queue, &done, flags, asked.elapsed());
                    Ok(lease)
                }
                Err(e) => {
                    // Whether the removes ran is unknown: their messages
                    // come back when the lease expires (as after any lost
                    // answer), so they are neither lost nor counted.
                    state.error("removeAndPoll", e);
                    Err(())
                }
            },
            None => client
                .poll(&state.queues[queue], a.batch as u32, a.lease_ms, a.wait_ms)
                .await
                .map_err(|e| state.error("poll", e)),
        };
        let Ok(lease) = polled else {
            glommio::timer::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let received = Instant::now();
        let Some(lease) = lease else { continue };
        delivered(&state, queue, &lease, received - asked);
        if a.remove_and_poll && client.has_remove_and_poll() {
            held = Some(lease);
            continue;
        }
        let asked = Instant::now();
        match client.remove(&state.queues[queue], &lease).await {
            Ok(flags) => removed(&state, queue, &lease, flags, asked.elapsed()),
            Err(e) => state.error("remove", e),
        }
    }
    // What the last request leased is acknowledged before the drain ends.
    if let Some(done) = held {
        let asked = Instant::now();
        match client.remove(&state.queues[queue], &done).await {
            Ok(flags) => removed(&state, queue, &done, flags, asked.elapsed()),
            Err(e) => state.error("remove", e),
        }
    }
}

/// Counts a lease's messages as delivered (duplicates, end-to-end latency).
fn delivered(state: &State, queue: usize, lease: &Lease, took: Duration) {
    let now_ns = state.since_start();
    let shard = state.shard_of[queue];
    let mut fates = state.fates.borrow_mut();
    let mut h = state.histograms.borrow_mut();
    if state.measuring.get() {
        record(&mut h.poll, took);
        state.counts.borrow_mut().delivered[shard] += lease.messages.len() as u64;
    }
    for m in &lease.messages {
        let Some((producer, seq, sent_at)) = parse(&m.payload) else {
            state.error("payload", "shorter than the loadgen header");
            continue;
        };
        let fate = fates.entry((producer, seq)).or_insert(Fate::Added);
        if *fate != Fate::Added || m.delivery_count > 1 {
            state.duplicates.set(state.duplicates.get() + 1);
        }
        *fate = Fate::Delivered;
        if state.measuring.get() {
            h.end_to_end
                .saturating_record((now_ns.saturating_sub(sent_at) / 1_000).max(1));
        }
    }
}

/// Counts a lease's messages as removed, by the server's flags.
fn removed(state: &State, queue: usize, lease: &Lease, flags: Vec<bool>, took: Duration) {
    let shard = state.shard_of[queue];
    if state.measuring.get() {
        record(&mut state.histograms.borrow_mut().remove, took);
    }
    let mut fates = state.fates.borrow_mut();
    let mut count = 0;
    for (m, ok) in lease.messages.iter().zip(flags) {
        if !ok {
            state.error("remove", "a fresh lease did not hold its message");
            continue;
        }
        if let Some((producer, seq, _)) = parse(&m.payload) {
            fates.insert((producer, seq), Fate::Removed);
        }
        count += 1;
    }
    if state.measuring.get() {
        state.counts.borrow_mut().removed[shard] += count;
    }
    state.total_removed.set(state.total_removed.get() + count);
    state.unacked.set(state.unacked.get().saturating_sub(count as usize));
    state.room.notify(usize::MAX);
}

pub async fn run(args: Args) -> Result<Report, String> {
    let probe = connect(&args).await?;
    let shards = probe.shards().await?;
    drop(probe);
    let queues = choose_queues(&args, shards);
    if queues.is_empty() {
        return Err("no queues chosen".into());
    }
    let shard_of = queues.iter().map(|q| q.shard(shards)).collect();
    let state = Rc::new(State {
        args: args.clone(),
        start: Instant::now(),
        queues,
        shard_of,
        shards,
        measuring: Cell::new(false),
        producing: Cell::new(true),
        consuming: Cell::new(true),
        unacked: Cell::new(0),
        room: event_listener::Event::new(),
        fates: RefCell::new(HashMap::new()),
        histograms: RefCell::new(Histograms::new()),
        counts: RefCell::new(ShardCounts::new(shards)),
        errors: Cell::new(0),
        duplicates: Cell::new(0),
        total_added: Cell::new(0),
        total_removed: Cell::new(0),
    });
    let q = state.queues.len();

    let mut producers = Vec::new();
    for _ in 0..args.producers {
        producers.push(connect(&args).await?);
    }
    let mut consumers = Vec::new();
    for _ in 0..args.consumers {
        consumers.push(connect(&args).await?);
    }

    // Deep-queue mode: fill first, then measure only the drain.
    let mut preload_secs = None;
    if args.preload > 0 {
        let began = Instant::now();
        let per_task = args.preload.div_ceil((args.producers.max(1) * q) as u64);
        let mut tasks = Vec::new();
        for client in &producers {
            for queue in 0..q {
                let stream = tasks.len() as u32;
                tasks.push(
                    glommio::spawn_local(produce(
                        state.clone(),
                        task_conn(&args, client, queue).await?,
                        stream,
                        queue,
                        1,
                        per_task,
                    ))
                    .detach(),
                );
            }
        }
        for t in tasks {
            t.await;
        }
        state.unacked.set(0);
        preload_secs = Some(began.elapsed().as_secs_f64());
        state.producing.set(false);
    }

    let assignments: usize = (0..args.producers)
        .map(|p| assignment(p, args.producers, q).len())
        .sum();
    // Closed loop: keep enough adds in flight to fill the unacked window
    // (a producer is one connection, pipelining); the window, not the
    // request round trip, bounds what is outstanding.
    let depth = args
        .depth
        .unwrap_or_else(|| (args.max_unacked / (args.batch.max(1) * assignments.max(1))).clamp(1, 64));
    let producer_tasks = assignments * depth;
    let mut running = Vec::new();
    if args.preload == 0 {
        for (p, client) in producers.iter().enumerate() {
            for (nth, queue) in assignment(p, args.producers, q)
                .into_iter()
                .flat_map(|q| std::iter::repeat_n(q, depth))
                .enumerate()
            {
                // Every producer task numbers its own messages: it is its
                // own stream of (stream, sequence) keys.
                let stream = running.len() as u32;
                running.push(
                    glommio::spawn_local(produce(
                        state.clone(),
                        task_conn(&args, client, nth).await?,
                        stream,
                        queue,
                        producer_tasks.max(1),
                        0,
                    ))
                    .detach(),
                );
            }
        }
    }
    for (c, client) in consumers.iter().enumerate() {
        for (nth, queue) in assignment(c, args.consumers, q)
            .into_iter()
            .flat_map(|q| std::iter::repeat_n(q, depth))
            .enumerate()
        {
            let conn = task_conn(&args, client, nth).await?;
            running.push(glommio::spawn_local(consume(state.clone(), conn, queue)).detach());
        }
    }

    glommio::timer::sleep(args.warmup()).await;
    *state.histograms.borrow_mut() = Histograms::new();
    *state.counts.borrow_mut() = ShardCounts::new(shards);
    let errors_before = state.errors.get();
    let cpu_before = args.server_pid.and_then(procstat::cpu_micros);
    state.measuring.set(true);
    let measure_start = Instant::now();
    if args.preload > 0 {
        // Measure until drained or out of time.
        while state.total_removed.get() < state.total_added.get() && measure_start.elapsed() < args.duration() {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    } else {
        glommio::timer::sleep(args.duration()).await;
    }
    state.measuring.set(false);
    let elapsed = measure_start.elapsed();
    let cpu_after = args.server_pid.and_then(procstat::cpu_micros);

    // Stop producing, drain what was acknowledged, then count losses.
    state.producing.set(false);
    state.room.notify(usize::MAX);
    let drain_deadline = Instant::now() + Duration::from_secs_f64(args.drain_timeout.max(0.0));
    while state.total_removed.get() < state.total_added.get() && Instant::now() < drain_deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    state.consuming.set(false);
    for t in running {
        t.await;
    }
    let lost = state.fates.borrow().values().filter(|&&f| f != Fate::Removed).count() as u64;

    let h = state.histograms.borrow();
    let counts = state.counts.borrow().clone();
    let removed: u64 = counts.removed.iter().sum();
    let server_cpu_us_per_msg = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) if removed > 0 => Some((a.saturating_sub(b)) as f64 / removed as f64),
        _ => None,
    };
    Ok(Report {
        label: args.label.clone(),
        args: args.clone(),
        shards: state.shards,
        queues: state.queues.len(),
        depth,
        seconds: elapsed.as_secs_f64(),
        counts,
        end_to_end: Latency::from(&h.end_to_end),
        add: Latency::from(&h.add),
        send_lag: args.rate.is_some().then(|| Latency::from(&h.send_lag)),
        poll: Latency::from(&h.poll),
        remove: Latency::from(&h.remove),
        errors: state.errors.get() - errors_before,
        duplicates: state.duplicates.get(),
        lost,
        server_cpu_us_per_msg,
        server_peak_rss_kib: args.server_pid.and_then(procstat::peak_rss_kib),
        preload_secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn payload_headers_round_trip() {
        assert_eq!(parse(&[0u8; 19]), None);
        let mut p = vec![0u8; 32];
        p[..4].copy_from_slice(&7u32.to_be_bytes());
        p[4..12].copy_from_slice(&9u64.to_be_bytes());
        p[12..20].copy_from_slice(&11u64.to_be_bytes());
        assert_eq!(parse(&p), Some((7, 9, 11)));
    }

    #[test]
    fn queues_follow_the_placement_flags() {
        let args = Args::parse_from(["loadgen", "-Q", "8", "--per-shard"]);
        let qs = choose_queues(&args, 2);
        assert_eq!(qs.len(), 8);
        assert_eq!(qs.iter().filter(|q| q.shard(2) == 0).count(), 4);
        let args = Args::parse_from(["loadgen", "-Q", "5", "--shard", "1"]);
        assert!(choose_queues(&args, 2).iter().all(|q| q.shard(2) == 1));
    }

    #[test]
    fn every_queue_is_served() {
        for (workers, queues) in [(2, 1), (2, 64), (3, 4)] {
            let mut served: Vec<usize> = (0..workers).flat_map(|w| assignment(w, workers, queues)).collect();
            served.sort();
            served.dedup();
            assert_eq!(served, (0..queues).collect::<Vec<_>>());
        }
    }
}
