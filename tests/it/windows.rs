//! Maintenance windows (issue 20): a runbook's checklist run as a guided,
//! recorded change window — approval, announce, backup pinned, manual steps
//! ticked by people, migration status before and after, health URL, close,
//! report; a failing step stops the window; roles; the pipeline's CLI and API.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use dbops::auth::Role;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Browser, TestApp, services, spawn_app_with, with_databases};

/// A webhook receiver standing in for the ops channel: the texts it got.
async fn webhook() -> (String, Arc<Mutex<Vec<String>>>) {
    let received = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = received.clone();
    let router = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let sink = sink.clone();
            async move {
                let v: Value = serde_json::from_str(&body).unwrap_or_default();
                sink.lock()
                    .unwrap()
                    .push(v["text"].as_str().unwrap_or_default().to_string());
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, received)
}

/// An application's health URL that answers 503 for its first `failures` calls,
/// then 200 (`usize::MAX`: never healthy). Returns its URL and the call count.
async fn health_server(failures: usize) -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let router = axum::Router::new().route(
        "/api/health",
        axum::routing::get(move || {
            let c = c.clone();
            async move {
                let n = c.fetch_add(1, Ordering::SeqCst);
                if n < failures {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                } else {
                    (StatusCode::OK, "ok")
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api/health", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, calls)
}

/// An application database with sqlx's bookkeeping table and one migration.
async fn app_database(db: &str) -> sqlx::PgPool {
    let s = services().await;
    let pool = sqlx::PgPool::connect(&format!("{}/{db}", s.pg_base))
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE _sqlx_migrations (version bigint PRIMARY KEY, description text NOT NULL,
           installed_on timestamptz NOT NULL DEFAULT now(), success boolean NOT NULL,
           checksum bytea NOT NULL, execution_time bigint NOT NULL);
         INSERT INTO _sqlx_migrations VALUES (20260101000000, 'create users', now(), true, '\\x01', 1000);
         CREATE TABLE users (id int PRIMARY KEY, name text);
         INSERT INTO users VALUES (1, 'ada');",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool
}

/// The migration "the deploy" applies inside the window.
async fn apply_migration(pool: &sqlx::PgPool) {
    sqlx::raw_sql(
        "ALTER TABLE users ADD COLUMN email text;
         INSERT INTO _sqlx_migrations VALUES (20261203120000, 'add email', now(), true, '\\x02', 2000);",
    )
    .execute(pool)
    .await
    .unwrap();
}

fn config(policy: &str, webhook: Option<&str>, extra: &str) -> String {
    let mut t = String::new();
    if webhook.is_some() {
        t.push_str("[notifications]\nwebhook_url_env = \"HOOK\"\n");
    }
    t.push_str(extra);
    t.push_str(&format!(
        "\n[targets]\nconnect_timeout_seconds = 3\n[[postgres]]\nname = \"app\"\nurl_env = \"APP\"\npolicy = \"{policy}\"\n"
    ));
    t
}

async fn spawn(db: &str, policy: &str, hook: Option<&str>, extra: &str) -> TestApp {
    let s = services().await;
    let mut env = vec![("APP", format!("{}/{db}", s.pg_base))];
    if let Some(h) = hook {
        env.push(("HOOK", h.to_string()));
    }
    spawn_app_with(&config(policy, hook, extra), &env).await
}

async fn login(app: &TestApp, name: &str, role: Role) -> Browser {
    let pw = app.create_user(name, role).await;
    let mut b = app.browser();
    assert_eq!(b.login(name, &pw).await.status, StatusCode::SEE_OTHER);
    b
}

/// (position, status) of every step.
async fn statuses(app: &TestApp, window: i64) -> Vec<(i32, String)> {
    sqlx::query_as("SELECT position, status FROM maintenance_window_steps WHERE window_id = $1 ORDER BY position")
        .bind(window)
        .fetch_all(&app.db)
        .await
        .unwrap()
}

/// Waits until step `position` of the window has one of `wanted` statuses.
async fn wait_step(app: &TestApp, window: i64, position: i32, wanted: &[&str]) -> String {
    for _ in 0..600 {
        let s: String = sqlx::query_scalar(
            "SELECT status FROM maintenance_window_steps WHERE window_id = $1 AND position = $2",
        )
        .bind(window)
        .bind(position)
        .fetch_one(&app.db)
        .await
        .unwrap();
        if wanted.contains(&s.as_str()) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "step {position} of window {window} never became {wanted:?}: {:?}",
        statuses(app, window).await
    );
}

async fn step_output(app: &TestApp, window: i64, position: i32) -> Value {
    sqlx::query_scalar::<_, Option<Value>>(
        "SELECT output FROM maintenance_window_steps WHERE window_id = $1 AND position = $2",
    )
    .bind(window)
    .bind(position)
    .fetch_one(&app.db)
    .await
    .unwrap()
    .unwrap_or(Value::Null)
}

async fn window_state(app: &TestApp, id: i64) -> String {
    sqlx::query_scalar("SELECT state FROM maintenance_windows WHERE id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

async fn wait_for_text(received: &Arc<Mutex<Vec<String>>>, needle: &str) -> String {
    for _ in 0..100 {
        if let Some(t) = received.lock().unwrap().iter().find(|t| t.contains(needle)) {
            return t.clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "no webhook text with “{needle}”: {:?}",
        received.lock().unwrap()
    );
}

fn window_id(location: Option<&str>) -> i64 {
    location
        .and_then(|l| l.strip_prefix("/windows/"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a window page: {location:?}"))
}

/// The marketplace runbook's window on a production target, from scheduling to
/// the report: an approver agrees, the announcement reaches the ops channel, the
/// backup is good and pinned, two people tick the manual steps, the health URL
/// is asked until it answers, the migration applied inside shows in the
/// before/after difference, the close is announced with a summary, and the
/// report (page and CSV) says who did what and when.
#[tokio::test]
async fn a_marketplace_window_on_production_runs_from_approval_to_the_report() {
    with_databases(1, |dbs| async move {
        let pool = app_database(&dbs[0]).await;
        let (hook, received) = webhook().await;
        let (health, calls) = health_server(2).await;
        let app = spawn(&dbs[0], "production", Some(&hook), "").await;
        let mut alice = login(&app, "alice", Role::Operator).await;
        let mut bob = login(&app, "bob", Role::Operator).await;
        let mut carol = login(&app, "carol", Role::Approver).await;
        let mut viewer = login(&app, "vera", Role::Viewer).await;

        // Viewers see the page but may not schedule.
        assert_eq!(viewer.get("/windows").await.status, StatusCode::OK);
        let r = viewer
            .post(
                "/windows",
                &[
                    ("template", "marketplace"),
                    ("targets", "app"),
                    ("reason", "x"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);

        alice.get("/windows").await;
        let r = alice
            .post(
                "/windows",
                &[
                    ("template", "marketplace"),
                    ("targets", "app"),
                    ("planned_minutes", "30"),
                    ("health_url", &health),
                    ("reason", "release 4.2: add users.email"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
        let id = window_id(r.location());
        assert_eq!(window_state(&app, id).await, "requested");

        // Production: it waits for an approver; opening now is refused.
        alice.get(&format!("/windows/{id}")).await;
        alice.post(&format!("/windows/{id}/open"), &[]).await;
        let page = alice.get(&format!("/windows/{id}")).await;
        assert!(page.text.contains("waiting for approval"), "{}", page.text);
        assert_eq!(window_state(&app, id).await, "requested");
        let approval: i64 =
            sqlx::query_scalar("SELECT approval_ids[1] FROM maintenance_windows WHERE id = $1")
                .bind(id)
                .fetch_one(&app.db)
                .await
                .unwrap();
        assert_eq!(crate::helpers::state_of(&app, approval).await, "pending");
        // The requester cannot approve their own window (she is no approver anyway).
        let r = alice
            .post(
                &format!("/approvals/{approval}/approve"),
                &[("comment", "me")],
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        carol.get(&format!("/approvals/{approval}")).await;
        carol
            .post(
                &format!("/approvals/{approval}/approve"),
                &[("comment", "go ahead")],
            )
            .await;
        assert_eq!(crate::helpers::state_of(&app, approval).await, "approved");

        // Open: the automatic steps run up to the first manual one.
        alice.get(&format!("/windows/{id}")).await;
        let r = alice.post(&format!("/windows/{id}/open"), &[]).await;
        assert_eq!(r.location(), Some(format!("/windows/{id}").as_str()));
        assert_eq!(window_state(&app, id).await, "open");
        assert_eq!(crate::helpers::state_of(&app, approval).await, "executed");
        wait_step(&app, id, 4, &["done"]).await;
        assert_eq!(wait_step(&app, id, 5, &["pending"]).await, "pending");
        // Announced, with who, what and how long.
        let opened = wait_for_text(&received, &format!("window #{id} opens")).await;
        assert!(
            opened.contains("alice") && opened.contains("30 min") && opened.contains("release 4.2"),
            "{opened}"
        );
        // The backup is good and pinned for the window.
        let backup = step_output(&app, id, 2).await["targets"][0]["backup_id"]
            .as_i64()
            .unwrap();
        let (status, pins): (String, Vec<String>) =
            sqlx::query_as("SELECT status, backup_pin_reasons(id) FROM backups WHERE id = $1")
                .bind(backup)
                .fetch_one(&app.db)
                .await
                .unwrap();
        assert_eq!(status, "good");
        assert!(
            pins.iter()
                .any(|p| p.contains(&format!("maintenance window #{id}"))),
            "{pins:?}"
        );
        // No archiving: the restore point is skipped, saying why.
        assert_eq!(wait_step(&app, id, 3, &["skipped"]).await, "skipped");
        // While open: a banner on the overview and the target's pages.
        for page in ["/", "/targets/app/backups"] {
            let r = viewer.get(page).await;
            assert!(r.text.contains(&format!("href=\"/windows/{id}\"")), "no banner on {page}");
        }
        // A gated action requested inside the window links to it.
        let inside: i64 = sqlx::query_scalar(
            "INSERT INTO approval_requests (kind, target, params, params_hash, summary, reason, requested_by,
                    requested_by_name, state, expires_at)
             SELECT 'pg.backend.cancel', 'app', '{}', '\\x00', 'made by the test', 'inside the window', id,
                    username, 'pending', now() + interval '1 hour' FROM users WHERE username = 'bob'
             RETURNING id",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
        let r = carol.get(&format!("/approvals/{inside}")).await;
        assert!(r.text.contains(&format!("Requested during <a href=\"/windows/{id}\">")), "{}", r.text);

        // The viewer sees the steps but may not tick them.
        let page = viewer.get(&format!("/windows/{id}")).await;
        assert!(page.text.contains("Stop the backend"));
        let r = viewer
            .post(&format!("/windows/{id}/steps/5/done"), &[("note", "x")])
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        // Out of order is refused.
        alice.get(&format!("/windows/{id}")).await;
        alice
            .post(
                &format!("/windows/{id}/steps/6/done"),
                &[("note", "too early")],
            )
            .await;
        assert_eq!(wait_step(&app, id, 6, &["pending"]).await, "pending");
        // Two people tick the manual steps, with notes; the deploy migrates.
        alice
            .post(
                &format!("/windows/{id}/steps/5/done"),
                &[("note", "backend stopped at 10:02")],
            )
            .await;
        apply_migration(&pool).await;
        bob.get(&format!("/windows/{id}")).await;
        bob.post(
            &format!("/windows/{id}/steps/6/done"),
            &[("note", "migration 20261203120000 applied")],
        )
        .await;
        alice
            .post(
                &format!("/windows/{id}/steps/7/done"),
                &[("note", "backend up")],
            )
            .await;
        // Then: migrations after, health URL (fails twice, then answers), target health.
        wait_step(&app, id, 10, &["done"]).await;
        let after = step_output(&app, id, 8).await;
        assert!(
            after["summary"]
                .as_str()
                .unwrap()
                .contains("20261203120000"),
            "{after}"
        );
        let health_out = step_output(&app, id, 9).await;
        assert!(
            health_out["attempts"].as_u64().unwrap() >= 3,
            "{health_out}"
        );
        assert!(calls.load(Ordering::SeqCst) >= 3);

        // Close: announced with a summary.
        alice.get(&format!("/windows/{id}")).await;
        let r = alice
            .post(&format!("/windows/{id}/close"), &[("note", "release done")])
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        assert_eq!(window_state(&app, id).await, "closed");
        let closed = wait_for_text(&received, &format!("window #{id} (")).await;
        assert!(
            closed.contains("closed by alice") && closed.contains("steps done"),
            "{closed}"
        );
        assert_eq!(wait_step(&app, id, 11, &["done"]).await, "done");

        // The report: every step, who, when; and as CSV.
        let report = viewer.get(&format!("/windows/{id}/report")).await;
        assert_eq!(report.status, StatusCode::OK);
        for needle in [
            "bob",
            "alice",
            "migration 20261203120000 applied",
            "carol",
            "answered 200",
        ] {
            assert!(report.text.contains(needle), "report lacks {needle}");
        }
        let csv = viewer.get(&format!("/windows/{id}/report.csv")).await;
        assert!(
            csv.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/csv")
        );
        assert!(
            csv.text.contains("\"bob\"") && csv.text.contains("\"Perform the operation\""),
            "{}",
            csv.text
        );
        assert_eq!(
            csv.text
                .lines()
                .filter(|l| l.starts_with(char::is_numeric))
                .count(),
            12
        );

        // The operations log has every step.
        for (kind, n) in [
            ("window.request", 1),
            ("window.open", 1),
            ("window.tick", 3),
            ("window.close", 1),
            ("window.gate", 1),
        ] {
            assert_eq!(app.count_ops(kind, Some("succeeded")).await, n, "{kind}");
        }
        assert!(app.count_ops("window.tick", Some("denied")).await >= 1);
    })
    .await;
}

/// A template from the config whose health URL never answers: the step fails,
/// the window stops with the reason (announced), closing is refused, and abort
/// leads to the rollback — the pinned backup's page. An overrun is announced.
#[tokio::test]
async fn a_failing_automatic_step_stops_the_window_and_abort_offers_the_pinned_backup() {
    with_databases(1, |dbs| async move {
        app_database(&dbs[0]).await;
        let (hook, received) = webhook().await;
        let (health, _) = health_server(usize::MAX).await;
        let extra = r#"
[[windows.templates]]
name = "quick"
title = "Quick change"
steps = [
  { kind = "backup" },
  { kind = "health_url", expect_status = 200, timeout_seconds = 3 },
  { kind = "manual", title = "Do it" },
  { kind = "announce_close" },
]
"#;
        let app = spawn(&dbs[0], "dev", Some(&hook), extra).await;
        let mut op = login(&app, "olga", Role::Operator).await;
        op.get("/windows").await;
        let r = op
            .post(
                "/windows",
                &[
                    ("template", "quick"),
                    ("targets", "app"),
                    ("planned_minutes", "1"),
                    ("health_url", &health),
                    ("reason", "try"),
                ],
            )
            .await;
        let id = window_id(r.location());
        // dev: no second person needed.
        assert_eq!(window_state(&app, id).await, "approved");
        op.get(&format!("/windows/{id}")).await;
        op.post(&format!("/windows/{id}/open"), &[]).await;
        // It can't close while the health check it started runs.
        assert_eq!(wait_step(&app, id, 2, &["running"]).await, "running");
        op.post(&format!("/windows/{id}/close"), &[]).await;
        let page = op.get(&format!("/windows/{id}")).await;
        assert!(
            page.text.contains("is running: the window can"),
            "{}",
            page.text
        );
        assert_eq!(app.count_ops("window.close", Some("denied")).await, 1);
        wait_step(&app, id, 2, &["failed"]).await;
        for _ in 0..50 {
            if window_state(&app, id).await == "stopped" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(window_state(&app, id).await, "stopped");
        let page = op.get(&format!("/windows/{id}")).await;
        assert!(
            page.text.contains("did not answer as expected"),
            "{}",
            page.text
        );
        let stopped = wait_for_text(&received, "STOPPED").await;
        assert!(stopped.contains("did not answer"), "{stopped}");
        // A stopped window does not close; the manual step can't be ticked.
        op.post(&format!("/windows/{id}/close"), &[]).await;
        op.post(&format!("/windows/{id}/steps/3/done"), &[]).await;
        assert_eq!(window_state(&app, id).await, "stopped");
        assert_eq!(wait_step(&app, id, 3, &["pending"]).await, "pending");

        // Overrun: planned one minute, open longer.
        sqlx::query(
            "UPDATE maintenance_windows SET opened_at = now() - interval '5 minutes' WHERE id = $1",
        )
        .bind(id)
        .execute(&app.db)
        .await
        .unwrap();
        dbops::windows::tick_periodic(&app.state()).await.unwrap();
        wait_for_text(&received, "overrun").await;
        assert_eq!(app.count_ops("window.overrun", Some("succeeded")).await, 1);
        dbops::windows::tick_periodic(&app.state()).await.unwrap();
        assert_eq!(
            app.count_ops("window.overrun", Some("succeeded")).await,
            1,
            "announced once"
        );

        // Abort: the rollback is the pinned backup's restore.
        let backup = step_output(&app, id, 1).await["targets"][0]["backup_id"]
            .as_i64()
            .unwrap();
        op.get(&format!("/windows/{id}")).await;
        op.post(
            &format!("/windows/{id}/abort"),
            &[("note", "health never came back")],
        )
        .await;
        assert_eq!(window_state(&app, id).await, "aborted");
        let page = op.get(&format!("/windows/{id}")).await;
        assert!(
            page.text.contains(&format!("href=\"/backups/{backup}\"")),
            "{}",
            page.text
        );
        wait_for_text(&received, "aborted by olga").await;
        assert_eq!(app.count_ops("window.stop", Some("failed")).await, 1);
        assert_eq!(app.count_ops("window.abort", Some("succeeded")).await, 1);
    })
    .await;
}

/// Runs `dbops window …` without blocking this test's runtime (the health
/// server the command asks lives in it).
async fn dbops_cli(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    let url = std::fs::read_to_string(config.with_extension("url")).unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_dbops"))
        .arg("--config")
        .arg(config)
        .arg("window")
        .args(args)
        .env_remove("DATABASE_URL")
        .env("APP", url)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap()
}

/// A deploy pipeline runs its migration inside a window: through the command
/// line (automatic steps run in the command, which waits for the backup), then
/// through the API with a scoped token.
#[tokio::test]
async fn a_pipeline_runs_its_migration_in_a_window_through_the_cli_and_the_api() {
    with_databases(1, |dbs| async move {
        let pool = app_database(&dbs[0]).await;
        let (health, _) = health_server(0).await;
        let app = spawn(&dbs[0], "dev", None, "").await;
        app.create_user("ci-owner", Role::Operator).await;
        let s = services().await;
        let dir = std::env::temp_dir().join(format!("dbops-it-win-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("dbops.toml");
        std::fs::write(
            &cfg,
            format!(
                "database_url = \"{}\"\n[backups]\ndirectory = \"{}\"\n[targets]\nconnect_timeout_seconds = 3\n[[postgres]]\nname = \"app\"\nurl_env = \"APP\"\npolicy = \"dev\"\n",
                app.database_url,
                dir.join("backups").display(),
            ),
        )
        .unwrap();
        std::fs::write(cfg.with_extension("url"), format!("{}/{}", s.pg_base, dbs[0])).unwrap();

        // CLI: open, waiting for the backup; the migration; the steps; close.
        let out = dbops_cli(&cfg,
            &["open", "--template", "marketplace", "--target", "app", "--owner", "ci-owner", "--wait-for", "backup", "--health-url", &health],
        ).await;
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("backup #") && text.contains("good, pinned"), "{text}");
        let id: i64 = sqlx::query_scalar("SELECT max(id) FROM maintenance_windows").fetch_one(&app.db).await.unwrap();
        assert_eq!(window_state(&app, id).await, "open");
        assert_eq!(wait_step(&app, id, 4, &["done"]).await, "done");
        let out = dbops_cli(&cfg, &["step", "--target", "app", "--done", "5", "--note", "stopped", "--by", "deploy-bot"]).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        apply_migration(&pool).await;
        for step in ["Perform the operation", "7"] {
            let out = dbops_cli(&cfg, &["step", "--window", &id.to_string(), "--done", step]).await;
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        // Step 7's command ran the automatic steps after it.
        assert_eq!(wait_step(&app, id, 10, &["done"]).await, "done");
        assert!(step_output(&app, id, 8).await["summary"].as_str().unwrap().contains("add email"));
        let out = dbops_cli(&cfg, &["close", "--window", &id.to_string()]).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(window_state(&app, id).await, "closed");
        let by: Option<String> = sqlx::query_scalar("SELECT done_by_name FROM maintenance_window_steps WHERE window_id = $1 AND position = 5")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
        assert!(by.unwrap().starts_with("deploy-bot (cli:"));

        // API: a token with the windows:run scope.
        let owner = crate::helpers::user(&app, Role::Operator).await;
        let (_, token) = dbops::auth::tokens::create(
            &app.db,
            "deploy",
            &["windows:run".to_string()],
            Some(&["app".to_string()]),
            (owner.id, &owner.username),
        )
        .await
        .unwrap();
        let client = reqwest::Client::new();
        let body = json!({ "template": "marketplace", "targets": ["app"], "planned_minutes": 15, "reason": "release 4.3" });
        let r = client.post(app.url("/api/v1/windows")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let r = client.post(app.url("/api/v1/windows")).bearer_auth(&token).json(&body).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let w: Value = r.json().await.unwrap();
        let api_id = w["id"].as_i64().unwrap();
        assert_eq!(w["state"], "open");
        assert_eq!(w["owner"], owner.username.as_str());
        wait_step(&app, api_id, 4, &["done"]).await;
        for step in ["5", "6", "7"] {
            let r = client
                .post(app.url(&format!("/api/v1/windows/{api_id}/steps/{step}/done")))
                .bearer_auth(&token)
                .json(&json!({ "note": format!("step {step} by the pipeline"), "by": "ci" }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
        }
        wait_step(&app, api_id, 10, &["done", "skipped"]).await;
        let r = client
            .post(app.url(&format!("/api/v1/windows/{api_id}/close")))
            .bearer_auth(&token)
            .json(&json!({ "note": "deployed" }))
            .send()
            .await
            .unwrap();
        let w: Value = r.json().await.unwrap();
        assert_eq!(w["state"], "closed", "{w}");
        assert!(w["summary"].as_str().unwrap().contains("Note: deployed"));
        let got: Value = client
            .get(app.url(&format!("/api/v1/windows/{api_id}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(got["steps"][4]["by"], "ci (token:deploy)");
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

/// On a production target a pipeline's window waits for an approver: the API
/// answers 202 with the request, the token's creator cannot approve it, and
/// once an approver has, the same call opens the approved window.
#[tokio::test]
async fn a_pipeline_window_on_production_waits_for_an_approver_then_opens() {
    with_databases(1, |dbs| async move {
        app_database(&dbs[0]).await;
        let app = spawn(&dbs[0], "production", None, "").await;
        let state = app.state();
        let owner = crate::helpers::user(&app, Role::Operator).await;
        let approver = crate::helpers::user(&app, Role::Approver).await;
        let (_, token) = dbops::auth::tokens::create(
            &app.db,
            "deploy",
            &["windows:run".to_string()],
            None,
            (owner.id, &owner.username),
        )
        .await
        .unwrap();
        let client = reqwest::Client::new();
        let body =
            json!({ "template": "migration-checklist", "targets": ["app"], "reason": "release 5" });
        let open = || {
            client
                .post(app.url("/api/v1/windows"))
                .bearer_auth(&token)
                .json(&body)
                .send()
        };
        let r = open().await.unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let w: Value = r.json().await.unwrap();
        assert_eq!(w["state"], "requested");
        let id = w["id"].as_i64().unwrap();
        let request = w["approvals"][0].as_i64().unwrap();
        let ctx = dbops::audit::AuditCtx::system();
        // The owner may not approve their own window.
        assert!(
            dbops::approvals::decide(
                &state,
                &ctx,
                &owner,
                request,
                dbops::approvals::Decision::Approve,
                "mine"
            )
            .await
            .is_err()
        );
        // Asking again does not make a second window while it waits.
        let r = open().await.unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let again: Value = r.json().await.unwrap();
        assert_eq!(again["id"], id);
        dbops::approvals::decide(
            &state,
            &ctx,
            &approver,
            request,
            dbops::approvals::Decision::Approve,
            "ok",
        )
        .await
        .unwrap();
        let r = open().await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let w: Value = r.json().await.unwrap();
        assert_eq!(w["id"], id);
        assert_eq!(w["state"], "open");
        // The checklist starts with manual steps: nothing runs before step 1 is ticked.
        assert_eq!(w["steps"][0]["status"], "pending");
        assert_eq!(crate::helpers::state_of(&app, request).await, "executed");
    })
    .await;
}

/// A window acts on all its targets: someone who is an operator on its first
/// target but only a viewer on another sees it and may not schedule, open or
/// tick it; an operator on both may.
#[tokio::test]
async fn changing_a_window_needs_an_operator_on_every_target_and_viewers_only_see_it() {
    with_databases(1, |dbs| async move {
        app_database(&dbs[0]).await;
        let s = services().await;
        let toml = r#"
[[windows.templates]]
name = "by-hand"
steps = [{ kind = "manual", title = "Do it" }]
[targets]
connect_timeout_seconds = 3
[[postgres]]
name = "app"
url_env = "APP"
policy = "dev"
[[postgres]]
name = "other"
url_env = "APP"
policy = "dev"
"#;
        let app = spawn_app_with(toml, &[("APP", format!("{}/{}", s.pg_base, dbs[0]))]).await;
        let pw = app.create_user("mia", Role::Operator).await;
        sqlx::query(
            "INSERT INTO user_target_roles (user_id, target, role, source, granted_by)
             SELECT id, 'other', 'viewer', 'admin', 'test' FROM users WHERE username = 'mia'",
        )
        .execute(&app.db)
        .await
        .unwrap();
        let mut mia = app.browser();
        assert_eq!(mia.login("mia", &pw).await.status, StatusCode::SEE_OTHER);
        let mut otto = login(&app, "otto", Role::Operator).await;

        let form = [
            ("template", "by-hand"),
            ("targets", "app, other"),
            ("reason", "both"),
        ];
        mia.get("/windows").await;
        assert_eq!(
            mia.post("/windows", &form).await.status,
            StatusCode::FORBIDDEN
        );
        otto.get("/windows").await;
        let id = window_id(otto.post("/windows", &form).await.location());
        assert_eq!(window_state(&app, id).await, "approved");

        mia.get(&format!("/windows/{id}")).await;
        assert_eq!(
            mia.post(&format!("/windows/{id}/open"), &[]).await.status,
            StatusCode::FORBIDDEN
        );
        otto.get(&format!("/windows/{id}")).await;
        otto.post(&format!("/windows/{id}/open"), &[]).await;
        assert_eq!(window_state(&app, id).await, "open");
        let r = mia
            .post(&format!("/windows/{id}/steps/1/done"), &[("note", "x")])
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert!(r.text.contains("other"), "{}", r.text);
        assert_eq!(
            mia.get(&format!("/windows/{id}")).await.status,
            StatusCode::OK
        );
        otto.post(
            &format!("/windows/{id}/steps/1/done"),
            &[("note", "done by hand")],
        )
        .await;
        assert_eq!(wait_step(&app, id, 1, &["done"]).await, "done");
        assert_eq!(
            mia.post(&format!("/windows/{id}/close"), &[]).await.status,
            StatusCode::FORBIDDEN
        );
        otto.post(&format!("/windows/{id}/close"), &[]).await;
        assert_eq!(window_state(&app, id).await, "closed");
        // Every refusal is in the log.
        let denied: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM operations WHERE outcome = 'denied' AND actor_name = 'mia'",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
        assert!(denied >= 4, "{denied}");
    })
    .await;
}
