//! A real browser (Debian's headless Chromium driven through chromedriver) logs in
//! and sees the overview. Screenshots go to `$DBOPS_SCREENSHOTS` or a temp dir.

use std::{process::Stdio, time::Duration};

use dbops::auth::Role;
use fantoccini::{ClientBuilder, Locator};
use sqlx::Connection;

use crate::helpers::spawn_app;

/// Installs Debian's chromium and chromium-driver when they are missing (as root).
fn ensure_chromium() {
    let have = |b: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {b}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if have("chromium") && have("chromedriver") {
        return;
    }
    eprintln!("installing Debian's chromium and chromium-driver for the browser tests");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let prefix = if root { "" } else { "sudo -n " };
    let ok = std::process::Command::new("sh")
        .args(["-c", &format!("{prefix}apt-get update -qq && DEBIAN_FRONTEND=noninteractive {prefix}apt-get install -y -qq --no-install-recommends chromium chromium-driver")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the browser tests need Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
    );
}

/// A chromedriver on a free port, stopped when dropped.
pub struct Driver {
    child: std::process::Child,
    pub port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn start_driver() -> Driver {
    ensure_chromium();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Driver { child, port }
}

/// A headless Chromium session with its own profile.
pub async fn open_browser(driver: &Driver, width: u32, height: u32) -> fantoccini::Client {
    let profile =
        std::env::temp_dir().join(format!("dbops-chrome-{}", uuid::Uuid::new_v4().simple()));
    let caps = serde_json::json!({
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                format!("--window-size={width},{height}"),
                format!("--user-data-dir={}", profile.display()),
            ]
        }
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    ClientBuilder::rustls()
        .expect("rustls")
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a chromium session")
}

pub fn screenshot_dir() -> std::path::PathBuf {
    let dir = std::env::var_os("DBOPS_SCREENSHOTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("dbops-screenshots"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub async fn screenshot(c: &fantoccini::Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    let path = screenshot_dir().join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());
}

#[tokio::test]
async fn in_a_real_browser_a_user_logs_in_and_sees_the_overview() {
    let app = spawn_app().await;
    let pw = app.create_user("olivia", Role::Operator).await;
    let driver = start_driver().await;
    let c = open_browser(&driver, 1280, 900).await;

    c.goto(&app.url("/")).await.unwrap();
    assert!(
        c.current_url().await.unwrap().path().starts_with("/login"),
        "anonymous visitors land on the login page"
    );
    screenshot(&c, "01-login").await;

    c.find(Locator::Css("input[name=username]"))
        .await
        .unwrap()
        .send_keys("olivia")
        .await
        .unwrap();
    c.find(Locator::Css("input[name=password]"))
        .await
        .unwrap()
        .send_keys("wrong-password-here")
        .await
        .unwrap();
    c.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let alert = c
        .wait()
        .for_element(Locator::Css("[role=alert]"))
        .await
        .unwrap();
    assert!(
        alert
            .text()
            .await
            .unwrap()
            .contains("Wrong username or password")
    );
    screenshot(&c, "02-login-failed").await;

    c.find(Locator::Css("input[name=password]"))
        .await
        .unwrap()
        .send_keys(&pw)
        .await
        .unwrap();
    c.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .for_element(Locator::Css("table.targets"))
        .await
        .unwrap();
    let h1 = c.find(Locator::Css("main h1")).await.unwrap();
    assert_eq!(h1.text().await.unwrap(), "Overview");
    let rows = c.find_all(Locator::Css("tr.target")).await.unwrap();
    assert_eq!(rows.len(), 2, "both targets are listed");
    let text = c
        .find(Locator::Css("table.targets"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("reachable") && text.contains("pg") && text.contains("cache"),
        "{text}"
    );
    // htmx loaded from our own origin (the CSP forbids anything else).
    let htmx: serde_json::Value = c
        .execute("return typeof window.htmx", vec![])
        .await
        .unwrap();
    assert_eq!(htmx, "object");
    screenshot(&c, "03-overview").await;

    c.goto(&app.url("/operations")).await.unwrap();
    c.wait()
        .for_element(Locator::Css("table.operations"))
        .await
        .unwrap();
    screenshot(&c, "04-operations").await;

    c.set_window_size(390, 844).await.unwrap();
    c.goto(&app.url("/")).await.unwrap();
    screenshot(&c, "05-overview-narrow").await;

    c.find(Locator::Css("form[action='/logout'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .for_element(Locator::Css("input[name=username]"))
        .await
        .unwrap();
    c.close().await.unwrap();
}

/// Logs a browser in through the login form.
async fn sign_in(c: &fantoccini::Client, app: &crate::helpers::TestApp, user: &str, pw: &str) {
    c.goto(&app.url("/login")).await.unwrap();
    c.find(Locator::Css("input[name=username]"))
        .await
        .unwrap()
        .send_keys(user)
        .await
        .unwrap();
    c.find(Locator::Css("input[name=password]"))
        .await
        .unwrap()
        .send_keys(pw)
        .await
        .unwrap();
    c.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .for_element(Locator::Css("table.targets"))
        .await
        .unwrap();
}

#[tokio::test]
async fn in_a_real_browser_an_operator_asks_an_approver_approves_and_the_operator_runs_it() {
    let app = spawn_app().await;
    let op_pw = app.create_user("oscar", Role::Operator).await;
    let ap_pw = app.create_user("petra", Role::Approver).await;
    let victim = crate::approvals::sleeper().await;
    let driver = start_driver().await;
    let op = open_browser(&driver, 1280, 900).await;
    let ap = open_browser(&driver, 1280, 900).await;
    sign_in(&op, &app, "oscar", &op_pw).await;
    sign_in(&ap, &app, "petra", &ap_pw).await;

    // The operator asks to terminate the session.
    op.goto(&app.url(&format!(
        "/targets/pg/actions/pg.backend.terminate?pid={}&backend_start={}",
        victim.pid,
        crate::approvals::urlencode(&victim.backend_start)
    )))
    .await
    .unwrap();
    let what = op
        .find(Locator::Css("p.what"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        what.contains(&format!("pg_terminate_backend({})", victim.pid)),
        "{what}"
    );
    op.find(Locator::Css("textarea[name=reason]"))
        .await
        .unwrap()
        .send_keys("holding locks on orders for 20 minutes")
        .await
        .unwrap();
    screenshot(&op, "10-request-form").await;
    op.find(Locator::Css(
        "form[action^='/targets/'] button[type=submit]",
    ))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    let flash = op
        .wait()
        .for_element(Locator::Css("p.flash"))
        .await
        .unwrap();
    assert!(
        flash
            .text()
            .await
            .unwrap()
            .contains("waiting for an approver")
    );
    let request_url = op.current_url().await.unwrap();
    screenshot(&op, "11-request-pending").await;

    // The approver, in another browser, sees it counted in the navigation, opens it and approves.
    ap.goto(&app.url("/approvals")).await.unwrap();
    let count = ap
        .find(Locator::Css("nav .count"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(count, "1");
    screenshot(&ap, "12-approvals-pending").await;
    ap.find(Locator::Css("table.approvals tbody tr td a"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    ap.wait()
        .for_element(Locator::Css("form[action$='/approve']"))
        .await
        .unwrap();
    ap.find(Locator::Css("form[action$='/approve'] textarea"))
        .await
        .unwrap()
        .send_keys("ok, the import can wait")
        .await
        .unwrap();
    screenshot(&ap, "13-approve").await;
    ap.find(Locator::Css("form[action$='/approve'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let flash = ap
        .wait()
        .for_element(Locator::Css("p.flash"))
        .await
        .unwrap();
    assert!(flash.text().await.unwrap().contains("Approved"));

    // The operator runs it.
    op.goto(request_url.as_str()).await.unwrap();
    op.find(Locator::Css("form[action$='/execute'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let flash = op
        .wait()
        .for_element(Locator::Css("p.flash"))
        .await
        .unwrap();
    assert_eq!(flash.text().await.unwrap(), "Done.");
    let state = op
        .find(Locator::Css(".req-state"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(state, "executed");
    screenshot(&op, "14-request-executed").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!victim.alive().await, "the session was terminated");
    victim.stop().await;
    op.close().await.unwrap();
    ap.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// Flows under real use (issue 9): each role's view, a backup watched to its end
// and restored over the database with a second person's approval, a Redis delete
// by pattern after its preview, and the operations log filtered and exported.
// Every step saves a screenshot at a normal and a narrow (420 px) width.

/// The widths every flow's screenshots are taken at.
const WIDE: u32 = 1280;
const NARROW: u32 = 420;

async fn el(c: &fantoccini::Client, css: &str) -> fantoccini::elements::Element {
    wait_for(c, css, 20).await
}

async fn fill(c: &fantoccini::Client, css: &str, text: &str) {
    el(c, css).await.send_keys(text).await.unwrap();
}

async fn click(c: &fantoccini::Client, css: &str) {
    el(c, css).await.click().await.unwrap();
}

async fn text(c: &fantoccini::Client, css: &str) -> String {
    el(c, css).await.text().await.unwrap()
}

async fn exists(c: &fantoccini::Client, css: &str) -> bool {
    !c.find_all(Locator::Css(css)).await.unwrap().is_empty()
}

/// Waits (up to `secs`) until an element matching `css` is on the page — across
/// the page's own htmx updates and reloads, without the test reloading it.
async fn wait_for(c: &fantoccini::Client, css: &str, secs: u64) -> fantoccini::elements::Element {
    match c
        .wait()
        .at_most(Duration::from_secs(secs))
        .every(Duration::from_millis(200))
        .for_element(Locator::Css(css))
        .await
    {
        Ok(e) => e,
        Err(e) => {
            let at = c.current_url().await.ok();
            let _ = screenshot(c, "failure").await;
            panic!("{css} never appeared on {at:?}: {e}")
        }
    }
}

/// A screenshot of the whole page (the window is made as tall as the page) at
/// this width.
async fn page_shot(c: &fantoccini::Client, name: &str, width: u32) {
    c.set_window_size(width, 900).await.unwrap();
    let h = c
        .execute(
            "return Math.max(document.documentElement.scrollHeight, document.body.scrollHeight)",
            vec![],
        )
        .await
        .unwrap()
        .as_u64()
        .unwrap_or(900);
    // The window's own frame takes ~140 px of its height in headless Chromium.
    c.set_window_size(width, (h as u32 + 140).clamp(600, 4000))
        .await
        .unwrap();
    screenshot(c, name).await;
}

/// The page at a normal and at a narrow width; the window ends at the normal size.
async fn shots(c: &fantoccini::Client, name: &str) {
    page_shot(c, &format!("{name}-narrow"), NARROW).await;
    page_shot(c, name, WIDE).await;
    c.set_window_size(WIDE, 900).await.unwrap();
}

/// The texts of the main navigation's links.
async fn nav_links(c: &fantoccini::Client) -> Vec<String> {
    let mut out = vec![];
    for a in c
        .find_all(Locator::Css("header.topbar nav ul:first-child a"))
        .await
        .unwrap()
    {
        let t = a.text().await.unwrap();
        // "Approvals 1": the count badge is not part of the name.
        out.push(t.split_whitespace().next().unwrap_or("").to_string());
    }
    out
}

async fn sign_out(c: &fantoccini::Client) {
    click(c, "form[action='/logout'] button").await;
    el(c, "input[name=username]").await;
}

#[tokio::test]
async fn in_a_real_browser_each_role_sees_only_the_links_and_buttons_it_may_use() {
    let app = spawn_app().await;
    let driver = start_driver().await;
    let c = open_browser(&driver, WIDE, 900).await;
    for (role, nav, may_start_backup, sees_activity) in [
        (
            Role::Viewer,
            &[
                "dbops",
                "Overview",
                "Backups",
                "Jobs",
                "Windows",
                "Operations",
            ][..],
            false,
            false,
        ),
        (
            Role::Operator,
            &[
                "dbops",
                "Overview",
                "Approvals",
                "Backups",
                "Jobs",
                "Windows",
                "Operations",
            ][..],
            true,
            true,
        ),
        (
            Role::Approver,
            &[
                "dbops",
                "Overview",
                "Approvals",
                "Backups",
                "Jobs",
                "Windows",
                "Operations",
            ][..],
            true,
            true,
        ),
        (
            Role::Admin,
            &[
                "dbops",
                "Overview",
                "Approvals",
                "Backups",
                "Jobs",
                "Windows",
                "Operations",
                "Users",
                "API",
            ][..],
            true,
            true,
        ),
    ] {
        let r = role.as_str();
        let name = format!("{r}-person");
        let pw = app.create_user(&name, role).await;
        sign_in(&c, &app, &name, &pw).await;
        assert_eq!(nav_links(&c).await, nav, "{r}'s navigation");
        assert_eq!(text(&c, ".who .badge").await, r, "the role is shown");
        assert_eq!(
            exists(&c, "a[href='/targets/pg/activity']").await,
            sees_activity,
            "{r}: link to the activity page"
        );
        shots(&c, &format!("20-{r}-overview")).await;

        c.goto(&app.url("/targets/pg/backups")).await.unwrap();
        el(&c, "main h1").await;
        assert_eq!(
            exists(&c, "details.start").await,
            may_start_backup,
            "{r}: the Back up now button"
        );
        if role == Role::Viewer {
            shots(&c, "21-viewer-target-backups").await;
            // What the viewer is not offered, they cannot open either: a readable
            // refusal with the request id, not a blank page.
            c.goto(&app.url("/approvals")).await.unwrap();
            let msg = text(&c, "main").await;
            assert!(msg.contains("needs the operator role"), "{msg}");
            assert!(msg.to_lowercase().contains("request id"), "{msg}");
            shots(&c, "22-viewer-refused").await;
        }
        if role == Role::Admin {
            c.goto(&app.url("/admin/users")).await.unwrap();
            let users = text(&c, "main").await;
            for who in [
                "viewer-person",
                "operator-person",
                "approver-person",
                "admin-person",
            ] {
                assert!(users.contains(who), "{users}");
            }
            shots(&c, "23-admin-users").await;
        }
        c.goto(&app.url("/")).await.unwrap();
        sign_out(&c).await;
    }
    c.close().await.unwrap();
}

#[tokio::test]
async fn in_a_real_browser_an_operator_watches_a_backup_end_and_restores_it_over_the_database_after_approval()
 {
    let src = crate::backups::source_db(2_000).await;
    let dir = crate::backups::temp_dir("browser-restore");
    let app = crate::helpers::spawn_app_with(
        &crate::backups::app_config("src", "SRC", "production", &dir, ""),
        &[("SRC", src.url.clone())],
    )
    .await;
    let op_pw = app.create_user("oona", Role::Operator).await;
    let ap_pw = app.create_user("arvid", Role::Approver).await;
    let driver = start_driver().await;
    let op = open_browser(&driver, WIDE, 900).await;
    let ap = open_browser(&driver, WIDE, 900).await;
    sign_in(&op, &app, "oona", &op_pw).await;
    sign_in(&ap, &app, "arvid", &ap_pw).await;

    // The backup: started from the target's page, watched on its own page, which
    // updates itself until the backup is good (the test never reloads it).
    op.goto(&app.url("/targets/src/backups")).await.unwrap();
    assert!(text(&op, "main").await.contains("No backups of src yet"));
    shots(&op, "30-backups-empty").await;
    click(&op, "details.start summary").await;
    click(&op, "details.start button[type=submit]").await;
    el(&op, "main h1").await;
    assert!(
        exists(&op, "#progress").await,
        "the new backup's page shows its progress"
    );
    screenshot(&op, "31-backup-in-progress").await;
    wait_for(&op, "a[href$='/restore'][role=button]", 60).await;
    assert_eq!(text(&op, "dl.facts .bstatus").await, "good");
    assert!(!exists(&op, "#progress").await);
    let backup_url = op.current_url().await.unwrap();
    shots(&op, "32-backup-good").await;

    // Things go wrong after the backup.
    let mut c = sqlx::PgConnection::connect(&src.url).await.unwrap();
    sqlx::query("DELETE FROM orders WHERE id % 2 = 0")
        .execute(&mut c)
        .await
        .unwrap();
    drop(c);

    // Restore… → Over an existing database → the approval request.
    click(&op, "a[href$='/restore'][role=button]").await;
    el(&op, "form[action$='/restore-over']").await;
    shots(&op, "33-restore-form").await;
    click(
        &op,
        "form[action$='/restore-over'] input[name=end_sessions]",
    )
    .await;
    click(&op, "form[action$='/restore-over'] button[type=submit]").await;
    let what = text(&op, "p.what").await;
    assert!(what.contains("safety backup"), "{what}");
    fill(
        &op,
        "textarea[name=reason]",
        "a bad deploy deleted half the orders",
    )
    .await;
    shots(&op, "34-restore-over-request").await;
    click(&op, "form[action^='/targets/'] button[type=submit]").await;
    assert!(
        text(&op, "p.flash")
            .await
            .contains("waiting for an approver"),
        "the operator cannot approve their own request"
    );
    let request_url = op.current_url().await.unwrap();
    assert_eq!(text(&op, ".req-state").await, "pending");

    // The approver, in a second browser, sees what will be dropped and approves.
    ap.goto(&app.url("/approvals")).await.unwrap();
    assert_eq!(text(&ap, "nav .count").await, "1");
    click(&ap, "table.approvals tbody tr td a").await;
    let details = text(&ap, "main").await;
    assert!(details.contains("public.orders"), "{details}");
    fill(&ap, "form[action$='/approve'] textarea", "yes, restore it").await;
    shots(&ap, "35-restore-over-approve").await;
    click(&ap, "form[action$='/approve'] button").await;
    assert!(text(&ap, "p.flash").await.contains("Approved"));

    // The operator runs it and follows it to the restored tables.
    op.goto(request_url.as_str()).await.unwrap();
    if exists(&op, "input[name=confirm_name]").await {
        fill(&op, "input[name=confirm_name]", "src").await;
    }
    click(&op, "form[action$='/execute'] button").await;
    let flash = text(&op, "p.flash").await;
    assert!(flash.starts_with("Started"), "{flash}");
    shots(&op, "36-restore-over-started").await;
    click(&op, "dl.facts a[href^='/jobs/']").await;
    click(&op, "a[role=button][href^='/restores/']").await;
    wait_for(&op, "table.restored-tables", 90).await;
    let status = text(&op, "dl.facts .bstatus").await;
    assert_eq!(status, "succeeded", "{}", text(&op, "main").await);
    let tables = text(&op, "table.restored-tables").await;
    assert!(
        tables.contains("public.orders") && tables.contains("6000"),
        "{tables}"
    );
    assert!(
        exists(&op, "dl.facts a[href^='/backups/']").await,
        "the safety backup is linked"
    );
    shots(&op, "37-restore-over-done").await;
    let mut c = sqlx::PgConnection::connect(&src.url).await.unwrap();
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(orders, 6_000, "the deleted orders are back");
    drop(c);

    // The request ended executed, and the backup lists its restore.
    op.goto(request_url.as_str()).await.unwrap();
    assert_eq!(text(&op, ".req-state").await, "executed");
    shots(&op, "38-request-executed").await;
    op.goto(backup_url.as_str()).await.unwrap();
    assert!(text(&op, "ul.restores").await.contains("over"));
    shots(&op, "39-backup-with-restore").await;

    op.close().await.unwrap();
    ap.close().await.unwrap();
    src.drop_db().await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn redis_client() -> fred::prelude::Client {
    use fred::prelude::*;
    let url = &crate::helpers::services().await.redis_url;
    let client = Builder::from_config(Config::from_url(url).unwrap())
        .build()
        .unwrap();
    client.init().await.expect("connect to Redis");
    client
}

#[tokio::test]
async fn in_a_real_browser_an_operator_deletes_redis_keys_after_the_preview_and_finds_it_in_the_exported_log()
 {
    use fred::prelude::*;
    let app = spawn_app().await;
    let pw = app.create_user("ruth", Role::Operator).await;
    let r = redis_client().await;
    let p = format!(
        "it:browser:{}:",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut doomed = vec![];
    for i in 0..250 {
        doomed.push(format!("{p}session:{i}"));
    }
    // A long key name with markup in it: it must render inert and wrap.
    doomed.push(format!(
        "{p}session:<script>alert(1)</script>:{}",
        "averyveryverylongsegmentwithoutanyspaces".repeat(4)
    ));
    for k in &doomed {
        let _: () = r.set(k.as_str(), "x", None, None, false).await.unwrap();
    }
    let kept: Vec<String> = (0..20).map(|i| format!("{p}settings:{i}")).collect();
    for k in &kept {
        let _: () = r.set(k.as_str(), "y", None, None, false).await.unwrap();
    }

    let driver = start_driver().await;
    let c = open_browser(&driver, WIDE, 900).await;
    sign_in(&c, &app, "ruth", &pw).await;

    // The preview: how many keys, some of them, their memory.
    c.goto(&app.url("/targets/cache/redis/delete"))
        .await
        .unwrap();
    fill(
        &c,
        "form.redis-filter input[name=pattern]",
        &format!("{p}session:*"),
    )
    .await;
    click(&c, "form.redis-filter button[type=submit]").await;
    let head = text(&c, "article.delete-preview header").await;
    assert!(head.contains("251 keys match"), "{head}");
    assert!(
        !c.source().await.unwrap().contains("<script>alert(1)"),
        "key names are escaped"
    );
    shots(&c, "40-redis-delete-preview").await;

    // Ask; the dev target's policy approves it at once and a job deletes.
    click(&c, "article.delete-preview a[role=button]").await;
    let what = text(&c, "p.what").await;
    assert!(what.contains("UNLINK"), "{what}");
    fill(
        &c,
        "textarea[name=reason]",
        "stale sessions after the migration",
    )
    .await;
    shots(&c, "41-redis-delete-request").await;
    click(&c, "form[action^='/targets/'] button[type=submit]").await;
    let flash = text(&c, "p.flash").await;
    shots(&c, "42-redis-delete-sent").await;
    assert!(flash.starts_with("Started"), "{flash}");
    click(&c, "dl.facts a[href^='/jobs/']").await;
    wait_for(&c, "dl.facts .bstatus.succeeded", 60).await;
    shots(&c, "43-redis-delete-job-done").await;
    let left: i64 = r.exists(doomed.clone()).await.unwrap();
    assert_eq!(left, 0, "every previewed key is gone");
    let still: i64 = r.exists(kept.clone()).await.unwrap();
    assert_eq!(still, 20, "the other keys are untouched");

    // The operations log, filtered to it, and its CSV export.
    c.goto(&app.url("/operations")).await.unwrap();
    fill(&c, "form.filters input[name=kind]", "redis.keys.delete").await;
    click(&c, "form.filters button[type=submit]").await;
    wait_for(&c, "table.operations", 10).await;
    let rows = c
        .find_all(Locator::Css("table.operations tbody tr"))
        .await
        .unwrap();
    assert!(!rows.is_empty());
    for row in &rows {
        let t = row.text().await.unwrap();
        assert!(t.contains("redis.keys.delete"), "{t}");
    }
    assert!(text(&c, "table.operations").await.contains("succeeded"));
    shots(&c, "44-operations-filtered").await;
    let href = el(&c, "a[href^='/operations/export.csv']")
        .await
        .attr("href")
        .await
        .unwrap()
        .unwrap();
    assert!(href.contains("kind=redis.keys.delete"), "{href}");
    // Fetched by the page itself, with its session, as the download would be.
    let csv = c
        .execute_async(
            "const done = arguments[arguments.length - 1];
             fetch(arguments[0]).then(r => r.text()).then(done, e => done('ERROR ' + e));",
            vec![serde_json::json!(href)],
        )
        .await
        .unwrap();
    let csv = csv.as_str().unwrap();
    let mut lines = csv.lines();
    let header = lines.next().unwrap();
    assert!(
        header.contains("kind") && header.contains("outcome"),
        "{header}"
    );
    let body: Vec<&str> = lines.collect();
    assert!(!body.is_empty(), "{csv}");
    assert!(
        body.iter().all(|l| l.contains("redis.keys.delete")),
        "only the filtered kind: {csv}"
    );
    assert!(body.iter().any(|l| l.contains("ruth")), "{csv}");

    // Empty result: a sentence, not an empty table.
    c.goto(&app.url("/operations?kind=no.such.kind"))
        .await
        .unwrap();
    assert!(text(&c, "main").await.contains("No operations match"));
    shots(&c, "45-operations-no-match").await;

    c.close().await.unwrap();
    for k in kept {
        let _: () = r.del(k).await.unwrap();
    }
}
