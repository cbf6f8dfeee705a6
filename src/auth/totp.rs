//! Two-factor sign-in for local accounts: time-based one-time passwords (RFC 6238,
//! HMAC-SHA1, 6 digits, 30-second steps, as every authenticator app speaks them),
//! the enrolment QR code (an SVG drawn here, nothing fetched), and recovery codes
//! stored as argon2 hashes and usable once. All SQL about second factors lives here.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sqlx::PgExecutor;

use super::password;

/// Seconds per step.
pub const STEP: u64 = 30;
/// Digits of a code.
pub const DIGITS: u32 = 6;
/// How many recovery codes an enrolment makes.
pub const RECOVERY_CODES: usize = 10;

/// HOTP (RFC 4226) of `counter` with `digits` digits.
pub fn hotp(secret: &[u8], counter: u64, digits: u32) -> u32 {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(&counter.to_be_bytes());
    let h = mac.finalize().into_bytes();
    let offset = (h[19] & 0x0f) as usize;
    let bin = (u32::from(h[offset]) & 0x7f) << 24
        | u32::from(h[offset + 1]) << 16
        | u32::from(h[offset + 2]) << 8
        | u32::from(h[offset + 3]);
    bin % 10u32.pow(digits)
}

/// The TOTP step a moment falls in.
pub fn step_of(unix_seconds: u64) -> u64 {
    unix_seconds / STEP
}

/// The code of a step, zero-padded.
pub fn code_for_step(secret: &[u8], step: u64) -> String {
    format!(
        "{:0width$}",
        hotp(secret, step, DIGITS),
        width = DIGITS as usize
    )
}

