//! The policy file loader (`PolicyFile::parse`) on any text, read as
//! wf-control reads `--policy` (lossy UTF-8): a policy or a clean error,
//! never a panic. A file that loads keeps its meaning on the wire (what
//! wf-control and `wfctl policy apply` send is validated again by
//! ApplyPolicy) and through `to_toml` (what `wfctl policy get` prints).

#![no_main]

use libfuzzer_sys::fuzz_target;
use wayfinder_proto::policy::{PolicyFile, ServicePolicy};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let file = match PolicyFile::parse("fuzz.toml", &text) {
        Ok(f) => f,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let wire = file.to_proto();
    for p in &wire {
        let (name, back) = match ServicePolicy::from_proto(p) {
            Ok(ok) => ok,
            Err(e) => panic!("a loaded policy is refused on the wire: {e}\n{p:?}"),
        };
        assert_eq!(
            &back.to_proto(name.as_str()),
            p,
            "the wire form round-trips"
        );
    }
    let rendered = file.to_toml();
    match PolicyFile::parse("rendered.toml", &rendered) {
        Ok(again) => assert_eq!(again.to_proto(), wire, "to_toml keeps the policies"),
        Err(e) => panic!("rendered TOML does not load: {e}\n{rendered}"),
    }
});
