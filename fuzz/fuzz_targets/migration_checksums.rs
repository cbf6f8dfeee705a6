//! The migration checksum readers on any file contents and file names: Flyway's
//! line-wise CRC-32, Prisma's SHA-256 variants, Flyway's version keys and each
//! tool's ordering. None panics, and each keeps the property the comparison relies
//! on.
#![no_main]

use dbops::fuzzing::{flyway_checksum, flyway_version_key, migration_sort_key, prisma_checksums};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Flyway hashes lines without their terminators: line endings never count.
    let crc = flyway_checksum(text);
    let lf = text.replace("\r\n", "\n");
    assert_eq!(crc, flyway_checksum(&lf));
    let joined = text.replace(['\r', '\n'], "");
    // Joining the lines may bring a BOM of a later line to the start, where it
    // does not count.
    if text.starts_with('\u{feff}') || !joined.starts_with('\u{feff}') {
        assert_eq!(crc, flyway_checksum(&joined));
    }
    if !text.starts_with('\u{feff}') {
        assert_eq!(crc, flyway_checksum(&format!("\u{feff}{text}")), "a BOM does not count");
    }

    let (main, also) = prisma_checksums(text);
    assert_eq!(main.len(), 64);
    assert!(main.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(!also.contains(&main));
    for (i, a) in also.iter().enumerate() {
        assert!(!also[i + 1..].contains(a), "{a} listed twice");
    }

    let key = flyway_version_key(text);
    assert_eq!(flyway_version_key(&key), key, "a version key is its own key");
    for tool in ["sqlx", "flyway", "prisma", "drizzle"] {
        let _ = migration_sort_key(tool, text);
        let _ = migration_sort_key(tool, &key);
    }
});
