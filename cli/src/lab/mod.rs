//! Labs: what `wfctl lab` runs.

pub mod dns;
