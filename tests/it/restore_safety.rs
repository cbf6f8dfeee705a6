//! Destructive work that cannot lose data (issue 13): a restore over a database is
//! restored beside it, checked and swapped in, so it never leaves a database half
//! restored — whether it succeeds, fails half-way, or its dbops is killed in the
//! swap — and it can be swapped back; backups something needs are pinned.

use std::collections::BTreeMap;

use dbops::{
    audit::AuditCtx,
    auth::{CurrentUser, Role},
    backups::run::{self, BackupRequest, Trigger},
    pg_tools::{DumpOptions, Format},
};
use sqlx::{Connection, Executor, PgConnection};

use crate::{
    backups::{app_config, row_counts, temp_dir, wait_ended, wait_for},
    helpers::{TestApp, services, spawn_app_with},
};

/// A database with a schema `shop` of nine tables (the walk-through).
async fn shop_db() -> (String, String) {
    let base = &services().await.pg_base;
    let name = format!("dbops_it_shop_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&format!("{base}/postgres"))
        .await
        .unwrap();
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    let url = format!("{base}/{name}");
    let mut c = PgConnection::connect(&url).await.unwrap();
    let mut sql = String::from("CREATE SCHEMA shop;");
    for (i, t) in [
        "customers",
        "orders",
        "order_lines",
        "products",
        "prices",
        "stock",
        "payments",
        "shipments",
        "returns",
    ]
    .iter()
    .enumerate()
    {
        sql.push_str(&format!(
            "CREATE TABLE shop.{t} (id int PRIMARY KEY, v text);
             INSERT INTO shop.{t} SELECT g, md5(g::text) FROM generate_series(1, {}) g;",
            100 + i * 10
        ));
    }
    c.execute(sql.as_str()).await.unwrap();
    (name, url)
}

async fn admin() -> PgConnection {
    PgConnection::connect(&format!("{}/postgres", services().await.pg_base))
        .await
        .unwrap()
}

async fn exists(name: &str) -> bool {
    sqlx::query_scalar::<_, i32>("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut admin().await)
        .await
        .unwrap()
        .is_some()
}

async fn drop_db(name: &str) {
    let _ = admin()
        .await
        .execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str())
        .await;
}

/// Every table's rows, as text, in key order: the database's whole contents.
async fn snapshot(url: &str) -> Vec<(String, i64, String)> {
    let mut c = PgConnection::connect(url).await.unwrap();
    let mut out = vec![];
    for (table, n) in row_counts(url).await {
        let sum: String = sqlx::query_scalar(&format!(
            "SELECT coalesce(md5(string_agg(t::text, '' ORDER BY t::text)), '') FROM {table} t"
        ))
        .fetch_one(&mut c)
        .await
        .unwrap();
        out.push((table, n, sum));
    }
    out
}

async fn good_backup(app: &TestApp, target: &str, test_restore: bool) -> i64 {
    let id = run::request(
        &app.state(),
        &AuditCtx::system(),
        target,
        Trigger::Person,
        BackupRequest {
            options: Some(DumpOptions {
                format: Format::Custom,
                ..Default::default()
            }),
            test_restore,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (status, error) = wait_for(app, id).await;
    assert_eq!(status, "good", "{error:?}");
    id
}

fn form(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Asks for `kind` as an operator, approves it as an approver, runs it; returns
/// the request's id and the run's outcome.
async fn approved(
    app: &TestApp,
    target: &str,
    kind: &str,
    fields: &[(&str, &str)],
) -> (i64, Result<dbops::approvals::Request, String>) {
    let state = app.state();
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let op: CurrentUser = app.current_user(&format!("op-{tag}"), Role::Operator).await;
    let ap: CurrentUser = app.current_user(&format!("ap-{tag}"), Role::Approver).await;
    let ctx = AuditCtx::system();
    let req = dbops::approvals::request(&state, &ctx, &op, target, kind, &form(fields), "test")
        .await
        .unwrap();
    if req.state == "pending" {
        dbops::approvals::decide(
            &state,
            &ctx,
            &ap,
            req.id,
            dbops::approvals::Decision::Approve,
            "ok",
        )
        .await
        .unwrap();
    }
    let ran = dbops::approvals::execute(&state, &ctx, &op, req.id)
        .await
        .map_err(|e| e.to_string());
    (req.id, ran)
}

/// Runs an approved restore over `database` to its end; returns the restore's
/// id, status and error.
async fn restore_over(
    app: &TestApp,
    backup: i64,
    fields: &[(&str, &str)],
) -> (i64, String, Option<String>) {
    let id = backup.to_string();
    let mut all = vec![("backup_id", id.as_str())];
    all.extend_from_slice(fields);
    let (req, ran) = approved(app, "src", "restore.over", &all).await;
    let ran = ran.unwrap();
    let rid: i64 = sqlx::query_scalar(
        "SELECT r.id FROM restores r JOIN jobs j ON j.id = r.job_id WHERE j.approval_id = $1",
    )
    .bind(req)
    .fetch_one(&app.db)
    .await
    .unwrap_or_else(|_| {
        panic!(
            "request {req} queued no restore: {} {:?}",
            ran.state, ran.error
        )
    });
    let (status, error) = wait_ended(app, "restores", rid).await;
    (rid, status, error)
}

#[tokio::test]
async fn a_restore_over_a_schema_that_gained_a_table_keeps_every_table_and_can_be_swapped_back() {
    let (name, url) = shop_db().await;
    let dir = temp_dir("swap");
    let app = spawn_app_with(
        &app_config("src", "SRC", "production", &dir, ""),
        &[("SRC", url.clone())],
    )
    .await;
    let backup = good_backup(&app, "src", true).await;
    let in_backup = snapshot(&url).await;
    assert_eq!(in_backup.len(), 9);
    // The live database moves on: one more table in the schema the backup
    // holds (what made pg_restore --clean fail at DROP SCHEMA), and changed rows.
    let mut c = PgConnection::connect(&url).await.unwrap();
    c.execute(
        "CREATE TABLE shop.added_later (id int PRIMARY KEY REFERENCES shop.customers(id));
         INSERT INTO shop.added_later VALUES (1), (2);
         DELETE FROM shop.orders WHERE id > 10;",
    )
    .await
    .unwrap();
    drop(c);
    let before = snapshot(&url).await;

    let (rid, status, error) = restore_over(&app, backup, &[("end_sessions", "on")]).await;
    assert_eq!(status, "succeeded", "{error:?}");
    // The name now holds exactly the backup: all nine tables, every row.
    assert_eq!(snapshot(&url).await, in_backup);
    // The database it replaced is kept whole, with the table the backup lacks.
    let previous = format!("{name}_before_restore_{rid}");
    let previous_url = format!("{}/{previous}", services().await.pg_base);
    assert_eq!(snapshot(&previous_url).await, before);
    assert!(!exists(&format!("{name}_restoring_{rid}")).await);

    // The safety backup is labelled, linked both ways and pinned while the
    // previous database is kept.
    let safety: i64 = sqlx::query_scalar("SELECT safety_backup_id FROM restores WHERE id = $1")
        .bind(rid)
        .fetch_one(&app.db)
        .await
        .unwrap();
    let mut op = app.logged_in(Role::Operator).await;
    let page = op.get(&format!("/backups/{safety}")).await;
    assert!(page.text.contains("safety backup"), "{}", page.text);
    assert!(page.text.contains(&format!("/restores/{rid}")));
    assert!(
        page.text.contains(&format!(
            "the safety backup of restore #{rid}, whose previous database {previous} is kept"
        )),
        "{}",
        page.text
    );
    let page = op.get(&format!("/restores/{rid}")).await;
    assert!(page.text.contains(&previous), "{}", page.text);
    assert!(
        page.text.contains(&format!(
            "/targets/src/actions/restore.swap_back?restore_id={rid}"
        )),
        "{}",
        page.text
    );

    // Swap back: the previous database has its name again, the restored one is
    // kept beside it.
    let (_, ran) = approved(
        &app,
        "src",
        "restore.swap_back",
        &[("restore_id", &rid.to_string()), ("end_sessions", "on")],
    )
    .await;
    let ran = ran.unwrap();
    assert_eq!(ran.state, "executed", "{:?}", ran.error);
    assert_eq!(snapshot(&url).await, before);
    let restored = format!("{name}_restored_{rid}");
    assert_eq!(
        snapshot(&format!("{}/{restored}", services().await.pg_base)).await,
        in_backup
    );
    assert!(!exists(&previous).await);
    // A second swap back is refused; dropping the kept (restored) one works.
    let (_, again) = approved(
        &app,
        "src",
        "restore.swap_back",
        &[("restore_id", &rid.to_string())],
    )
    .await;
    let again = again.unwrap();
    assert_eq!(again.state, "failed");
    assert!(again.error.unwrap().contains("Nothing was changed"));
    let (_, dropped) = approved(
        &app,
        "src",
        "restore.drop_previous",
        &[("restore_id", &rid.to_string())],
    )
    .await;
    assert_eq!(dropped.unwrap().state, "executed");
    assert!(!exists(&restored).await);
    assert_eq!(
        snapshot(&url).await,
        before,
        "the live database is untouched"
    );
    drop_db(&name).await;
}

#[tokio::test]
async fn a_restore_over_that_fails_half_way_leaves_the_live_database_exactly_as_it_was() {
    let (name, url) = shop_db().await;
    let dir = temp_dir("swap-fail");
    let app = spawn_app_with(
        &app_config("src", "SRC", "production", &dir, ""),
        &[("SRC", url.clone())],
    )
    .await;
    // Half the tables belong to a role that is gone by the time of the
    // restore: pg_restore creates the tables, loads rows, then fails at
    // ALTER TABLE … OWNER TO (with "keep owners"), half-way.
    let role = format!(
        "dbops_it_owner_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut a = admin().await;
    a.execute(format!("CREATE ROLE {role}").as_str())
        .await
        .unwrap();
    let mut c = PgConnection::connect(&url).await.unwrap();
    for t in ["payments", "shipments", "returns"] {
        c.execute(format!("ALTER TABLE shop.{t} OWNER TO {role}").as_str())
            .await
            .unwrap();
    }
    let backup = good_backup(&app, "src", false).await;
    c.execute(format!("REASSIGN OWNED BY {role} TO postgres").as_str())
        .await
        .unwrap();
    a.execute(format!("DROP ROLE {role}").as_str())
        .await
        .unwrap();
    c.execute("UPDATE shop.orders SET v = 'changed since the backup' WHERE id < 5")
        .await
        .unwrap();
    drop(c);
    let before = snapshot(&url).await;

    let (rid, status, error) = restore_over(
        &app,
        backup,
        &[("end_sessions", "on"), ("keep_owner", "on")],
    )
    .await;
    assert_eq!(status, "failed");
    let error = error.unwrap();
    assert!(error.contains(&role), "{error}");
    assert!(
        error.contains(&format!("{name} was not touched")),
        "{error}"
    );
    assert_eq!(snapshot(&url).await, before, "nothing was lost");
    assert!(
        !exists(&format!("{name}_restoring_{rid}")).await,
        "the copy is dropped"
    );
    assert!(!exists(&format!("{name}_before_restore_{rid}")).await);
    assert_eq!(app.count_ops("restore.over", Some("failed")).await, 1);

    // In place, in one transaction: the same failure rolls back whole.
    let (_, status, error) = restore_over(
        &app,
        backup,
        &[
            ("end_sessions", "on"),
            ("keep_owner", "on"),
            ("single_transaction", "on"),
        ],
    )
    .await;
    assert_eq!(status, "failed");
    assert!(error.unwrap().contains("rolled back"));
    assert_eq!(
        snapshot(&url).await,
        before,
        "nothing was lost in place either"
    );
    drop_db(&name).await;
}

#[tokio::test]
async fn a_restore_over_that_cannot_swap_is_refused_before_anything_is_touched() {
    let (name, url) = shop_db().await;
    // dbops connects as a role that may not create databases.
    let role = format!(
        "dbops_it_nocreate_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut a = admin().await;
    a.execute(format!("CREATE ROLE {role} LOGIN").as_str())
        .await
        .unwrap();
    a.execute(format!("ALTER DATABASE {name} OWNER TO {role}").as_str())
        .await
        .unwrap();
    let mut c = PgConnection::connect(&url).await.unwrap();
    c.execute(format!("REASSIGN OWNED BY postgres TO {role}").as_str())
        .await
        .ok();
    for t in [
        "customers",
        "orders",
        "order_lines",
        "products",
        "prices",
        "stock",
        "payments",
        "shipments",
        "returns",
    ] {
        c.execute(format!("ALTER TABLE shop.{t} OWNER TO {role}").as_str())
            .await
            .unwrap();
    }
    c.execute(format!("ALTER SCHEMA shop OWNER TO {role}").as_str())
        .await
        .unwrap();
    drop(c);
    let base = services()
        .await
        .pg_base
        .replacen("postgres@", &format!("{role}@"), 1);
    let as_role = format!("{base}/{name}");
    let dir = temp_dir("swap-nocreate");
    let app = spawn_app_with(
        &app_config("src", "SRC", "production", &dir, ""),
        &[("SRC", as_role.clone())],
    )
    .await;
    let backup = good_backup(&app, "src", false).await;
    let before = snapshot(&url).await;
    let (rid, status, error) = restore_over(&app, backup, &[("end_sessions", "on")]).await;
    assert_eq!(status, "failed");
    let error = error.unwrap();
    assert!(error.contains("CREATEDB"), "{error}");
    assert!(error.contains("in one transaction"), "{error}");
    assert!(error.contains("was not touched"), "{error}");
    assert_eq!(snapshot(&url).await, before);
    let safety: Option<i64> =
        sqlx::query_scalar("SELECT safety_backup_id FROM restores WHERE id = $1")
            .bind(rid)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(safety, None, "refused before even the safety backup");
    drop_db(&name).await;
    let _ = a
        .execute(format!("DROP ROLE IF EXISTS {role}").as_str())
        .await;
}

#[tokio::test]
async fn retention_keeps_a_pinned_backup_and_one_an_open_request_needs() {
    let (name, url) = shop_db().await;
    let dir = temp_dir("pins");
    let app = spawn_app_with(
        &app_config(
            "src",
            "SRC",
            "production",
            &dir,
            "[postgres.backup]\nkeep_last = 1\n",
        ),
        &[("SRC", url.clone())],
    )
    .await;
    // Retention runs after every good backup (keep the newest one).
    let pinned = good_backup(&app, "src", false).await;
    // A person keeps it, through the page.
    let mut op = app.logged_in(Role::Operator).await;
    op.get(&format!("/backups/{pinned}")).await;
    let r = op
        .post(
            &format!("/backups/{pinned}/pin"),
            &[("reason", "before the 3.2 migration"), ("until", "")],
        )
        .await;
    assert_eq!(
        r.location(),
        Some(format!("/backups/{pinned}").as_str()),
        "{}",
        r.text
    );
    let page = op.get(&format!("/backups/{pinned}")).await;
    assert!(
        page.text.contains("before the 3.2 migration"),
        "{}",
        page.text
    );
    let requested = good_backup(&app, "src", false).await;
    // Another is named by a pending restore request.
    let ctx = AuditCtx::system();
    let someone = app.current_user("asker", Role::Operator).await;
    dbops::approvals::request(
        &app.state(),
        &ctx,
        &someone,
        "src",
        "restore.over",
        &form(&[("backup_id", &requested.to_string())]),
        "bad deploy",
    )
    .await
    .unwrap();
    let plain = good_backup(&app, "src", false).await;
    let newest = good_backup(&app, "src", false).await;
    let target = app.state().targets.get("src").unwrap();
    dbops::schedules::prune(&app.state(), &target)
        .await
        .unwrap();
    let status = |id: i64| {
        let db = app.db.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT status FROM backups WHERE id = $1")
                .bind(id)
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };
    assert_eq!(status(pinned).await, "good");
    assert_eq!(status(requested).await, "good");
    assert_eq!(status(plain).await, "deleted");
    assert_eq!(status(newest).await, "good");
    let history = op.get("/targets/src/backups").await;
    assert!(history.text.contains("pinned"), "{}", history.text);
    // An approved deletion of a pinned backup is refused and deletes nothing.
    let (_, ran) = approved(
        &app,
        "src",
        "backup.delete",
        &[("backup_id", &pinned.to_string())],
    )
    .await;
    let ran = ran.unwrap();
    assert_eq!(ran.state, "failed");
    assert!(ran.error.unwrap().contains("before the 3.2 migration"));
    assert_eq!(status(pinned).await, "good");
    // Released, retention may take it.
    let pin: i64 = sqlx::query_scalar("SELECT id FROM backup_pins WHERE backup_id = $1")
        .bind(pinned)
        .fetch_one(&app.db)
        .await
        .unwrap();
    op.post(&format!("/backups/{pinned}/pins/{pin}/release"), &[])
        .await;
    dbops::schedules::prune(&app.state(), &target)
        .await
        .unwrap();
    assert_eq!(status(pinned).await, "deleted");
    assert_eq!(status(requested).await, "good", "still requested");
    drop_db(&name).await;
}
