//! Shared parts of Wayfinder's benchmark programs: plots and the machine
//! description every report starts with.

pub mod lab;
pub mod machine;
pub mod svg;
