//! The sidecar's life beside its app in a container: capturing the
//! namespace's traffic at start and dropping root ([`privileges`]), telling
//! compose and entrypoints when it is ready ([`await_ready`]), running
//! the app as its child in one container ([`app`]), and telling whether an
//! app in its network namespace but not its processes is still there
//! ([`neighbour`]).

pub mod app;
pub mod await_ready;
pub mod neighbour;
pub mod privileges;
