//! Logging in and out, lockout, sessions and CSRF.

use dbops::auth::Role;
use reqwest::StatusCode;

use crate::helpers::spawn_app;

#[tokio::test]
async fn a_user_logs_in_sees_the_overview_and_logs_out() {
    let app = spawn_app().await;
    let pw = app.create_user("alice", Role::Operator).await;
    let mut b = app.browser();
    let r = b.login("alice", &pw).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let page = b.get("/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text.contains("Overview") && page.text.contains("alice"));
    let r = b.post("/logout", &[]).await;
    assert_eq!(r.location(), Some("/login"));
    let after = b.get("/").await;
    assert_eq!(
        after.status,
        StatusCode::SEE_OTHER,
        "logged out means logged out"
    );
    assert_eq!(app.count_ops("auth.login", Some("succeeded")).await, 1);
    assert_eq!(app.count_ops("auth.logout", Some("succeeded")).await, 1);
}

#[tokio::test]
async fn the_session_id_changes_at_login_and_the_old_one_is_worthless_after_logout() {
    let app = spawn_app().await;
    let pw = app.create_user("bob", Role::Viewer).await;
    let mut b = app.browser();
    b.get("/login").await;
    let before = b
        .session_id()
        .expect("the login page starts a session for its CSRF token");
    b.post("/login", &[("username", "bob"), ("password", &pw)])
        .await;
    let during = b.session_id().expect("logged in");
    assert_ne!(
        before, during,
        "session fixation: the id must change at login"
    );

    // A planted (pre-login) id does not give access.
    let mut attacker = app.browser();
    attacker.jar.add_cookie_str(
        &format!("dbops_session={before}"),
        &app.url("/").parse().unwrap(),
    );
    assert_eq!(attacker.get("/").await.status, StatusCode::SEE_OTHER);

    b.get("/").await;
    assert_eq!(b.post("/logout", &[]).await.location(), Some("/login"));
    let mut thief = app.browser();
    thief.jar.add_cookie_str(
        &format!("dbops_session={during}"),
        &app.url("/").parse().unwrap(),
    );
    assert_eq!(
        thief.get("/").await.status,
        StatusCode::SEE_OTHER,
        "a logged-out session id is dead"
    );
}

#[tokio::test]
async fn five_wrong_passwords_lock_the_account_even_for_the_right_password() {
    let app = spawn_app().await;
    let pw = app.create_user("mallory", Role::Viewer).await;
    let mut b = app.browser();
    for i in 1..=4 {
        let r = b.login("mallory", "wrong password!").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "attempt {i}");
        assert!(r.text.contains("Wrong username or password"));
    }
    let r = b.login("mallory", "wrong password!").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.text.contains("locked"));
    let r = b.login("mallory", &pw).await;
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "locked accounts stay locked"
    );
    assert_eq!(app.count_ops("auth.login.failed", Some("failed")).await, 6);
    assert_eq!(app.count_ops("auth.lockout", None).await, 1);
    assert_eq!(app.count_ops("auth.login", None).await, 0);

    // An admin's password reset lifts the lock.
    let mut admin = app.logged_in(Role::Admin).await;
    let id: i64 = sqlx::query_scalar("SELECT id FROM users WHERE username = 'mallory'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    admin.get("/admin/users").await;
    admin
        .post(&format!("/admin/users/{id}/password"), &[])
        .await;
    let page = admin.get("/admin/users").await;
    let new_pw = page
        .text
        .split("shown only now: ")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .trim()
        .to_string();
    let r = b.login("mallory", &new_pw).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn unknown_users_and_disabled_users_get_the_same_answer_as_wrong_passwords() {
    let app = spawn_app().await;
    let pw = app.create_user("erin", Role::Viewer).await;
    sqlx::query("UPDATE users SET disabled = true WHERE username = 'erin'")
        .execute(&app.db)
        .await
        .unwrap();
    let mut b = app.browser();
    let a = b.login("nobody", "whatever-password").await;
    let c = b.login("erin", &pw).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(c.status, StatusCode::UNAUTHORIZED);
    assert!(
        a.text.contains("Wrong username or password")
            && c.text.contains("Wrong username or password")
    );
    let errors: Vec<String> = sqlx::query_scalar(
        "SELECT error FROM operations WHERE kind = 'auth.login.failed' ORDER BY id",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(errors, vec!["unknown username", "account disabled"]);
}

#[tokio::test]
async fn state_changes_without_or_with_a_wrong_csrf_token_are_refused_and_logged() {
    let app = spawn_app().await;
    let mut admin = app.logged_in(Role::Admin).await;
    let good = admin.csrf.clone().unwrap();
    for token in [None, Some("0000"), Some(&good[..good.len() - 1])] {
        let r = admin
            .post_with_token(
                "/admin/users",
                &[("username", "sneaky"), ("role", "admin")],
                token,
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "token {token:?}");
        assert!(r.text.contains("Reload the page"), "{}", r.text);
    }
    let exists: bool =
        sqlx::query_scalar("SELECT exists(SELECT 1 FROM users WHERE username = 'sneaky')")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(!exists, "nothing was created");
    assert_eq!(app.count_ops("auth.csrf.rejected", Some("denied")).await, 3);
    let actor: Option<String> = sqlx::query_scalar(
        "SELECT actor_role FROM operations WHERE kind = 'auth.csrf.rejected' LIMIT 1",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        actor.as_deref(),
        Some("admin"),
        "the rejection names who it was"
    );

    // The header htmx uses works.
    let r = admin
        .client
        .post(format!("{}/admin/users", admin.base))
        .header("x-csrf-token", &good)
        .form(&[("username", "viaheader"), ("role", "viewer")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);

    // Logging in needs the token too.
    let mut b = app.browser();
    let r = b
        .post_with_token("/login", &[("username", "x"), ("password", "y")], None)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn session_cookies_are_http_only_and_same_site_strict() {
    let app = spawn_app().await;
    let r = reqwest::Client::new()
        .get(app.url("/login"))
        .send()
        .await
        .unwrap();
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.starts_with("dbops_session="), "{cookie}");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(
        !cookie.contains("Secure"),
        "not Secure unless configured (plain http here)"
    );
}

#[tokio::test]
async fn a_disabled_user_or_changed_password_ends_existing_sessions() {
    let app = spawn_app().await;
    let mut b = app.logged_in(Role::Operator).await;
    assert_eq!(b.get("/").await.status, StatusCode::OK);
    sqlx::query("UPDATE users SET password_changed_at = now() WHERE role = 'operator'")
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(b.get("/").await.status, StatusCode::SEE_OTHER);

    let mut c = app.logged_in(Role::Viewer).await;
    assert_eq!(c.get("/").await.status, StatusCode::OK);
    sqlx::query("UPDATE users SET disabled = true WHERE role = 'viewer'")
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(c.get("/").await.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn an_idle_session_past_its_expiry_is_refused() {
    let app = spawn_app().await;
    let mut b = app.logged_in(Role::Viewer).await;
    assert_eq!(b.get("/").await.status, StatusCode::OK);
    // Time passes: the store's expiry (the idle timeout) is in the past.
    sqlx::query("UPDATE tower_sessions.session SET expiry_date = now() - interval '1 minute'")
        .execute(&app.db)
        .await
        .unwrap();
    let r = b.get("/").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(r.location().unwrap().starts_with("/login"));
}

/// The page as a client sees it, without what differs between any two sessions
/// (the CSRF token), the name typed (echoed into the form) and the minute a lock
/// ends.
fn normalized(text: &str, name: &str, csrf: Option<&str>) -> String {
    let mut t = text.replace(&format!("value=\"{name}\""), "value=\"NAME\"");
    if let Some(c) = csrf {
        t = t.replace(c, "TOKEN");
    }
    if let Some(i) = t.find("locked until ") {
        let at = i + "locked until ".len();
        t.replace_range(at..at + 5, "HH:MM");
    }
    t
}

#[tokio::test]
async fn known_and_unknown_usernames_are_indistinguishable_through_lockout() {
    let app = spawn_app().await;
    let pw = app.create_user("frank", Role::Viewer).await;
    let mut known = app.browser();
    let mut unknown = app.browser();
    for attempt in 1..=7 {
        let started = std::time::Instant::now();
        let k = known.login("frank", "not-his-password").await;
        let k_took = started.elapsed();
        let started = std::time::Instant::now();
        let u = unknown.login("nobody-here", "not-his-password").await;
        let u_took = started.elapsed();
        assert_eq!(k.status, u.status, "attempt {attempt}");
        let want = if attempt < 5 {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::TOO_MANY_REQUESTS
        };
        assert_eq!(k.status, want, "attempt {attempt}");
        assert_eq!(
            normalized(&k.text, "frank", known.csrf.as_deref()),
            normalized(&u.text, "nobody-here", unknown.csrf.as_deref()),
            "attempt {attempt}"
        );
        // Both checked a password with argon2 (tens of milliseconds), not a
        // quick "no such user".
        for (who, took) in [("known", k_took), ("unknown", u_took)] {
            assert!(
                took > std::time::Duration::from_millis(5),
                "attempt {attempt}: the {who} name answered in {took:?}"
            );
        }
    }
    // The unknown name is locked like an account: any capitalisation, even with
    // the password that would be right for someone.
    let r = unknown.login("NOBODY-HERE", &pw).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let r = known.login("frank", &pw).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(app.count_ops("auth.lockout", None).await, 2);
    let (failures, locked): (i32, bool) = sqlx::query_as(
        "SELECT failures, locked_until > now() FROM login_failures WHERE name = 'nobody-here'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((failures, locked), (5, true));
}
