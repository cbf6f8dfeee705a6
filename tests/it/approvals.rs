//! Approvals: requests, decisions by someone else, exactly-once execution with
//! exactly the approved parameters, and a log row for every step.

use std::{
    collections::BTreeMap,
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
    approval_steps as steps, pair, services, spawn_app, spawn_app_with, state_of, user,
};

/// A backend sleeping in `pg_sleep`, for actions to act on.
pub struct Sleeper {
    pub pid: i32,
    pub backend_start: String,
    task: tokio::task::JoinHandle<Result<(), sqlx::Error>>,
}

pub async fn sleeper() -> Sleeper {
    let base = &services().await.pg_base;
    let marker = format!("dbops-approval-test-{}", uuid::Uuid::new_v4().simple());
    let mut conn = PgConnection::connect(&format!("{base}/postgres"))
        .await
        .unwrap();
    // A statement timeout so that a test that fails before stop() leaves nothing
    // sleeping for long.
    sqlx::query("SET statement_timeout = '120s'")
        .execute(&mut conn)
        .await
        .unwrap();
    let sql = format!("SELECT pg_sleep(600) /* {marker} */");
    let task = tokio::spawn(async move { sqlx::query(&sql).execute(&mut conn).await.map(|_| ()) });
    let mut watcher = PgConnection::connect(&format!("{base}/postgres"))
        .await
        .unwrap();
    for _ in 0..100 {
        let row: Option<(i32, String)> = sqlx::query_as(
            "SELECT pid, to_char(backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
             FROM pg_stat_activity WHERE query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
        )
        .bind(&marker)
        .fetch_optional(&mut watcher)
        .await
        .unwrap();
        if let Some((pid, backend_start)) = row {
            return Sleeper {
                pid,
                backend_start,
                task,
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the sleeping query never showed up");
}

impl Sleeper {
    fn form(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("pid".to_string(), self.pid.to_string()),
            ("backend_start".to_string(), self.backend_start.clone()),
        ])
    }

    pub async fn alive(&self) -> bool {
        let base = &services().await.pg_base;
        let mut c = PgConnection::connect(&format!("{base}/postgres"))
            .await
            .unwrap();
        sqlx::query_scalar::<_, bool>(
            "SELECT exists(SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active')",
        )
        .bind(self.pid)
        .fetch_one(&mut c)
        .await
        .unwrap()
    }

    pub async fn stop(self) {
        let base = &services().await.pg_base;
        let mut c = PgConnection::connect(&format!("{base}/postgres"))
            .await
            .unwrap();
        let _ = sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(self.pid)
            .execute(&mut c)
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

#[tokio::test]
async fn a_request_is_approved_by_someone_else_and_runs_once_with_every_step_logged() {
    let app = spawn_app().await;
    let state = app.state();
    let ctx = AuditCtx::system();
    let op = user(&app, Role::Operator).await;
    let ap = user(&app, Role::Approver).await;
    let s = sleeper().await;

    let req = approvals::request(
        &state,
        &ctx,
        &op,
        "pg",
        "pg.backend.cancel",
        &s.form(),
        "runaway report query",
    )
    .await
    .unwrap();
    assert_eq!(req.state, "pending", "production needs an approver");
    assert!(s.alive().await, "nothing runs before approval");

    let err = approvals::decide(&state, &ctx, &op, req.id, Decision::Approve, "")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Only approvers"), "{err}");
    let approved = approvals::decide(&state, &ctx, &ap, req.id, Decision::Approve, "go ahead")
        .await
        .unwrap();
    assert_eq!(approved.state, "approved");

    let done = approvals::execute(&state, &ctx, &op, req.id).await.unwrap();
    assert_eq!(done.state, "executed", "{:?}", done.error);
    let again = approvals::execute(&state, &ctx, &op, req.id)
        .await
        .unwrap_err();
    assert!(again.to_string().contains("only once"), "{again}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!s.alive().await, "the query was cancelled");
    s.stop().await;

    assert_eq!(
        steps(&app, req.id).await,
        vec![
            pair("approval.requested", "succeeded"),
            pair("approval.approved", "denied"),
            pair("approval.approved", "succeeded"),
            pair("pg.backend.cancel", "succeeded"),
            pair("approval.execute", "denied"),
        ]
    );
}

#[tokio::test]
async fn the_requester_cannot_approve_their_own_request_not_even_in_sql() {
    let app = spawn_app().await;
    let state = app.state();
    let ctx = AuditCtx::system();
    let ap = user(&app, Role::Approver).await;
    let s = sleeper().await;
    let req = approvals::request(
        &state,
        &ctx,
        &ap,
        "pg",
        "pg.backend.cancel",
        &s.form(),
        "mine",
    )
    .await
    .unwrap();
    let err = approvals::decide(&state, &ctx, &ap, req.id, Decision::Approve, "")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("your own request"), "{err}");
    let sql = sqlx::query("UPDATE approval_requests SET state = 'approved', decided_by = requested_by, decided_by_name = 'x', decided_at = now() WHERE id = $1")
        .bind(req.id)
        .execute(&app.db)
        .await
        .unwrap_err();
    assert!(sql.to_string().contains("no_self_approval"), "{sql}");
    assert_eq!(state_of(&app, req.id).await, "pending");
    let err = approvals::execute(&state, &ctx, &ap, req.id)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("waiting for an approver"));
    assert!(s.alive().await);
    s.stop().await;
}

#[tokio::test]
async fn rejected_cancelled_and_expired_requests_never_run() {
    let app = spawn_app().await;
    let state = app.state();
    let ctx = AuditCtx::system();
    let op = user(&app, Role::Operator).await;
    let ap = user(&app, Role::Approver).await;
    let s = sleeper().await;

    let rejected = approvals::request(&state, &ctx, &op, "pg", "pg.backend.cancel", &s.form(), "a")
        .await
        .unwrap();
    let err = approvals::decide(&state, &ctx, &ap, rejected.id, Decision::Reject, "")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("comment is required"));
    approvals::decide(
        &state,
        &ctx,
        &ap,
        rejected.id,
        Decision::Reject,
        "not during the sale",
    )
    .await
    .unwrap();

    let cancelled =
        approvals::request(&state, &ctx, &op, "pg", "pg.backend.cancel", &s.form(), "b")
            .await
            .unwrap();
    let err = approvals::cancel(&state, &ctx, &ap, cancelled.id)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Only the requester"));
    approvals::cancel(&state, &ctx, &op, cancelled.id)
        .await
        .unwrap();

    let expired = approvals::request(&state, &ctx, &op, "pg", "pg.backend.cancel", &s.form(), "c")
        .await
        .unwrap();
    approvals::decide(&state, &ctx, &ap, expired.id, Decision::Approve, "")
        .await
        .unwrap();
    // Time passes (a superuser moves the clock of this row back).
    let mut conn = app.db.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("UPDATE approval_requests SET created_at = now() - interval '2 hours', expires_at = now() - interval '1 hour' WHERE id = $1")
        .bind(expired.id)
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);

    for (id, why) in [
        (rejected.id, "rejected"),
        (cancelled.id, "cancelled"),
        (expired.id, "expired"),
    ] {
        let err = approvals::execute(&state, &ctx, &op, id).await.unwrap_err();
        assert!(err.to_string().contains(why), "{id}: {err}");
        assert_eq!(state_of(&app, id).await, why);
    }
    assert!(s.alive().await, "none of them ran");
    assert!(
        steps(&app, expired.id)
            .await
            .contains(&pair("approval.expired", "succeeded"))
    );
    assert!(
        steps(&app, rejected.id)
            .await
            .contains(&pair("approval.rejected", "succeeded"))
    );
    assert!(
        steps(&app, cancelled.id)
            .await
            .contains(&pair("approval.cancelled", "succeeded"))
    );
    s.stop().await;
}

