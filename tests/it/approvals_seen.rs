//! What the approver saw is what is recorded; a failed destructive action keeps
//! its target red until acknowledged; break-glass runs at once and waits for a
//! review by someone else.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use dbops::{
    approvals::{self, Decision},
    audit::AuditCtx,
    auth::Role,
};
use reqwest::StatusCode;
use sqlx::{Connection, PgConnection};

use crate::helpers::{
    Browser, TestApp, approval_steps as ops, pair, services, spawn_app_with, state_of, user,
};

/// A database of its own on the test server, for a target whose tables a test
/// changes.
struct Scratch {
    name: String,
    url: String,
}

impl Scratch {
    async fn new() -> Scratch {
        let base = &services().await.pg_base;
        let name = format!(
            "dbops_it_seen_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mut c = PgConnection::connect(&format!("{base}/postgres"))
            .await
            .unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut c)
            .await
            .unwrap();
        let s = Scratch {
            url: format!("{base}/{name}"),
            name,
        };
        s.sql("CREATE TABLE public.t1 (id int PRIMARY KEY)").await;
        s
    }

    async fn sql(&self, sql: &str) {
        let mut c = PgConnection::connect(&self.url).await.unwrap();
        sqlx::query(sql).execute(&mut c).await.unwrap();
    }

    async fn drop(self) {
        let base = &services().await.pg_base;
        let mut c = PgConnection::connect(&format!("{base}/postgres"))
            .await
            .unwrap();
        let _ = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut c)
        .await;
    }
}

/// A production target `pg` on `url`, with these extra lines in its table.
async fn app_on(url: &str, extra: &str, hook: Option<String>) -> TestApp {
    let mut toml = format!(
        "[targets]\nconnect_timeout_seconds = 2\n[[postgres]]\nname = \"pg\"\nurl_env = \"PG\"\npolicy = \"production\"\n{extra}\n"
    );
    let mut env = vec![("PG", url.to_string())];
    if let Some(h) = hook {
        toml.push_str("[notifications]\nwebhook_url_env = \"HOOK\"\n");
        env.push(("HOOK", h));
    }
    spawn_app_with(&toml, &env).await
}

/// A good backup of `pg` whose file is not in storage (restoring it fails at its
/// first check, before anything is touched).
async fn good_backup_without_a_file(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO backups (target, method, format, status, trigger, storage, storage_key, bytes, sha256,
                              verification, finished_at)
         VALUES ('pg', 'pg_dump', 'custom', 'good', 'person', 'local', 'pg/not-there.dump', 1234,
                 repeat('ab', 32), '{\"tables\": [\"public.t1\"]}', now())
         RETURNING id",
    )
    .fetch_one(&app.db)
    .await
    .unwrap()
}

