//! A wake-up at a moving deadline that costs one glommio timer per ring
//! instead of one per wait.
//!
//! Why: a shard's core waits for its next call or its next deadline (the
//! first parked long poll to time out, the first lease to expire) on every
//! pass of its loop, several times per message. A timeout around each wait
//! created, registered, polled and dropped a timer every time (callgrind,
//! open loop: about 1% of the server's instructions per message went with
//! it, `docs/benchmarks.md`). The deadline mostly moves later (the oldest
//! waiter is served, the oldest lease removed), so an alarm already set at
//! or before the new deadline is kept; it then rings early, costing one
//! pass of the loop that finds nothing due, after which it is set again.
//! A deadline earlier than the alarm moves the alarm. So it never rings
//! late, and each time it is set it rings early at most once.

use std::rc::Rc;
use std::time::Instant;

use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::timer::TimerActionOnce;

/// Rings no later than the earliest deadline it was set by (see the module
/// documentation). Lives on one executor.
pub struct Alarm {
    /// When the live timer rings, if one is set and has not rung yet (or
    /// has rung and its ring is still waiting in `rings`).
    armed_at: Option<Instant>,
    timer: Option<TimerActionOnce<()>>,
    ring: Rc<LocalSender<()>>,
    rings: LocalReceiver<()>,
}

impl Alarm {
    /// An alarm that is not set. Must be created on a glommio executor.
    pub fn new() -> Alarm {
        let (ring, rings) = local_channel::new_unbounded();
        Alarm {
            armed_at: None,
            timer: None,
            ring: Rc::new(ring),
            rings,
        }
    }

    /// Makes sure the alarm rings no later than `at`: keeps one set at or
    /// before it, otherwise sets it for `at`.
    pub fn set_by(&mut self, at: Instant) {
        if self.armed_at.is_some_and(|armed| armed <= at) {
            return;
        }
        if let Some(old) = self.timer.take() {
            old.destroy();
        }
        let ring = self.ring.clone();
        self.timer = Some(TimerActionOnce::do_at(at, async move {
            // The receiver outlives every timer it set (see `Drop`).
            let _ = ring.try_send(());
        }));
        self.armed_at = Some(at);
    }

    /// Waits for the alarm to ring; it is then no longer set.
    pub async fn rung(&mut self) {
        if self.rings.recv().await.is_some() {
            self.armed_at = None;
            // Usually the timer that rang; a ring left over from a replaced
            // one may come first, and then the live timer goes too: the
            // next `set_by` sets it again, so nothing rings late.
            if let Some(timer) = self.timer.take() {
                timer.destroy();
            }
        }
    }
}

impl Default for Alarm {
    fn default() -> Self {
        Alarm::new()
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        if let Some(timer) = self.timer.take() {
            timer.destroy();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::run_on_test_executor as on_executor;
    use std::time::Duration;

    /// How long after `start` the alarm rang, with a minute's bound.
    async fn ring_after(alarm: &mut Alarm, start: Instant) -> Duration {
        crate::runtime::within(Duration::from_secs(60), alarm.rung())
            .await
            .expect("the alarm rang within a minute");
        start.elapsed()
    }

    #[test]
    fn rings_at_its_deadline_not_before() {
        let took = on_executor(|| {
            Box::pin(async {
                let mut alarm = Alarm::new();
                let start = Instant::now();
                alarm.set_by(start + Duration::from_millis(30));
                ring_after(&mut alarm, start).await
            })
        });
        assert!(took >= Duration::from_millis(30), "rang after {took:?}");
    }

    #[test]
    fn an_earlier_deadline_moves_it_and_a_later_one_does_not() {
        let (earlier, later) = on_executor(|| {
            Box::pin(async {
                let mut alarm = Alarm::new();
                let start = Instant::now();
                alarm.set_by(start + Duration::from_secs(30));
                alarm.set_by(start + Duration::from_millis(20));
                let earlier = ring_after(&mut alarm, start).await;
                // Set for 20 ms, a later deadline keeps it: it rings early.
                let start = Instant::now();
                alarm.set_by(start + Duration::from_millis(20));
                alarm.set_by(start + Duration::from_secs(30));
                let later = ring_after(&mut alarm, start).await;
                (earlier, later)
            })
        });
        for (which, took) in [("earlier", earlier), ("later", later)] {
            assert!(
                took >= Duration::from_millis(20) && took < Duration::from_secs(10),
                "{which}: rang after {took:?}"
            );
        }
    }

    #[test]
    fn after_ringing_it_can_be_set_again() {
        let rings = on_executor(|| {
            Box::pin(async {
                let mut alarm = Alarm::new();
                let mut rings = Vec::new();
                for _ in 0..3 {
                    let start = Instant::now();
                    alarm.set_by(start + Duration::from_millis(10));
                    rings.push(ring_after(&mut alarm, start).await);
                }
                rings
            })
        });
        assert!(rings.iter().all(|r| *r >= Duration::from_millis(10)), "{rings:?}");
    }

    #[test]
    fn a_replaced_timer_does_not_ring() {
        let quiet = on_executor(|| {
            Box::pin(async {
                let mut alarm = Alarm::new();
                let start = Instant::now();
                alarm.set_by(start + Duration::from_millis(40));
                alarm.set_by(start + Duration::from_millis(10));
                ring_after(&mut alarm, start).await;
                // The 40 ms timer was replaced: nothing rings at 40 ms.
                crate::runtime::within(Duration::from_millis(100), alarm.rung())
                    .await
                    .is_none()
            })
        });
        assert!(quiet, "a replaced timer rang");
    }
}