#[tokio::test]
async fn parameters_changed_after_approval_are_never_what_runs() {
    let app = spawn_app().await;
    let state = app.state();
    let ctx = AuditCtx::system();
    let op = user(&app, Role::Operator).await;
    let ap = user(&app, Role::Approver).await;
    let victim = sleeper().await;
    let other = sleeper().await;
    let req = approvals::request(
        &state,
        &ctx,
        &op,
        "pg",
        "pg.backend.cancel",
        &victim.form(),
        "x",
    )
    .await
    .unwrap();
    approvals::decide(&state, &ctx, &ap, req.id, Decision::Approve, "")
        .await
        .unwrap();

    let swap = format!(
        "{{\"pid\": {}, \"backend_start\": \"{}\"}}",
        other.pid, other.backend_start
    );
    let err = sqlx::query("UPDATE approval_requests SET params = $2::jsonb WHERE id = $1")
        .bind(req.id)
        .bind(&swap)
        .execute(&app.db)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot change"), "{err}");

    // Even a superuser who switches the guard off only gets a refusal at run time.
    let mut conn = app.db.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("UPDATE approval_requests SET params = $2::jsonb WHERE id = $1")
        .bind(req.id)
        .bind(&swap)
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    let done = approvals::execute(&state, &ctx, &op, req.id).await.unwrap();
    assert_eq!(done.state, "failed");
    assert!(done.error.unwrap().contains("hash mismatch"));
    assert!(
        victim.alive().await && other.alive().await,
        "nothing was signalled"
    );
    victim.stop().await;
    other.stop().await;
}

