//! Two-factor sign-in for local accounts: enrolment from the page's QR code and
//! key, sign-in with a code, wrong codes counted towards the lockout, recovery
//! codes that work once. The codes are computed here with our own small RFC 6238
//! implementation (HMAC-SHA1 from the RustCrypto crates), as an authenticator app
//! would from the key shown on the page.

use dbops::auth::Role;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;

use crate::helpers::{Browser, TestApp, spawn_app, spawn_app_with};

/// RFC 4648 base32 (no padding) to bytes.
fn unbase32(s: &str) -> Vec<u8> {
    const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let (mut buf, mut bits, mut out) = (0u64, 0, vec![]);
    for c in s.chars() {
        buf = (buf << 5) | ALPHABET.find(c).expect("base32") as u64;
        bits += 5;
        if bits >= 8 {
            out.push((buf >> (bits - 8)) as u8);
            bits -= 8;
        }
    }
    out
}

/// What an authenticator app shows for `key` at step `step`.
fn app_code(key: &[u8], step: u64) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(key).unwrap();
    mac.update(&step.to_be_bytes());
    let h = mac.finalize().into_bytes();
    let o = (h[19] & 15) as usize;
    let n = u32::from_be_bytes([h[o] & 0x7f, h[o + 1], h[o + 2], h[o + 3]]) % 1_000_000;
    format!("{n:06}")
}

fn now_step() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 30
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let i = text.find(start)? + start.len();
    let j = text[i..].find(end)?;
    Some(&text[i..i + j])
}

/// Enrols from this signed-in browser; returns the key and the recovery codes.
async fn enrol(b: &mut Browser) -> (Vec<u8>, Vec<String>) {
    let page = b.get("/account/two-factor").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.text.contains("<svg"),
        "the QR code is drawn on the page"
    );
    let qr = between(&page.text, "<figure class=\"qr\">", "</figure>").unwrap();
    assert!(!qr.contains("href") && !qr.contains("<script"), "{qr}");
    let key = unbase32(between(&page.text, "<code class=\"totp-secret\">", "</code>").unwrap());
    assert_eq!(key.len(), 20);

    let wrong = b.post("/account/two-factor", &[("code", "000000")]).await;
    let right_now = app_code(&key, now_step());
    if right_now != "000000" {
        assert_eq!(wrong.status, StatusCode::BAD_REQUEST);
        assert!(wrong.text.contains("does not match"), "{}", wrong.text);
    }
    // The step before, so that the sign-in below can use the current one.
    let r = b
        .post(
            "/account/two-factor",
            &[("code", &app_code(&key, now_step() - 1))],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.text.contains("Your recovery codes"));
    let codes: Vec<String> = r
        .text
        .split("<li><code>")
        .skip(1)
        .map(|s| s.split("</code>").next().unwrap().to_string())
        .collect();
    assert_eq!(codes.len(), 10);
    (key, codes)
}

/// Password step; returns the browser waiting for its second factor.
async fn password_step(app: &TestApp, name: &str, pw: &str) -> Browser {
    let mut b = app.browser();
    let r = b.login(name, pw).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.location(), Some("/login/two-factor"));
    assert_eq!(
        b.get("/").await.status,
        StatusCode::SEE_OTHER,
        "not signed in yet"
    );
    let page = b.get("/login/two-factor").await;
    assert_eq!(page.status, StatusCode::OK);
    b
}

#[tokio::test]
async fn a_user_enrols_signs_in_with_a_code_and_a_recovery_code_works_once() {
    let app = spawn_app().await;
    let pw = app.create_user("tess", Role::Operator).await;
    let mut b = app.browser();
    b.login("tess", &pw).await;
    let (key, codes) = enrol(&mut b).await;
    assert_eq!(app.count_ops("auth.2fa.enrol", Some("succeeded")).await, 1);
    assert_eq!(app.count_ops("auth.2fa.enrol", Some("failed")).await, 1);
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT code_hash FROM user_recovery_codes ORDER BY id")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(stored.len(), 10);
    assert!(
        stored.iter().all(|h| h.starts_with("$argon2")),
        "stored hashed"
    );
    assert!(
        !stored
            .iter()
            .any(|h| codes.iter().any(|c| h.contains(c.as_str())))
    );

    // Sign-in with a code from the app.
    let mut b = password_step(&app, "tess", &pw).await;
    let r = b
        .post(
            "/login/two-factor",
            &[("code", &app_code(&key, now_step()))],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    assert_eq!(b.get("/").await.status, StatusCode::OK);
    assert_eq!(app.count_ops("auth.2fa.challenge", None).await, 1);

    // The same code again: refused (a code works once).
    let mut b = password_step(&app, "tess", &pw).await;
    let r = b
        .post(
            "/login/two-factor",
            &[("code", &app_code(&key, now_step() - 1))],
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "an older code than the last used one"
    );
    assert!(r.text.contains("wrong or was used already"));

    // A recovery code: works once.
    let r = b.post("/login/two-factor", &[("code", &codes[3])]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    assert_eq!(b.get("/").await.status, StatusCode::OK);
    assert_eq!(app.count_ops("auth.2fa.recovery_code_used", None).await, 1);
    let mut b = password_step(&app, "tess", &pw).await;
    let r = b.post("/login/two-factor", &[("code", &codes[3])]).await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "a recovery code is spent"
    );
    assert_eq!(b.get("/").await.status, StatusCode::SEE_OTHER);
    let r = b
        .post("/login/two-factor", &[("code", &codes[4].to_uppercase())])
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "another one still works");
}

#[tokio::test]
async fn wrong_second_factor_codes_count_towards_the_lockout_and_are_logged() {
    let app = spawn_app().await;
    let pw = app.create_user("uma", Role::Viewer).await;
    let mut b = app.browser();
    b.login("uma", &pw).await;
    let (key, _) = enrol(&mut b).await;
    let mut b = password_step(&app, "uma", &pw).await;
    let good = app_code(&key, now_step());
    let wrong = if good == "123456" { "654321" } else { "123456" };
    let mut last = StatusCode::OK;
    for _ in 0..5 {
        last = b.post("/login/two-factor", &[("code", wrong)]).await.status;
        if last == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        assert_eq!(last, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        last,
        StatusCode::TOO_MANY_REQUESTS,
        "five wrong codes lock the account"
    );
    assert_eq!(app.count_ops("auth.2fa.failed", Some("failed")).await, 5);
    assert_eq!(app.count_ops("auth.lockout", None).await, 1);
    // Locked: even the right password and code do not get in now.
    let mut b = app.browser();
    let r = b.login("uma", &pw).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn when_required_an_approver_without_a_second_factor_must_enrol_before_anything_else() {
    let app = spawn_app_with("[sign_in]\nrequire_two_factor = true\n", &[]).await;
    let pw = app.create_user("vera", Role::Approver).await;
    let viewer_pw = app.create_user("walt", Role::Viewer).await;
    let mut b = app.browser();
    let r = b.login("vera", &pw).await;
    assert_eq!(r.location(), Some("/account/two-factor"));
    let r = b.get("/approvals").await;
    assert_eq!(
        r.location(),
        Some("/account/two-factor"),
        "every page sends her to enrol"
    );
    let (_, _) = enrol(&mut b).await;
    assert_eq!(
        b.get("/approvals").await.status,
        StatusCode::OK,
        "enrolled: free to go"
    );

    let mut w = app.browser();
    let r = w.login("walt", &viewer_pw).await;
    assert_eq!(r.location(), Some("/"), "viewers are not asked");
}
