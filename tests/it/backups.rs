//! Backups against real servers: round trips, failures that leave nothing behind,
//! a dbops killed mid-backup, schedules across replicas, roles, the pipeline API.

use std::{path::PathBuf, time::Duration};

use dbops::{
    audit::AuditCtx,
    auth::Role,
    backups::run::{self, BackupRequest, Trigger},
};
use reqwest::StatusCode;
use sqlx::{Connection, Executor, PgConnection};

use crate::helpers::{TestApp, services, spawn_app_with};

/// A throwaway database on the test server with a few tables and rows.
pub struct SourceDb {
    pub name: String,
    pub url: String,
}

pub async fn source_db(rows: i64) -> SourceDb {
    let base = &services().await.pg_base;
    let name = format!("dbops_it_src_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&format!("{base}/postgres"))
        .await
        .unwrap();
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    let url = format!("{base}/{name}");
    let mut c = PgConnection::connect(&url).await.unwrap();
    c.execute(
        format!(
            "CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, note text);
             CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int REFERENCES customers(id), total numeric(10,2), placed_at timestamptz);
             CREATE SCHEMA audit;
             CREATE TABLE audit.events (id serial PRIMARY KEY, payload jsonb);
             INSERT INTO customers SELECT g, 'customer ' || g, repeat('x', g % 50) FROM generate_series(1, {rows}) g;
             INSERT INTO orders SELECT g, 1 + g % {rows}, (g % 1000) / 7.0, now() - g * interval '1 minute' FROM generate_series(1, {rows} * 3) g;
             INSERT INTO audit.events (payload) SELECT jsonb_build_object('n', g) FROM generate_series(1, 500) g;"
        )
        .as_str(),
    )
    .await
    .unwrap();
    SourceDb { name, url }
}

impl SourceDb {
    pub async fn drop_db(&self) {
        let base = &services().await.pg_base;
        let mut admin = PgConnection::connect(&format!("{base}/postgres"))
            .await
            .unwrap();
        let _ = admin
            .execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str())
            .await;
    }
}

