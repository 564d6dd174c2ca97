//! `wfctl tap`: the taps open now, what each asks for ([`Filter`]), and the
//! fan-out of sidecars' events to them. Sidecars follow [`Taps::interest`]
//! and record nothing for a service nobody taps.
//!
//! Each tap has a bounded queue: events it does not take in time are
//! counted and reported to it with its next batch, never held.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use tokio::sync::{mpsc, watch};
use wayfinder_proto::v1::{TapBatch, TapEvent, TapRequest};

/// Most taps open at once.
pub const MAX_TAPS: usize = 64;
/// Batches a tap may have waiting; a sidecar sends one every 200 ms.
pub const TAP_QUEUE: usize = 256;

/// Which statuses a tap wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    /// One status: `503`.
    Exact(u16),
    /// A class: `5xx` is `Class(5)`.
    Class(u16),
}

/// What one tap asks for; every part that is set must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// The called service.
    pub service: String,
    /// The calling service.
    pub from: Option<String>,
    /// The answering instance.
    pub instance: Option<String>,
    /// The status.
    pub status: Option<StatusFilter>,
    /// A path prefix.
    pub path: Option<String>,
}

fn set(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

impl Filter {
    /// The filter of a request, or what is wrong with it.
    pub fn parse(r: &TapRequest) -> Result<Self, String> {
        wayfinder_proto::validate::service_name(&r.service).map_err(|e| format!("service: {e}"))?;
        if !r.from.is_empty() {
            wayfinder_proto::validate::service_name(&r.from).map_err(|e| format!("from: {e}"))?;
        }
        let status = match r.status.to_ascii_lowercase().as_str() {
            "" => None,
            s if s.len() == 3 && s.ends_with("xx") => match s.as_bytes()[0] {
                c @ b'1'..=b'5' => Some(StatusFilter::Class(u16::from(c - b'0'))),
                _ => return Err("status: 1xx to 5xx, or one status (503)".into()),
            },
            s => match s.parse::<u16>() {
                Ok(n) if (100..=599).contains(&n) => Some(StatusFilter::Exact(n)),
                _ => return Err("status: 1xx to 5xx, or one status (503)".into()),
            },
        };
        if r.instance.len() > 253 || r.path.len() > 2048 {
            return Err("instance: at most 253 bytes; path: at most 2048".into());
        }
        Ok(Self {
            service: r.service.clone(),
            from: set(&r.from),
            instance: set(&r.instance),
            status,
            path: set(&r.path),
        })
    }

    /// Whether `e` is one of the requests asked for.
    pub fn matches(&self, e: &TapEvent) -> bool {
        let status = u16::try_from(e.status).unwrap_or(0);
        e.callee == self.service
            && self.from.as_ref().is_none_or(|f| *f == e.caller)
            && self.instance.as_ref().is_none_or(|i| *i == e.instance)
            && self.path.as_ref().is_none_or(|p| e.path.starts_with(p))
            && match self.status {
                None => true,
                Some(StatusFilter::Exact(n)) => status == n,
                Some(StatusFilter::Class(c)) => status / 100 == c,
            }
    }
}

struct Watcher {
    filter: Filter,
    tx: mpsc::Sender<TapBatch>,
    /// Events it missed since its last batch (its queue was full).
    lost: u64,
}

#[derive(Default)]
struct Open {
    next: u64,
    watchers: HashMap<u64, Watcher>,
}

/// The open taps.
pub struct Taps {
    open: Mutex<Open>,
    interest: watch::Sender<Vec<String>>,
}

impl Default for Taps {
    fn default() -> Self {
        Self {
            open: Mutex::default(),
            interest: watch::Sender::new(Vec::new()),
        }
    }
}

/// An open tap: closed when dropped (its stream ends with the RPC).
pub struct Opened {
    taps: std::sync::Arc<Taps>,
    id: u64,
}

impl Taps {
    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a tap; its batches arrive on the receiver until [`Taps::close`].
    /// `None` when [`MAX_TAPS`] are open.
    pub fn open(&self, filter: Filter) -> Option<(u64, mpsc::Receiver<TapBatch>)> {
        let (tx, rx) = mpsc::channel(TAP_QUEUE);
        let mut open = self.lock();
        if open.watchers.len() >= MAX_TAPS {
            return None;
        }
        open.next += 1;
        let id = open.next;
        open.watchers.insert(
            id,
            Watcher {
                filter,
                tx,
                lost: 0,
            },
        );
        self.announce(&open);
        Some((id, rx))
    }

    /// Closes tap `id`.
    pub fn close(&self, id: u64) {
        let mut open = self.lock();
        if open.watchers.remove(&id).is_some() {
            self.announce(&open);
        }
    }

    /// Tells sidecars the services tapped, when that changed.
    fn announce(&self, open: &Open) {
        let services: Vec<String> = open
            .watchers
            .values()
            .map(|w| w.filter.service.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        self.interest.send_if_modified(|now| {
            let changed = *now != services;
            *now = services;
            changed
        });
    }

    /// The services tapped now, and each change of them.
    pub fn interest(&self) -> watch::Receiver<Vec<String>> {
        self.interest.subscribe()
    }

    /// Hands a sidecar's events to each tap they match, with the sidecar's
    /// drops; a tap whose queue is full loses them (counted).
    pub fn publish(&self, batch: &TapBatch) {
        let mut open = self.lock();
        for w in open.watchers.values_mut() {
            let events: Vec<TapEvent> = batch
                .events
                .iter()
                .filter(|e| w.filter.matches(e))
                .cloned()
                .collect();
            if events.is_empty() && batch.dropped == 0 {
                continue;
            }
            let n = events.len() as u64;
            let out = TapBatch {
                events,
                dropped: batch.dropped + w.lost,
                ..TapBatch::default()
            };
            match w.tx.try_send(out) {
                Ok(()) => w.lost = 0,
                Err(_) => w.lost += n,
            }
        }
    }

    /// Keeps tap `id` open until the guard is dropped.
    pub fn guard(self: &std::sync::Arc<Self>, id: u64) -> Opened {
        Opened {
            taps: self.clone(),
            id,
        }
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.taps.close(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(status: &str) -> TapRequest {
        TapRequest {
            service: "web".into(),
            status: status.into(),
            ..Default::default()
        }
    }

    fn event(caller: &str, instance: &str, status: u32, path: &str) -> TapEvent {
        TapEvent {
            caller: caller.into(),
            callee: "web".into(),
            instance: instance.into(),
            status,
            path: path.into(),
            ..Default::default()
        }
    }

    #[test]
    fn statuses_are_one_code_or_a_class() {
        assert_eq!(Filter::parse(&req("")).expect("ok").status, None);
        assert_eq!(
            Filter::parse(&req("5xx")).expect("ok").status,
            Some(StatusFilter::Class(5))
        );
        assert_eq!(
            Filter::parse(&req("503")).expect("ok").status,
            Some(StatusFilter::Exact(503))
        );
        for bad in ["6xx", "x5x", "99", "600", "five"] {
            assert!(Filter::parse(&req(bad)).is_err(), "{bad}");
        }
        let mut r = req("");
        r.service = "Not A Service".into();
        assert!(Filter::parse(&r).is_err());
    }

    #[test]
    fn every_filter_that_is_set_must_hold() {
        let f = Filter::parse(&TapRequest {
            service: "web".into(),
            from: "client".into(),
            instance: "web-1".into(),
            status: "5xx".into(),
            path: "/api".into(),
        })
        .expect("valid");
        assert!(f.matches(&event("client", "web-1", 503, "/api/x")));
        assert!(!f.matches(&event("other", "web-1", 503, "/api/x")));
        assert!(!f.matches(&event("client", "web-2", 503, "/api/x")));
        assert!(!f.matches(&event("client", "web-1", 200, "/api/x")));
        assert!(!f.matches(&event("client", "web-1", 503, "/other")));
        let mut api = event("client", "web-1", 503, "/api");
        api.callee = "api".into();
        assert!(!f.matches(&api));
        assert!(!Filter::parse(&req("")).expect("ok").matches(&api));
    }

    #[test]
    fn sidecars_hear_of_each_service_while_a_tap_is_open_on_it() {
        let taps = std::sync::Arc::new(Taps::default());
        let interest = taps.interest();
        let (a, _ra) = taps
            .open(Filter::parse(&req("")).expect("ok"))
            .expect("room");
        let (b, _rb) = taps
            .open(Filter::parse(&req("5xx")).expect("ok"))
            .expect("room");
        assert_eq!(*interest.borrow(), vec!["web".to_string()]);
        taps.close(a);
        assert_eq!(*interest.borrow(), vec!["web".to_string()]);
        drop(taps.guard(b));
        assert!(interest.borrow().is_empty());
    }

    #[test]
    fn a_tap_gets_its_matching_events_and_learns_what_it_missed() {
        let taps = Taps::default();
        let (_, mut errors) = taps
            .open(Filter::parse(&req("5xx")).expect("ok"))
            .expect("room");
        let batch = |n: usize| TapBatch {
            events: (0..n)
                .map(|i| event("client", "web-1", if i % 2 == 0 { 200 } else { 503 }, "/"))
                .collect(),
            dropped: 3,
            ..TapBatch::default()
        };
        taps.publish(&batch(4));
        let got = errors.try_recv().expect("a batch");
        assert_eq!((got.events.len(), got.dropped), (2, 3));
        // A full queue: the events are counted, then reported.
        for _ in 0..TAP_QUEUE + 1 {
            taps.publish(&batch(2));
        }
        while errors.try_recv().is_ok() {}
        taps.publish(&batch(0));
        let got = errors.try_recv().expect("a batch");
        assert_eq!(got.dropped, 3 + 1);
    }

    #[test]
    fn no_more_than_max_taps_are_open() {
        let taps = Taps::default();
        let held: Vec<_> = (0..MAX_TAPS)
            .map(|_| {
                taps.open(Filter::parse(&req("")).expect("ok"))
                    .expect("room")
            })
            .collect();
        assert!(taps.open(Filter::parse(&req("")).expect("ok")).is_none());
        drop(held);
    }
}
