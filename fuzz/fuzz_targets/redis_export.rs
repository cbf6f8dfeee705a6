//! The Redis logical export reader (`verify_export`) on any bytes: it returns an
//! error or the file's counts, never panics, and never reads a file that is not
//! whole. Half the inputs are framed (the magic, a valid header and a trailer with
//! the right checksum around the fuzzer's bytes), so the record reader is reached.
#![no_main]

use dbops::fuzzing::{EXPORT_MAGIC, verify_export};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest as _, Sha256};

fn check(file: &[u8]) {
    let mut input = file;
    if let Ok(stats) = futures::executor::block_on(verify_export(&mut input)) {
        assert_eq!(stats.bytes, file.len() as u64, "a good export is read to its end");
        assert!(stats.databases.windows(2).all(|w| w[0] < w[1]));
        assert!(stats.keys >= stats.databases.len() as u64);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let Some((&count, body)) = data.split_first() else {
        return;
    };
    let header = br#"{"format":1,"created_at_unix_ms":0,"redis_version":"7.0.15","producer":"fuzz"}"#;
    let mut file = EXPORT_MAGIC.to_vec();
    file.extend_from_slice(&(header.len() as u32).to_be_bytes());
    file.extend_from_slice(header);
    file.extend_from_slice(body);
    let digest = Sha256::digest(&file);
    file.push(b'E');
    file.extend_from_slice(&u64::from(count % 4).to_be_bytes());
    file.extend_from_slice(&digest);
    check(&file);
});