#[tokio::test]
async fn two_concurrent_executions_run_the_action_once() {
    let app = spawn_app().await;
    let state = app.state();
    let ctx = AuditCtx::system();
    let op = user(&app, Role::Operator).await;
    let ap = user(&app, Role::Approver).await;
    let s = sleeper().await;
    let req = approvals::request(&state, &ctx, &op, "pg", "pg.backend.cancel", &s.form(), "x")
        .await
        .unwrap();
    approvals::decide(&state, &ctx, &ap, req.id, Decision::Approve, "")
        .await
        .unwrap();
    let runs: Vec<_> = (0..6)
        .map(|_| {
            let (state, ctx, op) = (state.clone(), ctx.clone(), op.clone());
            tokio::spawn(async move { approvals::execute(&state, &ctx, &op, req.id).await })
        })
        .collect();
    let mut ok = 0;
    for r in runs {
        if r.await.unwrap().is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, 1, "exactly one execution");
    let ran: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM operations WHERE approval_id = $1 AND kind = 'pg.backend.cancel'",
    )
    .bind(req.id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(ran, 1);
    s.stop().await;
}

#[tokio::test]
async fn on_a_dev_target_the_request_is_approved_automatically_and_logged_the_same_way() {
    let s_services = services().await;
    let app = spawn_app_with(
        "[[postgres]]\nname = \"devdb\"\nurl_env = \"PG\"\npolicy = \"dev\"\n",
        &[("PG", format!("{}/postgres", s_services.pg_base))],
    )
    .await;
    let s = sleeper().await;
    let mut b = app.logged_in(Role::Operator).await;
    let path = format!(
        "/targets/devdb/actions/pg.backend.cancel?pid={}&backend_start={}",
        s.pid,
        urlencode(&s.backend_start)
    );
    let page = b.get(&path).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text);
    assert!(page.text.contains("needs no second person"));
    let r = b
        .post(
            "/targets/devdb/actions/pg.backend.cancel",
            &[
                ("pid", &s.pid.to_string()),
                ("backend_start", &s.backend_start),
                ("reason", "stuck migration"),
            ],
        )
        .await;
    let location = r.location().expect("redirect to the request").to_string();
    let id: i64 = location.rsplit('/').next().unwrap().parse().unwrap();
    assert_eq!(state_of(&app, id).await, "executed");
    assert!(
        b.get(&location)
            .await
            .text
            .contains("Approved automatically")
    );
    assert_eq!(
        steps(&app, id).await,
        vec![
            pair("approval.requested", "succeeded"),
            pair("approval.approved", "succeeded"),
            pair("pg.backend.cancel", "succeeded")
        ]
    );
    s.stop().await;
}

