//! Key names and values are untrusted bytes. In URLs a key travels as lowercase
//! hex (any byte survives, nothing needs escaping); on pages it is shown as text
//! where it is printable UTF-8 and as `\xNN` escapes where it is not (askama then
//! HTML-escapes the result, so `<script>` shows as text).

/// Hex of the key's bytes, for URLs and form fields.
pub fn encode(key: &[u8]) -> String {
    hex::encode(key)
}

/// The key's bytes from [`encode`]d text.
pub fn decode(text: &str) -> Result<Vec<u8>, String> {
    if text.len() > 2 * MAX_KEY_IN_URL {
        return Err("The key name is too long for dbops to look at.".into());
    }
    hex::decode(text.trim())
        .map_err(|_| "The key in the address is not valid (hex expected).".into())
}

/// Longest key (bytes) dbops accepts from a URL.
pub const MAX_KEY_IN_URL: usize = 64 * 1024;

/// Printable text for any bytes: valid UTF-8 is kept except control characters,
/// which (like invalid bytes) become `\xNN`; a backslash becomes `\\` so the
/// result is unambiguous. HTML escaping is the template's job.
pub fn display(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                push_text(&mut out, s);
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                // SAFETY-free: `good` is valid UTF-8 by construction.
                push_text(&mut out, std::str::from_utf8(good).unwrap_or_default());
                let n = e.error_len().unwrap_or(bad.len()).max(1);
                for b in &bad[..n] {
                    out.push_str(&format!("\\x{b:02x}"));
                }
                rest = &bad[n..];
            }
        }
    }
    out
}

fn push_text(out: &mut String, s: &str) {
    for c in s.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("\\x{b:02x}"));
            }
        } else {
            out.push(c);
        }
    }
}

/// [`display`] of at most `limit` bytes, with a note of the full length when cut.
pub fn display_cut(bytes: &[u8], limit: usize) -> (String, bool) {
    if bytes.len() <= limit {
        (display(bytes), false)
    } else {
        (display(&bytes[..limit]), true)
    }
}

/// Checks a SCAN MATCH pattern typed by a person.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("The pattern is empty: give a glob such as payment:idem:*.".into());
    }
    if pattern.len() > 1024 {
        return Err("The pattern is too long (1,024 bytes at most).".into());
    }
    if pattern.chars().any(|c| c.is_control()) {
        return Err("The pattern contains control characters.".into());
    }
    Ok(())
}

/// Whether a glob matches every key (`*`, `**`, …): delete by pattern refuses
/// those and points to FLUSHDB, which has its own stricter gate.
pub fn matches_everything(pattern: &str) -> bool {
    !pattern.is_empty() && pattern.chars().all(|c| c == '*')
}

/// The prefix group of a key at `depth` segments split by `sep`: `auth:refresh:42`
/// at depth 2 is `auth:refresh:*`; a key with no more than `depth` segments is its
/// own group.
pub fn prefix_of(key: &[u8], sep: u8, depth: usize) -> Vec<u8> {
    let mut seen = 0;
    for (i, b) in key.iter().enumerate() {
        if *b == sep {
            seen += 1;
            if seen == depth {
                let mut p = key[..=i].to_vec();
                p.push(b'*');
                return p;
            }
        }
    }
    key.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_urls_whatever_their_bytes() {
        for k in [
            &b"plain"[..],
            b"<script>alert(1)</script>",
            b"\x00\xff\"'",
            b"",
        ] {
            assert_eq!(decode(&encode(k)).unwrap(), k);
        }
        assert!(decode("zz").is_err());
    }

    #[test]
    fn binary_and_control_bytes_are_shown_as_escapes() {
        assert_eq!(display(b"user:42"), "user:42");
        assert_eq!(display(b"a\x00b\xffc"), "a\\x00b\\xffc");
        assert_eq!(display(b"tab\there\n"), "tab\\x09here\\x0a");
        assert_eq!(display("héllo".as_bytes()), "héllo");
        assert_eq!(display(b"back\\slash"), "back\\\\slash");
        // Markup stays as it is here; the template escapes it.
        assert_eq!(display(b"<b>"), "<b>");
    }

    #[test]
    fn prefixes_are_cut_at_the_separator() {
        assert_eq!(prefix_of(b"auth:refresh:42", b':', 1), b"auth:*");
        assert_eq!(prefix_of(b"auth:refresh:42", b':', 2), b"auth:refresh:*");
        assert_eq!(prefix_of(b"auth:refresh:42", b':', 3), b"auth:refresh:42");
        assert_eq!(prefix_of(b"plain", b':', 1), b"plain");
    }

    #[test]
    fn patterns_are_checked() {
        assert!(check_pattern("").is_err());
        assert!(check_pattern("a\nb").is_err());
        assert!(check_pattern("payment:idem:*").is_ok());
        assert!(matches_everything("*"));
        assert!(matches_everything("**"));
        assert!(!matches_everything("a*"));
    }
}
