//! A `WatchEvent` encoded once and shared by every watcher.
//!
//! With thousands of watch streams, re-encoding (or deep-cloning) an update per
//! stream costs more than the update itself. The control plane encodes each
//! event into [`Bytes`] once; cloning is a reference-count bump, and tonic's
//! codec writes the bytes as they are.

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use prost::encoding::{DecodeContext, WireType};

use crate::v1::WatchEvent;

/// The protobuf encoding of one [`WatchEvent`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodedWatchEvent(pub Bytes);

impl EncodedWatchEvent {
    /// Encodes `event` once.
    pub fn new(event: &WatchEvent) -> Self {
        Self(Bytes::from(event.encode_to_vec()))
    }

    /// Decodes the bytes back (tests and tools).
    pub fn decode(&self) -> Result<WatchEvent, prost::DecodeError> {
        WatchEvent::decode(self.0.clone())
    }
}

impl Message for EncodedWatchEvent {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    // The server never decodes this type; accept fields by skipping them so a
    // misuse cannot panic.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Delta, watch_event::Kind};

    #[test]
    fn encoded_bytes_round_trip_through_a_length_delimited_frame() {
        let event = WatchEvent {
            service: "web".into(),
            version: 7,
            changed_at_us: 1,
            kind: Some(Kind::Delta(Delta {
                prev_version: 6,
                removed: vec!["web-1".into()],
                ..Default::default()
            })),
        };
        let enc = EncodedWatchEvent::new(&event);
        assert_eq!(enc.encoded_len(), event.encoded_len());
        let mut framed = Vec::new();
        enc.encode(&mut framed).expect("vec grows");
        assert_eq!(
            WatchEvent::decode(framed.as_slice()).expect("decodes"),
            event
        );
        assert_eq!(enc.decode().expect("decodes"), event);
    }
}
