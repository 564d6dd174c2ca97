//! `wfctl inject` on files: golden files for the rewrite (regenerate with
//! `UPDATE_GOLDEN=1 cargo test -p wayfinder-cli --test inject`), round
//! trips, and each bad input refused with file, service and key named.

use std::path::{Path, PathBuf};

use wayfinder_cli::inject::{self, InjectError, Options, Request};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn opts(file: &str) -> Options {
    Options {
        file: file.into(),
        secrets_dir: "./lab.wayfinder".into(),
        ..Default::default()
    }
}

/// Compares `got` with the golden file (or rewrites it under UPDATE_GOLDEN).
fn golden(name: &str, got: &str) {
    let path = root().join("cli/tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).expect("writing the golden file");
        return;
    }
    let want = std::fs::read_to_string(&path).expect("the golden file (UPDATE_GOLDEN=1 writes it)");
    assert!(
        got == want,
        "{} differs from the rewrite (UPDATE_GOLDEN=1 to accept):\n{got}",
        path.display()
    );
}

fn classic() -> String {
    std::fs::read_to_string(root().join("examples/classic-lab/compose.yaml")).expect("classic lab")
}

fn features() -> String {
    std::fs::read_to_string(root().join("cli/tests/golden/features.yaml")).expect("features")
}

#[test]
fn the_classic_lab_is_meshed_as_the_golden_file_says() {
    let out = inject::inject(&classic(), &opts("compose.yaml")).expect("inject");
    golden("classic-lab.meshed.yaml", &out.text);
    let names: Vec<_> = out
        .meshed
        .iter()
        .map(|m| (m.compose.as_str(), m.service.as_str(), m.port))
        .collect();
    assert_eq!(
        names,
        [
            ("web1", "web", Some(80)),
            ("web2", "web", Some(80)),
            ("web3", "web", Some(80)),
            ("nginx", "nginx", Some(80)),
            ("client", "client", None),
        ]
    );
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
}

