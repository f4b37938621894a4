//! The server-wide buffer budget and each connection's share of it.
//!
//! What a client can make the server hold is bytes: request frames read but
//! not yet answered, answers built but not yet written, and the receive
//! buffer of a frame in progress. Every such byte is a [`Charge`] against
//! its connection's [`ConnectionBudget`] and the server's [`BufferBudget`]
//! (shared by all shards), and is released when the charge drops.
//!
//! The budgets are enforced where memory would grow, never by failing work
//! already accepted:
//!
//! * a connection whose requests and unwritten answers exceed its share is
//!   not read from (TCP pushes back on the client) until answers drain;
//! * no connection is read from while the server-wide budget is used up;
//! * a poll's reply is limited, when it is built, to the room left in both
//!   (a poll that finds no room is answered as if nothing were visible).
//!
//! Charges are atomics because a poll's reservation is taken on the shard
//! that owns its queue, which may not be the connection's shard.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::runtime::wait_until;

/// The server-wide cap on connection buffers.
pub(crate) struct BufferBudget {
    used: AtomicUsize,
    cap: usize,
    per_connection: usize,
    /// Notified when bytes are released while the budget was exhausted.
    released: event_listener::Event,
}

impl BufferBudget {
    pub(crate) fn new(cap: usize, per_connection: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            cap,
            per_connection,
            released: event_listener::Event::new(),
        })
    }

    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub(crate) fn exhausted(&self) -> bool {
        self.used() >= self.cap
    }

    fn charge(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    fn release(&self, bytes: usize) {
        let before = self.used.fetch_sub(bytes, Ordering::Relaxed);
        if before >= self.cap && before - bytes < self.cap {
            self.released.notify(usize::MAX);
        }
    }

    /// Waits until the budget is no longer exhausted.
    pub(crate) async fn wait_for_room(&self) {
        wait_until(&self.released, || !self.exhausted()).await;
    }

    /// A new connection's account.
    pub(crate) fn connection(self: &Arc<Self>) -> Arc<ConnectionBudget> {
        Arc::new(ConnectionBudget {
            global: self.clone(),
            pending: AtomicUsize::new(0),
            released: event_listener::Event::new(),
        })
    }
}

/// One connection's account: requests read and not answered, answers not
/// yet written, and poll replies being built for it.
pub(crate) struct ConnectionBudget {
    global: Arc<BufferBudget>,
    pending: AtomicUsize,
    released: event_listener::Event,
}

impl ConnectionBudget {
    /// Bytes charged to this connection's share.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    pub(crate) fn over_share(&self) -> bool {
        self.pending() >= self.global.per_connection
    }

    /// Charges `bytes` to this connection and the server.
    pub(crate) fn charge(self: &Arc<Self>, bytes: usize) -> Charge {
        self.pending.fetch_add(bytes, Ordering::Relaxed);
        self.global.charge(bytes);
        Charge {
            account: Account::Connection(self.clone()),
            bytes,
        }
    }

    /// Whether a reply may be built for this connection now: it is under its
    /// share and the server has room.
    pub(crate) fn has_room(&self) -> bool {
        !self.over_share() && !self.global.exhausted()
    }

    /// Charges `bytes` if both the share and the server have room for them.
    fn try_charge(&self, bytes: usize) -> bool {
        let before = self.pending.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes > self.global.per_connection {
            self.release_share(bytes);
            return false;
        }
        let used = self.global.used.fetch_add(bytes, Ordering::Relaxed);
        if used + bytes > self.global.cap {
            self.global.release(bytes);
            self.release_share(bytes);
            return false;
        }
        true
    }

    fn force_charge(&self, bytes: usize) {
        self.pending.fetch_add(bytes, Ordering::Relaxed);
        self.global.charge(bytes);
    }

    /// Waits until this connection is back under its share.
    pub(crate) async fn wait_under_share(&self) {
        wait_until(&self.released, || !self.over_share()).await;
    }

    fn release(&self, bytes: usize) {
        self.release_share(bytes);
        self.global.release(bytes);
    }

    fn release_share(&self, bytes: usize) {
        let before = self.pending.fetch_sub(bytes, Ordering::Relaxed);
        let share = self.global.per_connection;
        if before >= share && before - bytes < share {
            self.released.notify(usize::MAX);
        }
    }
}

impl std::fmt::Debug for ConnectionBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionBudget")
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

