//! Option values that cannot be honoured, and hostile ones: clear errors, never a wrap, a
//! saturated "no limit", or raw input in a message.

#[test]
fn sizes_that_overflow_in_bytes_are_errors() {
    // 2^64 / 2^20 and beyond: each once wrapped (a panic in a debug build) or saturated
    // into "no limit"
    for key in ["max_split_size_mb", "max_non_split_rounding_mb", "recycle_above_mb", "large_segment_size_mb"]
    {
        for v in ["17592186044416", "18446744073709551615", "1099511627778"] {
            let e = gpumem::AllocatorConfig::parse(&format!("{key}:{v}")).unwrap_err();
            assert!(e.0.contains("more than 1 EiB"), "{key}:{v}: {e}");
        }
    }
    assert_eq!(
        gpumem::AllocatorConfig::parse("max_split_size_mb:1099511627776").unwrap().max_split_size,
        1 << 60
    );
    assert!(gpumem::AllocatorConfig::parse("compact_factor:18446744073709551615").is_err());
    assert!(gpumem::Policy::parse("gpumem:compact_factor:65536").is_ok());
}

#[test]
fn messages_quote_values_safely() {
    let hostile = format!("max_split_size_mb:\u{1b}[2J{}", "9".repeat(100_000));
    for e in [
        gpumem::AllocatorConfig::parse(&hostile).unwrap_err(),
        gpumem::Policy::parse(&format!("\u{7}{hostile}")).unwrap_err(),
    ] {
        assert!(!e.0.chars().any(char::is_control), "{e:?}");
        assert!(e.0.len() < 1000, "{}", e.0.len());
    }
    let e = gpumem::AllocatorConfig::parse(&format!("{}:1", "k\n".repeat(50_000))).unwrap_err();
    assert!(!e.0.contains('\n') && e.0.len() < 1000);
}