#[tokio::test]
async fn over_http_an_operator_asks_an_approver_approves_and_the_operator_runs_it() {
    let app = spawn_app().await;
    let s = sleeper().await;
    let mut op = app.logged_in(Role::Operator).await;
    let mut ap = app.logged_in(Role::Approver).await;
    let mut viewer = app.logged_in(Role::Viewer).await;

    let fields = [
        ("pid", s.pid.to_string()),
        ("backend_start", s.backend_start.clone()),
    ];
    let no_reason = op
        .post(
            "/targets/pg/actions/pg.backend.cancel",
            &[("pid", &fields[0].1), ("backend_start", &fields[1].1)],
        )
        .await;
    assert_eq!(no_reason.status, StatusCode::BAD_REQUEST);
    assert!(no_reason.text.contains("reason is required"));
    let bad = op
        .post(
            "/targets/pg/actions/pg.backend.cancel",
            &[
                ("pid", "-3"),
                ("backend_start", "yesterday"),
                ("reason", "x"),
            ],
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    let r = op
        .post(
            "/targets/pg/actions/pg.backend.cancel",
            &[
                ("pid", &fields[0].1),
                ("backend_start", &fields[1].1),
                ("reason", "blocking the nightly import"),
            ],
        )
        .await;
    let location = r.location().unwrap().to_string();
    let id: i64 = location.rsplit('/').next().unwrap().parse().unwrap();
    assert_eq!(state_of(&app, id).await, "pending");

    // The approver sees it waiting, with a count in the navigation.
    let list = ap.get("/approvals").await;
    assert!(list.text.contains("blocking the nightly import"));
    assert!(
        list.text.contains("class=\"count\""),
        "a pending count in the navigation"
    );
    // Viewers cannot approve, operators cannot approve, the requester cannot approve.
    assert_eq!(
        viewer
            .post(&format!("/approvals/{id}/approve"), &[])
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        op.post(&format!("/approvals/{id}/approve"), &[])
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        op.post(&format!("/approvals/{id}/execute"), &[])
            .await
            .location(),
        Some(location.as_str())
    );
    assert!(
        op.get(&location)
            .await
            .text
            .contains("still waiting for an approver")
    );

    let page = ap.get(&location).await;
    assert!(
        page.text.contains(&format!("pg_cancel_backend({})", s.pid)),
        "the approver sees exactly what runs"
    );
    ap.post(
        &format!("/approvals/{id}/approve"),
        &[("comment", "ok, be quick")],
    )
    .await;
    op.get(&location).await;
    op.post(&format!("/approvals/{id}/execute"), &[]).await;
    let done = op.get(&location).await;
    assert!(done.text.contains("Done."), "{}", done.text);
    assert_eq!(state_of(&app, id).await, "executed");
    s.stop().await;
}

#[tokio::test]
async fn webhooks_announce_requests_and_decisions_and_a_dead_webhook_blocks_nothing() {
    // A local receiver standing in for Slack.
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

    let base = &services().await.pg_base;
    let toml = "[notifications]\nwebhook_url_env = \"HOOK\"\n[[postgres]]\nname = \"pg\"\nurl_env = \"PG\"\npolicy = \"production\"\n";
    let app = spawn_app_with(toml, &[("PG", format!("{base}/postgres")), ("HOOK", hook)]).await;
    let state = app.state();
    let ctx = AuditCtx::system();
    let op = user(&app, Role::Operator).await;
    let ap = user(&app, Role::Approver).await;
    let s = sleeper().await;
    let req = approvals::request(
        &state,
        &ctx,
        &op,
        "pg",
        "pg.backend.cancel",
        &s.form(),
        "webhook check",
    )
    .await
    .unwrap();
    approvals::decide(&state, &ctx, &ap, req.id, Decision::Reject, "no")
        .await
        .unwrap();
    for _ in 0..50 {
        if received.lock().unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "{got:?}");
    let first: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
    assert!(first["text"].as_str().unwrap().contains("webhook check"));
    assert!(got[1].contains("rejected"));

    // A webhook that refuses connections: the request still goes through.
    let dead = spawn_app_with(
        toml,
        &[
            ("PG", format!("{base}/postgres")),
            ("HOOK", "http://127.0.0.1:1/hook".into()),
        ],
    )
    .await;
    let dstate = dead.state();
    let op2 = user(&dead, Role::Operator).await;
    let req = approvals::request(
        &dstate,
        &ctx,
        &op2,
        "pg",
        "pg.backend.cancel",
        &s.form(),
        "still works",
    )
    .await
    .unwrap();
    assert_eq!(req.state, "pending");
    for _ in 0..50 {
        if dead.count_ops("notify.webhook", Some("failed")).await > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        dead.count_ops("notify.webhook", Some("failed")).await,
        1,
        "the failure is logged"
    );
    s.stop().await;
}

pub fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("x", s)])
        .unwrap()
        .trim_start_matches("x=")
        .to_string()
}

#[tokio::test]
async fn an_execution_whose_dbops_died_ends_failed_with_its_operation_interrupted() {
    let app = spawn_app().await;
    let state = app.state();
    let ctx = AuditCtx::system();
    let op = user(&app, Role::Operator).await;
    let ap = user(&app, Role::Approver).await;
    let s = sleeper().await;
    let req = approvals::request(&state, &ctx, &op, "pg", "pg.backend.cancel", &s.form(), "x")
        .await
        .unwrap();
    approvals::decide(&state, &ctx, &ap, req.id, Decision::Approve, "")
        .await
        .unwrap();
    // A dbops claimed the execution and wrote its running operation, then died.
    sqlx::query("UPDATE approval_requests SET execution_started_at = now() - interval '2 hours', executed_by = $2, executed_by_name = 'x' WHERE id = $1")
        .bind(req.id)
        .bind(op.id)
        .execute(&app.db)
        .await
        .unwrap();
    dbops::audit::start(
        &app.db,
        &ctx,
        dbops::audit::Entry::new("pg.backend.cancel").approval(req.id),
    )
    .await
    .unwrap();
    let ended = approvals::end_orphaned_executions(&app.db, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(ended, 1);
    assert_eq!(state_of(&app, req.id).await, "failed");
    assert!(
        steps(&app, req.id)
            .await
            .contains(&pair("pg.backend.cancel", "interrupted"))
    );
    assert!(dbops::audit::verify(&app.db).await.unwrap().ok());
    s.stop().await;
}