/// One connection's room for the poll replies of one batch: the store
/// charges the connection's account message by message as it builds them,
/// so nothing is held back that is not used, and a connection with many
/// polls in a batch is limited by bytes, not by a count of polls. The first
/// message of the batch's replies always fits (a poll must be able to make
/// progress); the charges are released when the batch is done, and the
/// connection charges the encoded answers instead.
#[derive(Debug)]
pub(crate) struct BatchReplyRoom {
    account: Arc<ConnectionBudget>,
    taken: AtomicUsize,
    forced: std::sync::atomic::AtomicBool,
}

impl BatchReplyRoom {
    pub(crate) fn new(account: Arc<ConnectionBudget>) -> Self {
        Self {
            account,
            taken: AtomicUsize::new(0),
            forced: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl crate::storage::ReplyRoom for BatchReplyRoom {
    fn take(&self, bytes: usize, first: bool) -> bool {
        let granted = self.account.try_charge(bytes)
            || (first && self.taken.load(Ordering::Relaxed) == 0 && !self.forced.swap(true, Ordering::Relaxed) && {
                self.account.force_charge(bytes);
                true
            });
        if granted {
            self.taken.fetch_add(bytes, Ordering::Relaxed);
        }
        granted
    }
}

impl Drop for BatchReplyRoom {
    fn drop(&mut self) {
        self.account.release(*self.taken.get_mut());
    }
}

enum Account {
    Connection(Arc<ConnectionBudget>),
    /// Server-wide only: the receive buffer, bounded per connection by the
    /// frame limit, counts against the server but not the share (the share
    /// is about what a client leaves unanswered, not the frame it sends).
    Server(Arc<BufferBudget>),
}

/// Bytes held against a budget; released when dropped.
pub(crate) struct Charge {
    account: Account,
    bytes: usize,
}

impl Charge {
    /// A charge against the server-wide budget only.
    pub(crate) fn server(budget: &Arc<BufferBudget>, bytes: usize) -> Charge {
        budget.charge(bytes);
        Charge {
            account: Account::Server(budget.clone()),
            bytes,
        }
    }

    /// Changes the charge to `bytes` (what the thing it pays for now holds).
    pub(crate) fn set(&mut self, bytes: usize) {
        if bytes > self.bytes {
            let more = bytes - self.bytes;
            match &self.account {
                Account::Connection(c) => {
                    c.pending.fetch_add(more, Ordering::Relaxed);
                    c.global.charge(more);
                }
                Account::Server(s) => s.charge(more),
            }
        } else {
            self.release_part(self.bytes - bytes);
        }
        self.bytes = bytes;
    }

    fn release_part(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        match &self.account {
            Account::Connection(c) => c.release(bytes),
            Account::Server(s) => s.release(bytes),
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.release_part(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_add_up_and_drop_back_to_zero() {
        let server = BufferBudget::new(100, 40);
        let a = server.connection();
        let b = server.connection();
        let mut first = a.charge(30);
        let second = b.charge(50);
        let buffer = Charge::server(&server, 10);
        assert_eq!((a.pending(), b.pending(), server.used()), (30, 50, 90));
        assert!(!a.over_share() && b.over_share());
        first.set(45);
        assert!(a.over_share());
        assert_eq!(server.used(), 105);
        assert!(server.exhausted());
        drop((first, second, buffer));
        assert_eq!((a.pending(), b.pending(), server.used()), (0, 0, 0));
    }

    #[test]
    fn a_batch_room_charges_what_is_built_and_forces_only_the_first_message() {
        use crate::storage::ReplyRoom;
        let server = BufferBudget::new(100, 40);
        let a = server.connection();
        let held = a.charge(25);
        let room = BatchReplyRoom::new(a.clone());
        assert!(room.take(10, true), "fits the share");
        assert!(!room.take(10, false), "35 + 10 is over the share of 40");
        assert!(!room.take(10, true), "only the batch's first message is forced");
        assert_eq!(a.pending(), 35);
        drop(room);
        assert_eq!(a.pending(), 25, "the batch's charges go with it");

        let room = BatchReplyRoom::new(a.clone());
        assert!(room.take(1000, true), "a first message too large still goes");
        assert!(a.over_share() && !a.has_room());
        drop(room);
        let b = server.connection();
        let _big = b.charge(80);
        let room = BatchReplyRoom::new(a.clone());
        assert!(!room.take(10, false), "the server's room is gone");
        drop((room, held));
        assert_eq!(server.used(), 80);
    }

    #[test]
    fn waiters_wake_when_bytes_are_released() {
        let server = BufferBudget::new(10, 5);
        let a = server.connection();
        let charge = a.charge(12);
        let waiter = {
            let a = a.clone();
            let server = server.clone();
            std::thread::spawn(move || {
                futures::executor::block_on(async {
                    a.wait_under_share().await;
                    server.wait_for_room().await;
                })
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(charge);
        waiter.join().expect("woken");
    }
}
