//! Circuit breakers per upstream service, as Envoy's: limits on requests in
//! flight, retries in flight, open connections and requests waiting for a
//! connection. A request over a limit is refused at once (503
//! `overloaded`) instead of queueing behind a service that is already
//! struggling. Limits come from the live policy, so they are passed in.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::Notify;

/// A counter with a limit that is checked on every acquire.
#[derive(Debug, Default)]
pub struct Gate {
    current: AtomicU32,
}

/// One unit held in a [`Gate`]; released on drop.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
    notify: Option<Arc<Notify>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.current.fetch_sub(1, Ordering::AcqRel);
        if let Some(n) = &self.notify {
            n.notify_one();
        }
    }
}

impl Gate {
    /// Takes a unit unless `limit` units are taken (`None` = unlimited).
    pub fn try_acquire(self: &Arc<Self>, limit: Option<u32>) -> Option<Permit> {
        self.try_acquire_notify(limit, None)
    }

    fn try_acquire_notify(
        self: &Arc<Self>,
        limit: Option<u32>,
        notify: Option<Arc<Notify>>,
    ) -> Option<Permit> {
        let max = limit.unwrap_or(u32::MAX);
        self.current
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                (c < max).then_some(c + 1)
            })
            .ok()?;
        Some(Permit {
            gate: self.clone(),
            notify,
        })
    }

    /// Units taken now.
    pub fn current(&self) -> u32 {
        self.current.load(Ordering::Acquire)
    }
}

/// Why a connection could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Overflow {
    /// Too many requests in flight.
    #[error("too many requests in flight")]
    Requests,
    /// Too many requests waiting for a connection.
    #[error("too many requests waiting for a connection")]
    Pending,
    /// Too many retries in flight.
    #[error("too many retries in flight")]
    Retries,
}

impl Overflow {
    /// Every limit (to remove a service's series).
    pub const ALL: [Overflow; 3] = [Overflow::Requests, Overflow::Pending, Overflow::Retries];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::Requests => "requests",
            Overflow::Pending => "pending",
            Overflow::Retries => "retries",
        }
    }
}

/// The breakers of one upstream.
#[derive(Debug, Default)]
pub struct Breakers {
    /// Requests in flight.
    pub requests: Arc<Gate>,
    /// Retries in flight.
    pub retries: Arc<Gate>,
    /// Open connections.
    pub connections: Arc<Gate>,
    /// Requests waiting for a connection slot.
    pub pending: Arc<Gate>,
    closed: Arc<Notify>,
}

impl Breakers {
    /// A connection slot: at once when one is free; otherwise waits as one
    /// of at most `max_pending` until a connection closes. The caller bounds
    /// the wait (the connect timeout).
    pub async fn connection(
        &self,
        max_connections: Option<u32>,
        max_pending: Option<u32>,
    ) -> Result<Permit, Overflow> {
        if let Some(p) = self
            .connections
            .try_acquire_notify(max_connections, Some(self.closed.clone()))
        {
            return Ok(p);
        }
        let _waiting = self
            .pending
            .try_acquire(max_pending)
            .ok_or(Overflow::Pending)?;
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if let Some(p) = self
                .connections
                .try_acquire_notify(max_connections, Some(self.closed.clone()))
            {
                return Ok(p);
            }
            closed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_gate_admits_up_to_its_limit_and_frees_on_drop() {
        let g = Arc::new(Gate::default());
        let a = g.try_acquire(Some(2)).expect("1");
        let _b = g.try_acquire(Some(2)).expect("2");
        assert!(g.try_acquire(Some(2)).is_none());
        assert!(g.try_acquire(None).is_some(), "unlimited");
        drop(a);
        assert!(g.try_acquire(Some(2)).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn connection_waiters_are_bounded_and_woken_by_a_close() {
        let b = Arc::new(Breakers::default());
        let first = b.connection(Some(1), Some(1)).await.expect("free slot");
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.connection(Some(1), Some(1)).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(b.pending.current(), 1);
        assert_eq!(
            b.connection(Some(1), Some(1)).await.err(),
            Some(Overflow::Pending),
            "the second waiter overflows at once"
        );
        drop(first);
        assert_eq!(waiter.await.ok(), Some(Ok(())));
        assert_eq!(b.pending.current(), 0);
    }
}
