//! The gRPC services of `wayfinder.v1`, thin adapters between tonic and the
//! registry: they validate input, call the registry and map errors to statuses.

pub mod admin;
pub mod auth;
pub mod catalog;
pub mod discovery;
pub mod identity;
pub mod registry;
pub mod serve;
pub mod tap;
pub mod telemetry;
pub mod transport;

use prost::Message;
use tonic::Status;

use crate::registry::RegistryError;
use crate::store::BackendError;

/// Largest request an RPC accepts; bigger ones are refused with
/// `InvalidArgument` before any work. Messages beyond tonic's transport limit
/// ([`TRANSPORT_LIMIT`]) are refused by tonic itself with `OutOfRange`.
pub const REQUEST_LIMIT: usize = 1024 * 1024;
/// Decoding limit handed to tonic.
pub const TRANSPORT_LIMIT: usize = wayfinder_proto::MAX_MESSAGE_BYTES;

/// Refuses requests larger than [`REQUEST_LIMIT`].
pub fn check_size(msg: &impl Message) -> Result<(), Status> {
    let len = msg.encoded_len();
    if len > REQUEST_LIMIT {
        return Err(Status::invalid_argument(format!(
            "request is {len} bytes; at most {REQUEST_LIMIT} allowed"
        )));
    }
    Ok(())
}

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::UnknownLease(_) | RegistryError::UnknownEndpoint { .. } => {
                Status::not_found(e.to_string())
            }
            RegistryError::Conflict(_) => Status::failed_precondition(e.to_string()),
        }
    }
}

impl From<BackendError> for Status {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Registry(e) => e.into(),
            BackendError::NotDurable | BackendError::Unavailable(_) => {
                Status::unavailable(e.to_string())
            }
        }
    }
}

/// Refuses an invalid name or field with `InvalidArgument`.
pub fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}
