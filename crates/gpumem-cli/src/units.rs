//! Sizes on the command line and in tables.

/// Parses `80GiB`, `81559MiB`, `512KiB`, `10GB`, or plain bytes.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "bad size '{s}': unknown unit '{other}' (use B, KiB, MiB, GiB, TiB, KB, MB, GB)"
            ))
        }
    };
    let x: f64 = num.parse().map_err(|_| format!("bad size '{s}': expected a number such as 80GiB"))?;
    let bytes = x * mult as f64;
    if !(1.0..1e19).contains(&bytes) {
        return Err(format!("bad size '{s}': must be at least 1 byte and less than 16 EiB"));
    }
    Ok(bytes as u64)
}

/// Bytes in GiB with two decimals, for tables.
pub(crate) fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("80GiB").unwrap(), 80 << 30);
        assert_eq!(parse_size("81559MiB").unwrap(), 81559 << 20);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert!(parse_size("80 parsecs").is_err());
        assert!(parse_size("-5GiB").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("0").is_err());
    }
}