/// Posts the request form; returns the request's id.
async fn ask(b: &mut Browser, kind: &str, form: &[(&str, &str)]) -> i64 {
    let r = b.post(&format!("/targets/pg/actions/{kind}"), form).await;
    let loc = r
        .location()
        .unwrap_or_else(|| panic!("{} {}", r.status, r.text))
        .to_string();
    loc.rsplit('/').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_requests_recorded_view_does_not_change_when_the_database_does_and_approving_needs_reconfirmation()
 {
    let db = Scratch::new().await;
    let app = app_on(&db.url, "", None).await;
    let backup = good_backup_without_a_file(&app).await;
    let mut op = app.logged_in(Role::Operator).await;
    let mut ap = app.logged_in(Role::Approver).await;
    let id = ask(
        &mut op,
        "restore.over",
        &[("backup_id", &backup.to_string()), ("reason", "bad deploy")],
    )
    .await;
    let recorded: serde_json::Value =
        sqlx::query_scalar("SELECT params -> 'seen' FROM approval_requests WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(
        recorded["world"]["tables"],
        serde_json::json!(["public.t1"])
    );
    assert_eq!(recorded["world"]["backup"]["status"], "good");

    // Nothing changed yet: no re-confirmation is asked for.
    let page = ap.get(&format!("/approvals/{id}")).await;
    assert!(
        page.text.contains("As recorded when requested"),
        "{}",
        page.text
    );
    assert!(!page.text.contains("I have seen what changed"));

    // The database gains a table after the request.
    db.sql("CREATE TABLE public.t2 (id int)").await;
    let after: serde_json::Value =
        sqlx::query_scalar("SELECT params -> 'seen' FROM approval_requests WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(after, recorded, "what was recorded stays as it was");
    let page = ap.get(&format!("/approvals/{id}")).await;
    let (then, now) = page.text.split_once("Live view, now").expect("a live view");
    assert!(
        then.contains("Not in the backup (kept only in the previous database)</dt><dd>none"),
        "{then}"
    );
    assert!(
        !then.contains("public.t2"),
        "the recorded view is what the requester saw"
    );
    assert!(now.contains("public.t2"), "{now}");
    assert!(
        now.contains("● changed"),
        "the live view marks the difference"
    );
    assert!(
        page.text
            .contains("has changed since it was requested (tables)")
    );
    assert!(page.text.contains("name=\"reconfirm\" required"));

    // Approving without saying so is refused, with a sentence and a denied row.
    ap.post(&format!("/approvals/{id}/approve"), &[("comment", "ok")])
        .await;
    let page = ap.get(&format!("/approvals/{id}")).await;
    assert!(
        page.text
            .contains("tick “I have seen what changed” to approve it"),
        "{}",
        page.text
    );
    assert_eq!(state_of(&app, id).await, "pending");
    assert!(
        ops(&app, id)
            .await
            .contains(&pair("approval.approved", "denied"))
    );

    // With it, the approval goes through and its log row says so.
    ap.post(
        &format!("/approvals/{id}/approve"),
        &[("comment", "ok, seen t2"), ("reconfirm", "on")],
    )
    .await;
    assert_eq!(state_of(&app, id).await, "approved");
    let logged: serde_json::Value = sqlx::query_scalar(
        "SELECT result FROM operations WHERE approval_id = $1 AND kind = 'approval.approved' AND outcome = 'succeeded'",
    )
    .bind(id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        logged["reconfirmed"]["changed"],
        serde_json::json!(["tables"])
    );
    assert_eq!(
        logged["reconfirmed"]["now"]["tables"],
        serde_json::json!(["public.t1", "public.t2"])
    );

    // Running it needs the same confirmation.
    op.get(&format!("/approvals/{id}")).await;
    op.post(&format!("/approvals/{id}/execute"), &[]).await;
    let page = op.get(&format!("/approvals/{id}")).await;
    assert!(page.text.contains("to run it"), "{}", page.text);
    assert_eq!(state_of(&app, id).await, "approved");
    assert!(
        ops(&app, id)
            .await
            .contains(&pair("approval.execute", "denied"))
    );
    db.drop().await;
}

#[tokio::test]
async fn a_request_whose_backup_was_deleted_cannot_be_approved() {
    let db = Scratch::new().await;
    let app = app_on(&db.url, "", None).await;
    let state = app.state();
    let ctx = AuditCtx::system();
    let op = user(&app, Role::Operator).await;
    let ap = user(&app, Role::Approver).await;
    let form =
        |id: i64| std::collections::BTreeMap::from([("backup_id".to_string(), id.to_string())]);

    // Deleted after the request: the row says so.
    let b1 = good_backup_without_a_file(&app).await;
    let r1 = approvals::request(&state, &ctx, &op, "pg", "restore.over", &form(b1), "x")
        .await
        .unwrap();
    sqlx::query("UPDATE backups SET status = 'deleted', deleted_at = now() WHERE id = $1")
        .bind(b1)
        .execute(&app.db)
        .await
        .unwrap();
    let err = approvals::decide_reconfirmed(&state, &ctx, &ap, r1.id, Decision::Approve, "", true)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("Backup #{b1} is deleted now")),
        "{err}"
    );
    assert!(err.to_string().contains("can no longer be approved"));
    assert_eq!(state_of(&app, r1.id).await, "pending");
    assert!(
        ops(&app, r1.id)
            .await
            .contains(&pair("approval.approved", "denied"))
    );

    // Gone altogether (a delete request of the same kind of thing).
    let b2 = good_backup_without_a_file(&app).await;
    let r2 = approvals::request(&state, &ctx, &op, "pg", "backup.delete", &form(b2), "x")
        .await
        .unwrap();
    sqlx::query("DELETE FROM backups WHERE id = $1")
        .bind(b2)
        .execute(&app.db)
        .await
        .unwrap();
    let err = approvals::decide(&state, &ctx, &ap, r2.id, Decision::Approve, "")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert_eq!(state_of(&app, r2.id).await, "pending");

    // The approver's page says so and offers no Approve button; rejecting still works.
    let mut apb = app.logged_in(Role::Approver).await;
    let page = apb.get(&format!("/approvals/{}", r1.id)).await;
    assert!(
        page.text.contains("can no longer be approved or run"),
        "{}",
        page.text
    );
    assert!(!page.text.contains(&format!("/approvals/{}/approve", r1.id)));
    approvals::decide(&state, &ctx, &ap, r1.id, Decision::Reject, "backup is gone")
        .await
        .unwrap();
    db.drop().await;
}

