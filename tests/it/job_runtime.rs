//! Backups on the one job runtime: they are jobs like every other long piece of
//! work (the jobs page lists them, Stop works from there), their kind's limit
//! keeps a second backup of a target waiting while the first runs, and the old
//! `[backups]` worker keys still work with a deprecation warning.

use std::time::Duration;

use dbops::{
    audit::AuditCtx,
    auth::Role,
    backups::run::{self, BackupRequest, Trigger},
};
use sqlx::{Connection, Executor, PgConnection};

use crate::{
    backups::{app_config, source_db, temp_dir, wait_ended, wait_for},
    helpers::{spawn_app_with, test_config},
};

async fn job_of(db: &sqlx::PgPool, backup: i64) -> (i64, String) {
    sqlx::query_as(
        "SELECT j.id, j.status FROM backups b JOIN jobs j ON j.id = b.job_id WHERE b.id = $1",
    )
    .bind(backup)
    .fetch_one(db)
    .await
    .unwrap()
}

async fn until_job_running(db: &sqlx::PgPool, backup: i64) -> i64 {
    for _ in 0..300 {
        let (job, status) = job_of(db, backup).await;
        if status == "running" {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the job of backup #{backup} never ran");
}

#[tokio::test]
async fn a_second_backup_of_a_target_waits_for_the_first_and_stop_on_the_jobs_page_cancels_a_backup()
 {
    let src = source_db(100).await;
    let dir = temp_dir("runtime");
    let app = spawn_app_with(
        &app_config("src", "SRC", "dev", &dir, ""),
        &[("SRC", src.url.clone())],
    )
    .await;
    // pg_dump of the first backup waits on this lock until the test lets go.
    let mut lock = PgConnection::connect(&src.url).await.unwrap();
    lock.execute("BEGIN").await.unwrap();
    lock.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let ask = || async {
        run::request(
            &app.state(),
            &AuditCtx::system(),
            "src",
            Trigger::Person,
            BackupRequest::default(),
        )
        .await
        .unwrap()
    };
    let first = ask().await;
    let first_job = until_job_running(&app.db, first).await;
    let second = ask().await;
    // Give a worker every chance to take it: the limit (one backup per target)
    // keeps it queued for as long as the first one runs. Past 20 s the waiting
    // job gives its worker back and the queue offers it again later (below, it
    // must still run once the first has ended).
    tokio::time::sleep(Duration::from_secs(23)).await;
    let (second_job, status) = job_of(&app.db, second).await;
    assert_eq!(
        status, "queued",
        "a second backup of src started beside the first"
    );
    let (_, status) = job_of(&app.db, first).await;
    assert_eq!(status, "running");

    // The one "running work" page lists both backups, with their state.
    let mut op = app.logged_in(Role::Operator).await;
    let page = op.get("/jobs").await;
    assert!(page.text.contains("Backup"), "{}", page.text);
    assert!(page.text.contains(&format!("/jobs/{first_job}")));
    assert!(page.text.contains(&format!("/jobs/{second_job}")));
    let page = op.get(&format!("/jobs/{first_job}")).await;
    assert!(
        page.text.contains(&format!("/backups/{first}")),
        "the job links to its backup"
    );

    // Stop, from the job's page: the backup, its job and its operation end
    // cancelled, and the waiting backup then runs.
    let r = op.post(&format!("/jobs/{first_job}/cancel"), &[]).await;
    assert!(r.status.is_redirection(), "{} {}", r.status, r.text);
    let (status, _) = wait_for(&app, first).await;
    assert_eq!(status, "cancelled");
    // The backup's row ends inside its job; the job ends just after.
    wait_ended(&app, "jobs", first_job).await;
    let (job_status, outcome): (String, String) = sqlx::query_as(
        "SELECT j.status, o.outcome FROM jobs j JOIN operations o ON o.id = j.operation_id WHERE j.id = $1",
    )
    .bind(first_job)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        (job_status.as_str(), outcome.as_str()),
        ("cancelled", "cancelled")
    );
    drop(lock);
    let (status, error) = wait_for(&app, second).await;
    assert_eq!(status, "good", "{error:?}");
    wait_ended(&app, "jobs", second_job).await;
    let (_, status) = job_of(&app.db, second).await;
    assert_eq!(status, "succeeded");
    // The backup page shows the job's progress: bytes written, as the job saw them.
    let page = op.get(&format!("/backups/{second}")).await;
    assert!(page.text.contains("good"), "{}", page.text);
    src.drop_db().await;
}

#[tokio::test]
async fn the_old_backup_worker_keys_still_work_and_say_where_they_moved() {
    let env = [("DATABASE_URL", "postgres://127.0.0.1/x".to_string())];
    let c = test_config("[backups]\nworkers = 3\nlease_seconds = 7\n", &env);
    assert_eq!(c.jobs.backups, 3);
    assert_eq!(c.jobs.lease, Duration::from_secs(7));
    assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    assert!(
        c.warnings.iter().all(|w| w.contains("[jobs]")),
        "{:?}",
        c.warnings
    );

    let c = test_config(
        "[jobs]\nbackups = 4\nbackups_per_target = 2\nlease_seconds = 9\n",
        &env,
    );
    assert_eq!((c.jobs.backups, c.jobs.backups_per_target), (4, 2));
    assert_eq!(c.jobs.lease, Duration::from_secs(9));
    assert!(c.warnings.is_empty());

    for (toml, key) in [
        (
            "[backups]\nworkers = 2\n[jobs]\nbackups = 3\n",
            "backups.workers",
        ),
        ("[jobs]\nlease_seconds = 1\n", "jobs.lease_seconds"),
        (
            "[jobs]\nbackups_per_target = 0\n",
            "jobs.backups_per_target",
        ),
    ] {
        let err = dbops::config::Config::from_toml(
            toml,
            std::path::Path::new("test.toml"),
            std::path::Path::new("."),
            |k| (k == "DATABASE_URL").then(|| "postgres://127.0.0.1/x".to_string()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(key), "{toml}: {err}");
    }
}

/// During a rolling upgrade a replica of the version before the one job
/// runtime may still run a backup of its own (no job; it writes the backup's
/// heartbeat): the new sweeper leaves it alone while it beats, and ends it only
/// once it stops; one such replica's queued backup nobody took ends after an hour.
#[tokio::test]
async fn backups_of_a_replica_from_before_the_job_runtime_are_left_alone_while_it_runs_them() {
    let app = crate::helpers::spawn_app().await;
    let legacy = |status: &'static str, heartbeat: &'static str, created: &'static str| {
        let db = app.db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&format!(
                "INSERT INTO backups (target, method, format, status, trigger, storage, started_at, heartbeat_at, created_at)
                 VALUES ('pg', 'pg_dump', 'custom', '{status}', 'person', 'local',
                         CASE WHEN '{status}' = 'running' THEN now() END, {heartbeat}, {created})
                 RETURNING id"
            ))
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    let beating = legacy("running", "now()", "now()").await;
    let stopped = legacy("running", "now() - interval '10 minutes'", "now()").await;
    let waiting = legacy("queued", "NULL", "now() - interval '5 minutes'").await;
    let forgotten = legacy("queued", "NULL", "now() - interval '2 hours'").await;
    for id in [beating, stopped, waiting, forgotten] {
        run::sweep(&app.state(), Some(id)).await.unwrap();
    }
    let status = |id: i64| {
        let db = app.db.clone();
        async move {
            sqlx::query_as::<_, (String, Option<String>)>(
                "SELECT status, error FROM backups WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    assert_eq!(status(beating).await.0, "running");
    assert_eq!(status(waiting).await.0, "queued");
    let (s, e) = status(stopped).await;
    assert_eq!(s, "interrupted");
    assert!(e.unwrap().contains("stopped"));
    let (s, e) = status(forgotten).await;
    assert_eq!(s, "interrupted");
    assert!(e.unwrap().contains("earlier dbops version"), "says why");
}
