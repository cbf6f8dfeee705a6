//! A real browser (Debian's headless Chromium driven through chromedriver) logs in
//! and sees the overview. Screenshots go to `$DBOPS_SCREENSHOTS` or a temp dir.

use std::{process::Stdio, time::Duration};

use dbops::auth::Role;
use fantoccini::{ClientBuilder, Locator};

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
