//! A blocking, byte-level client: for tests that need to pipeline without
//! reading, send broken frames, half-close, or see a connection reset.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use capnp::message::ReaderOptions;
use queueber::ids::{LeaseId, MessageId};
use queueber::names::QueueName;
use queueber::ops;
use queueber::protocol::{decode_response, encode_request, Op, Reply, Request, Response};
use queueber::storage::NewMessage;

pub fn frame(id: u64, op: Op) -> Vec<u8> {
    capnp::serialize::write_message_to_words(&encode_request(&Request { id, op }))
}

pub fn add(id: u64, queue: &QueueName, payload: &[u8]) -> Vec<u8> {
    frame(
        id,
        Op::Add(ops::Add {
            queue: queue.clone(),
            messages: vec![NewMessage::new(payload.to_vec())],
        }),
    )
}

pub fn poll(id: u64, queue: &QueueName, max_items: u32, lease_ms: u64, wait_ms: u64) -> Vec<u8> {
    frame(
        id,
        Op::Poll(ops::Poll {
            queue: queue.clone(),
            max_items,
            lease_ms,
            wait_ms,
        }),
    )
}

pub fn remove(id: u64, queue: &QueueName, lease: LeaseId, ids: Vec<MessageId>) -> Vec<u8> {
    frame(
        id,
        Op::Remove(ops::Remove {
            queue: queue.clone(),
            lease,
            ids,
        }),
    )
}

pub struct Wire {
    pub stream: TcpStream,
}

impl Wire {
    pub fn connect(addr: SocketAddr) -> Wire {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        Wire { stream }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Reads one response.
    pub fn recv(&mut self) -> Response {
        let reader = capnp::serialize::read_message(&mut self.stream, ReaderOptions::new()).expect("a response frame");
        decode_response(&reader).expect("a valid response")
    }

    /// Sends one request and reads its answer (nothing else in flight).
    pub fn call(&mut self, id: u64, op: Op) -> Response {
        self.send(&frame(id, op));
        let response = self.recv();
        assert_eq!(response.id, id);
        response
    }

    /// Adds one message and reads the answer (nothing else in flight).
    pub fn add_one(&mut self, id: u64, queue: &QueueName, payload: impl Into<Vec<u8>>) -> Response {
        self.call(
            id,
            Op::Add(ops::Add {
                queue: queue.clone(),
                messages: vec![NewMessage::new(payload.into())],
            }),
        )
    }

    pub fn half_close(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// Reads until the server closes. `Err` when the connection was reset
    /// (answers the server wrote may then have been destroyed in flight).
    pub fn read_all(&mut self) -> Result<Vec<Response>, std::io::Error> {
        let mut bytes = Vec::new();
        self.stream.read_to_end(&mut bytes)?;
        let mut rest = &bytes[..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            let reader =
                capnp::serialize::read_message(&mut rest, ReaderOptions::new()).expect("whole response frames");
            out.push(decode_response(&reader).expect("a valid response"));
        }
        Ok(out)
    }
}

/// The lease of a poll answer, if it leased anything.
pub fn leased(response: &Response) -> Option<queueber::storage::Lease> {
    match &response.result {
        Ok(Reply::Polled(lease)) => lease.clone(),
        other => panic!("expected a poll answer, got {other:?}"),
    }
}

/// The `p` quantile (0 to 1) of sorted durations.
pub fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}
