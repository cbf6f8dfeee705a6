//! Single sign-on against a real OpenID provider: the certified `oidc-provider`
//! package from npm, run by our script `tests/oidc/provider.mjs` (installed into a
//! cache directory by `.ci/install-oidc-provider`, called from here when missing).
//! The provider issues real codes and ID tokens; for the refusals its script
//! rewrites the ID token in the `/token` answer the way an attacker in the middle
//! would (tampered, wrong audience, `none`, expired).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use dbops::auth::Role;
use fantoccini::Locator;
use reqwest::StatusCode;
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::OnceCell,
};

use crate::helpers::{Browser, TestApp, spawn_app_with};

static INSTALLED: OnceCell<PathBuf> = OnceCell::const_new();

const CLIENT_SECRET: &str = "test-client-secret-0123456789abcdef";

/// The cache directory with `oidc-provider` installed and our script next to it.
async fn installed() -> &'static Path {
    INSTALLED
        .get_or_init(|| async {
            let cache = std::env::var_os("DBOPS_IT_TOOLS")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                        .join(".cache/dbops-it")
                });
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            let out = Command::new("bash")
                .arg(root.join(".ci/install-oidc-provider"))
                .arg(&cache)
                .stdin(Stdio::null())
                .output()
                .await
                .expect("bash runs");
            assert!(
                out.status.success(),
                "installing oidc-provider failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let dir = cache.join("oidc");
            std::fs::copy(
                root.join("tests/oidc/provider.mjs"),
                dir.join("provider.mjs"),
            )
            .expect("the provider script is copied next to the package");
            dir
        })
        .await
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running provider; stopped when dropped.
struct Idp {
    port: u16,
    dir: tempdir::Dir,
    child: Option<Child>,
}

mod tempdir {
    /// A directory removed when dropped.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Idp {
    fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Writes the test users: `(login, groups)`; each one's password is `pw-<login>`.
    fn set_users(&self, users: &[(&str, &[&str])]) {
        let map: serde_json::Map<String, serde_json::Value> = users
            .iter()
            .map(|(l, g)| {
                (
                    l.to_string(),
                    json!({ "password": format!("pw-{l}"), "groups": g }),
                )
            })
            .collect();
        std::fs::write(
            self.dir.0.join("users.json"),
            serde_json::Value::Object(map).to_string(),
        )
        .unwrap();
    }

    fn set_mode(&self, mode: &str) {
        std::fs::write(self.dir.0.join("mode"), mode).unwrap();
    }

