//! Restores into a new database against the real server: the round trip through
//! the pages, artifacts that were altered, names that are taken, roles.

use dbops::{
    audit::AuditCtx,
    auth::Role,
    backups::run::{self, BackupRequest, Trigger},
    pg_tools::{DumpOptions, Format},
    restores as restore,
};
use reqwest::StatusCode;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::{
    backups::{app_config, row_counts, source_db, temp_dir, wait_ended, wait_for},
    helpers::{TestApp, services, spawn_app_with},
};

/// Takes a good backup of `src` in this format, here (some of these apps run no
/// job workers); returns its id.
async fn good_backup(app: &TestApp, format: &str) -> i64 {
    let format = Format::parse(format).unwrap();
    let id = run::request(
        &app.state(),
        &AuditCtx::system(),
        "src",
        Trigger::Person,
        BackupRequest {
            options: Some(DumpOptions {
                format,
                jobs: if format == Format::Directory { 2 } else { 1 },
                ..Default::default()
            }),
            run_here: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    run::run_here(&app.state(), id, &CancellationToken::new()).await;
    let (status, error) = wait_for(app, id).await;
    assert_eq!(status, "good", "{error:?}");
    id
}

/// Runs a restore's job in the test (its app runs no job workers), as a worker
/// would.
async fn run_restore_job(app: &TestApp, rid: i64) {
    let job: i64 = sqlx::query_scalar("SELECT job_id FROM restores WHERE id = $1")
        .bind(rid)
        .fetch_one(&app.db)
        .await
        .unwrap();
    dbops::jobs::run(&app.state(), job, &CancellationToken::new()).await;
}

/// Waits until restore `id` has ended; returns (status, error).
async fn wait_for_restore(app: &TestApp, id: i64) -> (String, Option<String>) {
    wait_ended(app, "restores", id).await
}

/// Runs the `dbops` binary with `cfg` and the target's URL in `SRC`.
fn dbops_cli(cfg: &std::path::Path, src: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_dbops"))
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env_remove("DATABASE_URL")
        .env("SRC", src)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// A checksum of every table's contents, in key order.
async fn contents(url: &str) -> Vec<(String, String)> {
    let mut c = PgConnection::connect(url).await.unwrap();
    let mut out = vec![];
    for (table, _) in row_counts(url).await {
        let sum: String = sqlx::query_scalar(&format!(
            "SELECT coalesce(md5(string_agg(t::text, '' ORDER BY id)), '') FROM {table} t"
        ))
        .fetch_one(&mut c)
        .await
        .unwrap();
        out.push((table, sum));
    }
    out
}

async fn database_exists(name: &str) -> bool {
    let mut c = PgConnection::connect(&format!("{}/postgres", services().await.pg_base))
        .await
        .unwrap();
    sqlx::query_scalar::<_, i32>("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut c)
        .await
        .unwrap()
        .is_some()
}

async fn drop_database(name: &str) {
    let mut c = PgConnection::connect(&format!("{}/postgres", services().await.pg_base))
        .await
        .unwrap();
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut c)
        .await;
}

fn new_name() -> String {
    format!("dbops_it_rs_{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn an_operator_restores_a_backup_into_a_new_database_with_the_same_rows_and_contents() {
    let src = source_db(2_000).await;
    let dir = temp_dir("restore");
    let extra = "[postgres.backup]\ntest_restore = true\n";
    let app = spawn_app_with(
        &app_config("src", "SRC", "dev", &dir, extra),
        &[("SRC", src.url.clone())],
    )
    .await;
    let expected_rows = row_counts(&src.url).await;
    let expected_contents = contents(&src.url).await;
    let mut op = app.logged_in(Role::Operator).await;
    for (format, jobs) in [("custom", "2"), ("directory", "2"), ("plain", "1")] {
        let id = good_backup(&app, format).await;
        let page = op.get(&format!("/backups/{id}")).await;
        assert!(
            page.text.contains(&format!("/backups/{id}/restore")),
            "{format}: a Restore… button"
        );
        let form = op.get(&format!("/backups/{id}/restore")).await;
        assert_eq!(form.status, StatusCode::OK);
        let name = new_name();
        let r = op
            .post(
                &format!("/backups/{id}/restore"),
                &[("database", &name), ("jobs", jobs)],
            )
            .await;
        let location = r
            .location()
            .unwrap_or_else(|| panic!("{format}: {}", r.text))
            .to_string();
        assert!(location.starts_with("/restores/"), "{location}");
        let rid: i64 = location.rsplit('/').next().unwrap().parse().unwrap();
        let (status, error) = wait_for_restore(&app, rid).await;
        assert_eq!(status, "succeeded", "{format}: {error:?}");
        let url = format!("{}/{name}", services().await.pg_base);
        assert_eq!(row_counts(&url).await, expected_rows, "{format}: rows");
        // Analyzed after the restore: statistics from the first query on.
        let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
        let unanalyzed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_user_tables WHERE last_analyze IS NULL AND last_autoanalyze IS NULL",
        )
        .fetch_one(&mut c)
        .await
        .unwrap();
        assert_eq!(unanalyzed, 0, "{format}: every table analyzed");
        drop(c);
        assert_eq!(
            contents(&url).await,
            expected_contents,
            "{format}: contents"
        );
        let page = op.get(&location).await;
        assert_eq!(page.status, StatusCode::OK);
        assert!(
            page.text.contains("succeeded"),
            "{format}: the outcome shows"
        );
        assert!(
            page.text.contains("audit.events") && page.text.contains("6000"),
            "{format}: tables and row counts show: {}",
            page.text
        );
        let (items, total): (i64, i64) =
            // The progress is the job's (the one runtime writes it); the total is
            // the restore's, from the backup's table of contents.
            sqlx::query_as("SELECT j.done, r.progress_total FROM restores r JOIN jobs j ON j.id = r.job_id WHERE r.id = $1")
                .bind(rid)
                .fetch_one(&app.db)
                .await
                .unwrap();
        assert!(items <= total, "{format}: {items} of {total}");
        if format == "plain" {
            // A script has no table of contents and is not test-restored.
            assert_eq!(total, 0);
        } else {
            assert_eq!(total, 3, "{format}: three tables of data to restore");
            assert!(
                page.text
                    .contains("the same 3 tables and 8500 rows as the backup"),
                "{format}: compared with the test restore: {}",
                page.text
            );
        }
        drop_database(&name).await;
    }
    assert_eq!(app.count_ops("restore.run", Some("succeeded")).await, 3);
    src.drop_db().await;
}

#[tokio::test]
async fn an_altered_or_truncated_backup_file_is_refused_before_any_database_is_created() {
    let src = source_db(200).await;
    let dir = temp_dir("restore-altered");
    let app = spawn_app_with(
        &app_config("src", "SRC", "dev", &dir, ""),
        &[("SRC", src.url.clone())],
    )
    .await;
    let id = good_backup(&app, "custom").await;
    let key: String = sqlx::query_scalar("SELECT storage_key FROM backups WHERE id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    let file = dir.join(&key);
    let original = std::fs::read(&file).unwrap();
    let mut op = app.logged_in(Role::Operator).await;

    // One byte changed, same size.
    let mut altered = original.clone();
    let i = altered.len() / 2;
    altered[i] ^= 0xff;
    std::fs::write(&file, &altered).unwrap();
    op.get(&format!("/backups/{id}/restore")).await;
    let name = new_name();
    let r = op
        .post(&format!("/backups/{id}/restore"), &[("database", &name)])
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.text.contains("does not match its recorded checksum"),
        "{}",
        r.text
    );
    assert!(!database_exists(&name).await, "nothing was created");

    // Truncated.
    std::fs::write(&file, &original[..original.len() - 100]).unwrap();
    let r = op
        .post(&format!("/backups/{id}/restore"), &[("database", &name)])
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text.contains("truncated or altered"), "{}", r.text);
    assert!(!database_exists(&name).await, "nothing was created");

    let restores: i64 = sqlx::query_scalar("SELECT count(*) FROM restores")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(restores, 0, "no restore was started");
    assert_eq!(app.count_ops("restore.run", Some("failed")).await, 2);
    src.drop_db().await;
}

#[tokio::test]
async fn a_database_name_that_exists_or_is_not_a_plain_identifier_is_refused() {
    let src = source_db(20).await;
    let dir = temp_dir("restore-names");
    let app = spawn_app_with(
        &app_config("src", "SRC", "dev", &dir, ""),
        &[("SRC", src.url.clone())],
    )
    .await;
    let id = good_backup(&app, "custom").await;
    let mut op = app.logged_in(Role::Operator).await;
    op.get(&format!("/backups/{id}/restore")).await;
    let r = op
        .post(
            &format!("/backups/{id}/restore"),
            &[("database", &src.name)],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text.contains("already exists"), "{}", r.text);
    for bad in ["Bad-Name", "1db", "x\"; DROP DATABASE postgres; --"] {
        let r = op
            .post(&format!("/backups/{id}/restore"), &[("database", bad)])
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(r.text.contains("is not a valid name"), "{bad}: {}", r.text);
    }
    assert_eq!(app.count_ops("restore.run", Some("failed")).await, 4);
    assert_eq!(
        row_counts(&src.url).await.len(),
        3,
        "the existing database is untouched"
    );
    src.drop_db().await;
}

#[tokio::test]
async fn a_viewer_sees_backups_but_cannot_restore_one() {
    let src = source_db(20).await;
    let dir = temp_dir("restore-viewer");
    let app = spawn_app_with(
        &app_config("src", "SRC", "dev", &dir, ""),
        &[("SRC", src.url.clone())],
    )
    .await;
    let id = good_backup(&app, "custom").await;
    let mut viewer = app.logged_in(Role::Viewer).await;
    let page = viewer.get(&format!("/backups/{id}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(!page.text.contains("Restore…"), "no button for viewers");
    assert_eq!(
        viewer.get(&format!("/backups/{id}/restore")).await.status,
        StatusCode::FORBIDDEN
    );
    let name = new_name();
    assert_eq!(
        viewer
            .post(&format!("/backups/{id}/restore"), &[("database", &name)])
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert!(!database_exists(&name).await);
    let restores: i64 = sqlx::query_scalar("SELECT count(*) FROM restores")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(restores, 0);
    src.drop_db().await;
}

#[tokio::test]
async fn dbops_restore_on_the_command_line_restores_into_a_new_database_and_fails_loudly() {
    let src = source_db(50).await;
    let dir = temp_dir("restore-cli");
    let toml = app_config("src", "SRC", "dev", &dir, "");
    let app = spawn_app_with(&toml, &[("SRC", src.url.clone())]).await;
    let id = good_backup(&app, "custom").await;
    let cfg = dir.join("dbops.toml");
    std::fs::write(
        &cfg,
        format!("database_url = \"{}\"\n{toml}", app.database_url),
    )
    .unwrap();
    let dbops = |args: &[&str]| dbops_cli(&cfg, &src.url, args);
    let name = new_name();
    let id_s = id.to_string();
    let out = dbops(&["restore", "--backup", &id_s, "--into", &name]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 tables, 700 rows"), "{stdout}");
    let url = format!("{}/{name}", services().await.pg_base);
    assert_eq!(row_counts(&url).await, row_counts(&src.url).await);

    // Again into the same name: refused, exit code 1, nothing touched.
    let out = dbops(&["restore", "--backup", &id_s, "--into", &name]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(app.count_ops("restore.run", Some("succeeded")).await, 1);
    assert_eq!(app.count_ops("restore.run", Some("failed")).await, 1);
    drop_database(&name).await;
    src.drop_db().await;
}

#[tokio::test]
async fn a_file_altered_after_the_request_fails_the_restore_before_the_database_is_created() {
    let src = source_db(50).await;
    let dir = temp_dir("restore-late");
    let app = spawn_app_with(
        &format!(
            "[jobs]\nworkers = 0\n{}",
            app_config("src", "SRC", "dev", &dir, "")
        ),
        &[("SRC", src.url.clone())],
    )
    .await;
    let id = good_backup(&app, "custom").await;
    let state = app.state();
    let name = new_name();
    let req = restore::RestoreRequest {
        backup_id: id,
        database: name.clone(),
        jobs: Some(1),
        target: None,
        options: Default::default(),
    };
    let rid = restore::request(&state, &AuditCtx::system(), &req)
        .await
        .unwrap();
    // Altered between the request and the run (or too large to check while the
    // request waited): the run's own re-read catches it.
    let key: String = sqlx::query_scalar("SELECT storage_key FROM backups WHERE id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    let file = dir.join(&key);
    let mut bytes = std::fs::read(&file).unwrap();
    let i = bytes.len() / 3;
    bytes[i] ^= 0x55;
    std::fs::write(&file, &bytes).unwrap();
    run_restore_job(&app, rid).await;
    let (status, error) = wait_for_restore(&app, rid).await;
    assert_eq!(status, "failed");
    assert!(
        error
            .as_deref()
            .unwrap_or("")
            .contains("does not match its recorded checksum"),
        "{error:?}"
    );
    assert!(!database_exists(&name).await, "nothing was created");
    let mut op = app.logged_in(Role::Operator).await;
    let page = op.get(&format!("/restores/{rid}")).await;
    assert!(page.text.contains("does not match its recorded checksum"));
    assert_eq!(app.count_ops("restore.run", Some("failed")).await, 1);
    src.drop_db().await;
}

#[tokio::test]
async fn a_database_created_by_someone_else_meanwhile_is_left_alone() {
    let src = source_db(50).await;
    let dir = temp_dir("restore-race");
    let app = spawn_app_with(
        &format!(
            "[jobs]\nworkers = 0\n{}",
            app_config("src", "SRC", "dev", &dir, "")
        ),
        &[("SRC", src.url.clone())],
    )
    .await;
    let id = good_backup(&app, "custom").await;
    let state = app.state();
    let name = new_name();
    let req = restore::RestoreRequest {
        backup_id: id,
        database: name.clone(),
        jobs: None,
        target: None,
        options: Default::default(),
    };
    let rid = restore::request(&state, &AuditCtx::system(), &req)
        .await
        .unwrap();
    // Someone else creates that database (with a table) before the run.
    let base = &services().await.pg_base;
    let mut admin = PgConnection::connect(&format!("{base}/postgres"))
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let theirs = format!("{base}/{name}");
    let mut c = PgConnection::connect(&theirs).await.unwrap();
    sqlx::query("CREATE TABLE keep_me (id int PRIMARY KEY)")
        .execute(&mut c)
        .await
        .unwrap();
    drop(c);
    run_restore_job(&app, rid).await;
    let (status, error) = wait_for_restore(&app, rid).await;
    assert_eq!(status, "failed");
    assert!(
        error
            .as_deref()
            .unwrap_or("")
            .contains("cannot create the database"),
        "{error:?}"
    );
    assert!(
        database_exists(&name).await,
        "their database is not dropped"
    );
    assert_eq!(
        row_counts(&theirs).await,
        vec![("public.keep_me".to_string(), 0)]
    );
    drop_database(&name).await;
    src.drop_db().await;
}

#[tokio::test]
async fn restoring_over_a_production_database_needs_an_approver_and_takes_a_safety_backup_first() {
    let src = source_db(300).await;
    let dir = temp_dir("restore-over");
    let app = spawn_app_with(
        &app_config("src", "SRC", "production", &dir, ""),
        &[("SRC", src.url.clone())],
    )
    .await;
    let expected_rows = row_counts(&src.url).await;
    let expected_contents = contents(&src.url).await;
    let id = good_backup(&app, "custom").await;
    // Things go wrong after the backup.
    let mut c = PgConnection::connect(&src.url).await.unwrap();
    for sql in [
        "DELETE FROM orders WHERE id % 2 = 0",
        "UPDATE customers SET name = 'oops'",
        "CREATE TABLE public.added_later (id int PRIMARY KEY)",
    ] {
        sqlx::query(sql).execute(&mut c).await.unwrap();
    }
    let damaged_orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&mut c)
        .await
        .unwrap();

    let mut op = app.logged_in(Role::Operator).await;
    let page = op.get(&format!("/backups/{id}")).await;
    assert!(page.text.contains(&format!("/backups/{id}/restore")));
    let page = op.get(&format!("/backups/{id}/restore")).await;
    assert!(page.text.contains(&format!("/backups/{id}/restore-over")));
    let on = op
        .get(&format!(
            "/backups/{id}/restore-over?target=src&database=&end_sessions=on"
        ))
        .await;
    let form_url = on.location().expect("on to the request form").to_string();
    assert!(
        form_url.starts_with(&format!("/targets/src/actions/restore.over?backup_id={id}")),
        "{form_url}"
    );
    let form = op.get(&form_url).await;
    assert!(form.text.contains("safety backup"), "{}", form.text);
    let r = op
        .post(
            "/targets/src/actions/restore.over",
            &[
                ("backup_id", &id.to_string()),
                ("end_sessions", "on"),
                ("reason", "bad deploy"),
            ],
        )
        .await;
    let req_url = r
        .location()
        .unwrap_or_else(|| panic!("{}", r.text))
        .to_string();
    let req_id: i64 = req_url.rsplit('/').next().unwrap().parse().unwrap();
    let restores: i64 = sqlx::query_scalar("SELECT count(*) FROM restores")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(restores, 0, "nothing runs before an approver approves");
    let mut ap = app.logged_in(Role::Approver).await;
    let seen = ap.get(&req_url).await;
    // The approver sees the backup and what will be dropped.
    assert!(
        seen.text.contains(&format!("#{id} of src, custom format")),
        "{}",
        seen.text
    );
    assert!(
        seen.text.contains("Replaced from the backup"),
        "{}",
        seen.text
    );
    assert!(seen.text.contains("public.orders"), "{}", seen.text);
    assert!(
        seen.text.contains(
            "Not in the backup (kept only in the previous database)</dt><dd>public.added_later"
        ),
        "{}",
        seen.text
    );
    ap.post(
        &format!("/approvals/{req_id}/approve"),
        &[("comment", "ok")],
    )
    .await;
    op.get(&req_url).await;
    op.post(&format!("/approvals/{req_id}/execute"), &[]).await;
    let rid: i64 = sqlx::query_scalar("SELECT id FROM restores WHERE mode = 'over_database'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let (status, error) = wait_for_restore(&app, rid).await;
    assert_eq!(status, "succeeded", "{error:?}");
    // The other session was ended.
    assert!(
        sqlx::query("SELECT 1").execute(&mut c).await.is_err(),
        "the other session was ended"
    );
    let after: Vec<(String, i64)> = row_counts(&src.url)
        .await
        .into_iter()
        .filter(|(t, _)| t != "public.added_later")
        .collect();
    assert_eq!(after, expected_rows, "the backup's rows are back");
    let after_contents: Vec<(String, String)> = contents(&src.url)
        .await
        .into_iter()
        .filter(|(t, _)| t != "public.added_later")
        .collect();
    assert_eq!(after_contents, expected_contents);
    // The safety backup holds the damaged state.
    let safety: i64 = sqlx::query_scalar("SELECT safety_backup_id FROM restores WHERE id = $1")
        .bind(rid)
        .fetch_one(&app.db)
        .await
        .unwrap();
    let (sstatus, verification): (String, serde_json::Value) =
        sqlx::query_as("SELECT status, verification FROM backups WHERE id = $1")
            .bind(safety)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(sstatus, "good");
    assert_eq!(
        verification["table_data"], 4,
        "it has the table added later"
    );
    assert!(
        damaged_orders
            < expected_rows
                .iter()
                .find(|(t, _)| t == "public.orders")
                .unwrap()
                .1
    );
    let page = op.get(&format!("/restores/{rid}")).await;
    assert!(
        page.text.contains(&format!("/backups/{safety}")),
        "the page links the safety backup"
    );
    // The request's outcome follows the restore: executed once it succeeded,
    // and its operation ended with the restore's result.
    let state: String = sqlx::query_scalar("SELECT state FROM approval_requests WHERE id = $1")
        .bind(req_id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(state, "executed");
    assert_eq!(app.count_ops("restore.over", Some("succeeded")).await, 1);
    let page = op.get(&req_url).await;
    assert!(
        page.text.contains(&format!("/restores/{rid}")),
        "{}",
        page.text
    );
    src.drop_db().await;
}

#[tokio::test]
async fn a_backup_restores_into_a_new_database_on_another_target_with_only_the_chosen_tables() {
    let src = source_db(40).await;
    let other = source_db(1).await;
    let dir = temp_dir("restore-other");
    let toml = format!(
        "{}[[postgres]]\nname = \"staging\"\nurl_env = \"STG\"\npolicy = \"staging\"\n",
        app_config("src", "SRC", "production", &dir, "")
    );
    let app = spawn_app_with(
        &toml,
        &[("SRC", src.url.clone()), ("STG", other.url.clone())],
    )
    .await;
    let id = good_backup(&app, "custom").await;
    let mut op = app.logged_in(Role::Operator).await;
    let page = op.get(&format!("/backups/{id}/restore")).await;
    assert!(
        page.text.contains("<option value=\"staging\""),
        "{}",
        page.text
    );
    let name = new_name();
    let r = op
        .post(
            &format!("/backups/{id}/restore"),
            &[
                ("target", "staging"),
                ("database", &name),
                ("jobs", "2"),
                ("tables", "customers, orders"),
                ("schemas", "public"),
            ],
        )
        .await;
    let loc = r
        .location()
        .unwrap_or_else(|| panic!("{}", r.text))
        .to_string();
    let rid: i64 = loc.rsplit('/').next().unwrap().parse().unwrap();
    let (status, error) = wait_for_restore(&app, rid).await;
    assert_eq!(status, "succeeded", "{error:?}");
    let url = format!("{}/{name}", services().await.pg_base);
    let all = row_counts(&src.url).await;
    let only: Vec<(String, i64)> = all
        .into_iter()
        .filter(|(t, _)| t != "audit.events")
        .collect();
    assert_eq!(row_counts(&url).await, only, "only the chosen tables");
    let page = op.get(&loc).await;
    assert!(page.text.contains("on staging"), "{}", page.text);
    assert!(page.text.contains("a backup of src"));
    assert!(page.text.contains("tables customers, orders"));
    let target: String = sqlx::query_scalar(
        "SELECT target FROM operations WHERE kind = 'restore.run' AND outcome = 'succeeded'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(target, "staging", "logged against the target it changed");
    drop_database(&name).await;
    src.drop_db().await;
    other.drop_db().await;
}

#[tokio::test]
async fn a_restore_that_fails_half_way_ends_failed_with_the_error_and_leaves_nothing() {
    let src = source_db(30).await;
    let dir = temp_dir("restore-half");
    let app = spawn_app_with(
        &app_config("src", "SRC", "dev", &dir, ""),
        &[("SRC", src.url.clone())],
    )
    .await;
    let id = good_backup(&app, "custom").await;
    let mut op = app.logged_in(Role::Operator).await;
    // Data only into a new, empty database: the tables it needs are missing.
    let name = new_name();
    let r = op
        .post(
            &format!("/backups/{id}/restore"),
            &[("database", &name), ("data_only", "on"), ("jobs", "1")],
        )
        .await;
    let loc = r
        .location()
        .unwrap_or_else(|| panic!("{}", r.text))
        .to_string();
    let rid: i64 = loc.rsplit('/').next().unwrap().parse().unwrap();
    let (status, error) = wait_for_restore(&app, rid).await;
    assert_eq!(status, "failed");
    let error = error.unwrap_or_default();
    assert!(error.contains("does not exist"), "{error}");
    let page = op.get(&loc).await;
    assert!(
        page.text.contains("does not exist"),
        "the error is on the page"
    );
    assert!(
        !database_exists(&name).await,
        "the half-restored database is dropped"
    );
    assert_eq!(app.count_ops("restore.run", Some("failed")).await, 1);

    // Contradictory options are refused on the form, before anything runs.
    let r = op
        .post(
            &format!("/backups/{id}/restore"),
            &[
                ("database", &new_name()),
                ("data_only", "on"),
                ("schema_only", "on"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text.contains("schema only or data only"), "{}", r.text);
    src.drop_db().await;
}

#[tokio::test]
async fn a_pg_restore_older_than_the_dump_and_a_database_being_backed_up_are_refused_up_front() {
    let src = source_db(20).await;
    let dir = temp_dir("restore-refuse");
    let app = spawn_app_with(
        &app_config("src", "SRC", "dev", &dir, ""),
        &[("SRC", src.url.clone())],
    )
    .await;
    let id = good_backup(&app, "custom").await;
    let mut op = app.logged_in(Role::Operator).await;

    // Written by a pg_dump newer than any pg_restore here.
    sqlx::query("UPDATE backups SET tool_version = 'pg_dump 99' WHERE id = $1")
        .bind(id)
        .execute(&app.db)
        .await
        .unwrap();
    let name = new_name();
    let r = op
        .post(&format!("/backups/{id}/restore"), &[("database", &name)])
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text.contains("written by pg_dump 99"), "{}", r.text);
    assert!(r.text.contains("postgresql-client-99"));
    assert!(!database_exists(&name).await);
    sqlx::query("UPDATE backups SET tool_version = 'pg_dump 15' WHERE id = $1")
        .bind(id)
        .execute(&app.db)
        .await
        .unwrap();

    // A backup of the database is running (queued here, never taken by a
    // worker): restoring over it is refused, and nothing is touched.
    let running = run::request(
        &app.state(),
        &AuditCtx::system(),
        "src",
        Trigger::Person,
        BackupRequest {
            run_here: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let before = row_counts(&src.url).await;
    // dev: approved automatically and run at once.
    let r = op
        .post(
            "/targets/src/actions/restore.over",
            &[("backup_id", &id.to_string()), ("reason", "test")],
        )
        .await;
    let req_url = r
        .location()
        .unwrap_or_else(|| panic!("{}", r.text))
        .to_string();
    let page = op.get(&req_url).await;
    assert!(
        page.text
            .contains(&format!("Backup #{running} of src is reading the database")),
        "{}",
        page.text
    );
    assert_eq!(row_counts(&src.url).await, before);
    let restores: i64 = sqlx::query_scalar("SELECT count(*) FROM restores")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(restores, 0, "no restore was started");
    assert_eq!(app.count_ops("restore.over", Some("failed")).await, 1);
    src.drop_db().await;
}

#[tokio::test]
async fn an_approved_restore_over_runs_from_the_command_line_only_by_its_request_id() {
    let src = source_db(25).await;
    let dir = temp_dir("restore-cli-over");
    let toml = app_config("src", "SRC", "staging", &dir, "");
    let app = spawn_app_with(
        &format!("[jobs]\nworkers = 0\n{toml}"),
        &[("SRC", src.url.clone())],
    )
    .await;
    let expected = row_counts(&src.url).await;
    let id = good_backup(&app, "plain").await;
    let mut c = PgConnection::connect(&src.url).await.unwrap();
    sqlx::query("DELETE FROM orders")
        .execute(&mut c)
        .await
        .unwrap();
    drop(c);

    let cfg = dir.join("dbops.toml");
    std::fs::write(
        &cfg,
        format!(
            "database_url = \"{}\"\n[jobs]\nworkers = 0\n{toml}",
            app.database_url
        ),
    )
    .unwrap();
    let dbops = |args: &[&str]| dbops_cli(&cfg, &src.url, args);
    let requester = format!("op-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let pw = app.create_user(&requester, Role::Operator).await;
    let mut op = app.browser();
    op.login(&requester, &pw).await;
    let r = op
        .post(
            "/targets/src/actions/restore.over",
            &[
                ("backup_id", &id.to_string()),
                ("single_transaction", "on"),
                ("end_sessions", "on"),
                ("reason", "orders were deleted"),
            ],
        )
        .await;
    let req_url = r
        .location()
        .unwrap_or_else(|| panic!("{}", r.text))
        .to_string();
    let req = req_url.rsplit('/').next().unwrap().to_string();

    // Not approved yet: the command line refuses too.
    let out = dbops(&["restore", "--request", &req, "--as", &requester]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("waiting for an approver"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut ap = app.logged_in(Role::Approver).await;
    ap.post(&format!("/approvals/{req}/approve"), &[("comment", "go")])
        .await;
    let out = dbops(&["restore", "--request", &req, "--as", &requester]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 tables, 600 rows"), "{stdout}");
    assert_eq!(
        row_counts(&src.url).await,
        expected,
        "the plain backup re-created the database"
    );
    let (mode, options): (String, serde_json::Value) =
        sqlx::query_as("SELECT mode, options FROM restores")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(mode, "over_database");
    assert_eq!(options["single_transaction"], true);
    // It ran once: asking again is refused.
    let out = dbops(&["restore", "--request", &req, "--as", &requester]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(app.count_ops("restore.over", Some("succeeded")).await, 1);
    src.drop_db().await;
}