/// Per-table row counts of a database.
pub async fn row_counts(url: &str) -> Vec<(String, i64)> {
    let mut c = PgConnection::connect(url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    let mut out = vec![];
    for t in tables {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {t}"))
            .fetch_one(&mut c)
            .await
            .unwrap();
        out.push((t, n));
    }
    out
}

pub fn app_config(
    target: &str,
    url_env: &str,
    policy: &str,
    backups_dir: &std::path::Path,
    extra: &str,
) -> String {
    format!(
        "[backups]\ndirectory = \"{}\"\nlease_seconds = 3\n[[postgres]]\nname = \"{target}\"\nurl_env = \"{url_env}\"\npolicy = \"{policy}\"\n{extra}",
        backups_dir.display()
    )
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dbops-it-{tag}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Waits until backup `id` has ended; returns (status, error).
pub async fn wait_for(app: &TestApp, id: i64) -> (String, Option<String>) {
    wait_ended(app, "backups", id).await
}

/// Waits until row `id` of `table` (backups, restores, jobs: anything with a
/// `status` that is `queued` or `running` until it ends) has ended; returns
/// (status, error).
pub async fn wait_ended(app: &TestApp, table: &str, id: i64) -> (String, Option<String>) {
    for _ in 0..1200 {
        let (status, error): (String, Option<String>) =
            sqlx::query_as(&format!("SELECT status, error FROM {table} WHERE id = $1"))
                .bind(id)
                .fetch_one(&app.db)
                .await
                .unwrap();
        if !matches!(status.as_str(), "queued" | "running") {
            return (status, error);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{table} row {id} never ended");
}

async fn wait_running(app: &TestApp, id: i64) {
    for _ in 0..300 {
        let status: String = sqlx::query_scalar("SELECT status FROM backups WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
        if status == "running" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("backup {id} never started");
}

fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                if e.file_name() != ".scratch" {
                    stack.push(e.path());
                }
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// `FILE.zst` (compressed by dbops) decompressed with the zstd command, as a
/// person would, next to it; other files as they are.
pub fn unzstd(artifact: &std::path::Path) -> PathBuf {
    let name = artifact.to_string_lossy();
    let Some(plain) = name.strip_suffix(".zst") else {
        return artifact.to_path_buf();
    };
    let plain = PathBuf::from(format!("{plain}.unpacked"));
    assert!(
        std::process::Command::new("zstd")
            .args(["-d", "-q", "-f", "-o"])
            .arg(&plain)
            .arg(artifact)
            .status()
            .unwrap()
            .success(),
        "zstd -d {name}"
    );
    plain
}

pub async fn restore_into_new_db(format: &str, artifact: &std::path::Path) -> String {
    let unpacked = unzstd(artifact);
    let decompressed = unpacked != artifact;
    let artifact = unpacked.as_path();
    let base = &services().await.pg_base;
    let name = format!("dbops_it_restored_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&format!("{base}/postgres"))
        .await
        .unwrap();
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    let url = format!("{base}/{name}");
    let status = match format {
        "custom" => std::process::Command::new("pg_restore")
            .args(["--exit-on-error", "--no-owner", "-d", &url])
            .arg(artifact)
            .status(),
        "plain" => std::process::Command::new("psql")
            .args(["-q", "-v", "ON_ERROR_STOP=1", "-d", &url, "-f"])
            .arg(artifact)
            .stdout(std::process::Stdio::null())
            .status(),
        _ => {
            let dir = temp_dir("untar");
            assert!(
                std::process::Command::new("tar")
                    .arg("-C")
                    .arg(&dir)
                    .arg("-xf")
                    .arg(artifact)
                    .status()
                    .unwrap()
                    .success()
            );
            let s = std::process::Command::new("pg_restore")
                .args(["--exit-on-error", "--no-owner", "-j", "2", "-d", &url])
                .arg(&dir)
                .status();
            let _ = std::fs::remove_dir_all(&dir);
            s
        }
    }
    .unwrap();
    assert!(status.success(), "restoring the {format} backup failed");
    if decompressed {
        let _ = std::fs::remove_file(&unpacked);
    }
    url
}

fn sha256_file(path: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

#[tokio::test]
async fn each_format_restores_into_a_fresh_database_with_identical_row_counts_and_the_recorded_checksum()
 {
    // Big enough that a dump is larger than a pipe's buffer (pg_restore --list
    // stops reading early; the checksum must still cover every byte).
    let src = source_db(20_000).await;
    let dir = temp_dir("roundtrip");
    let app = spawn_app_with(
        &app_config("src", "SRC", "dev", &dir, ""),
        &[("SRC", src.url.clone())],
    )
    .await;
    let mut op = app.logged_in(Role::Operator).await;
    let expected = row_counts(&src.url).await;
    for (format, jobs) in [("custom", "1"), ("directory", "2"), ("plain", "1")] {
        op.get("/targets/src/backups").await;
        let r = op
            .post(
                "/targets/src/backups",
                &[("format", format), ("jobs", jobs)],
            )
            .await;
        let location = r
            .location()
            .unwrap_or_else(|| panic!("{format}: {}", r.text))
            .to_string();
        let id: i64 = location.rsplit('/').next().unwrap().parse().unwrap();
        let (status, error) = wait_for(&app, id).await;
        assert_eq!(status, "good", "{format}: {error:?}");
        let (key, sha, bytes): (String, String, i64) =
            sqlx::query_as("SELECT storage_key, sha256, bytes FROM backups WHERE id = $1")
                .bind(id)
                .fetch_one(&app.db)
                .await
                .unwrap();
        let file = dir.join(&key);
        assert_eq!(
            sha256_file(&file),
            sha,
            "{format}: the recorded checksum is the file's"
        );
        assert_eq!(std::fs::metadata(&file).unwrap().len() as i64, bytes);
        let restored = restore_into_new_db(format, &file).await;
        assert_eq!(
            row_counts(&restored).await,
            expected,
            "{format}: restored row counts"
        );
        let page = op.get(&location).await;
        assert!(
            page.text.contains(&sha) && page.text.contains("good"),
            "{format}: the page shows it"
        );
        let name = restored.rsplit('/').next().unwrap().to_string();
        let mut admin = PgConnection::connect(&format!("{}/postgres", services().await.pg_base))
            .await
            .unwrap();
        admin
            .execute(format!("DROP DATABASE {name} WITH (FORCE)").as_str())
            .await
            .unwrap();
    }
    assert_eq!(app.count_ops("backup.create", Some("succeeded")).await, 3);
    assert!(
        files_under(&dir).iter().all(|f| !f.contains(".partial-")),
        "no temporary files left"
    );
    src.drop_db().await;
}

/// Holds an ACCESS EXCLUSIVE lock on a table, so that pg_dump waits on it.
async fn lock_table(url: &str, table: &str) -> PgConnection {
    let mut c = PgConnection::connect(url).await.unwrap();
    c.execute("BEGIN").await.unwrap();
    c.execute(format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE").as_str())
        .await
        .unwrap();
    c
}

/// The pid of the pg_dump dumping `dbname` (found through its environment).
async fn pg_dump_pid(dbname: &str) -> i32 {
    for _ in 0..200 {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if !String::from_utf8_lossy(&cmd).contains("pg_dump") {
                continue;
            }
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            if String::from_utf8_lossy(&env).contains(&format!("PGDATABASE={dbname}")) {
                return pid;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no pg_dump for {dbname}");
}

#[tokio::test]
async fn pg_dump_never_sees_the_password_on_its_command_line_and_a_killed_pg_dump_leaves_nothing() {
    let src = source_db(100).await;
    let dir = temp_dir("killed");
    let secret = "S3cret-Dump-Pw-41";
    // Trust authentication ignores the password, so the URL with it still connects.
    let url = src.url.replace("postgres@", &format!("postgres:{secret}@"));
    let app = spawn_app_with(&app_config("src", "SRC", "dev", &dir, ""), &[("SRC", url)]).await;
    let lock = lock_table(&src.url, "orders").await;
    let id = run::request(
        &app.state(),
        &AuditCtx::system(),
        "src",
        Trigger::Person,
        BackupRequest::default(),
    )
    .await
    .unwrap();
    wait_running(&app, id).await;
    let pid = pg_dump_pid(&src.name).await;
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
        .replace('\0', " ");
    let environ = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap())
        .replace('\0', " ");
    assert!(
        !cmdline.contains(secret),
        "password on the command line: {cmdline}"
    );
    assert!(
        !environ.contains(secret) && !environ.contains("PGPASSWORD="),
        "password in the environment"
    );
    assert!(
        environ.contains("PGPASSFILE="),
        "the password comes from a passfile"
    );

    unsafe { libc::kill(pid, libc::SIGKILL) };
    let (status, error) = wait_for(&app, id).await;
    drop(lock);
    assert_eq!(status, "failed");
    assert!(error.unwrap().contains("pg_dump failed"));
    assert!(
        files_under(&dir).is_empty(),
        "no artifact and no temp file: {:?}",
        files_under(&dir)
    );
    // The backup's row ends just before its operation does: wait for both.
    let mut outcome = String::new();
    for _ in 0..50 {
        outcome = sqlx::query_scalar("SELECT o.outcome FROM operations o JOIN backups b ON b.operation_id = o.id WHERE b.id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
        if outcome != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(outcome, "failed");
    // This backup's passfile (other tests may be running backups of their own).
    let passfile = environ
        .split(' ')
        .find_map(|kv| kv.strip_prefix("PGPASSFILE="))
        .unwrap()
        .to_string();
    assert!(
        !std::path::Path::new(&passfile).exists(),
        "the passfile {passfile} is removed"
    );
    src.drop_db().await;
}

#[tokio::test]
async fn a_target_stopped_mid_backup_gives_a_failed_backup_and_no_artifact() {
    let tmp = temp_dir("stopped-target");
    let cluster = dbops::devcluster::PgCluster::start(&tmp.join("pg"))
        .await
        .unwrap();
    cluster.create_database("shop").await.unwrap();
    let url = cluster.url("shop");
    let mut c = PgConnection::connect(&url).await.unwrap();
    c.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 1000)")
        .await
        .unwrap();
    drop(c);
    let dir = tmp.join("backups");
    let app = spawn_app_with(
        &app_config("shop", "SHOP", "dev", &dir, ""),
        &[("SHOP", url.clone())],
    )
    .await;
    let lock = lock_table(&url, "t").await;
    let id = run::request(
        &app.state(),
        &AuditCtx::system(),
        "shop",
        Trigger::Person,
        BackupRequest::default(),
    )
    .await
    .unwrap();
    wait_running(&app, id).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(lock);
    cluster.stop().await.unwrap();
    let (status, error) = wait_for(&app, id).await;
    // Depending on timing pg_dump sees the server go away or finishes first; it must
    // never be listed good without a verified artifact.
    if status == "good" {
        assert!(files_under(&dir).iter().any(|f| f.contains(".dump")));
    } else {
        assert_eq!(status, "failed", "{error:?}");
        assert!(files_under(&dir).is_empty(), "{:?}", files_under(&dir));
    }
    // With the server down, a new backup fails with a readable reason.
    let id = run::request(
        &app.state(),
        &AuditCtx::system(),
        "shop",
        Trigger::Person,
        BackupRequest::default(),
    )
    .await
    .unwrap();
    let (status, error) = wait_for(&app, id).await;
    assert_eq!(status, "failed");
    let error = error.unwrap();
    assert!(
        error.contains("refused") || error.contains("not responding") || error.contains("timeout"),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

#[tokio::test]
async fn unwritable_storage_fails_the_backup_with_a_readable_error() {
    let src = source_db(10).await;
    let dir = temp_dir("unwritable");
    // Where the target's backups would go is a file, not a directory.
    std::fs::write(dir.join("src"), b"in the way").unwrap();
    let app = spawn_app_with(
        &app_config("src", "SRC", "dev", &dir, ""),
        &[("SRC", src.url.clone())],
    )
    .await;
    let id = run::request(
        &app.state(),
        &AuditCtx::system(),
        "src",
        Trigger::Person,
        BackupRequest::default(),
    )
    .await
    .unwrap();
    let (status, error) = wait_for(&app, id).await;
    assert_eq!(status, "failed");
    let error = error.unwrap();
    assert!(!error.is_empty() && !error.contains("panicked"), "{error}");
    let good: i64 = sqlx::query_scalar("SELECT count(*) FROM backups WHERE status = 'good'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(good, 0);
    assert_eq!(files_under(&dir), vec!["src".to_string()]);
    src.drop_db().await;
}

#[tokio::test]
async fn two_dbops_on_one_console_database_run_each_scheduled_instant_once() {
    let src = source_db(10).await;
    let dir = temp_dir("schedule");
    // Once a year at 10:05 on 21 November: the apps' own tickers, running now, never hit it.
    let extra = "[postgres.backup]\nschedule = \"5 10 21 11 *\"\n";
    let a = spawn_app_with(
        &app_config("src", "SRC", "dev", &dir, extra),
        &[("SRC", src.url.clone())],
    )
    .await;
    // A second replica on the same console database.
    let config = crate::helpers::test_config(
        &app_config("src", "SRC", "dev", &dir, extra),
        &[
            ("SRC", src.url.clone()),
            ("DATABASE_URL", a.database_url.clone()),
        ],
    );
    let b = dbops::app::Application::build(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (sa, sb) = (a.state(), b.state.clone());
    let from: chrono::DateTime<chrono::Utc> = "2026-11-21T10:03:00Z".parse().unwrap();
    let to: chrono::DateTime<chrono::Utc> = "2026-11-21T10:07:00Z".parse().unwrap();
    let ticks: Vec<_> = (0..4)
        .map(|i| {
            let s = if i % 2 == 0 { sa.clone() } else { sb.clone() };
            tokio::spawn(async move { dbops::schedules::schedule_tick(&s, from, to).await })
        })
        .collect();
    for t in ticks {
        t.await.unwrap();
    }
    let slots: Vec<(chrono::DateTime<chrono::Utc>, String)> =
        sqlx::query_as("SELECT schedule_slot, trigger FROM backups")
            .fetch_all(&a.db)
            .await
            .unwrap();
    assert_eq!(slots.len(), 1, "{slots:?}");
    assert_eq!(
        slots[0].0,
        "2026-11-21T10:05:00Z"
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap()
    );
    assert_eq!(slots[0].1, "schedule");
    // A tick with no instant in its window queues nothing.
    dbops::schedules::schedule_tick(
        &sa,
        "2026-11-21T10:06:00Z".parse().unwrap(),
        "2026-11-21T10:07:00Z".parse().unwrap(),
    )
    .await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM backups")
        .fetch_one(&a.db)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let id: i64 = sqlx::query_scalar("SELECT id FROM backups")
        .fetch_one(&a.db)
        .await
        .unwrap();
    assert_eq!(wait_for(&a, id).await.0, "good");
    src.drop_db().await;
}

#[tokio::test]
async fn viewers_read_backup_history_but_cannot_start_download_or_delete() {
    let src = source_db(10).await;
    let dir = temp_dir("viewer");
    let app = spawn_app_with(
        &app_config("src", "SRC", "production", &dir, ""),
        &[("SRC", src.url.clone())],
    )
    .await;
    let id = run::request(
        &app.state(),
        &AuditCtx::system(),
        "src",
        Trigger::Person,
        BackupRequest::default(),
    )
    .await
    .unwrap();
    assert_eq!(wait_for(&app, id).await.0, "good");
    let mut viewer = app.logged_in(Role::Viewer).await;
    assert_eq!(viewer.get("/backups").await.status, StatusCode::OK);
    let page = viewer.get("/targets/src/backups").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.text.contains("<svg class=\"chart\""),
        "history as a chart"
    );
    assert!(!page.text.contains("Back up now"), "no button for viewers");
    assert_eq!(
        viewer.get(&format!("/backups/{id}")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        viewer.post("/targets/src/backups", &[]).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        viewer.get(&format!("/backups/{id}/download")).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        viewer
            .get(&format!(
                "/targets/src/actions/backup.delete?backup_id={id}"
            ))
            .await
            .status,
        StatusCode::FORBIDDEN
    );

    // An operator downloads it (logged), byte for byte.
    let mut op = app.logged_in(Role::Operator).await;
    let r = op
        .client
        .get(app.url(&format!("/backups/{id}/download")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let sha = r.headers()["x-checksum-sha256"]
        .to_str()
        .unwrap()
        .to_string();
    let body = r.bytes().await.unwrap();
    use sha2::Digest;
    assert_eq!(hex::encode(sha2::Sha256::digest(&body)), sha);
    assert_eq!(app.count_ops("backup.download", Some("succeeded")).await, 1);
    let _ = op.get("/").await;
    src.drop_db().await;
}

#[tokio::test]
async fn deleting_a_production_backup_needs_an_approver_and_only_touches_that_targets_backup() {
    let src = source_db(10).await;
    let dir = temp_dir("delete");
    let toml = format!(
        "{}[[postgres]]\nname = \"scratch\"\nurl_env = \"SRC\"\npolicy = \"dev\"\n",
        app_config("src", "SRC", "production", &dir, "")
    );
    let app = spawn_app_with(&toml, &[("SRC", src.url.clone())]).await;
    let id = run::request(
        &app.state(),
        &AuditCtx::system(),
        "src",
        Trigger::Person,
        BackupRequest::default(),
    )
    .await
    .unwrap();
    assert_eq!(wait_for(&app, id).await.0, "good");
    let key: String = sqlx::query_scalar("SELECT storage_key FROM backups WHERE id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap();

    // Through a dev target (no approval), someone tries to delete production's backup.
    let mut op = app.logged_in(Role::Operator).await;
    op.get("/").await;
    let r = op
        .post(
            "/targets/scratch/actions/backup.delete",
            &[("backup_id", &id.to_string()), ("reason", "cleanup")],
        )
        .await;
    let req_url = r.location().unwrap().to_string();
    let page = op.get(&req_url).await;
    assert!(
        page.text.contains("belongs to src"),
        "refused: {}",
        page.text
    );
    assert!(dir.join(&key).exists(), "nothing was deleted");

    // The right way: on production, an approver approves, then it runs.
    let r = op
        .post(
            "/targets/src/actions/backup.delete",
            &[
                ("backup_id", &id.to_string()),
                ("reason", "contains test data"),
            ],
        )
        .await;
    let req_url = r.location().unwrap().to_string();
    let req_id: i64 = req_url.rsplit('/').next().unwrap().parse().unwrap();
    let mut ap = app.logged_in(Role::Approver).await;
    ap.get(&req_url).await;
    ap.post(
        &format!("/approvals/{req_id}/approve"),
        &[("comment", "ok")],
    )
    .await;
    op.get(&req_url).await;
    op.post(&format!("/approvals/{req_id}/execute"), &[]).await;
    let status: String = sqlx::query_scalar("SELECT status FROM backups WHERE id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(status, "deleted");
    assert!(!dir.join(&key).exists());
    src.drop_db().await;
}

#[tokio::test]
async fn a_pipeline_takes_a_backup_with_an_api_token_and_without_one_is_refused() {
    let src = source_db(10).await;
    let dir = temp_dir("api");
    let app = spawn_app_with(
        &app_config("src", "SRC", "production", &dir, ""),
        &[("SRC", src.url.clone())],
    )
    .await;
    let mut admin = app.logged_in(Role::Admin).await;
    admin.get("/admin/tokens").await;
    admin
        .post(
            "/admin/tokens",
            &[
                ("name", "deploy"),
                ("scope", "backup:create"),
                ("scope", "backup:read"),
            ],
        )
        .await;
    let page = admin.get("/admin/tokens").await;
    let token = page
        .text
        .split("shown only once: ")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .trim()
        .to_string();
    assert!(token.starts_with("dbops_"));
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM api_tokens WHERE prefix = $1 AND token_hash IS NOT NULL",
    )
    .bind(&token[..12])
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(stored, 1);

    let client = reqwest::Client::new();
    let r = client
        .post(app.url("/api/v1/targets/src/backups"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = client
        .post(app.url("/api/v1/targets/src/backups"))
        .bearer_auth("dbops_wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = client
        .post(app.url("/api/v1/targets/src/backups"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let body: serde_json::Value = r.json().await.unwrap();
    let id = body["id"].as_i64().unwrap();
    assert_eq!(wait_for(&app, id).await.0, "good");
    let r = client
        .get(app.url(&format!("/api/v1/backups/{id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["status"], "good");
    let (trigger, who): (String, String) = sqlx::query_as("SELECT b.trigger, o.actor_name FROM backups b JOIN operations o ON o.id = b.operation_id WHERE b.id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!((trigger.as_str(), who.as_str()), ("api", "token:deploy"));

    let token_id: i64 = sqlx::query_scalar("SELECT id FROM api_tokens")
        .fetch_one(&app.db)
        .await
        .unwrap();
    admin
        .post(&format!("/admin/tokens/{token_id}/revoke"), &[])
        .await;
    let r = client
        .post(app.url("/api/v1/targets/src/backups"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "a revoked token is dead"
    );
    assert!(app.count_ops("auth.denied", Some("denied")).await >= 3);
    src.drop_db().await;
}

#[tokio::test]
async fn redis_targets_are_backed_up_as_a_verified_logical_export() {
    let tmp = temp_dir("redis-backup");
    let mut redis = dbops::devcluster::RedisServer::start(&tmp).await.unwrap();
    let client = redis_client(&redis.url()).await;
    for i in 0..500 {
        let _: () = client
            .set(
                format!("shop:session:{i}"),
                format!("v{i}"),
                None,
                None,
                false,
            )
            .await
            .unwrap();
    }
    let dir = tmp.join("backups");
    let toml = format!(
        "[backups]\ndirectory = \"{}\"\n[[redis]]\nname = \"cache\"\nurl_env = \"R\"\npolicy = \"dev\"\n",
        dir.display()
    );
    let app = spawn_app_with(&toml, &[("R", redis.url())]).await;
    let id = run::request(
        &app.state(),
        &AuditCtx::system(),
        "cache",
        Trigger::Person,
        BackupRequest::default(),
    )
    .await
    .unwrap();
    let (status, error) = wait_for(&app, id).await;
    assert_eq!(status, "good", "{error:?}");
    let keys: i64 =
        sqlx::query_scalar("SELECT (verification->>'keys')::bigint FROM backups WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(keys, 500);
    let id = run::request(
        &app.state(),
        &AuditCtx::system(),
        "cache",
        Trigger::Person,
        BackupRequest {
            redis_format: Some("rdb".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (status, error) = wait_for(&app, id).await;
    assert_eq!(status, "good", "{error:?}");
    redis.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&tmp);
}

async fn redis_client(url: &str) -> fred::prelude::Client {
    use fred::prelude::*;
    let c = Builder::from_config(Config::from_url(url).unwrap())
        .build()
        .unwrap();
    c.init().await.unwrap();
    c
}

use fred::prelude::KeysInterface as _;

#[tokio::test]
async fn a_dbops_killed_mid_backup_leaves_an_interrupted_backup_and_no_temp_file_after_restart() {
    let src = source_db(100).await;
    let base = &services().await.pg_base;
    let console = format!("dbops_it_{}", uuid::Uuid::new_v4().simple());
    let database_url = format!("{base}/{console}");
    let dir = temp_dir("sigkill");
    let cfg = dir.join("dbops.toml");
    std::fs::write(
        &cfg,
        format!(
            "database_url = \"{database_url}\"\n{}",
            app_config("src", "SRC", "dev", &dir.join("store"), "")
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_dbops");
    let lock = lock_table(&src.url, "orders").await;
    // A separate dbops process serves and runs the queued backup.
    let mut serve = KillOnDrop(
        std::process::Command::new(bin)
            .arg("--config")
            .arg(&cfg)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("SRC", &src.url)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("serve.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let queued = std::process::Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .args(["backup", "run", "--target", "src"])
        .env("SRC", &src.url)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        queued.status.success(),
        "{}",
        String::from_utf8_lossy(&queued.stderr)
    );
    let db = sqlx::PgPool::connect(&database_url).await.unwrap();
    let mut running = false;
    for _ in 0..300 {
        let s: Option<String> =
            sqlx::query_scalar("SELECT status FROM backups ORDER BY id DESC LIMIT 1")
                .fetch_optional(&db)
                .await
                .unwrap();
        if s.as_deref() == Some("running") {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        running,
        "the serving dbops took the backup: {}",
        std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default()
    );
    let partials = || {
        files_under(&dir.join("store"))
            .into_iter()
            .filter(|f| f.contains(".partial-"))
            .count()
    };
    for _ in 0..100 {
        if partials() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(partials(), 1, "a temporary file while it runs");

    // SIGKILL: no chance to clean up.
    serve.0.kill().unwrap();
    serve.0.wait().unwrap();
    drop(lock); // the orphaned pg_dump now finishes into a closed pipe and exits
    tokio::time::sleep(Duration::from_secs(4)).await; // longer than the 3 s lease

    // dbops starts again.
    let config = crate::helpers::test_config(
        &format!(
            "database_url = \"{database_url}\"\n{}",
            app_config("src", "SRC", "dev", &dir.join("store"), "")
        ),
        &[("SRC", src.url.clone())],
    );
    let app = dbops::app::Application::build(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (status, error, outcome): (String, Option<String>, String) = sqlx::query_as(
        "SELECT b.status, b.error, o.outcome FROM backups b JOIN operations o ON o.id = b.operation_id ORDER BY b.id DESC LIMIT 1",
    )
    .fetch_one(&app.state.db)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), outcome.as_str()),
        ("interrupted", "interrupted")
    );
    assert!(error.unwrap().contains("stopped"));
    assert_eq!(partials(), 0, "the temporary file is removed");
    assert!(dbops::audit::verify(&app.state.db).await.unwrap().ok());
    drop(app);
    db.close().await;
    src.drop_db().await;
}

#[tokio::test]
async fn a_test_restore_compares_row_counts_with_the_dumps_snapshot_and_drops_its_database() {
    let src = source_db(500).await;
    let dir = temp_dir("testrestore");
    let extra = "[postgres.backup]\ntest_restore = true\n";
    let app = spawn_app_with(
        &app_config("src", "SRC", "dev", &dir, extra),
        &[("SRC", src.url.clone())],
    )
    .await;
    for format in ["custom", "directory"] {
        let opts = dbops::pg_tools::DumpOptions {
            format: dbops::pg_tools::Format::parse(format).unwrap(),
            jobs: if format == "directory" { 2 } else { 1 },
            ..Default::default()
        };
        let id = run::request(
            &app.state(),
            &AuditCtx::system(),
            "src",
            Trigger::Person,
            BackupRequest {
                options: Some(opts),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let (status, error) = wait_for(&app, id).await;
        assert_eq!(status, "good", "{format}: {error:?}");
        let v: serde_json::Value =
            sqlx::query_scalar("SELECT verification FROM backups WHERE id = $1")
                .bind(id)
                .fetch_one(&app.db)
                .await
                .unwrap();
        assert_eq!(v["test_restore"]["row_counts_match"], true, "{v}");
        assert_eq!(v["test_restore"]["tables"], 3);
        assert_eq!(v["test_restore"]["rows"], 500 + 1500 + 500);
    }
    let mut c = PgConnection::connect(&src.url).await.unwrap();
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_database WHERE datname LIKE 'dbops_testrestore_%'",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!(left, 0, "the scratch databases are dropped");
    src.drop_db().await;
}

#[tokio::test]
async fn a_backup_to_s3_compatible_storage_is_good_downloadable_and_byte_identical() {
    let moto = crate::storage::start_moto().await;
    let bucket = moto.create_bucket().await;
    let src = source_db(300).await;
    let dir = temp_dir("s3");
    let toml = format!(
        "[backups]\ndirectory = \"{}\"\n[backups.s3]\nbucket = \"{bucket}\"\nprefix = \"team\"\nendpoint = \"{}\"\naccess_key_id_env = \"KEY\"\nsecret_access_key_env = \"SECRET\"\nallow_http = true\n[[postgres]]\nname = \"src\"\nurl_env = \"SRC\"\npolicy = \"dev\"\n[postgres.backup]\nstorage = \"s3\"\n",
        dir.display(),
        moto.url()
    );
    let app = spawn_app_with(
        &toml,
        &[
            ("SRC", src.url.clone()),
            ("KEY", "AKIDDBOPS".into()),
            ("SECRET", "s3-secret-never-shown".into()),
        ],
    )
    .await;
    let id = run::request(
        &app.state(),
        &AuditCtx::system(),
        "src",
        Trigger::Person,
        BackupRequest::default(),
    )
    .await
    .unwrap();
    let (status, error) = wait_for(&app, id).await;
    assert_eq!(status, "good", "{error:?}");
    let (storage, sha): (String, String) =
        sqlx::query_as("SELECT storage, sha256 FROM backups WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(storage, "s3");
    assert!(
        files_under(&dir).is_empty(),
        "nothing was written locally: {:?}",
        files_under(&dir)
    );
    let mut op = app.logged_in(Role::Operator).await;
    let page = op.get("/targets/src/backups").await;
    assert!(
        page.text.contains(&format!("s3://{bucket}/team")),
        "the page says where backups go"
    );
    assert!(!page.text.contains("s3-secret-never-shown"));
    let r = op
        .client
        .get(app.url(&format!("/backups/{id}/download")))
        .send()
        .await
        .unwrap();
    let body = r.bytes().await.unwrap();
    use sha2::Digest;
    assert_eq!(hex::encode(sha2::Sha256::digest(&body)), sha);
    let restored = restore_into_new_db("custom", &{
        let f = dir.join("download.dump.zst");
        std::fs::write(&f, &body).unwrap();
        f
    })
    .await;
    assert_eq!(row_counts(&restored).await, row_counts(&src.url).await);
    src.drop_db().await;
}

#[tokio::test]
async fn a_test_restore_schedule_takes_a_backup_that_is_test_restored() {
    let src = source_db(50).await;
    let dir = temp_dir("trschedule");
    // Only the weekly test restore at 06:00 on Sundays; no nightly schedule.
    let extra = "[postgres.backup]\ntest_restore_schedule = \"0 6 * * 0\"\n";
    let app = spawn_app_with(
        &app_config("src", "SRC", "dev", &dir, extra),
        &[("SRC", src.url.clone())],
    )
    .await;
    // 2026-11-22 is a Sunday.
    dbops::schedules::schedule_tick(
        &app.state(),
        "2026-11-22T05:59:00Z".parse().unwrap(),
        "2026-11-22T06:00:30Z".parse().unwrap(),
    )
    .await;
    let id: i64 = sqlx::query_scalar("SELECT id FROM backups WHERE trigger = 'schedule'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let (status, error) = wait_for(&app, id).await;
    assert_eq!(status, "good", "{error:?}");
    let v: serde_json::Value = sqlx::query_scalar("SELECT verification FROM backups WHERE id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(v["test_restore"]["row_counts_match"], true, "{v}");
    src.drop_db().await;
}

/// A child process killed when the test ends, also when it fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_table_name_with_spaces_is_kept_whole_in_the_backup_and_its_restore_over() {
    let src = source_db(10).await;
    let mut c = PgConnection::connect(&src.url).await.unwrap();
    c.execute(r#"CREATE TABLE "order lines" (id int); INSERT INTO "order lines" SELECT generate_series(1, 3);"#)
        .await
        .unwrap();
    let dir = temp_dir("spaces");
    let app = spawn_app_with(
        &app_config("src", "SRC", "dev", &dir, ""),
        &[("SRC", src.url.clone())],
    )
    .await;
    let state = app.state();
    let id = run::request(
        &state,
        &AuditCtx::system(),
        "src",
        Trigger::Person,
        BackupRequest::default(),
    )
    .await
    .unwrap();
    let (status, error) = wait_for(&app, id).await;
    assert_eq!(status, "good", "{error:?}");
    let tables: serde_json::Value =
        sqlx::query_scalar("SELECT verification->'tables' FROM backups WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(
        tables
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "public.order lines"),
        "{tables}"
    );
    let mut viewer = app.logged_in(Role::Viewer).await;
    let page = viewer.get(&format!("/backups/{id}")).await;
    assert!(page.text.contains("public.order lines"), "{}", page.text);

    // Restored over the database (swap): the check finds the table by its whole name.
    c.execute(r#"DELETE FROM "order lines""#).await.unwrap();
    drop(c);
    let user = app.current_user("spaces-op", Role::Operator).await;
    let form: std::collections::BTreeMap<String, String> = [
        ("backup_id".to_string(), id.to_string()),
        ("end_sessions".to_string(), "on".to_string()),
    ]
    .into();
    let req = dbops::approvals::request(
        &state,
        &AuditCtx::system(),
        &user,
        "src",
        "restore.over",
        &form,
        "test",
    )
    .await
    .unwrap();
    dbops::approvals::execute(&state, &AuditCtx::system(), &user, req.id)
        .await
        .unwrap();
    let rid: i64 = sqlx::query_scalar(
        "SELECT r.id FROM restores r JOIN jobs j ON j.id = r.job_id WHERE j.approval_id = $1",
    )
    .bind(req.id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    let (status, error) = wait_ended(&app, "restores", rid).await;
    assert_eq!(status, "succeeded", "{error:?}");
    let mut c = PgConnection::connect(&src.url).await.unwrap();
    let n: i64 = sqlx::query_scalar(r#"SELECT count(*) FROM "order lines""#)
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 3);
    drop(c);
    src.drop_db().await;
    // The kept previous database too (the test server is shared).
    let base = &services().await.pg_base;
    let mut admin = PgConnection::connect(&format!("{base}/postgres"))
        .await
        .unwrap();
    let _ = admin
        .execute(
            format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                dbops::restores::swap::Names::for_restore(&src.name, rid).previous
            )
            .as_str(),
        )
        .await;
}