    async fn start(&mut self) {
        let script = installed().await.join("provider.mjs");
        let mut child = Command::new("node")
            .arg(script)
            .env("OIDC_PORT", self.port.to_string())
            .env("OIDC_STATE_DIR", &self.dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("node starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(l)) = lines.next_line().await {
                if l.starts_with("ready ") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(ready, Ok(true), "the OpenID provider did not start");
        // Keep reading its output so that it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
    }

    /// Stops it and starts it again: a new signing key with a new key id.
    async fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
        self.start().await;
    }
}

/// A dbops with one `[[oidc]]` provider called `test`, and that provider running
/// with a client whose redirect URL is this dbops' callback.
async fn app_with_idp(extra: &str) -> (TestApp, Idp) {
    let dir = std::env::temp_dir().join(format!("dbops-idp-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut idp = Idp {
        port: free_port(),
        dir: tempdir::Dir(dir),
        child: None,
    };
    let s = crate::helpers::services().await;
    let app = spawn_app_with(
        &format!(
            r#"
            [[postgres]]
            name = "pg"
            url_env = "PG"
            policy = "production"
            [[redis]]
            name = "cache"
            url_env = "REDIS"
            policy = "dev"
            [[oidc]]
            name = "test"
            display_name = "Test IdP"
            issuer = "{}"
            client_id = "dbops-test"
            client_secret_env = "IDP_SECRET"
            scopes = ["openid", "profile", "email", "groups"]
            role_claim = "groups"
            [oidc.roles]
            "dbops-admins" = "admin"
            "dbops-approvers" = "approver"
            "dbops-ops" = "operator"
            "dbops-viewers" = "viewer"
            {extra}
            "#,
            idp.issuer()
        ),
        &[
            ("IDP_SECRET", CLIENT_SECRET.to_string()),
            ("PG", format!("{}/postgres", s.pg_base)),
            ("REDIS", s.redis_url.clone()),
        ],
    )
    .await;
    std::fs::write(
        idp.dir.0.join("clients.json"),
        json!([{
            "client_id": "dbops-test",
            "client_secret": CLIENT_SECRET,
            "redirect_uris": [app.url("/login/oidc/test/callback")],
            "post_logout_redirect_uris": [app.url("/login")],
        }])
        .to_string(),
    )
    .unwrap();
    idp.set_users(&[]);
    idp.start().await;
    (app, idp)
}

/// Signs in at the provider as `login` from this browser and returns the callback
/// path the provider redirects to (not yet followed).
async fn through_provider(app: &TestApp, b: &mut Browser, login: &str) -> String {
    let r = b.get("/login/oidc/test?next=/").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let mut url = r.location().unwrap().to_string();
    let callback = app.url("/login/oidc/test/callback");
    for _ in 0..20 {
        if url.starts_with(&callback) {
            return url[app.url("").len()..].to_string();
        }
        let r = b.client.get(&url).send().await.unwrap();
        let status = r.status();
        let location = r
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let base: reqwest::Url = url.parse().unwrap();
        if let Some(l) = location {
            url = base.join(&l).unwrap().to_string();
            continue;
        }
        let html = r.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "provider page {url}: {html}");
        let action = html
            .split("action=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or_else(|| panic!("no sign-in form at the provider: {html}"))
            .to_string();
        let password = format!("pw-{login}");
        let r = b
            .client
            .post(base.join(&action).unwrap())
            .form(&[("login", login), ("password", password.as_str())])
            .send()
            .await
            .unwrap();
        let l = r
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("the provider refused {login}"));
        url = base.join(&l).unwrap().to_string();
    }
    panic!("the provider never sent the browser back to dbops");
}

/// The whole sign-in from a new browser; returns it and the callback's answer.
async fn sign_in(app: &TestApp, login: &str) -> (Browser, crate::helpers::Resp) {
    let mut b = app.browser();
    let cb = through_provider(app, &mut b, login).await;
    let r = b.get(&cb).await;
    (b, r)
}

async fn role_of(app: &TestApp, username: &str) -> Option<String> {
    sqlx::query_scalar("SELECT role FROM users WHERE username = $1")
        .bind(username)
        .fetch_optional(&app.db)
        .await
        .unwrap()
}

/// The newest refused sign-in's error text.
async fn last_refusal(app: &TestApp) -> String {
    sqlx::query_scalar(
        "SELECT coalesce(error, '') FROM operations WHERE kind = 'auth.login.failed' \
         AND params->>'method' = 'oidc' ORDER BY id DESC LIMIT 1",
    )
    .fetch_optional(&app.db)
    .await
    .unwrap()
    .unwrap_or_default()
}

#[tokio::test]
async fn in_chromium_a_person_signs_in_through_the_provider_and_a_group_change_changes_the_role_at_the_next_sign_in()
 {
    let (app, idp) = app_with_idp("").await;
    idp.set_users(&[("grace", &["dbops-approvers", "unrelated"])]);
    let driver = crate::browser::start_driver().await;
    let c = crate::browser::open_browser(&driver, 1280, 900).await;

    let sign_in_with_chromium = async |c: &fantoccini::Client| {
        c.goto(&app.url("/login")).await.unwrap();
        c.find(Locator::LinkText("Sign in with Test IdP"))
            .await
            .expect("the login page has a button for the provider")
            .click()
            .await
            .unwrap();
        if c.wait().for_element(Locator::Css("#login")).await.is_err() {
            crate::browser::screenshot(c, "sso-00-no-provider-page").await;
            panic!(
                "the provider's sign-in page did not come: at {} showing {}",
                c.current_url().await.unwrap(),
                c.source().await.unwrap_or_default()
            );
        }
        c.find(Locator::Css("#login"))
            .await
            .unwrap()
            .send_keys("grace")
            .await
            .unwrap();
        c.find(Locator::Css("#password"))
            .await
            .unwrap()
            .send_keys("pw-grace")
            .await
            .unwrap();
        c.find(Locator::Css("#submit"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        c.wait()
            .for_element(Locator::Css("li.who .badge"))
            .await
            .expect("back at dbops, signed in");
        assert_eq!(c.current_url().await.unwrap().path(), "/");
        c.find(Locator::Css("li.who .badge"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };

    let role = sign_in_with_chromium(&c).await;
    crate::browser::screenshot(&c, "sso-01-signed-in").await;
    assert_eq!(
        role, "approver",
        "the group dbops-approvers maps to approver"
    );
    assert_eq!(role_of(&app, "grace").await.as_deref(), Some("approver"));
    assert_eq!(
        app.count_ops("auth.sso.user_created", Some("succeeded"))
            .await,
        1
    );
    let mapping: String = sqlx::query_scalar(
        "SELECT params->>'mapping' FROM operations WHERE kind = 'auth.login' AND actor_name = 'grace'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(mapping.contains("dbops-approvers"), "{mapping}");

    // The group changes at the provider; the role follows at the next sign-in.
    idp.set_users(&[("grace", &["dbops-ops"])]);
    c.find(Locator::Css("form[action='/logout'] button"))
        .await
        .expect("a sign-out button")
        .click()
        .await
        .unwrap();
    // Signed out at the provider too (RP-initiated logout): it asks, then sends
    // the browser back to dbops' login page, and the next sign-in asks again.
    c.wait()
        .for_element(Locator::Css("button[name=logout]"))
        .await
        .expect("the provider's sign-out page");
    c.find(Locator::Css("button[name=logout]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .for_element(Locator::LinkText("Sign in with Test IdP"))
        .await
        .unwrap();
    assert_eq!(c.current_url().await.unwrap().path(), "/login");
    let role = sign_in_with_chromium(&c).await;
    crate::browser::screenshot(&c, "sso-02-role-changed").await;
    assert_eq!(role, "operator");
    assert_eq!(role_of(&app, "grace").await.as_deref(), Some("operator"));
    let changed: (String, String) = sqlx::query_as(
        "SELECT params->>'from', params->>'to' FROM operations WHERE kind = 'auth.sso.role_changed'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(changed, ("approver".into(), "operator".into()));

    // An admin sees which mapping granted the role.
    let mut admin = app.logged_in(Role::Admin).await;
    let page = admin.get("/admin/users").await.text;
    let row = page
        .split("data-user=\"grace\"")
        .nth(1)
        .and_then(|r| r.split("</tr>").next())
        .expect("grace is listed");
    assert!(
        row.contains("single sign-on (test)") && row.contains("dbops-ops"),
        "{row}"
    );
    c.close().await.unwrap();
}

#[tokio::test]
async fn a_role_that_drops_at_the_provider_ends_the_sessions_that_had_the_higher_one() {
    let (app, idp) = app_with_idp("").await;
    idp.set_users(&[("heidi", &["dbops-admins"])]);
    let (mut first, r) = sign_in(&app, "heidi").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    assert_eq!(first.get("/admin/users").await.status, StatusCode::OK);

    idp.set_users(&[("heidi", &["dbops-viewers"])]);
    let (mut second, r) = sign_in(&app, "heidi").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(role_of(&app, "heidi").await.as_deref(), Some("viewer"));
    assert_eq!(second.get("/").await.status, StatusCode::OK);
    let r = first.get("/").await;
    assert!(
        r.location().is_some_and(|l| l.starts_with("/login")),
        "the admin session ended when the role dropped: {}",
        r.status
    );
}

/// `[[oidc.target_roles]]`: roles per target and per policy from the provider's
/// groups, set again at every sign-in, shown on the user's page and logged.
#[tokio::test]
async fn groups_map_to_roles_per_target_and_policy_again_at_every_sign_in() {
    let (app, idp) = app_with_idp(
        r#"
        [[oidc.target_roles]]
        claim_value = "pg-leads"
        target = "pg"
        role = "approver"
        [[oidc.target_roles]]
        claim_value = "dbops-ops"
        policy = "dev"
        role = "viewer"
        "#,
    )
    .await;
    idp.set_users(&[("ivan", &["dbops-ops", "pg-leads"])]);
    let (mut first, r) = sign_in(&app, "ivan").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    assert_eq!(role_of(&app, "ivan").await.as_deref(), Some("operator"));
    type Grant = (Option<String>, Option<String>, String, String, String);
    let grants: Vec<Grant> = sqlx::query_as(
        "SELECT target, policy, role, source, granted_by FROM user_target_roles ORDER BY id",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(
        grants,
        vec![
            (
                Some("pg".into()),
                None,
                "approver".into(),
                "oidc".into(),
                "test: groups contains pg-leads → approver on target pg".into()
            ),
            (
                None,
                Some("dev".into()),
                "viewer".into(),
                "oidc".into(),
                "test: groups contains dbops-ops → viewer on policy = dev".into()
            ),
        ]
    );
    // Viewer on the dev target, approver on pg.
    assert_eq!(first.get("/").await.status, StatusCode::OK);
    let r = first.get("/targets/cache/redis/slowlog").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        r.text.contains("operator role or higher on cache"),
        "{}",
        r.text
    );
    assert_eq!(
        first.get("/targets/pg/reports").await.status,
        StatusCode::OK
    );
    let changed: String = sqlx::query_scalar(
        "SELECT params::text FROM operations WHERE kind = 'auth.sso.target_roles_changed' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(
        changed.contains(r#""on": "target pg""#) && changed.contains(r#""to": "approver""#),
        "{changed}"
    );
    let login: String = sqlx::query_scalar(
        "SELECT params::text FROM operations WHERE kind = 'auth.login' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(
        login.contains("pg-leads → approver on target pg"),
        "{login}"
    );

    // What granted what, on the user's page.
    let mut admin = app.logged_in(Role::Admin).await;
    let id: i64 = sqlx::query_scalar("SELECT id FROM users WHERE username = 'ivan'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let page = admin.get(&format!("/admin/users/{id}")).await;
    assert!(
        page.text
            .contains("sign-in mapping: test: groups contains pg-leads → approver on target pg"),
        "{}",
        page.text
    );

    // Out of pg-leads at the provider: the role on pg is gone at the next sign-in,
    // logged, and the session that had it ends.
    idp.set_users(&[("ivan", &["dbops-ops"])]);
    let (mut second, r) = sign_in(&app, "ivan").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_target_roles WHERE target = 'pg'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(left, 0);
    let changed: String = sqlx::query_scalar(
        "SELECT params::text FROM operations WHERE kind = 'auth.sso.target_roles_changed' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(
        changed.contains(r#""to": null"#) && changed.contains("no longer mapped"),
        "{changed}"
    );
    assert_eq!(
        second.get("/targets/pg/reports").await.status,
        StatusCode::OK,
        "operator on pg (global)"
    );
    let r = first.get("/").await;
    assert!(
        r.location().is_some_and(|l| l.starts_with("/login")),
        "the session that was an approver on pg ended: {}",
        r.status
    );
}

#[tokio::test]
async fn people_without_a_mapped_group_disabled_users_and_clashing_local_names_are_refused_and_logged()
 {
    let (app, idp) = app_with_idp("").await;
    idp.set_users(&[
        ("ivan", &["marketing"]),
        ("judy", &["dbops-ops"]),
        ("localname", &["dbops-admins"]),
    ]);
    let (mut b, r) = sign_in(&app, "ivan").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        r.text.contains("no group or role that gives access"),
        "{}",
        r.text
    );
    assert_eq!(b.get("/").await.status, StatusCode::SEE_OTHER);
    assert_eq!(role_of(&app, "ivan").await, None, "no user is created");
    assert!(last_refusal(&app).await.contains("no role"));

    let (_, r) = sign_in(&app, "judy").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    sqlx::query("UPDATE users SET disabled = true WHERE username = 'judy'")
        .execute(&app.db)
        .await
        .unwrap();
    let (mut b, r) = sign_in(&app, "judy").await;
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "the provider says yes, dbops says no"
    );
    assert!(r.text.contains("disabled"), "{}", r.text);
    assert_eq!(b.get("/").await.status, StatusCode::SEE_OTHER);
    assert_eq!(last_refusal(&app).await, "account disabled");

    app.create_user("localname", Role::Viewer).await;
    let (_, r) = sign_in(&app, "localname").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(last_refusal(&app).await.contains("not linked"));
    assert_eq!(role_of(&app, "localname").await.as_deref(), Some("viewer"));
}

#[tokio::test]
async fn a_wrong_state_and_a_replayed_code_are_refused_and_logged() {
    let (app, idp) = app_with_idp("").await;
    idp.set_users(&[("kim", &["dbops-ops"])]);

    // Wrong state: the callback of this browser's own sign-in with another state.
    let mut b = app.browser();
    let cb = through_provider(&app, &mut b, "kim").await;
    let mut url: reqwest::Url = app.url(&cb).parse().unwrap();
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "state" {
                "forged-state".to_string()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    url.query_pairs_mut().clear().extend_pairs(pairs);
    let r = b
        .get(&format!("{}?{}", url.path(), url.query().unwrap()))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
    assert!(r.text.contains("state mismatch"), "{}", r.text);
    assert!(last_refusal(&app).await.contains("state mismatch"));
    assert_eq!(
        b.get("/").await.status,
        StatusCode::SEE_OTHER,
        "not signed in"
    );

    // A code used once, then again: by the same browser (its sign-in is spent)
    // and by another browser with a sign-in of its own in progress.
    let (mut a, r) = sign_in(&app, "kim").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let mut a2 = app.browser();
    let cb = through_provider(&app, &mut a2, "kim").await;
    let r = a2.get(&cb).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let r = a2.get(&format!("{cb}&hop=1")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
    assert!(r.text.contains("state mismatch"), "{}", r.text);
    let code_url: reqwest::Url = app.url(&cb).parse().unwrap();
    let code = code_url
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();
    let mut eve = app.browser();
    let r = eve.get("/login/oidc/test").await;
    let auth: reqwest::Url = r.location().unwrap().parse().unwrap();
    let state = auth
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let q =
        serde_urlencoded::to_string([("code", code.as_str()), ("state", state.as_str())]).unwrap();
    let r = eve.get(&format!("/login/oidc/test/callback?{q}")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
    assert!(
        r.text.contains("did not accept the authorization code"),
        "{}",
        r.text
    );
    assert!(
        last_refusal(&app).await.contains("invalid_grant"),
        "{}",
        last_refusal(&app).await
    );
    assert_eq!(eve.get("/").await.status, StatusCode::SEE_OTHER);
    assert_eq!(a.get("/").await.status, StatusCode::OK);
}

#[tokio::test]
async fn tampered_wrongly_addressed_unsigned_and_expired_id_tokens_are_refused_and_logged() {
    let (app, idp) = app_with_idp("").await;
    idp.set_users(&[("leo", &["dbops-viewers"])]);
    for (mode, expect) in [
        ("tamper", "signature"),
        ("wrong_aud", "audience"),
        ("none_alg", "no signature"),
        ("none_alg_signed", "no signature"),
        ("expired", "expired"),
    ] {
        idp.set_mode(mode);
        let (mut b, r) = sign_in(&app, "leo").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{mode}: {}", r.text);
        assert!(
            r.text.contains("The ID token was refused"),
            "{mode}: {}",
            r.text
        );
        let logged = last_refusal(&app).await;
        assert!(
            logged.to_lowercase().contains(expect),
            "{mode}: the log says why: {logged}"
        );
        assert_eq!(b.get("/").await.status, StatusCode::SEE_OTHER, "{mode}");
    }
    assert_eq!(role_of(&app, "leo").await, None);
    assert_eq!(role_of(&app, "mallory").await, None);
    assert_eq!(app.count_ops("auth.login.failed", Some("failed")).await, 5);

    // The same provider, untouched: the sign-in works.
    idp.set_mode("");
    let (_, r) = sign_in(&app, "leo").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
}

#[tokio::test]
async fn a_provider_that_rotates_its_signing_key_is_followed() {
    let (app, mut idp) = app_with_idp("").await;
    idp.set_users(&[("mia", &["dbops-viewers"])]);
    let (_, r) = sign_in(&app, "mia").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    idp.restart().await;
    let (mut b, r) = sign_in(&app, "mia").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    assert_eq!(b.get("/").await.status, StatusCode::OK);
}

#[tokio::test]
async fn an_admin_can_leave_password_sign_in_to_admins_only() {
    let (app, _idp) = app_with_idp("").await;
    let pw = app.create_user("oscar", Role::Operator).await;
    let admin_pw = app.create_user("root-admin", Role::Admin).await;
    let mut admin = app.browser();
    assert_eq!(
        admin.login("root-admin", &admin_pw).await.status,
        StatusCode::SEE_OTHER
    );
    admin.get("/admin/users").await;
    let r = admin
        .post("/admin/settings/password-sign-in", &[("value", "admins")])
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(
        app.count_ops("auth.settings.password_sign_in", Some("succeeded"))
            .await,
        1
    );

    let mut b = app.browser();
    let r = b.login("oscar", &pw).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        r.text.contains("Password sign-in is turned off"),
        "{}",
        r.text
    );
    assert!(
        r.text.contains("Sign in with Test IdP"),
        "the provider's button is offered"
    );
    assert_eq!(app.count_ops("auth.login.failed", Some("denied")).await, 1);
    // A wrong password still says "wrong" (the setting tells nothing about accounts).
    let r = b.login("oscar", "not-the-password").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // The break-glass admin still can.
    let mut again = app.browser();
    assert_eq!(
        again.login("root-admin", &admin_pw).await.status,
        StatusCode::SEE_OTHER
    );

    admin.get("/admin/users").await;
    admin
        .post("/admin/settings/password-sign-in", &[("value", "everyone")])
        .await;
    assert_eq!(b.login("oscar", &pw).await.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn a_client_secret_written_into_the_config_file_is_refused() {
    let err = dbops::config::Config::from_toml(
        r#"
        database_url = "postgres://x@127.0.0.1/db"
        [[oidc]]
        name = "corp"
        issuer = "https://id.example.com"
        client_id = "dbops"
        client_secret = "hunter2hunter2"
        [oidc.roles]
        admins = "admin"
        "#,
        Path::new("t.toml"),
        Path::new("."),
        |_| None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("oidc[0].client_secret") && err.contains("never go in the config file"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}