#[tokio::test]
async fn a_failed_destructive_action_turns_its_target_red_until_an_approver_acknowledges_it() {
    let db = Scratch::new().await;
    let app = app_on(&db.url, "", None).await;
    let backup = good_backup_without_a_file(&app).await;
    let mut op = app.logged_in(Role::Operator).await;
    let mut ap = app.logged_in(Role::Approver).await;
    let mut viewer = app.logged_in(Role::Viewer).await;

    let calm = viewer.get("/").await;
    assert!(!calm.text.contains("target attention"));

    let id = ask(
        &mut op,
        "restore.over",
        &[("backup_id", &backup.to_string()), ("reason", "roll back")],
    )
    .await;
    ap.get(&format!("/approvals/{id}")).await;
    ap.post(&format!("/approvals/{id}/approve"), &[("comment", "go")])
        .await;
    op.get(&format!("/approvals/{id}")).await;
    op.post(&format!("/approvals/{id}/execute"), &[]).await;
    assert_eq!(state_of(&app, id).await, "failed");

    // Everyone sees the target red, with what failed, the error and the request.
    let page = viewer.get("/").await;
    assert!(
        page.text.contains("class=\"target attention\""),
        "{}",
        page.text
    );
    assert!(
        page.text
            .contains("Restore a backup over a database failed")
    );
    assert!(page.text.contains("cannot be found"), "the error is shown");
    assert!(page.text.contains(&format!("href=\"/approvals/{id}\"")));
    assert!(!page.text.contains("/acknowledge"), "viewers get no form");
    let incident: i64 = sqlx::query_scalar("SELECT id FROM incidents WHERE approval_id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap();

    // A viewer and an operator cannot acknowledge it; an approver must give a note.
    let path = format!("/incidents/{incident}/acknowledge");
    assert_eq!(
        viewer.post(&path, &[("note", "fine")]).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        op.post(&path, &[("note", "fine")]).await.status,
        StatusCode::FORBIDDEN
    );
    let page = ap.get("/").await;
    assert!(page.text.contains(&path), "approvers get the form");
    ap.post(&path, &[("note", "  ")]).await;
    let page = ap.get("/").await;
    assert!(page.text.contains("the note is required"), "{}", page.text);
    assert!(page.text.contains("class=\"target attention\""));

    ap.post(
        &path,
        &[("note", "file restored from the copy; nothing was touched")],
    )
    .await;
    let page = viewer.get("/").await;
    assert!(!page.text.contains("target attention"), "{}", page.text);
    assert!(
        !page
            .text
            .contains("Restore a backup over a database failed")
    );
    assert_eq!(
        app.count_ops("incident.acknowledged", Some("succeeded"))
            .await,
        1
    );
    assert_eq!(
        app.count_ops("incident.acknowledged", Some("denied")).await,
        1
    );
    // Once only, and the database keeps it.
    let again = sqlx::query("UPDATE incidents SET acknowledgement = 'changed' WHERE id = $1")
        .bind(incident)
        .execute(&app.db)
        .await;
    assert!(again.is_err());
    assert!(dbops::audit::verify(&app.db).await.unwrap().ok());
    db.drop().await;
}

/// A backend sleeping in `pg_sleep` on `url`: its pid and start, as the
/// cancel action's form wants them, and the task waiting for it.
async fn sleeper(url: &str) -> (i32, String, tokio::task::JoinHandle<bool>) {
    let marker = format!("dbops-break-glass-{}", uuid::Uuid::new_v4().simple());
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::query("SET statement_timeout = '60s'")
        .execute(&mut conn)
        .await
        .unwrap();
    let sql = format!("SELECT pg_sleep(60) /* {marker} */");
    let task = tokio::spawn(async move { sqlx::query(&sql).execute(&mut conn).await.is_ok() });
    let mut watcher = PgConnection::connect(url).await.unwrap();
    for _ in 0..100 {
        let row: Option<(i32, String)> = sqlx::query_as(
            "SELECT pid, to_char(backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
             FROM pg_stat_activity WHERE query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
        )
        .bind(&marker)
        .fetch_optional(&mut watcher)
        .await
        .unwrap();
        if let Some((pid, start)) = row {
            return (pid, start, task);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the sleeping query never showed up");
}

#[tokio::test]
async fn break_glass_is_refused_where_it_is_off_and_where_on_runs_at_once_notifies_and_waits_for_another_approvers_review()
 {
    let db = Scratch::new().await;
    let (pid, start, sleeping) = sleeper(&db.url).await;
    let pid = pid.to_string();
    let form = |reason: &'static str| {
        vec![
            ("pid", pid.clone()),
            ("backend_start", start.clone()),
            ("reason", reason.to_string()),
            ("break_glass", "on".to_string()),
        ]
    };
    let form_url = format!(
        "/targets/pg/actions/pg.backend.cancel?{}",
        serde_urlencoded::to_string([("pid", &pid), ("backend_start", &start)]).unwrap()
    );
    async fn post(b: &mut Browser, f: &[(&'static str, String)]) -> crate::helpers::Resp {
        let f: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
        b.post("/targets/pg/actions/pg.backend.cancel", &f).await
    }

    // Off (the default): refused with a sentence and a denied row; nothing runs.
    let off = app_on(&db.url, "", None).await;
    let mut ap = off.logged_in(Role::Approver).await;
    let form_page = ap.get(&form_url).await;
    assert!(!form_page.text.contains("name=\"break_glass\""));
    let r = post(&mut ap, &form("INC-41: checkout is down")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text.contains("Break-glass is off for pg"), "{}", r.text);
    assert_eq!(
        off.count_ops("approval.break_glass", Some("denied")).await,
        1
    );
    let made: i64 = sqlx::query_scalar("SELECT count(*) FROM approval_requests")
        .fetch_one(&off.db)
        .await
        .unwrap();
    assert_eq!(made, 0);
    assert!(!sleeping.is_finished());

    // On, with a webhook.
    let received = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = received.clone();
    let router = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let app = app_on(&db.url, "break_glass = true", Some(hook)).await;

    // Operators cannot break glass, not even by posting the field.
    let mut op = app.logged_in(Role::Operator).await;
    let r = post(&mut op, &form("INC-42")).await;
    assert!(
        r.text
            .contains("Only an approver or an admin can break glass"),
        "{}",
        r.text
    );
    assert_eq!(
        app.count_ops("approval.break_glass", Some("denied")).await,
        1
    );

    let mut ap = app.logged_in(Role::Approver).await;
    let form_page = ap.get(&form_url).await;
    assert!(
        form_page.text.contains("name=\"break_glass\""),
        "{}",
        form_page.text
    );
    let r = post(
        &mut ap,
        &form("INC-42: checkout is down, this query holds the lock"),
    )
    .await;
    let loc = r
        .location()
        .unwrap_or_else(|| panic!("{}", r.text))
        .to_string();
    let id: i64 = loc.rsplit('/').next().unwrap().parse().unwrap();
    assert_eq!(state_of(&app, id).await, "executed", "it ran at once");
    let finished = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("the query was cancelled")
        .unwrap();
    assert!(!finished, "the sleeping query ended by cancellation");
    let steps = ops(&app, id).await;
    assert!(
        steps.contains(&pair("approval.break_glass", "succeeded")),
        "{steps:?}"
    );
    assert!(
        steps.contains(&pair("pg.backend.cancel", "succeeded")),
        "{steps:?}"
    );
    let marked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM operations WHERE approval_id = $1 AND params ->> 'break_glass' = 'true'",
    )
    .bind(id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        marked as usize,
        steps.len(),
        "every row of it is marked break-glass"
    );
    for _ in 0..50 {
        if !received.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = received.lock().unwrap().clone();
    assert!(
        got.iter()
            .any(|m| m.contains("BREAK-GLASS") && m.contains("INC-42")),
        "{got:?}"
    );

    // Shown everywhere, and waiting for review on the overview.
    let page = ap.get(&loc).await;
    assert!(page.text.contains("badge break-glass"));
    assert!(page.text.contains("needs review"));
    assert!(
        !page.text.contains(&format!("/approvals/{id}/review")),
        "not for the invoker"
    );
    let list = ap.get("/approvals?tab=history").await;
    assert!(list.text.contains("badge break-glass"));
    let overview = op.get("/").await;
    assert!(overview.text.contains("class=\"target attention\""));
    assert!(overview.text.contains("break-glass run needs review"));
    assert!(
        overview.text.contains("badge break-glass"),
        "the log rows say so"
    );

    // The invoker cannot review it, not even in SQL.
    ap.post(&format!("/approvals/{id}/review"), &[("verdict", "accept")])
        .await;
    let page = ap.get(&loc).await;
    assert!(
        page.text.contains("another approver must review it"),
        "{}",
        page.text
    );
    assert_eq!(app.count_ops("approval.reviewed", Some("denied")).await, 1);
    let sql = sqlx::query(
        "UPDATE approval_requests SET reviewed_by = requested_by, reviewed_by_name = 'x', reviewed_at = now(),
                review = 'accepted' WHERE id = $1",
    )
    .bind(id)
    .execute(&app.db)
    .await
    .unwrap_err();
    assert!(sql.to_string().contains("no_self_review"), "{sql}");

    // Another approver reviews it: no longer waiting.
    let mut second = app.logged_in(Role::Approver).await;
    let page = second.get(&loc).await;
    assert!(page.text.contains(&format!("/approvals/{id}/review")));
    second
        .post(
            &format!("/approvals/{id}/review"),
            &[("verdict", "accept"), ("comment", "right call")],
        )
        .await;
    let page = second.get(&loc).await;
    assert!(page.text.contains("accepted</span> by"), "{}", page.text);
    let overview = op.get("/").await;
    assert!(!overview.text.contains("needs review"));
    assert!(!overview.text.contains("target attention"));
    assert!(dbops::audit::verify(&app.db).await.unwrap().ok());
    drop(off);
    db.drop().await;
}

#[tokio::test]
async fn a_handed_off_job_that_ends_interrupted_turns_its_target_red_with_links_to_the_job_and_the_restore()
 {
    let db = Scratch::new().await;
    let app = app_on(&db.url, "", None).await;
    let state = app.state();
    let ctx = AuditCtx::system();
    let op = user(&app, Role::Operator).await;
    let ap = user(&app, Role::Approver).await;
    let backup = good_backup_without_a_file(&app).await;
    let form = std::collections::BTreeMap::from([("backup_id".to_string(), backup.to_string())]);
    let req = approvals::request(&state, &ctx, &op, "pg", "restore.over", &form, "x")
        .await
        .unwrap();
    approvals::decide(&state, &ctx, &ap, req.id, Decision::Approve, "")
        .await
        .unwrap();
    // Its execution handed the work to a job, whose dbops then died.
    sqlx::query(
        "UPDATE approval_requests SET execution_started_at = now(), executed_by = $2, executed_by_name = 'x'
         WHERE id = $1",
    )
    .bind(req.id)
    .bind(op.id)
    .execute(&app.db)
    .await
    .unwrap();
    let job: i64 = sqlx::query_scalar(
        "INSERT INTO jobs (kind, target, params, status, approval_id, started_at, heartbeat_at)
         VALUES ('restore.run', 'pg', '{\"restore_id\": 777}', 'running', $1, now() - interval '1 hour',
                 now() - interval '1 hour')
         RETURNING id",
    )
    .bind(req.id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        dbops::jobs::sweep(&state, Duration::from_secs(60))
            .await
            .unwrap(),
        1
    );
    assert_eq!(state_of(&app, req.id).await, "failed");
    let mut viewer = app.logged_in(Role::Viewer).await;
    let page = viewer.get("/").await;
    assert!(
        page.text.contains("class=\"target attention\""),
        "{}",
        page.text
    );
    assert!(page.text.contains(&format!("href=\"/jobs/{job}\"")));
    assert!(
        page.text.contains("href=\"/restores/777\""),
        "the restore it worked on"
    );
    assert!(page.text.contains("dbops stopped while this was running"));
    db.drop().await;
}
