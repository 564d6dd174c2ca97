//! Shared parts of Wayfinder's benchmark programs: plots and the machine
//! description every report starts with.

pub mod lab;
/// The machine description, shared with `wfctl lab compare`.
pub use wayfinder_cli::lab::machine;
/// Plots, shared with `wfctl lab compare`.
pub use wayfinder_cli::lab::svg;
