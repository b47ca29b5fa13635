//! Human-readable memory sizes: `"64M"`, `"1G"`, `"512KiB"`, `"4096"`.

use thiserror::Error;

/// A size string that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid size {input:?}: {why} (expected a byte count with an optional K, M, G or T suffix, such as \"64M\")")]
pub struct SizeError {
    /// The text that was given.
    pub input: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// Parses a size in bytes. Suffixes are binary (K = 1024) and case-insensitive; `KiB`, `KB` and `K`
/// mean the same.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let error = |why| SizeError { input: input.to_owned(), why };
    let text = input.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    if digits.is_empty() {
        return Err(error("no number"));
    }
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(error("unknown suffix")),
    };
    let value: u64 = digits.parse().map_err(|_| error("number too large"))?;
    value.checked_mul(1u64 << shift).ok_or_else(|| error("number too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_suffixed_sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size(" 3 MB "), Ok(3 << 20));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "M", "abc", "-1", "1.5G", "12Q", "99999999999999999999", "20000000T"] {
            let err = parse_size(bad).unwrap_err();
            assert_eq!(err.input, bad);
            assert!(err.to_string().contains("invalid size"), "{err}");
        }
    }
}
