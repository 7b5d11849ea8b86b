//! Options in PyTorch's syntax: defaults, both syntaxes of `roundup_power2_divisions`, errors
//! that name the key and quote values safely, and the policy names.

use gpumem::{AllocatorConfig, Policy, PolicyKind};

#[test]
fn defaults_are_pytorchs() {
    let c = AllocatorConfig::parse("").unwrap();
    assert_eq!(c.max_split_size, u64::MAX);
    assert_eq!(c.large_segment_size, 20 << 20);
    assert!(!c.expandable_segments);
}

#[test]
fn divisions_in_both_syntaxes() {
    let c = AllocatorConfig::parse("roundup_power2_divisions:4").unwrap();
    assert_eq!(c.roundup_power2_divisions, [4; 16]);
    let c = AllocatorConfig::parse("roundup_power2_divisions:[64:8,256:4,1024:4,>:1]").unwrap();
    // PyTorch sets only each key's own interval (and, for the first key, all below it):
    // the intervals between keys (128 MB, 512 MB) keep 0 divisions.
    let mut want = [8u64; 16];
    want[7] = 0;
    want[8] = 4;
    want[9] = 0;
    want[10] = 4;
    for w in &mut want[11..] {
        *w = 1;
    }
    assert_eq!(c.roundup_power2_divisions, want);
    assert_eq!(c.roundup_power2_divisions_for(100 << 20), 8);
    assert_eq!(c.roundup_power2_divisions_for(300 << 20), 4);
    assert_eq!(c.roundup_power2_divisions_for(600 << 20), 0);
    assert_eq!(c.roundup_power2_divisions_for(1 << 40), 1);
    assert_eq!(c.roundup_power2_divisions_for(1000), 8);
}

#[test]
fn bad_options_are_errors() {
    for bad in [
        "max_split_size_mb:10",
        "max_split_size_mb:abc",
        "expandable_segments:true",
        "garbage_collection_threshold:1.5",
        "roundup_power2_divisions:3",
        "roundup_power2_divisions:[63:4]",
        "no_such_key:1",
        "max_split_size_mb",
        "backend:cudaMallocAsync",
        "per_process_memory_fraction:2",
    ] {
        let e = AllocatorConfig::parse(bad);
        assert!(e.is_err(), "{bad} should be rejected");
    }
}

#[test]
fn whitespace_and_inert_keys() {
    let c = AllocatorConfig::parse(" max_split_size_mb : 128 , pinned_use_cuda_host_register:True").unwrap();
    assert_eq!(c.max_split_size, 128 << 20);
    assert_eq!(c.inert.len(), 1);
}

#[test]
fn policies() {
    assert!(Policy::parse("torch-expandable").unwrap().config.expandable_segments);
    assert_eq!(Policy::parse("torch:expandable_segments:True").unwrap().kind, PolicyKind::TorchExpandable);
    assert!(Policy::parse("tensorflow").is_err());
    assert!(AllocatorConfig::parse("policy:tensorflow").is_err());
    for name in Policy::NAMES {
        assert_eq!(Policy::parse(name).unwrap().name(), *name);
        assert_eq!(
            AllocatorConfig::parse(&format!("policy:{name}")).unwrap().policy.map(Policy::kind_name),
            Some(*name)
        );
    }
    assert_eq!(Policy::parse("gpumem").unwrap().kind, PolicyKind::Gpumem);
    assert!(Policy::parse("gpumem:max_split_size_mb:128").is_err(), "torch-only options are refused");
    assert!(Policy::parse("gpumem:roundup_power2_divisions:4").is_ok());
    assert!(Policy::parse("torch:policy:gpumem").is_err());
    let c = AllocatorConfig::parse("max_split_size_mb:128").unwrap();
    assert_eq!(c.policy_or(PolicyKind::Gpumem), PolicyKind::Torch, "PyTorch settings keep their meaning");
    assert_eq!(AllocatorConfig::parse("").unwrap().policy_or(PolicyKind::Gpumem), PolicyKind::Gpumem);
    let c = AllocatorConfig::parse("policy:torch-expandable").unwrap();
    assert_eq!(c.policy_or(PolicyKind::Gpumem), PolicyKind::TorchExpandable);
    assert_eq!(
        Policy::parse("torch:max_split_size_mb:64").unwrap().to_string(),
        "torch:max_split_size_mb:64"
    );
}