#[test]
fn every_shape_of_service_is_meshed_as_the_golden_file_says() {
    let out = inject::inject(&features(), &opts("features.yaml")).expect("inject");
    golden("features.meshed.yaml", &out.text);
    let names: Vec<_> = out
        .meshed
        .iter()
        .map(|m| {
            (
                m.compose.as_str(),
                m.service.as_str(),
                m.instance.as_str(),
                m.port,
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            // A shared alias is the mesh service; the container name the instance.
            ("api", "backend", "api-1", Some(8080)),
            ("api2", "backend", "api2", Some(8080)),
            // A label names the service; no port, no alias: client only.
            ("worker", "jobs", "worker", None),
            // An unquoted number label; the UDP port is not the app's.
            ("resolver", "resolver", "resolver", Some(8053)),
            // A job: it shares its sidecar's PID namespace, which ends with it.
            ("migrate", "migrate", "migrate", None),
        ]
    );
    assert!(out.text.contains("pid: service:migrate-sidecar"));
    assert_eq!(out.text.matches("--exit-with-app").count(), 1);
    // db (an unquoted `false` label), monitor (host network), sandbox (no
    // network) and legacy (Docker's bridge, no names) are left alone, each
    // named with its reason; debug, in api's namespace, follows it to its
    // sidecar.
    assert_eq!(out.warnings.len(), 5, "{:?}", out.warnings);
    assert!(out.warnings[0].contains("db is not meshed: label wayfinder.io/inject"));
    assert!(
        out.warnings[1]
            .contains("monitor is not meshed: network_mode \"host\": it shares the host's")
    );
    assert!(
        out.warnings[2].contains("sandbox is not meshed: network_mode \"none\": it has no network")
    );
    assert!(out.warnings[3].contains(
        "legacy is not meshed: network_mode \"bridge\": Docker's default bridge resolves no names"
    ));
    assert!(out.warnings[4].contains("debug shares api's network namespace"));
    assert!(out.text.contains("network_mode: service:api-sidecar"));
}

#[test]
fn injecting_twice_gives_the_same_file_and_remove_gives_back_the_original() {
    for original in [classic(), features()] {
        let once = inject::inject(&original, &opts("f.yaml"))
            .expect("once")
            .text;
        let twice = inject::inject(&once, &opts("f.yaml")).expect("twice").text;
        assert_eq!(once, twice);
        let back = inject::remove(&once, &opts("f.yaml")).expect("remove");
        assert_eq!(back, original, "byte for byte, comments included");
    }
}

#[test]
fn only_and_skip_choose_the_meshed_services() {
    let only = Options {
        only: vec!["web1".into(), "client".into()],
        ..opts("c.yaml")
    };
    let out = inject::inject(&classic(), &only).expect("only");
    let meshed: Vec<_> = out.meshed.iter().map(|m| m.compose.as_str()).collect();
    assert_eq!(meshed, ["web1", "client"]);
    let skip = Options {
        skip: vec!["nginx".into()],
        ..opts("c.yaml")
    };
    let out = inject::inject(&classic(), &skip).expect("skip");
    assert!(out.meshed.iter().all(|m| m.compose != "nginx"));
    assert!(
        out.warnings
            .iter()
            .any(|w| w.contains("nginx is not meshed: --skip"))
    );
    // The options are remembered: injecting again with none keeps the file
    // consistent (checked against the options it was made with).
    let again = inject::inject(&out.text, &skip).expect("again");
    assert_eq!(again.text, out.text);
}

/// The error for `text`, as a string.
fn refusal(text: &str) -> String {
    match inject::inject(text, &opts("bad.yaml")) {
        Ok(out) => panic!("accepted:\n{}", out.text),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_input_is_refused_naming_file_service_and_key() {
    let cases = [
        ("services: [a, b\n", "bad.yaml: "),
        (
            "include: [other.yaml]\nservices:\n  web:\n    image: x\n",
            "bad.yaml: include: services from other files",
        ),
        (
            "services:\n  web:\n    image: x\nextensions: {}\n",
            "bad.yaml: extensions: a top-level key inject does not know",
        ),
        (
            "name: not compose\n",
            "bad.yaml: services: not a compose file",
        ),
        (
            "services:\n  web:\n    image: x\n    scale: 3\n",
            "bad.yaml: services.web.scale: one sidecar per container",
        ),
        (
            "services:\n  web:\n    image: x\n    deploy: {replicas: 2}\n",
            "bad.yaml: services.web.deploy.replicas",
        ),
        (
            "services:\n  web:\n    extends: {service: base}\n",
            "bad.yaml: services.web.extends: resolve `extends` first",
        ),
        (
            "services:\n  web:\n    image: x\n    frobnicate: true\n",
            "bad.yaml: services.web.frobnicate: a key inject does not know",
        ),
        (
            "services:\n  web:\n    image: x\n    ports: ['8000-8010:8000-8010']\n",
            "bad.yaml: services.web.ports: \"8000-8010:8000-8010\": port ranges",
        ),
        (
            "services:\n  Web_1:\n    image: x\n",
            "bad.yaml: services.Web_1.labels: \"Web_1\" cannot be a mesh service name",
        ),
        (
            "services:\n  web:\n    image: x\n  web-sidecar:\n    image: y\n",
            "bad.yaml: services.web-sidecar: the name inject gives web's sidecar is taken",
        ),
        (
            "services:\n  control:\n    image: x\n    command: [wf-control, --insecure]\n",
            "bad.yaml: services.control.command: this file runs Wayfinder already",
        ),
        (
            "services:\n  app:\n    image: x\n    network_mode: host\n",
            "bad.yaml: services: no service can be meshed",
        ),
        (
            "services:\n  web:\n    image: x\n    labels: {wayfinder.io/port: http}\n",
            "bad.yaml: services.web.labels: wayfinder.io/port: \"http\" is not a port",
        ),
    ];
    for (text, want) in cases {
        let got = refusal(text);
        assert!(
            got.starts_with(want),
            "{text:?}:\n  got  {got}\n  want {want}…"
        );
    }
    // A YAML error names the line.
    assert!(refusal("services:\n  web:\n    image: [x\n").contains("line"));
}

#[test]
fn a_meshed_file_edited_by_hand_is_not_silently_reverted() {
    let once = inject::inject(&classic(), &opts("c.yaml"))
        .expect("inject")
        .text;
    let edited = once.replacen("hostname: web2", "hostname: web2b", 1);
    assert_ne!(edited, once);
    for e in [
        inject::remove(&edited, &opts("c.yaml")).map(drop),
        inject::inject(&edited, &opts("c.yaml")).map(drop),
    ] {
        match e {
            Err(InjectError::Compose { at, message, .. }) => {
                assert_eq!(at, "services.web2-sidecar.hostname");
                assert!(message.contains("edited after `wfctl inject`"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
    let err = inject::remove(&classic(), &opts("c.yaml")).expect_err("not injected");
    assert!(err.to_string().contains("nothing to remove"), "{err}");
}

#[test]
fn a_refused_file_writes_nothing_and_tokens_are_owner_only_and_kept() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "services:\n  web:\n    image: x\n    scale: 2\n").expect("write");
    let out = dir.path().join("bad.meshed.yaml");
    let r = Request {
        file: bad,
        out: Some(out.clone()),
        remove: false,
        only: vec![],
        skip: vec![],
    };
    assert!(inject::run(&r).is_err());
    assert!(!out.exists());
    assert!(
        !inject::secrets_dir(&r).1.exists(),
        "no tokens for a refused file"
    );

    let good = dir.path().join("lab.yaml");
    std::fs::write(&good, classic()).expect("write");
    // An OUT that cannot be written fails before any token is.
    let nowhere = Request {
        file: good.clone(),
        out: Some(dir.path().join("missing/lab.meshed.yaml")),
        ..r.clone()
    };
    let e = inject::run(&nowhere).expect_err("no such directory");
    assert!(
        format!("{e:#}").contains("missing/lab.meshed.yaml"),
        "{e:#}"
    );
    assert!(
        !inject::secrets_dir(&nowhere).1.exists(),
        "tokens for an unwritten file"
    );

    let out = dir.path().join("lab.meshed.yaml");
    let r = Request {
        file: good,
        out: Some(out.clone()),
        ..r
    };
    inject::run(&r).expect("inject");
    let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&out), 0o644, "a compose file is no secret");
    let (relative, secrets) = inject::secrets_dir(&r);
    assert_eq!(relative, "./lab.meshed.wayfinder");
    assert_eq!(mode(&secrets), 0o700);
    let web = std::fs::read_to_string(secrets.join("web.env")).expect("web.env");
    assert_eq!(mode(&secrets.join("web.env")), 0o600);
    assert_eq!(mode(&secrets.join("control.env")), 0o600);
    let token = web
        .trim()
        .strip_prefix("WAYFINDER_JOIN_TOKEN=")
        .expect("token");
    assert_eq!(token.len(), 32);
    // The meshed file holds no token; the control plane's env file has
    // each, scoped to its service.
    let meshed = std::fs::read_to_string(&out).expect("out");
    assert!(!meshed.contains(token));
    let control = std::fs::read_to_string(secrets.join("control.env")).expect("control");
    assert!(control.contains(&format!("{token}:web")), "{control}");
    // Injecting again keeps the tokens (a running lab keeps working).
    inject::run(&r).expect("again");
    assert_eq!(
        std::fs::read_to_string(secrets.join("web.env")).expect("web.env"),
        web
    );
    assert_eq!(std::fs::read_to_string(&out).expect("out"), meshed);
}

#[test]
fn only_the_control_plane_holds_the_operator_credential() {
    // The operator credential lives in the control plane's data volume; an
    // app or a sidecar that mounted it could call the operator RPCs.
    let out = inject::inject(&classic(), &opts("compose.yaml")).expect("inject");
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out.text).expect("yaml");
    let services = doc["services"].as_mapping().expect("services");
    let mut holders = Vec::new();
    for (name, svc) in services {
        let name = name.as_str().expect("name");
        let mounts = svc["volumes"].as_sequence().cloned().unwrap_or_default();
        if mounts.iter().any(|m| {
            m.as_str()
                .is_some_and(|m| m.starts_with("wayfinder-control-data:"))
        }) {
            holders.push(name.to_string());
        }
        let envs = svc["env_file"].as_sequence().cloned().unwrap_or_default();
        for env in envs.iter().filter_map(|e| e.as_str()) {
            let owner = env
                .rsplit('/')
                .next()
                .unwrap_or(env)
                .trim_end_matches(".env");
            let own = match name.strip_suffix("-sidecar") {
                Some(app) => out
                    .meshed
                    .iter()
                    .any(|m| m.compose == app && m.service == owner),
                None => name == "wayfinder-control" && owner == "control",
            };
            assert!(own, "{name} reads {env}, not its own secrets");
        }
    }
    assert_eq!(holders, ["wayfinder-control"]);
}
