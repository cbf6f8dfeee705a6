//! Point-in-time recovery (issue 17), against a throwaway PostgreSQL with
//! `wal_level = replica`: base backups taken with the machine's
//! `pg_basebackup` and verified, recoveries on a scratch server to a time, a
//! restore point and "just before operation #N" (an approved restore over a
//! database did the drop), copies into a new database, the window refused
//! outside, the pages and who may use them.
//!
//! The WAL is archived by dbops itself (`pg_receivewal` over its slot, see
//! pitr_archive.rs), as in production.

use std::{path::Path, time::Duration};

use chrono::Utc;
use dbops::{
    audit::AuditCtx,
    auth::Role,
    backups::run::{self, BackupRequest, Trigger},
    devcluster::PgCluster,
    pg_tools::{DumpOptions, Format},
    pitr::{
        Lsn, base_backups,
        recover::{self, Point},
        restore_points,
    },
};
use sqlx::{Connection, Executor, PgConnection};

use crate::{
    backups::{temp_dir, wait_ended, wait_for},
    helpers::{TestApp, spawn_app_with},
};

/// A throwaway cluster (`wal_level = replica`, the default).
async fn cluster() -> PgCluster {
    tokio::task::spawn_blocking(dbops::devcluster::ensure_binaries)
        .await
        .unwrap()
        .unwrap();
    let base = std::path::PathBuf::from(format!(
        "/tmp/dbops-pitr-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    ));
    PgCluster::start_with(&base, "wal_level = replica\nmax_wal_senders = 10\n")
        .await
        .unwrap()
}

fn config(dir: &Path) -> String {
    format!(
        "[backups]\ndirectory = \"{}\"\nlease_seconds = 3\n\
         [[postgres]]\nname = \"src\"\nurl_env = \"SRC\"\npolicy = \"production\"\n\
         [postgres.archive]\nenabled = true\nkeep_base_backups = 2\n",
        dir.display()
    )
}

/// Waits (up to a minute) until dbops' archiver streams the target.
async fn wait_streaming(app: &TestApp) {
    for _ in 0..600 {
        let st: Option<String> =
            sqlx::query_scalar("SELECT state FROM wal_streams WHERE target = 'src'")
                .fetch_optional(&app.db)
                .await
                .unwrap();
        if st.as_deref() == Some("streaming") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the archive did not start streaming src");
}

/// Switches to a new WAL segment and waits until dbops' archiver has stored
/// everything up to the switch.
async fn archive_now(app: &TestApp, cluster: &PgCluster) {
    let mut c = PgConnection::connect(&cluster.url("postgres"))
        .await
        .unwrap();
    let pos: String = sqlx::query_scalar("SELECT pg_switch_wal()::text")
        .fetch_one(&mut c)
        .await
        .unwrap();
    let pos = Lsn::parse(&pos).unwrap();
    let state = app.state();
    let target = state.targets.get("src").unwrap();
    for _ in 0..600 {
        let st = dbops::pitr::archive::status(&state, &target, false)
            .await
            .unwrap();
        if st.stored_lsn.is_some_and(|l| l >= pos) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the archive did not store the WAL up to {pos}");
}

async fn base_backup(app: &TestApp) -> base_backups::BaseBackup {
    let state = app.state();
    let (id, job) = base_backups::request(
        &state,
        &AuditCtx::system(),
        "src",
        base_backups::Trigger::Person,
        None,
        true,
    )
    .await
    .unwrap();
    dbops::jobs::run_here(&state, job, &state.shutdown.child_token()).await;
    base_backups::find(&app.db, id).await.unwrap().unwrap()
}

async fn recover_to(app: &TestApp, point: Point) -> recover::Recovery {
    let state = app.state();
    let (id, job) = recover::request(&state, &AuditCtx::system(), "src", &point, true)
        .await
        .unwrap();
    dbops::jobs::run_here(&state, job, &state.shutdown.child_token()).await;
    recover::find(&app.db, id).await.unwrap().unwrap()
}

/// The row counts of `shop`'s tables in a ready recovery.
async fn recovered_counts(r: &recover::Recovery) -> Vec<(String, i64)> {
    recover::tables(r)
        .await
        .unwrap()
        .into_iter()
        .filter(|(db, _, _)| db == "shop")
        .map(|(_, t, n)| (t, n))
        .collect()
}

async fn count(c: &mut PgConnection, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(c)
        .await
        .unwrap()
}

#[tokio::test]
async fn recovery_to_a_time_a_restore_point_and_before_an_operation_has_the_dropped_table() {
    let cluster = cluster().await;
    cluster.create_database("shop").await.unwrap();
    let url = cluster.url("shop");
    let mut c = PgConnection::connect(&url).await.unwrap();
    c.execute("CREATE TABLE items (id serial PRIMARY KEY, v text); INSERT INTO items (v) SELECT 'a' FROM generate_series(1, 3);")
        .await
        .unwrap();
    let dir = temp_dir("pitr");
    let app = spawn_app_with(&config(&dir), &[("SRC", url.clone())]).await;
    let state = app.state();
    // dbops' archiver streams the WAL from before the base backup on.
    wait_streaming(&app).await;

    // A dbops backup without the table `orders` (restoring it over the database
    // later is the dbops action that "drops" the table).
    let old = run::request(
        &state,
        &AuditCtx::system(),
        "src",
        Trigger::Person,
        BackupRequest {
            options: Some(DumpOptions {
                format: Format::Custom,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (status, error) = wait_for(&app, old).await;
    assert_eq!(status, "good", "{error:?}");

    c.execute("CREATE TABLE orders (id int PRIMARY KEY); INSERT INTO orders SELECT generate_series(1, 5);")
        .await
        .unwrap();
    let bb = base_backup(&app).await;
    assert_eq!(bb.status, "good", "{:?}", bb.error);
    assert!(bb.end() > bb.start() && bb.start() > Some(Lsn(0)));
    assert!(
        bb.verified().contains("files match the manifest"),
        "{:?}",
        bb.verification
    );
    // The tar in storage is what its checksum says.
    let stored = state.storage_for("local").unwrap();
    let key = bb.storage_key.clone().unwrap();
    assert_eq!(stored.size(&key).await.unwrap(), bb.bytes.unwrap() as u64);
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // T1: more rows. Then a restore point and the time just before the drop.
    c.execute(
        "INSERT INTO orders SELECT generate_series(6, 7); INSERT INTO items (v) VALUES ('t1');",
    )
    .await
    .unwrap();
    let target = state.targets.get("src").unwrap();
    restore_points::create(&state, &AuditCtx::system(), &target, "before-drop", None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before_drop = Utc::now();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    drop(c);

    // T2: dbops restores the old backup over `shop` (approved): `orders` is gone.
    let old_id = old.to_string();
    let request = approved(
        &app,
        "restore.over",
        &[("backup_id", &old_id), ("end_sessions", "on")],
    )
    .await;
    let rid: i64 = sqlx::query_scalar(
        "SELECT r.id FROM restores r JOIN jobs j ON j.id = r.job_id WHERE j.approval_id = $1",
    )
    .bind(request)
    .fetch_one(&app.db)
    .await
    .unwrap();
    let (status, error) = wait_ended(&app, "restores", rid).await;
    assert_eq!(status, "succeeded", "{error:?}");
    let mut c = PgConnection::connect(&url).await.unwrap();
    assert!(
        sqlx::query("SELECT 1 FROM orders")
            .fetch_one(&mut c)
            .await
            .is_err(),
        "the restore over dropped orders"
    );
    // The hook made a restore point just before the operation.
    let (op_id, action): (i64, String) = sqlx::query_as(
        "SELECT operation_id, action FROM restore_points WHERE target = 'src' AND operation_id IS NOT NULL",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(action, "restore.over");

    // T3: more rows after the drop.
    c.execute("INSERT INTO items (v) SELECT 't3' FROM generate_series(1, 10);")
        .await
        .unwrap();
    assert_eq!(count(&mut c, "items").await, 13);
    drop(c);
    archive_now(&app, &cluster).await;

    let want = vec![
        ("public.items".to_string(), 4),
        ("public.orders".to_string(), 7),
    ];
    for point in [
        Point::Time(before_drop),
        Point::RestorePoint("before-drop".into()),
        Point::BeforeOperation(op_id),
    ] {
        let r = recover_to(&app, point.clone()).await;
        assert_eq!(r.status, "ready", "{point:?}: {:?}", r.error);
        assert_eq!(
            recovered_counts(&r).await,
            want,
            "{point:?}: {:?}",
            r.outcome
        );
        // The scratch server listens on 127.0.0.1 only, and goes when done.
        let dir = std::path::PathBuf::from(r.scratch_dir.clone().unwrap());
        assert!(dir.join("pgdata").exists());
        recover::remove(&state, &AuditCtx::system(), r.id, "test")
            .await
            .unwrap();
        assert!(!dir.exists(), "the scratch directory is removed");
        let r = recover::find(&app.db, r.id).await.unwrap().unwrap();
        assert_eq!(r.status, "removed");
    }

    // Copy a recovered database into a new database on the target.
    let r = recover_to(&app, Point::RestorePoint("before-drop".into())).await;
    assert_eq!(r.status, "ready", "{:?}", r.error);
    let job = recover::request_copy(
        &state,
        &AuditCtx::system(),
        r.id,
        "shop",
        &[],
        "src",
        "shop_recovered",
        true,
    )
    .await
    .unwrap();
    dbops::jobs::run_here(&state, job, &state.shutdown.child_token()).await;
    let j = dbops::jobs::find(&app.db, job).await.unwrap().unwrap();
    assert_eq!(j.status, "succeeded", "{:?}", j.error);
    let mut copy = PgConnection::connect(&cluster.url("shop_recovered"))
        .await
        .unwrap();
    assert_eq!(count(&mut copy, "orders").await, 7);
    assert_eq!(count(&mut copy, "items").await, 4);
    // A second copy under the same name is refused, and what exists is untouched.
    let job = recover::request_copy(
        &state,
        &AuditCtx::system(),
        r.id,
        "shop",
        &[],
        "src",
        "shop_recovered",
        true,
    )
    .await
    .unwrap();
    dbops::jobs::run_here(&state, job, &state.shutdown.child_token()).await;
    let j = dbops::jobs::find(&app.db, job).await.unwrap().unwrap();
    assert_eq!(j.status, "failed");
    assert!(j.error.unwrap().contains("already exists"));
    assert_eq!(count(&mut copy, "orders").await, 7);

    // The sweeper removes a recovery past its limit.
    sqlx::query("UPDATE recoveries SET expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(r.id)
        .execute(&app.db)
        .await
        .unwrap();
    recover::sweep(&state).await.unwrap();
    let r = recover::find(&app.db, r.id).await.unwrap().unwrap();
    assert_eq!(r.status, "removed");
    assert!(!Path::new(&r.scratch_dir.unwrap()).exists());

    // A time outside the window is refused, with the window.
    let later = Utc::now() + chrono::Duration::hours(1);
    let err = recover::request(
        &state,
        &AuditCtx::system(),
        "src",
        &Point::Time(later),
        false,
    )
    .await
    .unwrap_err();
    assert!(err.contains("outside the recoverable window"), "{err}");
    let before_any = bb.finished_at.unwrap() - chrono::Duration::minutes(5);
    let err = recover::request(
        &state,
        &AuditCtx::system(),
        "src",
        &Point::Time(before_any),
        false,
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("outside the recoverable window of src, which is from "),
        "{err}"
    );
    assert_eq!(app.count_ops("pitr.recover", Some("failed")).await, 2);

    // The pages: a viewer sees the window, base backups and restore points but
    // may not recover; an operator is told why a point is refused, recovers
    // from the browser, sees the tables and clicks Done.
    let mut viewer = app.logged_in(Role::Viewer).await;
    let page = viewer.get("/targets/src/pitr").await;
    assert_eq!(page.status, 200);
    assert!(
        page.text
            .contains("can be recovered to any second <strong>from "),
        "{}",
        page.text
    );
    assert!(page.text.contains("before-drop") && page.text.contains(&format!("dbops-op-{op_id}")));
    assert!(page.text.contains(&bb.start_text()));
    assert!(
        page.text.contains("is stored"),
        "the archive's recovery point is shown: {}",
        page.text
    );
    assert!(
        !page
            .text
            .contains("action=\"/targets/src/pitr/recoveries\""),
        "a viewer gets no recovery form"
    );
    let denied = viewer
        .post(
            "/targets/src/pitr/recoveries",
            &[("kind", "restore_point"), ("restore_point", "before-drop")],
        )
        .await;
    assert_eq!(denied.status, 403);
    let mut operator = app.logged_in(Role::Operator).await;
    let later = (Utc::now() + chrono::Duration::hours(2))
        .format("%Y-%m-%d %H:%M:%S")
        .to_string();
    let refused = operator
        .post(
            "/targets/src/pitr/recoveries",
            &[("kind", "time"), ("time", &later), ("zone", "utc")],
        )
        .await;
    assert!(
        refused
            .text
            .contains("is outside the recoverable window of src, which is from "),
        "{}",
        refused.text
    );
    let started = operator
        .post(
            "/targets/src/pitr/recoveries",
            &[("kind", "operation"), ("operation", &op_id.to_string())],
        )
        .await;
    let at = started
        .location()
        .expect("redirected to the recovery")
        .to_string();
    let id: i64 = at.rsplit('/').next().unwrap().parse().unwrap();
    let mut status = String::new();
    for _ in 0..1200 {
        status = recover::find(&app.db, id).await.unwrap().unwrap().status;
        if !matches!(status.as_str(), "queued" | "recovering") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, "ready");
    let page = operator.get(&at).await;
    assert!(
        page.text
            .contains("<td><code>public.orders</code></td><td>7</td>"),
        "{}",
        page.text
    );
    assert!(page.text.contains("Done: remove the scratch server"));
    let seen = viewer.get(&at).await;
    assert!(
        seen.text
            .contains("<td><code>public.items</code></td><td>4</td>")
    );
    assert!(
        !seen.text.contains("Done: remove the scratch server"),
        "a viewer cannot remove it"
    );
    assert_eq!(viewer.post(&format!("{at}/done"), &[]).await.status, 403);
    let done = operator.post(&format!("{at}/done"), &[]).await;
    assert!(done.location().is_some_and(|l| l.contains("removed")));
    assert_eq!(
        recover::find(&app.db, id).await.unwrap().unwrap().status,
        "removed"
    );
    assert!(
        app.count_ops("pitr.recovery.remove", Some("succeeded"))
            .await
            >= 5
    );
    drop(cluster);
}

/// Runs gated action `kind` on `src` with `form`: requested by an operator,
/// approved by an approver (production), executed; returns the request's id.
async fn approved(app: &TestApp, kind: &str, form: &[(&str, &str)]) -> i64 {
    let state = app.state();
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let op = app.current_user(&format!("op-{tag}"), Role::Operator).await;
    let ap = app.current_user(&format!("ap-{tag}"), Role::Approver).await;
    let form: std::collections::BTreeMap<String, String> = form
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let req =
        dbops::approvals::request(&state, &AuditCtx::system(), &op, "src", kind, &form, "test")
            .await
            .unwrap();
    assert_eq!(req.state, "pending", "production needs a second person");
    // Not by the one who asked.
    assert!(
        dbops::approvals::decide(
            &state,
            &AuditCtx::system(),
            &op,
            req.id,
            dbops::approvals::Decision::Approve,
            "mine",
        )
        .await
        .is_err()
    );
    dbops::approvals::decide(
        &state,
        &AuditCtx::system(),
        &ap,
        req.id,
        dbops::approvals::Decision::Approve,
        "ok",
    )
    .await
    .unwrap();
    dbops::approvals::execute(&state, &AuditCtx::system(), &op, req.id)
        .await
        .unwrap();
    req.id
}

#[tokio::test]
async fn a_dropped_table_comes_back_by_replacing_the_database_with_a_recovered_one() {
    let cluster = cluster().await;
    cluster.create_database("shop").await.unwrap();
    let url = cluster.url("shop");
    let mut c = PgConnection::connect(&url).await.unwrap();
    c.execute(
        "CREATE TABLE items (id serial PRIMARY KEY, v text); INSERT INTO items (v) SELECT 'a' FROM generate_series(1, 3);
         CREATE TABLE orders (id int PRIMARY KEY); INSERT INTO orders SELECT generate_series(1, 5);",
    )
    .await
    .unwrap();
    let dir = temp_dir("pitr-replace");
    let app = spawn_app_with(&config(&dir), &[("SRC", url.clone())]).await;
    let state = app.state();
    wait_streaming(&app).await;
    let first = base_backup(&app).await;
    assert_eq!(first.status, "good", "{:?}", first.error);

    // Pins: an operator pins the first base backup; a viewer may not.
    let mut viewer = app.logged_in(Role::Viewer).await;
    let mut operator = app.logged_in(Role::Operator).await;
    let pin = format!("/targets/src/pitr/base-backups/{}/pin", first.id);
    assert_eq!(viewer.post(&pin, &[("reason", "audit")]).await.status, 403);
    let refused = operator.post(&pin, &[("reason", "  ")]).await;
    assert_eq!(refused.status, 400);
    assert!(
        refused.text.contains("Say why it must be kept"),
        "{}",
        refused.text
    );
    let pinned = operator
        .post(&pin, &[("reason", "quarter-end audit")])
        .await;
    assert!(pinned.location().is_some_and(|l| l.contains("pinned")));
    let page = viewer.get("/targets/src/pitr").await;
    assert!(page.text.contains("quarter-end audit"), "{}", page.text);

    // T1: two more orders, then a restore point.
    c.execute(
        "INSERT INTO orders SELECT generate_series(6, 7); INSERT INTO items (v) VALUES ('t1');",
    )
    .await
    .unwrap();
    let target = state.targets.get("src").unwrap();
    restore_points::create(&state, &AuditCtx::system(), &target, "before-mistake", None)
        .await
        .unwrap();
    // T2: somebody drops orders in psql; T3: work goes on.
    c.execute("DROP TABLE orders; INSERT INTO items (v) VALUES ('t3');")
        .await
        .unwrap();
    drop(c);
    // Two more base backups: retention (keep 2) would delete the first, but
    // it is pinned.
    for _ in 0..2 {
        let bb = base_backup(&app).await;
        assert_eq!(bb.status, "good", "{:?}", bb.error);
    }
    base_backups::prune(&state, &target).await.unwrap();
    let first_now = base_backups::find(&app.db, first.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first_now.status, "good", "a pinned base backup is kept");
    archive_now(&app, &cluster).await;

    let r = recover_to(&app, Point::RestorePoint("before-mistake".into())).await;
    assert_eq!(r.status, "ready", "{:?}", r.error);
    let page = operator
        .get(&format!("/targets/src/pitr/recoveries/{}", r.id))
        .await;
    assert!(
        page.text.contains("/targets/src/actions/pitr.replace"),
        "the recovery page offers the replace: {}",
        page.text
    );
    // The request form says what will happen; a viewer may not ask.
    let form_url = format!(
        "/targets/src/actions/pitr.replace?recovery_id={}&database=shop&end_sessions=on",
        r.id
    );
    let form = operator.get(&form_url).await;
    assert_eq!(form.status, 200, "{}", form.text);
    assert!(form.text.contains("swapped in"), "{}", form.text);
    assert!(
        form.text
            .contains(&format!("recovered by recovery #{}", r.id)),
        "{}",
        form.text
    );
    assert_eq!(viewer.get(&form_url).await.status, 403);

    let rid_s = r.id.to_string();
    let request = approved(
        &app,
        "pitr.replace",
        &[
            ("recovery_id", &rid_s),
            ("database", "shop"),
            ("end_sessions", "on"),
        ],
    )
    .await;
    let restore: i64 = sqlx::query_scalar("SELECT id FROM restores WHERE recovery_id = $1")
        .bind(r.id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    let (status, error) = wait_ended(&app, "restores", restore).await;
    assert_eq!(status, "succeeded", "{error:?}");
    // The job ends the request once the restore's row is written.
    let mut req_state = String::new();
    for _ in 0..300 {
        req_state = sqlx::query_scalar("SELECT state FROM approval_requests WHERE id = $1")
            .bind(request)
            .fetch_one(&app.db)
            .await
            .unwrap();
        if req_state != "approved" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(req_state, "executed");
    // The approver saw what was recovered, measured by dbops.
    let shown = operator.get(&format!("/approvals/{request}")).await;
    assert!(
        shown.text.contains("public.orders (7 rows)"),
        "{}",
        shown.text
    );

    // shop is as it was at the restore point; the replaced one is kept.
    let mut c = PgConnection::connect(&url).await.unwrap();
    assert_eq!(count(&mut c, "orders").await, 7);
    assert_eq!(count(&mut c, "items").await, 4);
    drop(c);
    let previous = format!("shop_before_restore_{restore}");
    let mut p = PgConnection::connect(&cluster.url(&previous))
        .await
        .unwrap();
    assert_eq!(
        count(&mut p, "items").await,
        5,
        "the T3 row is in the kept database"
    );
    assert!(
        sqlx::query("SELECT 1 FROM orders")
            .fetch_one(&mut p)
            .await
            .is_err()
    );
    drop(p);

    // The restore's page names the recovery; the operations log offers the
    // recovery to just before the replace (dbops made a restore point).
    let page = viewer.get(&format!("/restores/{restore}")).await;
    assert!(
        page.text
            .contains(&format!("database shop of recovery #{}", r.id)),
        "{}",
        page.text
    );
    assert!(page.text.contains(&previous), "{}", page.text);
    let op: i64 = sqlx::query_scalar("SELECT operation_id FROM restores WHERE id = $1")
        .bind(restore)
        .fetch_one(&app.db)
        .await
        .unwrap();
    let log = viewer.get("/operations?kind=pitr.replace").await;
    assert!(
        log.text
            .contains(&format!("/targets/src/pitr?before_operation={op}")),
        "{}",
        log.text
    );
    let one = viewer.get(&format!("/operations/{op}")).await;
    assert!(one.text.contains("Recover to just before this operation"));

    // Swap back: the generic restore action works on it.
    approved(
        &app,
        "restore.swap_back",
        &[("restore_id", &restore.to_string()), ("end_sessions", "on")],
    )
    .await;
    let mut c = PgConnection::connect(&url).await.unwrap();
    assert_eq!(count(&mut c, "items").await, 5);
    assert!(
        sqlx::query("SELECT 1 FROM orders")
            .fetch_one(&mut c)
            .await
            .is_err()
    );
    drop(c);

    // A replace from a recovery that is gone is refused, and nothing changes.
    recover::remove(&state, &AuditCtx::system(), r.id, "test")
        .await
        .unwrap();
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let op_user = app
        .current_user(&format!("op2-{tag}"), Role::Operator)
        .await;
    let form: std::collections::BTreeMap<String, String> = [
        ("recovery_id".to_string(), rid_s.clone()),
        ("database".to_string(), "shop".to_string()),
    ]
    .into();
    let err = dbops::approvals::request(
        &state,
        &AuditCtx::system(),
        &op_user,
        "src",
        "pitr.replace",
        &form,
        "again",
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("not ready"), "{err}");
    drop(cluster);
}
