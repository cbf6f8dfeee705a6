//! Faults under real use: the console database restarting under open pages, a
//! target PostgreSQL or Redis stopping mid-operation, `dbops serve` SIGKILLed with
//! work running, a full disk. After each: nothing is listed good that is not, every
//! operation has a final state, no temporary file is left, and the operations log
//! still verifies.
//!
//! Servers that are stopped here are always throwaway ones (`devcluster`), never
//! the machine's PostgreSQL or Redis.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use dbops::{
    audit::AuditCtx,
    auth::{CurrentUser, Role},
    backups::run::{self, BackupRequest, Trigger},
    devcluster::{PgCluster, RedisServer},
};
use reqwest::StatusCode;
use sqlx::{Connection, Executor, PgConnection, PgPool};

use crate::{
    backups::{source_db, temp_dir},
    helpers::{TestApp, services, spawn_app_on, spawn_app_with},
};

// ---------------------------------------------------------------------------------
// What every fault test checks afterwards.
// ---------------------------------------------------------------------------------

/// Every file under `dir` (relative), scratch space included.
fn all_files(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Temporary files (`.name.partial-*`, scratch dumps) left under a backups directory.
fn temp_files(dir: &Path) -> Vec<String> {
    all_files(dir)
        .into_iter()
        .filter(|f| f.contains(".partial-") || f.starts_with(".scratch/"))
        .collect()
}

/// Every backup listed good has its file, of the recorded size and checksum; and
/// every file in the store belongs to a good backup.
async fn only_good_backups_have_files(db: &PgPool, dir: &Path) {
    let good: Vec<(i64, String, i64, String)> = sqlx::query_as(
        "SELECT id, storage_key, bytes, sha256 FROM backups WHERE status = 'good' AND storage = 'local'",
    )
    .fetch_all(db)
    .await
    .unwrap();
    for (id, key, bytes, sha) in &good {
        let path = dir.join(key);
        let data = std::fs::read(&path).unwrap_or_else(|e| {
            panic!("backup #{id} is listed good but {key} cannot be read: {e}")
        });
        assert_eq!(data.len() as i64, *bytes, "backup #{id}: size");
        use sha2::Digest;
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&data)),
            *sha,
            "backup #{id}: checksum"
        );
    }
    let keys: Vec<&str> = good.iter().map(|g| g.1.as_str()).collect();
    for f in all_files(dir) {
        assert!(
            keys.contains(&f.as_str()),
            "{f} is in the backups directory but no good backup names it"
        );
    }
}

/// Operations still `running`, jobs/backups/restores still active, approvals still
/// approved-and-started: none may be left once the dust has settled.
async fn unfinished(db: &PgPool) -> Vec<String> {
    let mut out: Vec<String> = sqlx::query_scalar(
        "SELECT 'operation #' || id || ' ' || kind FROM operations WHERE outcome = 'running'
         UNION ALL SELECT 'backup #' || id FROM backups WHERE status IN ('queued', 'running')
         UNION ALL SELECT 'restore #' || id FROM restores WHERE status IN ('queued', 'running')
         UNION ALL SELECT 'job #' || id || ' ' || kind FROM jobs WHERE status IN ('queued', 'running')
         UNION ALL SELECT 'approval #' || id FROM approval_requests
                   WHERE state = 'approved' AND execution_started_at IS NOT NULL",
    )
    .fetch_all(db)
    .await
    .unwrap();
    out.sort();
    out
}

