//! Redis restores through the pages, against throwaway redis-servers: a logical
//! export loads into an empty server with the same keys, values and TTLs; loading
//! again into a full server is refused; flushing first needs an approver; an RDB
//! snapshot's page says how to load it instead of pretending.

use dbops::{
    audit::AuditCtx,
    auth::Role,
    backups::run::{self, BackupRequest, Trigger},
};

use crate::{
    backups::{temp_dir, wait_ended, wait_for},
    helpers::{TestApp, spawn_app_with},
    redis_backup::{TempDir, assert_same_data, fill, redis, total_keys},
};

fn config(dir: &std::path::Path) -> String {
    format!(
        "[backups]\ndirectory = \"{}\"\nlease_seconds = 3\n\
         [[redis]]\nname = \"rsrc\"\nurl_env = \"RSRC\"\npolicy = \"dev\"\n\
         [[redis]]\nname = \"rdst\"\nurl_env = \"RDST\"\npolicy = \"staging\"\n",
        dir.display()
    )
}

async fn backup(app: &TestApp, format: &str) -> i64 {
    let id = run::request(
        &app.state(),
        &AuditCtx::system(),
        "rsrc",
        Trigger::Person,
        BackupRequest {
            redis_format: Some(format.into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (status, error) = wait_for(app, id).await;
    assert_eq!(status, "good", "{error:?}");
    id
}

async fn wait_for_job(app: &TestApp, id: i64) -> (String, Option<String>) {
    wait_ended(app, "jobs", id).await
}

fn job_id(location: &str) -> i64 {
    location
        .strip_prefix("/jobs/")
        .unwrap_or_else(|| panic!("not a job page: {location}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_redis_export_restores_into_an_empty_server_and_flushing_first_needs_an_approver() {
    let tmp = TempDir::new("rrestore");
    let src = redis(&tmp, "src").await;
    let dst = redis(&tmp, "dst").await;
    fill(&src.url()).await;
    let dir = temp_dir("rrestore");
    let app = spawn_app_with(&config(&dir), &[("RSRC", src.url()), ("RDST", dst.url())]).await;
    let id = backup(&app, "logical").await;

    let mut op = app.logged_in(Role::Operator).await;
    let page = op.get(&format!("/backups/{id}/restore")).await;
    assert!(
        page.text.contains("How the export meets the keys there"),
        "{}",
        page.text
    );
    let r = op
        .post(
            &format!("/backups/{id}/restore"),
            &[("target", "rdst"), ("mode", "into_empty")],
        )
        .await;
    let job = job_id(r.location().unwrap_or_else(|| panic!("{}", r.text)));
    let (status, error) = wait_for_job(&app, job).await;
    assert_eq!(status, "succeeded", "{error:?}");
    assert_same_data(&src.url(), &dst.url()).await;
    let page = op.get(&format!("/jobs/{job}")).await;
    let restored: i64 =
        sqlx::query_scalar("SELECT (result->>'restored')::bigint FROM jobs WHERE id = $1")
            .bind(job)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(restored, total_keys(&src.url()).await, "every key restored");
    assert!(
        page.text.contains("restored") && page.text.contains(&format!(": {restored}")),
        "the job page shows the outcome: {}",
        page.text
    );

    // Into a server that holds keys now: refused before anything is written.
    let r = op
        .post(
            &format!("/backups/{id}/restore"),
            &[("target", "rdst"), ("mode", "into_empty")],
        )
        .await;
    let again = job_id(r.location().unwrap());
    let (status, error) = wait_for_job(&app, again).await;
    assert_eq!(status, "failed");
    assert!(error.unwrap_or_default().contains("hold"), "a clear reason");

    // Flushing first is destructive: on staging it waits for an approver.
    let extra = dst.url();
    let c = fred::prelude::Builder::from_config(fred::prelude::Config::from_url(&extra).unwrap())
        .build()
        .unwrap();
    fred::prelude::ClientLike::init(&c).await.unwrap();
    let _: () = fred::prelude::KeysInterface::set(&c, "added:after", "1", None, None, false)
        .await
        .unwrap();
    let keys_before = total_keys(&dst.url()).await;
    let r = op
        .post(
            &format!("/backups/{id}/restore"),
            &[("target", "rdst"), ("mode", "flush_first")],
        )
        .await;
    let form = r.location().unwrap().to_string();
    assert!(
        form.starts_with("/targets/rdst/actions/redis.restore.over?"),
        "{form}"
    );
    let page = op.get(&form).await;
    assert!(page.text.contains("FLUSHALL"), "{}", page.text);
    let r = op
        .post(
            "/targets/rdst/actions/redis.restore.over",
            &[
                ("backup_id", &id.to_string()),
                ("mode", "flush_first"),
                ("reason", "cache poisoned"),
            ],
        )
        .await;
    let req_url = r.location().unwrap().to_string();
    let req: i64 = req_url.rsplit('/').next().unwrap().parse().unwrap();
    assert_eq!(total_keys(&dst.url()).await, keys_before, "nothing ran yet");
    let refused = op.post(&format!("/approvals/{req}/execute"), &[]).await;
    assert!(refused.status.is_redirection() || refused.status.is_client_error());
    assert_eq!(
        total_keys(&dst.url()).await,
        keys_before,
        "not without approval"
    );
    let mut ap = app.logged_in(Role::Approver).await;
    let seen = ap.get(&req_url).await;
    assert!(
        seen.text.contains(&format!("#{id} of rsrc")),
        "{}",
        seen.text
    );
    ap.post(&format!("/approvals/{req}/approve"), &[("comment", "ok")])
        .await;
    op.post(&format!("/approvals/{req}/execute"), &[]).await;
    let job: i64 = sqlx::query_scalar("SELECT id FROM jobs WHERE approval_id = $1")
        .bind(req)
        .fetch_one(&app.db)
        .await
        .unwrap();
    let (status, error) = wait_for_job(&app, job).await;
    assert_eq!(status, "succeeded", "{error:?}");
    let exists: i64 = fred::prelude::KeysInterface::exists(&c, "added:after")
        .await
        .unwrap();
    assert_eq!(exists, 0, "flushed first");
    assert_same_data(&src.url(), &dst.url()).await;
    let state: String = sqlx::query_scalar("SELECT state FROM approval_requests WHERE id = $1")
        .bind(req)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(state, "executed", "the request ends with its job");
    assert_eq!(
        app.count_ops("redis.restore.over", Some("succeeded")).await,
        1
    );
    assert_eq!(app.count_ops("redis.restore", Some("succeeded")).await, 1);
    assert_eq!(app.count_ops("redis.restore", Some("failed")).await, 1);
}

#[tokio::test]
async fn an_rdb_snapshot_page_says_how_to_load_it_and_the_restore_is_refused() {
    let tmp = TempDir::new("rrdb");
    let src = redis(&tmp, "src").await;
    let dst = redis(&tmp, "dst").await;
    fill(&src.url()).await;
    let dir = temp_dir("rrdb");
    let app = spawn_app_with(&config(&dir), &[("RSRC", src.url()), ("RDST", dst.url())]).await;
    let id = backup(&app, "rdb").await;
    let mut op = app.logged_in(Role::Operator).await;
    let page = op.get(&format!("/backups/{id}/restore")).await;
    assert!(page.text.contains("SHUTDOWN NOSAVE"), "{}", page.text);
    assert!(page.text.contains("CONFIG GET dir"));
    let r = op
        .post(
            &format!("/backups/{id}/restore"),
            &[("target", "rdst"), ("mode", "into_empty")],
        )
        .await;
    assert_eq!(r.status, reqwest::StatusCode::BAD_REQUEST);
    assert!(r.text.contains("RDB snapshot"), "{}", r.text);
    assert_eq!(total_keys(&dst.url()).await, 0);
    assert_eq!(app.count_ops("redis.restore", Some("failed")).await, 1);
}

/// Sends one command to a Redis.
async fn cmd(c: &fred::prelude::Client, args: &[&str]) -> fred::prelude::Value {
    use fred::{
        prelude::ClientLike,
        types::{ClusterHash, CustomCommand},
    };
    let name = args[0].to_string();
    c.custom(
        CustomCommand::new(name, ClusterHash::Random, false),
        args[1..].iter().map(|a| a.to_string()).collect::<Vec<_>>(),
    )
    .await
    .unwrap()
}

async fn client(url: &str) -> fred::prelude::Client {
    let c = fred::prelude::Builder::from_config(fred::prelude::Config::from_url(url).unwrap())
        .build()
        .unwrap();
    fred::prelude::ClientLike::init(&c).await.unwrap();
    c
}

#[tokio::test]
async fn a_redis_restore_over_that_fails_half_way_puts_back_what_was_there() {
    let tmp = TempDir::new("rrestore-half");
    let src = redis(&tmp, "src").await;
    let dst = redis(&tmp, "dst").await;
    // The export: 3,000 keys of 2 KB; what the destination holds: 20 small keys.
    let s = client(&src.url()).await;
    let big = "x".repeat(2048);
    for i in 0..3000 {
        cmd(&s, &["SET", &format!("big:{i}"), &big]).await;
    }
    let d = client(&dst.url()).await;
    for i in 0..20 {
        cmd(&d, &["SET", &format!("mine:{i}"), &format!("value {i}")]).await;
    }
    let dir = temp_dir("rrestore-half");
    let app = spawn_app_with(&config(&dir), &[("RSRC", src.url()), ("RDST", dst.url())]).await;
    let id = backup(&app, "logical").await;
    // The destination runs out of memory part-way through the import.
    let info = cmd(&d, &["INFO", "memory"]).await.as_string().unwrap();
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let limit = (used + 2 * 1024 * 1024).to_string();
    cmd(&d, &["CONFIG", "SET", "maxmemory", &limit]).await;
    cmd(&d, &["CONFIG", "SET", "maxmemory-policy", "noeviction"]).await;

    let mut op = app.logged_in(Role::Operator).await;
    let r = op
        .post(
            "/targets/rdst/actions/redis.restore.over",
            &[
                ("backup_id", &id.to_string()),
                ("mode", "flush_first"),
                ("reason", "cache poisoned"),
            ],
        )
        .await;
    let req_url = r
        .location()
        .unwrap_or_else(|| panic!("{}", r.text))
        .to_string();
    let req: i64 = req_url.rsplit('/').next().unwrap().parse().unwrap();
    let mut ap = app.logged_in(Role::Approver).await;
    ap.get(&req_url).await;
    ap.post(&format!("/approvals/{req}/approve"), &[("comment", "ok")])
        .await;
    op.get(&req_url).await;
    op.post(&format!("/approvals/{req}/execute"), &[]).await;
    let job: i64 = sqlx::query_scalar("SELECT id FROM jobs WHERE approval_id = $1")
        .bind(req)
        .fetch_one(&app.db)
        .await
        .unwrap();
    let (status, error) = wait_for_job(&app, job).await;
    assert_eq!(status, "failed");
    let error = error.unwrap();
    assert!(error.contains("was put back from safety backup"), "{error}");
    // Exactly what was there before, and nothing of the half-done import.
    assert_eq!(total_keys(&dst.url()).await, 20, "{error}");
    for i in 0..20 {
        let v = cmd(&d, &["GET", &format!("mine:{i}")]).await;
        assert_eq!(
            v.as_string().as_deref(),
            Some(format!("value {i}").as_str())
        );
    }
    let safety: i64 = sqlx::query_scalar(
        "SELECT id FROM backups WHERE target = 'rdst' AND method = 'redis_logical' AND status = 'good'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(error.contains(&format!("#{safety}")), "{error}");
}