/// Checks a typed code against the steps around `now` (one step of clock drift
/// either way) and returns the step it matched. A step at or before
/// `last_used_step` is refused: a code works once.
pub fn check(secret: &[u8], typed: &str, now: u64, last_used_step: Option<i64>) -> Option<u64> {
    let typed: String = typed.chars().filter(|c| !c.is_whitespace()).collect();
    if typed.len() != DIGITS as usize || !typed.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let current = step_of(now);
    [current.saturating_sub(1), current, current + 1]
        .into_iter()
        .filter(|s| last_used_step.is_none_or(|l| *s as i64 > l))
        .find(|s| {
            let expected = code_for_step(secret, *s);
            // Constant time: compare every byte.
            expected
                .bytes()
                .zip(typed.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
        })
}

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// RFC 4648 base32 without padding (what `otpauth://` URIs carry).
pub fn base32(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for b in bytes {
        buffer = (buffer << 8) | u32::from(*b);
        bits += 8;
        while bits >= 5 {
            out.push(BASE32[((buffer >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(BASE32[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// A new random secret (160 bits, as RFC 4226 recommends).
pub fn new_secret() -> Vec<u8> {
    use rand::RngCore;
    let mut s = vec![0u8; 20];
    rand::rng().fill_bytes(&mut s);
    s
}

/// The `otpauth://` URI an authenticator app reads from the QR code.
pub fn otpauth_uri(secret: &[u8], username: &str) -> String {
    let label = url::form_urlencoded::byte_serialize(format!("dbops:{username}").as_bytes())
        .collect::<String>()
        .replace('+', "%20");
    format!(
        "otpauth://totp/{label}?secret={}&issuer=dbops&algorithm=SHA1&digits={DIGITS}&period={STEP}",
        base32(secret)
    )
}

/// The QR code of `data` as an SVG element.
pub fn qr_svg(data: &str) -> anyhow::Result<String> {
    let code = qrcode::QrCode::new(data.as_bytes())?;
    Ok(code
        .render::<qrcode::render::svg::Color>()
        .min_dimensions(220, 220)
        .quiet_zone(true)
        .build())
}

/// New recovery codes (`xxxxx-xxxxx`, 50 random bits each) and their argon2 hashes.
pub fn new_recovery_codes() -> anyhow::Result<Vec<(String, String)>> {
    (0..RECOVERY_CODES)
        .map(|_| {
            let raw = base32(&{
                use rand::RngCore;
                let mut b = [0u8; 7];
                rand::rng().fill_bytes(&mut b);
                b
            })
            .to_lowercase();
            let code = format!("{}-{}", &raw[..5], &raw[5..10]);
            let hash = password::hash(&code)?;
            Ok((code, hash))
        })
        .collect()
}

/// A recovery code as typed: lowercase, spaces dropped.
pub fn normalize_recovery_code(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_lowercase()
}

// ---------------------------------------------------------------------------------
// SQL
// ---------------------------------------------------------------------------------

/// A user's confirmed second factor.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Enrolment {
    pub user_id: i64,
    pub secret: Vec<u8>,
    pub last_used_step: Option<i64>,
    pub enrolled_at: DateTime<Utc>,
}

pub async fn enrolment(
    db: impl PgExecutor<'_>,
    user_id: i64,
) -> Result<Option<Enrolment>, sqlx::Error> {
    sqlx::query_as(
        "SELECT user_id, secret, last_used_step, enrolled_at FROM user_totp WHERE user_id = $1",
    )
    .bind(user_id)
    .fetch_optional(db)
    .await
}

/// Stores a confirmed enrolment (replacing an earlier one) and marks its step used.
pub async fn enrol(
    db: impl PgExecutor<'_>,
    user_id: i64,
    secret: &[u8],
    step: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO user_totp (user_id, secret, last_used_step) VALUES ($1, $2, $3)
         ON CONFLICT (user_id) DO UPDATE SET secret = EXCLUDED.secret,
             last_used_step = EXCLUDED.last_used_step, enrolled_at = now()",
    )
    .bind(user_id)
    .bind(secret)
    .bind(step as i64)
    .execute(db)
    .await?;
    Ok(())
}

/// Marks a step used, unless a later one already is (two requests racing with the
/// same code: only one wins). Returns whether this one did.
pub async fn use_step(
    db: impl PgExecutor<'_>,
    user_id: i64,
    step: u64,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE user_totp SET last_used_step = $2
         WHERE user_id = $1 AND (last_used_step IS NULL OR last_used_step < $2)",
    )
    .bind(user_id)
    .bind(step as i64)
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Replaces a user's recovery codes with these hashes.
pub async fn replace_recovery_codes(
    conn: &mut sqlx::PgConnection,
    user_id: i64,
    hashes: &[String],
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM user_recovery_codes WHERE user_id = $1")
        .bind(user_id)
        .execute(&mut *conn)
        .await?;
    for h in hashes {
        sqlx::query("INSERT INTO user_recovery_codes (user_id, code_hash) VALUES ($1, $2)")
            .bind(user_id)
            .bind(h)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// The unused recovery codes' `(id, hash)`.
pub async fn unused_recovery_codes(
    db: impl PgExecutor<'_>,
    user_id: i64,
) -> Result<Vec<(i64, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, code_hash FROM user_recovery_codes WHERE user_id = $1 AND used_at IS NULL ORDER BY id",
    )
    .bind(user_id)
    .fetch_all(db)
    .await
}

/// Marks a recovery code used; false when it was used meanwhile.
pub async fn use_recovery_code(db: impl PgExecutor<'_>, id: i64) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE user_recovery_codes SET used_at = now() WHERE id = $1 AND used_at IS NULL",
    )
    .bind(id)
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Removes a user's second factor and recovery codes (an admin's reset).
pub async fn remove(conn: &mut sqlx::PgConnection, user_id: i64) -> Result<bool, sqlx::Error> {
    sqlx::query("DELETE FROM user_recovery_codes WHERE user_id = $1")
        .bind(user_id)
        .execute(&mut *conn)
        .await?;
    let r = sqlx::query("DELETE FROM user_totp WHERE user_id = $1")
        .bind(user_id)
        .execute(&mut *conn)
        .await?;
    Ok(r.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1, 8 digits.
    #[test]
    fn rfc_6238_test_vectors() {
        let secret = b"12345678901234567890";
        for (t, expected) in [
            (59u64, 94287082u32),
            (1111111109, 7081804),
            (1111111111, 14050471),
            (1234567890, 89005924),
            (2000000000, 69279037),
            (20000000000, 65353130),
        ] {
            assert_eq!(hotp(secret, step_of(t), 8), expected, "T = {t}");
        }
    }

    /// RFC 4226 appendix D: HOTP values 0..9 of the same secret, 6 digits.
    #[test]
    fn rfc_4226_test_vectors() {
        let expected = [
            755224, 287082, 359152, 969429, 338314, 254676, 287922, 162583, 399871, 520489,
        ];
        for (c, e) in expected.iter().enumerate() {
            assert_eq!(hotp(b"12345678901234567890", c as u64, 6), *e);
        }
    }

    #[test]
    fn a_code_works_in_its_window_and_only_once() {
        let secret = b"12345678901234567890";
        let now = 1_111_111_111;
        let code = code_for_step(secret, step_of(now));
        assert_eq!(check(secret, &code, now, None), Some(step_of(now)));
        assert_eq!(check(secret, &code, now + 30, None), Some(step_of(now)));
        assert_eq!(check(secret, &code, now + 90, None), None);
        assert_eq!(check(secret, &code, now, Some(step_of(now) as i64)), None);
        assert_eq!(check(secret, "12345", now, None), None);
        assert_eq!(check(secret, "abcdef", now, None), None);
    }

    #[test]
    fn base32_matches_rfc_4648() {
        assert_eq!(base32(b""), "");
        assert_eq!(base32(b"f"), "MY");
        assert_eq!(base32(b"fo"), "MZXQ");
        assert_eq!(base32(b"foo"), "MZXW6");
        assert_eq!(base32(b"foob"), "MZXW6YQ");
        assert_eq!(base32(b"fooba"), "MZXW6YTB");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
    }

    #[test]
    fn the_qr_code_is_a_self_contained_svg() {
        let svg = qr_svg(&otpauth_uri(b"12345678901234567890", "alice")).unwrap();
        assert!(svg.contains("<svg"), "{svg}");
        assert!(!svg.contains("http://") || svg.contains("http://www.w3.org/2000/svg"));
        assert!(!svg.contains("href"));
    }
}
