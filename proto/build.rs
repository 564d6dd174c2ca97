//! Compiles `wayfinder.v1` (and lab-app's `wayfinder.lab.v1`) with protox (no system `protoc`) and tonic's generator.
//!
//! Two passes: the normal one produces every message, client and server; the
//! second produces only the Discovery server again, with `WatchEvent` mapped to
//! `crate::encoded::EncodedWatchEvent`, so the control plane can encode each
//! update once and hand the same bytes to every watcher.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "protos/wayfinder/v1/types.proto",
    "protos/wayfinder/v1/policy.proto",
    "protos/wayfinder/v1/registry.proto",
    "protos/wayfinder/v1/discovery.proto",
    "protos/wayfinder/v1/admin.proto",
    "protos/wayfinder/v1/telemetry.proto",
    "protos/wayfinder/v1/identity.proto",
    "protos/wayfinder/v1/catalog.proto",
    "protos/wayfinder/v1/tap.proto",
    "protos/wayfinder/lab/v1/echo.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=protos");
    let fds = protox::compile(PROTOS, ["protos"])?;
    // serde on the messages lets the control plane persist them and tools
    // print them as JSON without a parallel set of types.
    tonic_prost_build::configure()
        .type_attribute(
            ".wayfinder.v1",
            "#[derive(serde::Serialize, serde::Deserialize)]",
        )
        .message_attribute(".wayfinder.v1", "#[serde(default)]")
        .enum_attribute(".wayfinder.v1", "#[serde(rename_all = \"snake_case\")]")
        .compile_fds(fds)?;

    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("shared");
    std::fs::create_dir_all(&out)?;
    let fds = protox::compile(["protos/wayfinder/v1/discovery.proto"], ["protos"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&out)
        .extern_path(".wayfinder.v1", "crate::v1")
        .extern_path(
            ".wayfinder.v1.WatchEvent",
            "crate::encoded::EncodedWatchEvent",
        )
        .compile_fds(fds)?;
    Ok(())
}
