//! A small authoritative DNS server for labs: answers A queries for service
//! names from a table the lab edits while it runs, rotating the records on
//! every answer (round robin, as Docker's embedded DNS spreads its answers).
//! AAAA queries for a known name get no records; unknown names NXDOMAIN.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType, rdata::A};

/// Name → addresses.
pub type Records = Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>>;
/// Name → queries asked for it.
pub type Asked = Arc<Mutex<HashMap<String, usize>>>;

/// A running server; stops on drop.
pub struct DnsServer {
    /// Where it listens (UDP).
    pub addr: SocketAddr,
    /// The table; edit it to change the answers (names lowercase, no dot).
    pub records: Records,
    /// Queries asked so far (any type), by name (lowercase, no dot).
    pub asked: Asked,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    /// Starts answering on `listen` with records valid for `ttl` seconds.
    pub async fn start(listen: SocketAddr, ttl: u32) -> Result<Self> {
        let sock = tokio::net::UdpSocket::bind(listen)
            .await
            .with_context(|| format!("binding DNS on {listen}"))?;
        let addr = sock.local_addr()?;
        let records: Records = Arc::default();
        let table = records.clone();
        let asked: Asked = Arc::default();
        let count = asked.clone();
        let turn = AtomicUsize::new(0);
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                let rotate = turn.fetch_add(1, Ordering::Relaxed);
                if let Some(reply) = answer(&buf[..n], &table, &count, ttl, rotate) {
                    let _ = sock.send_to(&reply, peer).await;
                }
            }
        });
        Ok(Self {
            addr,
            records,
            asked,
            task,
        })
    }

    /// How many queries (any type) for `name` came so far.
    pub fn asked(&self, name: &str) -> usize {
        self.asked.lock().map_or(0, |a| {
            a.get(&name.to_ascii_lowercase()).copied().unwrap_or(0)
        })
    }

    /// Sets the addresses of `name`; an empty list removes it.
    pub fn set(&self, name: &str, ips: Vec<Ipv4Addr>) {
        if let Ok(mut t) = self.records.lock() {
            if ips.is_empty() {
                t.remove(name);
            } else {
                t.insert(name.to_ascii_lowercase(), ips);
            }
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A name as the table keys it: lowercase, no trailing dot.
fn name_of(name: &hickory_proto::rr::Name) -> String {
    name.to_lowercase()
        .to_ascii()
        .trim_end_matches('.')
        .to_string()
}

/// Counts one packet's question and answers it; `None` for what is not a
/// query.
fn answer(
    packet: &[u8],
    table: &Records,
    asked: &Asked,
    ttl: u32,
    rotate: usize,
) -> Option<Vec<u8>> {
    let query = Message::from_vec(packet).ok()?;
    if let (Some(q), Ok(mut c)) = (query.queries.first(), asked.lock()) {
        *c.entry(name_of(q.name())).or_default() += 1;
    }
    reply(&query, table, ttl, rotate)
}

/// The reply to `query`, or `None` for what is not a query.
fn reply(query: &Message, table: &Records, ttl: u32, rotate: usize) -> Option<Vec<u8>> {
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    let Some(q) = query.queries.first().cloned() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return reply.to_vec().ok();
    };
    reply.add_query(q.clone());
    if query.metadata.op_code != OpCode::Query {
        reply.metadata.response_code = ResponseCode::NotImp;
        return reply.to_vec().ok();
    }
    let ips = table.lock().ok()?.get(&name_of(q.name())).cloned();
    match ips {
        None => reply.metadata.response_code = ResponseCode::NXDomain,
        Some(mut ips) if q.query_type() == RecordType::A => {
            let len = ips.len().max(1);
            ips.rotate_left(rotate % len);
            for ip in ips {
                reply.add_answer(Record::from_rdata(q.name().clone(), ttl, RData::A(A(ip))));
            }
        }
        // Known name, another type (AAAA): no records, no error.
        Some(_) => {}
    }
    reply.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn ask(table: &Records, name: &str, t: RecordType, rotate: usize) -> Message {
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_ascii(name).expect("name"), t));
        let bytes = q.to_vec().expect("encode");
        let query = Message::from_vec(&bytes).expect("decode");
        let reply = reply(&query, table, 5, rotate).expect("a reply");
        Message::from_vec(&reply).expect("decode")
    }

    fn ips(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn answers_rotate_and_unknown_names_are_nxdomain() {
        let table: Records = Arc::default();
        let a = |n| Ipv4Addr::new(10, 0, 0, n);
        table
            .lock()
            .expect("lock")
            .insert("web".into(), vec![a(1), a(2), a(3)]);
        assert_eq!(
            ips(&ask(&table, "web.", RecordType::A, 0)),
            [a(1), a(2), a(3)]
        );
        assert_eq!(
            ips(&ask(&table, "WEB.", RecordType::A, 1)),
            [a(2), a(3), a(1)]
        );
        let aaaa = ask(&table, "web.", RecordType::AAAA, 0);
        assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
        assert!(aaaa.answers.is_empty());
        let nx = ask(&table, "db.", RecordType::A, 0);
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        assert!(answer(b"garbage", &table, &Asked::default(), 5, 0).is_none());
    }
}