/// Waits (up to `secs`) until nothing is unfinished; panics naming what is left.
async fn settles(db: &PgPool, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = unfinished(db).await;
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still unfinished after {secs} s: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn audit_verifies(db: &PgPool) {
    let report = dbops::audit::verify(db).await.unwrap();
    assert!(
        report.ok(),
        "the operations log no longer verifies: {report:?}"
    );
}

/// Polls `sql` (one boolean) until it is true.
async fn until(db: &PgPool, sql: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let ok: Option<bool> = sqlx::query_scalar(sql).fetch_one(db).await.unwrap();
        if ok == Some(true) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never true within {secs} s: {sql}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// A child process killed when the test ends, also when it fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------
// 1. The console database restarts while pages are open.
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn pages_say_the_console_database_is_unavailable_while_it_restarts_and_then_recover() {
    let tmp = temp_dir("console-restart");
    let cluster = PgCluster::start(&tmp.join("pg")).await.unwrap();
    let store = tmp.join("store");
    let src = source_db(10).await;
    let app = spawn_app_on(
        &cluster.url("dbops_console"),
        &crate::backups::app_config("src", "SRC", "dev", &store, ""),
        &[("SRC", src.url.clone())],
    )
    .await;
    let mut b = app.logged_in(Role::Operator).await;
    let pages = ["/", "/backups", "/operations", "/jobs"];
    for p in pages {
        assert_eq!(b.get(p).await.status, StatusCode::OK, "{p}");
    }

    cluster.stop().await.unwrap();
    // Every open page, reloaded or polled by htmx, says so in a sentence with the
    // request id; nothing hangs and nothing panics.
    let down = futures::future::join_all(pages.iter().map(|p| {
        let client = b.client.clone();
        let url = format!("{}{p}", b.base);
        async move {
            let r = client
                .get(&url)
                .header("accept", "text/html")
                .send()
                .await
                .unwrap();
            let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
            (r.status(), id, r.text().await.unwrap())
        }
    }))
    .await;
    for ((status, id, text), p) in down.iter().zip(pages) {
        assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE, "{p}: {text}");
        assert!(
            text.contains("The console database is not answering right now"),
            "{p}: {text}"
        );
        assert!(text.contains(id.as_str()), "{p} shows its request id");
    }
    let htmx = b
        .client
        .get(format!("{}/jobs", b.base))
        .header("hx-request", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(htmx.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(htmx.headers()["hx-retarget"], "#toasts");
    assert!(htmx.text().await.unwrap().contains("not answering"));

    cluster.start_again().await.unwrap();
    // The same dbops and the same browser session carry on.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = b.get("/").await;
        if r.status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {}", r.text);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for p in pages {
        assert_eq!(
            b.get(p).await.status,
            StatusCode::OK,
            "{p} after the restart"
        );
    }
    // The workers carry on too: a backup and a job started from the pages run.
    let r = b.post("/targets/src/backups", &[]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let backup: i64 = r
        .location()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let (status, error) = ended(&app.db, "backups", backup).await;
    assert_eq!(status, "good", "{error}");
    let r = b.post("/targets/src/reports/space/refresh", &[]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let job: i64 = r
        .location()
        .unwrap()
        .trim_start_matches("/jobs/")
        .parse()
        .unwrap();
    let (status, error) = ended(&app.db, "jobs", job).await;
    assert_eq!(status, "succeeded", "{error}");
    settles(&app.db, 5).await;
    only_good_backups_have_files(&app.db, &store).await;
    audit_verifies(&app.db).await;
    assert!(temp_files(&store).is_empty());
    drop(cluster);
    src.drop_db().await;
    let _ = std::fs::remove_dir_all(&tmp);
}

// ---------------------------------------------------------------------------------
// 2. A target PostgreSQL stops mid-backup and mid-restore.
// ---------------------------------------------------------------------------------

/// Rows of `slow` are checked by a function that sleeps in every database but
/// `keep_fast`: pg_dump reads them at full speed, and a restore of them into
/// another database (COPY checks each row) takes `rows` × 50 ms.
const SLOW_TABLE: &str = "
    CREATE FUNCTION slow_elsewhere(int) RETURNS boolean LANGUAGE sql AS
      $$ SELECT CASE WHEN current_database() = 'keep_fast' THEN true ELSE pg_sleep(0.05) IS NOT NULL END $$;
    CREATE TABLE slow (id int PRIMARY KEY CHECK (slow_elsewhere(id)));
";

async fn fill_slow_table(url: &str, rows: i64) {
    let mut c = PgConnection::connect(url).await.unwrap();
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut c)
        .await
        .unwrap();
    c.execute(SLOW_TABLE.replace("keep_fast", &db).as_str())
        .await
        .unwrap();
    c.execute(format!("INSERT INTO slow SELECT generate_series(1, {rows})").as_str())
        .await
        .unwrap();
}

async fn backup_now(app: &TestApp, target: &str) -> i64 {
    run::request(
        &app.state(),
        &AuditCtx::system(),
        target,
        Trigger::Person,
        BackupRequest::default(),
    )
    .await
    .unwrap()
}

async fn ended(db: &PgPool, table: &str, id: i64) -> (String, String) {
    until(
        db,
        &format!("SELECT status NOT IN ('queued', 'running') FROM {table} WHERE id = {id}"),
        60,
    )
    .await;
    sqlx::query_as(&format!(
        "SELECT status, coalesce(error, '') FROM {table} WHERE id = $1"
    ))
    .bind(id)
    .fetch_one(db)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_target_stopped_mid_backup_or_mid_restore_ends_failed_with_a_reason_and_lists_nothing_good()
 {
    let tmp = temp_dir("target-stops");
    let cluster = PgCluster::start(&tmp.join("pg")).await.unwrap();
    cluster.create_database("shop").await.unwrap();
    let url = cluster.url("shop");
    let mut c = PgConnection::connect(&url).await.unwrap();
    c.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 1000)")
        .await
        .unwrap();
    drop(c);
    fill_slow_table(&url, 400).await;
    let store = tmp.join("store");
    let app = spawn_app_with(
        &crate::backups::app_config("shop", "SHOP", "dev", &store, ""),
        &[("SHOP", url.clone())],
    )
    .await;

    // Mid-backup: pg_dump waits on a lock when the server goes away.
    let lock = lock_table(&url, "t").await;
    let id = backup_now(&app, "shop").await;
    until(
        &app.db,
        &format!("SELECT b.status = 'running' AND j.phase = 'dumping' FROM backups b JOIN jobs j ON j.id = b.job_id WHERE b.id = {id}"),
        30,
    )
    .await;
    cluster.stop().await.unwrap();
    drop(lock);
    let (status, error) = ended(&app.db, "backups", id).await;
    eprintln!("backup with its server stopped: {error}");
    assert_eq!(status, "failed", "{error}");
    assert!(
        error.contains("pg_dump"),
        "the error says what failed: {error}"
    );
    assert!(!error.contains("panicked"), "{error}");
    assert_eq!(
        all_files(&store),
        Vec::<String>::new(),
        "no artifact, no temp file"
    );

    // Mid-restore into a new database.
    cluster.start_again().await.unwrap();
    let good = backup_now(&app, "shop").await;
    assert_eq!(ended(&app.db, "backups", good).await.0, "good");
    let rid = dbops::restores::request(
        &app.state(),
        &AuditCtx::system(),
        &dbops::restores::RestoreRequest {
            backup_id: good,
            database: "shop_copy".into(),
            jobs: Some(1),
            target: None,
            options: Default::default(),
        },
    )
    .await
    .unwrap();
    until(
        &app.db,
        &format!("SELECT j.phase = 'restoring' FROM restores r JOIN jobs j ON j.id = r.job_id WHERE r.id = {rid}"),
        30,
    )
    .await;
    let mut admin = PgConnection::connect(&cluster.url("postgres"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Stopped once rows are being copied into the new database.
    loop {
        let copying: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = 'shop_copy' AND query ILIKE 'COPY%')",
        )
        .fetch_one(&mut admin)
        .await
        .unwrap();
        if copying {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restore never started copying"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(admin);
    cluster.stop().await.unwrap();
    let (status, error) = ended(&app.db, "restores", rid).await;
    eprintln!("restore with its server stopped: {error}");
    assert!(
        !error.contains("password file"),
        "noise in the error: {error}"
    );
    assert_eq!(status, "failed", "{error}");
    // The half-restored database could not be dropped with the server down: the
    // error says so, by name.
    assert!(error.contains("shop_copy"), "{error}");
    cluster.start_again().await.unwrap();
    // Once the server answers again, the sweeper drops what the restore left
    // (called here rather than waiting for its next tick).
    dbops::restores::drop_leftovers(&app.state()).await;
    let left: bool = {
        let mut c = PgConnection::connect(&cluster.url("postgres"))
            .await
            .unwrap();
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'shop_copy')")
            .fetch_one(&mut c)
            .await
            .unwrap()
    };
    assert!(
        !left,
        "the half-restored database is dropped once the server is back"
    );
    if error.contains("could not be dropped") {
        let cleaned: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM operations WHERE kind = 'restore.cleanup' AND outcome = 'succeeded'",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
        assert_eq!(cleaned, 1, "the drop is logged");
    }

    settles(&app.db, 10).await;
    let (outcome, op_error): (String, String) = sqlx::query_as(
        "SELECT o.outcome, coalesce(o.error, '') FROM operations o JOIN restores r ON r.operation_id = o.id WHERE r.id = $1",
    )
    .bind(rid)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        (outcome.as_str(), op_error.as_str()),
        ("failed", error.as_str())
    );
    let backup_outcomes: Vec<(String, String)> = sqlx::query_as(
        "SELECT b.status, o.outcome FROM backups b JOIN operations o ON o.id = b.operation_id ORDER BY b.id",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(
        backup_outcomes,
        vec![
            ("failed".to_string(), "failed".to_string()),
            ("good".to_string(), "succeeded".to_string())
        ]
    );
    only_good_backups_have_files(&app.db, &store).await;
    assert!(temp_files(&store).is_empty(), "{:?}", temp_files(&store));
    audit_verifies(&app.db).await;
    drop(cluster);
    let _ = std::fs::remove_dir_all(&tmp);
}

// ---------------------------------------------------------------------------------
// 3. Redis stops mid-bulk-delete.
// ---------------------------------------------------------------------------------

async fn redis_client(url: &str) -> fred::prelude::Client {
    use fred::prelude::*;
    let c = Builder::from_config(Config::from_url(url).unwrap())
        .build()
        .unwrap();
    c.init().await.unwrap();
    c
}

async fn redis(c: &fred::prelude::Client, args: &[&str]) -> fred::prelude::Value {
    use fred::prelude::ClientLike;
    let cmd = fred::types::CustomCommand::new(
        args[0].to_string(),
        fred::types::ClusterHash::FirstKey,
        false,
    );
    let args: Vec<fred::prelude::Value> = args[1..].iter().map(|a| (*a).into()).collect();
    c.custom(cmd, args).await.unwrap()
}

/// `n` keys `prefix1` … `prefixN`, written by one script.
async fn fill_keys(c: &fred::prelude::Client, prefix: &str, n: u64) {
    redis(
        c,
        &[
            "EVAL",
            "for i = 1, tonumber(ARGV[1]) do redis.call('SET', ARGV[2] .. i, 'x') end return 1",
            "0",
            &n.to_string(),
            prefix,
        ],
    )
    .await;
}

async fn dbsize(c: &fred::prelude::Client) -> i64 {
    redis(c, &["DBSIZE"]).await.as_i64().unwrap()
}

#[tokio::test]
async fn redis_stopped_mid_delete_by_pattern_ends_the_job_failed_saying_how_many_keys_went() {
    let tmp = temp_dir("redis-stops");
    let mut server = RedisServer::start(&tmp.join("redis")).await.unwrap();
    let c = redis_client(&server.url()).await;
    fill_keys(&c, "fault:", 200_000).await;
    fill_keys(&c, "keep:", 10).await;
    let app = spawn_app_with(
        "[targets]\nconnect_timeout_seconds = 2\n[[redis]]\nname = \"cache\"\nurl_env = \"CACHE\"\npolicy = \"dev\"\n",
        &[("CACHE", server.url())],
    )
    .await;
    let mut b = app.logged_in(Role::Operator).await;
    let r = b
        .post(
            "/targets/cache/actions/redis.keys.delete",
            &[
                ("db", "0"),
                ("pattern", "fault:*"),
                ("batch", "10"),
                ("expected", "200000"),
                ("reason", "fault test"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    // Stopped as soon as keys start to go.
    let deadline = Instant::now() + Duration::from_secs(20);
    while dbsize(&c).await == 200_010 {
        assert!(Instant::now() < deadline, "the delete never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = fred::prelude::ClientLike::quit(&c).await;
    server.stop().await.unwrap();

    let job: i64 = sqlx::query_scalar("SELECT max(id) FROM jobs WHERE kind = 'redis.keys.delete'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let (status, error) = ended(&app.db, "jobs", job).await;
    eprintln!("delete with its server stopped: {error}");
    assert_eq!(status, "failed", "{error}");
    assert!(
        error.contains("keys were deleted before this"),
        "the error says how far it got: {error}"
    );
    settles(&app.db, 10).await;
    let (outcome, state): (String, String) = sqlx::query_as(
        "SELECT o.outcome, a.state FROM jobs j JOIN operations o ON o.id = j.operation_id
         JOIN approval_requests a ON a.id = j.approval_id WHERE j.id = $1",
    )
    .bind(job)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((outcome.as_str(), state.as_str()), ("failed", "failed"));
    // The job page says it in words.
    let page = b.get(&format!("/jobs/{job}")).await;
    assert!(
        page.text.contains("keys were deleted before this"),
        "{}",
        page.text
    );
    audit_verifies(&app.db).await;
    let _ = std::fs::remove_dir_all(&tmp);
}

// ---------------------------------------------------------------------------------
// 4. `dbops serve` SIGKILLed with a backup, a restore and a bulk delete running.
// ---------------------------------------------------------------------------------

fn start_serve(cfg: &Path, env: &[(&str, String)], log: &Path) -> KillOnDrop {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dbops"));
    cmd.arg("--config")
        .arg(cfg)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        );
    for (k, v) in env {
        cmd.env(k, v);
    }
    KillOnDrop(cmd.spawn().unwrap())
}

async fn console_user(db: &PgPool, role: Role) -> CurrentUser {
    use dbops::auth::{password, users};
    let name = format!(
        "{}-{}",
        role.as_str(),
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    let hash = password::hash(&password::generate()).unwrap();
    let id = users::create(db, &users::Username::parse(&name).unwrap(), &hash, role)
        .await
        .unwrap();
    CurrentUser {
        id,
        username: name,
        role,
        csrf_token: String::new(),
    }
}

async fn drop_pg_database(name: &str) {
    let mut admin = PgConnection::connect(&format!("{}/postgres", services().await.pg_base))
        .await
        .unwrap();
    let _ = admin
        .execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str())
        .await;
}

#[tokio::test]
async fn a_dbops_killed_with_a_backup_a_restore_and_a_delete_running_ends_them_interrupted_after_restart()
 {
    let tmp = temp_dir("sigkill-all");
    let base = services().await.pg_base.clone();
    let console = format!("dbops_it_{}", uuid::Uuid::new_v4().simple());
    let database_url = format!("{base}/{console}");
    let src = source_db(100).await;
    let slow = source_db(1).await;
    fill_slow_table(&slow.url, 400).await;
    let restored = format!("dbops_it_rs_{}", uuid::Uuid::new_v4().simple());
    let mut redis_server = RedisServer::start(&tmp.join("redis")).await.unwrap();
    let rc = redis_client(&redis_server.url()).await;
    fill_keys(&rc, "gone:", 50_000).await;
    // Keys the delete keeps: a pattern that matches every key is a flush, which
    // needs an approver even on dev.
    fill_keys(&rc, "keep:", 10).await;

    let store = tmp.join("store");
    let toml = format!(
        "database_url = \"{database_url}\"
[backups]
directory = \"{}\"
lease_seconds = 3
[targets]
connect_timeout_seconds = 3
[[postgres]]
name = \"src\"
url_env = \"SRC\"
policy = \"dev\"
[[postgres]]
name = \"slow\"
url_env = \"SLOW\"
policy = \"dev\"
[[redis]]
name = \"cache\"
url_env = \"CACHE\"
policy = \"dev\"
",
        store.display()
    );
    let cfg = tmp.join("dbops.toml");
    std::fs::write(&cfg, &toml).unwrap();
    let env = [
        ("SRC", src.url.clone()),
        ("SLOW", slow.url.clone()),
        ("CACHE", redis_server.url()),
    ];
    let log = tmp.join("serve.log");
    let serve_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut serve = start_serve(&cfg, &env, &log);
    // This process only queues work (its application is built, never run): the
    // serving child takes it.
    let here = dbops::app::Application::build(
        crate::helpers::test_config(&toml, &env),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let state = here.state.clone();
    let db = state.db.clone();
    let ctx = AuditCtx::system();

    // A good backup to restore from.
    let good = run::request(
        &state,
        &ctx,
        "slow",
        Trigger::Person,
        BackupRequest::default(),
    )
    .await
    .unwrap();
    let (status, error) = ended(&db, "backups", good).await;
    assert_eq!(status, "good", "{error}\n{}", serve_log());

    // 1. A backup that waits on a lock, its temporary file open.
    let lock = lock_table(&src.url, "orders").await;
    let backup = run::request(
        &state,
        &ctx,
        "src",
        Trigger::Person,
        BackupRequest::default(),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !temp_files(&store).iter().any(|f| f.contains(".partial-")) {
        assert!(
            Instant::now() < deadline,
            "no temporary file\n{}",
            serve_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 2. A restore copying rows slowly, with two jobs (its archive spooled to a
    // scratch file, which must not outlive the process).
    let restore = dbops::restores::request(
        &state,
        &ctx,
        &dbops::restores::RestoreRequest {
            backup_id: good,
            database: restored.clone(),
            jobs: Some(2),
            target: None,
            options: Default::default(),
        },
    )
    .await
    .unwrap();
    until(
        &db,
        &format!("SELECT j.phase = 'restoring' FROM restores r JOIN jobs j ON j.id = r.job_id WHERE r.id = {restore}"),
        30,
    )
    .await;
    // 3. A delete by pattern, stuck: writes are paused on that Redis.
    redis(&rc, &["CLIENT", "PAUSE", "60000", "WRITE"]).await;
    let operator = console_user(&db, Role::Operator).await;
    let form: std::collections::BTreeMap<String, String> =
        [("db", "0"), ("pattern", "gone:*"), ("batch", "100")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    let req = dbops::approvals::request(
        &state,
        &ctx,
        &operator,
        "cache",
        "redis.keys.delete",
        &form,
        "fault test",
    )
    .await
    .unwrap();
    dbops::approvals::execute(&state, &ctx, &operator, req.id)
        .await
        .unwrap();
    let job: i64 = sqlx::query_scalar("SELECT id FROM jobs WHERE approval_id = $1")
        .bind(req.id)
        .fetch_one(&db)
        .await
        .unwrap();
    until(
        &db,
        &format!(
            "SELECT status = 'running' AND heartbeat_at > started_at FROM jobs WHERE id = {job}"
        ),
        30,
    )
    .await;
    until(
        &db,
        &format!("SELECT status = 'running' FROM backups WHERE id = {backup}"),
        5,
    )
    .await;

    // SIGKILL: no chance to clean anything up.
    serve.0.kill().unwrap();
    serve.0.wait().unwrap();
    drop(serve);
    drop(lock);
    // Past the 3 s lease of every heartbeat.
    until(
        &db,
        "SELECT coalesce(max(h) < clock_timestamp() - interval '3.5 s', true) FROM (
           SELECT heartbeat_at AS h FROM backups WHERE status = 'running'
           UNION ALL SELECT heartbeat_at FROM jobs WHERE status = 'running'
           UNION ALL SELECT heartbeat_at FROM restores WHERE status = 'running') x",
        20,
    )
    .await;
    let serve = start_serve(&cfg, &env, &log);
    settles(&db, 30).await;

    let (status, error, outcome): (String, String, String) = sqlx::query_as(
        "SELECT b.status, b.error, o.outcome FROM backups b JOIN operations o ON o.id = b.operation_id WHERE b.id = $1",
    )
    .bind(backup)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), outcome.as_str()),
        ("interrupted", "interrupted"),
        "{error}"
    );
    assert!(error.contains("stopped"), "{error}");
    let (status, error, job_status, outcome): (String, String, String, String) = sqlx::query_as(
        "SELECT r.status, r.error, j.status, o.outcome FROM restores r JOIN jobs j ON j.id = r.job_id
         JOIN operations o ON o.id = r.operation_id WHERE r.id = $1",
    )
    .bind(restore)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), job_status.as_str(), outcome.as_str()),
        ("interrupted", "interrupted", "interrupted"),
        "{error}"
    );
    assert!(
        error.contains(&restored),
        "the error names the database to check: {error}"
    );
    let (job_status, outcome, approval, approval_error): (String, String, String, String) =
        sqlx::query_as(
            "SELECT j.status, o.outcome, a.state, coalesce(a.error, '') FROM jobs j
             JOIN operations o ON o.id = j.operation_id JOIN approval_requests a ON a.id = j.approval_id
             WHERE j.id = $1",
        )
        .bind(job)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(
        (job_status.as_str(), outcome.as_str(), approval.as_str()),
        ("interrupted", "interrupted", "failed")
    );
    assert!(approval_error.contains("dbops stopped"), "{approval_error}");
    assert!(temp_files(&store).is_empty(), "{:?}", temp_files(&store));
    only_good_backups_have_files(&db, &store).await;
    // `dbops audit verify`, the real command.
    let verify = std::process::Command::new(env!("CARGO_BIN_EXE_dbops"))
        .arg("--config")
        .arg(&cfg)
        .args(["audit", "verify"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    drop(serve);
    drop(here);
    let _ = redis(&rc, &["CLIENT", "UNPAUSE"]).await;
    let _ = fred::prelude::ClientLike::quit(&rc).await;
    redis_server.stop().await.unwrap();
    drop_pg_database(&restored).await;
    src.drop_db().await;
    slow.drop_db().await;
    db.close().await;
    drop_pg_database(&console).await;
    let _ = std::fs::remove_dir_all(&tmp);
}

// ---------------------------------------------------------------------------------
// 5. The backups directory fills up.
// ---------------------------------------------------------------------------------

/// A size-limited tmpfs mounted on a directory; unmounted when dropped (also when
/// the test panics).
struct SmallDisk(PathBuf);

impl SmallDisk {
    /// `None` where this process may not mount (not root, no CAP_SYS_ADMIN).
    fn mount(dir: &Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "cannot mount a small filesystem here ({}): skipping",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(SmallDisk(dir.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn a_full_backups_disk_fails_the_backup_with_no_space_left_and_leaves_no_file() {
    let tmp = temp_dir("disk-full");
    let store = tmp.join("store");
    let Some(disk) = SmallDisk::mount(&store, "2M") else {
        return;
    };
    let src = source_db(10).await;
    let mut c = PgConnection::connect(&src.url).await.unwrap();
    // About 6 MB even compressed: random hex.
    c.execute(
        "CREATE TABLE blob AS SELECT g AS id, md5(random()::text) || md5(random()::text) AS v
         FROM generate_series(1, 200000) g",
    )
    .await
    .unwrap();
    drop(c);
    let app = spawn_app_with(
        &crate::backups::app_config("src", "SRC", "dev", &store, ""),
        &[("SRC", src.url.clone())],
    )
    .await;
    let mut b = app.logged_in(Role::Operator).await;
    let id = backup_now(&app, "src").await;
    let (status, error) = ended(&app.db, "backups", id).await;
    assert_eq!(status, "failed", "{error}");
    assert!(
        error.to_lowercase().contains("no space left"),
        "the error says the disk is full: {error}"
    );
    assert!(
        !error.contains("panicked") && !error.contains("Os {"),
        "{error}"
    );
    settles(&app.db, 10).await;
    assert_eq!(
        all_files(&store),
        Vec::<String>::new(),
        "no partial file is left"
    );
    let good: i64 = sqlx::query_scalar("SELECT count(*) FROM backups WHERE status = 'good'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(good, 0);
    let outcome: String = sqlx::query_scalar(
        "SELECT o.outcome FROM operations o JOIN backups b ON b.operation_id = o.id WHERE b.id = $1",
    )
    .bind(id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(outcome, "failed");
    // The backup's page says it.
    let page = b.get(&format!("/backups/{id}")).await;
    assert!(
        page.text.contains("no space left on the backup volume"),
        "{}",
        page.text
    );
    audit_verifies(&app.db).await;
    drop(disk);
    src.drop_db().await;
    let _ = std::fs::remove_dir_all(&tmp);
}

// ---------------------------------------------------------------------------------
// 6. `dbops serve` SIGKILLed in the swap window of a restore over a database.
// ---------------------------------------------------------------------------------

/// Every table's rows of a database, as text: its whole contents.
async fn contents_of(url: &str) -> Vec<(String, i64, String)> {
    let mut c = PgConnection::connect(url).await.unwrap();
    let mut out = vec![];
    for (table, n) in crate::backups::row_counts(url).await {
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

async fn pg_database_exists(name: &str) -> bool {
    let mut admin = PgConnection::connect(&format!("{}/postgres", services().await.pg_base))
        .await
        .unwrap();
    sqlx::query_scalar::<_, i32>("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut admin)
        .await
        .unwrap()
        .is_some()
}

#[tokio::test]
async fn a_dbops_killed_in_the_swap_of_a_restore_over_leaves_one_whole_database_under_the_name_and_keeps_the_other()
 {
    let tmp = temp_dir("sigkill-swap");
    let base = services().await.pg_base.clone();
    let console = format!("dbops_it_{}", uuid::Uuid::new_v4().simple());
    let database_url = format!("{base}/{console}");
    let src = source_db(200).await;
    let store = tmp.join("store");
    let toml = format!(
        "database_url = \"{database_url}\"
[backups]
directory = \"{}\"
lease_seconds = 3
[[postgres]]
name = \"src\"
url_env = \"SRC\"
policy = \"dev\"
",
        store.display()
    );
    let cfg = tmp.join("dbops.toml");
    std::fs::write(&cfg, &toml).unwrap();
    let env = [("SRC", src.url.clone())];
    let log = tmp.join("serve.log");
    let serve_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut serve = start_serve(&cfg, &env, &log);
    let here = dbops::app::Application::build(
        crate::helpers::test_config(&toml, &env),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let state = here.state.clone();
    let db = state.db.clone();
    let ctx = AuditCtx::system();
    let good = run::request(
        &state,
        &ctx,
        "src",
        Trigger::Person,
        BackupRequest::default(),
    )
    .await
    .unwrap();
    let (status, error) = ended(&db, "backups", good).await;
    assert_eq!(status, "good", "{error}\n{}", serve_log());
    let in_backup = contents_of(&src.url).await;
    // Then the database moves on.
    let mut c = PgConnection::connect(&src.url).await.unwrap();
    c.execute("DELETE FROM orders WHERE id > 100; CREATE TABLE later (id int)")
        .await
        .unwrap();
    drop(c);
    let before = contents_of(&src.url).await;
    let operator = console_user(&db, Role::Operator).await;

    // Runs a restore over src (dev: approved at once) that waits in its swap
    // window — another session stays on the database and it may not end it —
    // then kills dbops there. Returns the restore's id.
    let restore_stuck_in_swap = |serve: KillOnDrop| {
        let (state, db, ctx, operator) = (state.clone(), db.clone(), ctx.clone(), operator.clone());
        let url = src.url.clone();
        async move {
            let mut serve = serve;
            let holder = PgConnection::connect(&url).await.unwrap();
            let form: std::collections::BTreeMap<String, String> =
                [("backup_id".to_string(), good.to_string())].into();
            let req = dbops::approvals::request(
                &state,
                &ctx,
                &operator,
                "src",
                "restore.over",
                &form,
                "fault test",
            )
            .await
            .unwrap();
            dbops::approvals::execute(&state, &ctx, &operator, req.id)
                .await
                .unwrap();
            let rid: i64 = sqlx::query_scalar(
                "SELECT r.id FROM restores r JOIN jobs j ON j.id = r.job_id WHERE j.approval_id = $1",
            )
            .bind(req.id)
            .fetch_one(&db)
            .await
            .unwrap();
            until(
                &db,
                &format!(
                    "SELECT j.phase = 'swapping the restored copy in' FROM restores r JOIN jobs j ON j.id = r.job_id WHERE r.id = {rid}"
                ),
                60,
            )
            .await;
            serve.0.kill().unwrap();
            serve.0.wait().unwrap();
            drop(serve);
            (rid, holder)
        }
    };

    // 1. Killed before the rename committed.
    let (rid, holder) = restore_stuck_in_swap(serve).await;
    drop(holder);
    let name = src.name.clone();
    let work = format!("{name}_restoring_{rid}");
    assert!(
        pg_database_exists(&work).await,
        "the checked copy waits beside"
    );
    serve = start_serve(&cfg, &env, &log);
    until(
        &db,
        &format!("SELECT status = 'interrupted' AND NOT leftover FROM restores WHERE id = {rid}"),
        60,
    )
    .await;
    let error: String = sqlx::query_scalar("SELECT error FROM restores WHERE id = $1")
        .bind(rid)
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(error.contains("the swap had not happened"), "{error}");
    assert_eq!(contents_of(&src.url).await, before, "nothing was lost");
    assert!(!pg_database_exists(&work).await, "the copy was dropped");
    assert!(!pg_database_exists(&format!("{name}_before_restore_{rid}")).await);
    let outcome: String = sqlx::query_scalar(
        "SELECT o.outcome FROM restores r JOIN operations o ON o.id = r.operation_id WHERE r.id = $1",
    )
    .bind(rid)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(outcome, "interrupted");
    let facts: serde_json::Value = sqlx::query_scalar(
        "SELECT result FROM operations WHERE kind = 'restore.cleanup' AND params->>'restore_id' = $1",
    )
    .bind(rid.to_string())
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(facts["swapped"], false, "{facts}");

    // 2. Killed after the rename committed, before dbops recorded it: the
    // renames are done here as the committed transaction would have done them.
    let (rid, holder) = restore_stuck_in_swap(serve).await;
    drop(holder);
    let work = format!("{name}_restoring_{rid}");
    let previous = format!("{name}_before_restore_{rid}");
    let mut admin = PgConnection::connect(&format!("{base}/postgres"))
        .await
        .unwrap();
    admin
        .execute(format!("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname IN ('{name}', '{work}')").as_str())
        .await
        .unwrap();
    admin
        .execute(format!("BEGIN; ALTER DATABASE {name} RENAME TO {previous}; ALTER DATABASE {work} RENAME TO {name}; COMMIT").as_str())
        .await
        .unwrap();
    let serve = start_serve(&cfg, &env, &log);
    until(
        &db,
        &format!("SELECT status = 'interrupted' AND NOT leftover FROM restores WHERE id = {rid}"),
        60,
    )
    .await;
    let (error, swapped): (String, bool) =
        sqlx::query_as("SELECT error, swapped_at IS NOT NULL FROM restores WHERE id = $1")
            .bind(rid)
            .fetch_one(&db)
            .await
            .unwrap();
    assert!(error.contains("the swap had completed"), "{error}");
    assert!(swapped, "recorded as swapped: it can be swapped back");
    assert_eq!(
        contents_of(&src.url).await,
        in_backup,
        "the name holds the restored copy"
    );
    assert_eq!(
        contents_of(&format!("{base}/{previous}")).await,
        before,
        "the replaced database is kept whole"
    );
    audit_verifies(&db).await;

    drop(serve);
    drop(here);
    drop_pg_database(&previous).await;
    src.drop_db().await;
    drop_pg_database(&console).await;
}
