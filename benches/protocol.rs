//! Protocol encode/decode of the hot frames: a 32-message add request and a
//! 32-message poll response, 256-byte payloads.

use capnp::message::ReaderOptions;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use queueber::ids::{LeaseId, MessageId};
use queueber::names::QueueName;
use queueber::ops;
use queueber::protocol::{
    decode_request, decode_response, encode_request, encode_response, write_response, Op, Reply, Request, Response,
};
use queueber::types::{Delivery, Lease, NewMessage};

fn add_request() -> Request {
    Request {
        id: 1,
        op: Op::Add(ops::Add {
            queue: QueueName::new("bench", "proto").unwrap(),
            messages: (0..32).map(|_| NewMessage::new(vec![7u8; 256])).collect(),
        }),
    }
}

fn poll_response() -> Response {
    Response {
        id: 2,
        result: Ok(Reply::Polled(Some(Lease {
            id: LeaseId([1; 16]),
            expires_at_ms: 1,
            messages: (0..32)
                .map(|i| Delivery {
                    id: MessageId([i as u8; 16]),
                    payload: vec![7u8; 256].into(),
                    delivery_count: 1,
                    enqueued_at_ms: 1,
                })
                .collect(),
        }))),
    }
}

fn protocol(c: &mut Criterion) {
    let mut group = c.benchmark_group("protocol");
    group.throughput(Throughput::Elements(32));
    let req = add_request();
    group.bench_function("encode_add_32", |b| {
        b.iter(|| capnp::serialize::write_message_to_words(&encode_request(&req)))
    });
    let bytes = capnp::serialize::write_message_to_words(&encode_request(&req));
    group.bench_function("decode_add_32", |b| {
        b.iter(|| {
            let reader = capnp::serialize::read_message(&mut &bytes[..], ReaderOptions::new()).unwrap();
            decode_request(&reader).unwrap()
        })
    });
    let resp = poll_response();
    group.bench_function("encode_poll_32", |b| {
        b.iter(|| capnp::serialize::write_message_to_words(&encode_response(&resp)))
    });
    let bytes = capnp::serialize::write_message_to_words(&encode_response(&resp));
    group.bench_function("decode_poll_32", |b| {
        b.iter(|| {
            let reader = capnp::serialize::read_message(&mut &bytes[..], ReaderOptions::new()).unwrap();
            decode_response(&reader).unwrap()
        })
    });
    group.finish();
}

/// One answer as the server queues it at B=1, the way it did (a message
/// on a heap segment, serialized into the queue's buffer) and the way it
/// does (`write_response`: built on the stack, appended framed).
fn answer(c: &mut Criterion) {
    let mut group = c.benchmark_group("answer");
    let mut poll = poll_response();
    if let Ok(Reply::Polled(Some(lease))) = &mut poll.result {
        lease.messages.truncate(1);
    }
    let remove = Response {
        id: 3,
        result: Ok(Reply::Removed(vec![true])),
    };
    for (name, resp) in [("poll_1", &poll), ("remove_1", &remove)] {
        let mut out = Vec::with_capacity(4096);
        group.bench_function(format!("{name}_heap_message"), |b| {
            b.iter(|| {
                out.clear();
                capnp::serialize::write_message(&mut out, &encode_response(resp)).unwrap();
                out.len()
            })
        });
        group.bench_function(format!("{name}_write_response"), |b| {
            b.iter(|| {
                out.clear();
                write_response(resp, &mut out);
                out.len()
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3));
    targets = protocol, answer
}
criterion_main!(benches);
