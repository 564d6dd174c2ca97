//! The sidecar's life beside its app in a container: capturing the
//! namespace's traffic at start and dropping root ([`privileges`]), telling
//! compose and entrypoints when it is ready ([`await_ready`]), and running
//! the app as its child in one container ([`app`]).

pub mod app;
pub mod await_ready;
pub mod privileges;
