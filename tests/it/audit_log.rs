//! The operations log is append-only in the database itself, and `audit verify`
//! proves it whole.

use dbops::audit::{self, AuditCtx, Entry, Outcome};
use serde_json::json;

use crate::helpers::spawn_app;

async fn some_history(app: &crate::helpers::TestApp) -> Vec<i64> {
    let ctx = AuditCtx::system();
    let mut ids = vec![];
    for i in 0..5 {
        ids.push(
            audit::record(
                &app.db,
                &ctx,
                Entry::new("test.step")
                    .target("pg")
                    .params(json!({ "i": i })),
            )
            .await
            .unwrap(),
        );
    }
    ids
}

#[tokio::test]
async fn the_database_refuses_to_change_or_delete_finished_operations() {
    let app = spawn_app().await;
    let ids = some_history(&app).await;
    let id = ids[2];
    for sql in [
        format!("UPDATE operations SET outcome = 'failed' WHERE id = {id}"),
        format!("UPDATE operations SET actor_name = 'someone else' WHERE id = {id}"),
        format!("DELETE FROM operations WHERE id = {id}"),
        "DELETE FROM operations".to_string(),
        "TRUNCATE operations".to_string(),
        "UPDATE operations_chain_head SET last_seq = 1".to_string(),
    ] {
        let err = sqlx::query(&sql).execute(&app.db).await.expect_err(&sql);
        assert!(
            err.to_string().contains("append-only") || err.to_string().contains("chain head"),
            "{sql}: {err}"
        );
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM operations WHERE kind = 'test.step'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(n, 5);
}

#[tokio::test]
async fn a_running_operation_can_be_finished_once_and_then_never_again() {
    let app = spawn_app().await;
    let ctx = AuditCtx::system();
    let id = audit::start(&app.db, &ctx, Entry::new("test.long"))
        .await
        .unwrap();
    // While running, who and what cannot change either.
    let err = sqlx::query("UPDATE operations SET kind = 'test.other' WHERE id = $1")
        .bind(id)
        .execute(&app.db)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("append-only"));
    audit::finish(
        &app.db,
        id,
        Outcome::Succeeded,
        None,
        Some(json!({ "rows": 3 })),
    )
    .await
    .unwrap();
    let again = audit::finish(&app.db, id, Outcome::Failed, Some("late"), None).await;
    assert!(
        again.is_err(),
        "a finished operation cannot be finished again"
    );
    let (outcome, result): (String, serde_json::Value) =
        sqlx::query_as("SELECT outcome, result FROM operations WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(outcome, "succeeded");
    assert_eq!(result["rows"], 3);
    assert!(audit::verify(&app.db).await.unwrap().ok());
}

#[tokio::test]
async fn verify_passes_on_a_clean_log_and_names_the_row_a_superuser_altered() {
    let app = spawn_app().await;
    let ids = some_history(&app).await;
    let report = audit::verify(&app.db).await.unwrap();
    assert!(report.ok(), "{report:?}");
    assert!(report.checked >= 5);

    // A superuser switches the triggers off and rewrites history.
    let mut conn = app.db.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("UPDATE operations SET actor_name = 'nobody' WHERE id = $1")
        .bind(ids[1])
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("RESET session_replication_role")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    let report = audit::verify(&app.db).await.unwrap();
    let (bad, what) = report.first_problem.expect("tampering is found");
    assert_eq!(bad, Some(ids[1]));
    assert!(what.contains("altered"), "{what}");
}

#[tokio::test]
async fn verify_notices_removed_rows_in_the_middle_and_at_the_end() {
    let app = spawn_app().await;
    let ids = some_history(&app).await;
    let mut conn = app.db.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("DELETE FROM operations WHERE id = $1")
        .bind(ids[2])
        .execute(&mut *conn)
        .await
        .unwrap();
    let report = audit::verify(&app.db).await.unwrap();
    assert_eq!(
        report.first_problem.as_ref().unwrap().0,
        Some(ids[3]),
        "{report:?}"
    );

    let app = spawn_app().await;
    let ids = some_history(&app).await;
    let mut conn = app.db.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("DELETE FROM operations WHERE id = $1")
        .bind(ids[4])
        .execute(&mut *conn)
        .await
        .unwrap();
    let report = audit::verify(&app.db).await.unwrap();
    let (_, what) = report.first_problem.expect("a removed last row is found");
    assert!(what.contains("newest rows were removed"), "{what}");
}

#[tokio::test]
async fn secrets_in_parameters_never_reach_the_log() {
    let app = spawn_app().await;
    let id = audit::record(&app.db, &AuditCtx::system(), Entry::new("test.secret").params(json!({ "user": "x", "password": "hunter2hunter2", "target_url": "postgres://a:b@c/d" }))).await.unwrap();
    let params: serde_json::Value =
        sqlx::query_scalar("SELECT params FROM operations WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(params["password"], "[redacted]");
    assert_eq!(params["target_url"], "[redacted]");
    assert_eq!(params["user"], "x");
}

#[tokio::test]
async fn concurrent_writers_keep_one_unbroken_chain() {
    let app = spawn_app().await;
    let mut tasks = vec![];
    for t in 0..8 {
        let db = app.db.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                audit::record(
                    &db,
                    &AuditCtx::system(),
                    Entry::new("test.concurrent").params(json!({ "t": t, "i": i })),
                )
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let report = audit::verify(&app.db).await.unwrap();
    assert!(report.ok(), "{report:?}");
    assert!(report.checked >= 200);
}
