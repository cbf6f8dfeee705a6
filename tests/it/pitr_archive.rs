//! Continuous WAL archiving (src/pitr/archive.rs) against throwaway PostgreSQL
//! clusters (`wal_level = replica`, their default): segments are stored whole and
//! checked, the recovery point follows the server, killing `pg_receivewal` or the
//! server loses nothing, a second replica takes over, a role without REPLICATION
//! is named, and a restore point is made before a destructive action.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use dbops::{
    audit::AuditCtx,
    auth::Role,
    devcluster::PgCluster,
    pitr::{self, Lsn, segments},
};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use sqlx::{Connection, Executor, PgConnection};

use crate::helpers::*;

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "dbops-wal-{tag}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(store: &Path, extra: &str) -> String {
    format!(
        "[backups]\ndirectory = \"{}\"\n[targets]\nconnect_timeout_seconds = 2\n\
         [[postgres]]\nname = \"arch\"\nurl_env = \"ARCH\"\npolicy = \"dev\"\n\
         [postgres.archive]\nsnapshot_seconds = 1\n{extra}",
        store.display()
    )
}

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.unwrap()
}

/// Waits (up to `secs`) until `check` says yes; panics with `what` otherwise.
async fn wait_until<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out waiting: {what}");
}

async fn stream_state(app: &TestApp) -> Option<(String, Option<String>, i32)> {
    sqlx::query_as("SELECT state, message, restarts FROM wal_streams WHERE target = 'arch'")
        .fetch_optional(&app.db)
        .await
        .unwrap()
}

async fn streaming(app: &TestApp) -> bool {
    matches!(stream_state(app).await, Some((s, _, _)) if s == "streaming")
}

/// Writes rows and switches to a new segment; returns the name of the segment
/// that was just completed.
async fn write_and_switch(c: &mut PgConnection, rows: i32) -> String {
    c.execute(
        format!("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, {rows}) g").as_str(),
    )
    .await
    .unwrap();
    let name: String = sqlx::query_scalar("SELECT pg_walfile_name(pg_switch_wal())")
        .fetch_one(&mut *c)
        .await
        .unwrap();
    name
}

async fn stored(app: &TestApp, name: &str) -> bool {
    sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM wal_segments WHERE target = 'arch' AND file_name = $1",
    )
    .bind(name)
    .fetch_one(&app.db)
    .await
    .unwrap()
        == 1
}

/// Every stored segment name of the archive, in order.
async fn stored_names(app: &TestApp) -> Vec<String> {
    sqlx::query_scalar("SELECT file_name FROM wal_segments WHERE target = 'arch' AND kind = 'segment' ORDER BY start_lsn")
        .fetch_all(&app.db)
        .await
        .unwrap()
}

/// Whether the names follow each other without a missing segment.
fn contiguous(names: &[String]) -> bool {
    const SEG: u64 = 16 * 1024 * 1024;
    let nos: Vec<u64> = names
        .iter()
        .map(|n| match pitr::WalFile::parse(n, SEG).unwrap() {
            pitr::WalFile::Segment { segno, .. } => segno,
            _ => unreachable!(),
        })
        .collect();
    nos.windows(2).all(|w| w[1] == w[0] + 1)
}

/// The pid of the `pg_receivewal` writing into `spool`.
fn receiver_pid(spool: &Path) -> Option<i32> {
    let spool = spool.to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("pg_receivewal") && cmd.contains(&spool) && !cmd.contains("--create-slot") {
            return Some(pid);
        }
    }
    None
}

#[tokio::test]
async fn segments_are_stored_whole_and_the_recovery_point_follows_the_server() {
    let tmp = temp_dir("stream");
    let cluster = PgCluster::start(&tmp.join("pg")).await.unwrap();
    let store = tmp.join("store");
    let app = spawn_app_with(&config(&store, ""), &[("ARCH", cluster.url("postgres"))]).await;
    wait_until(30, "the stream starts", || streaming(&app)).await;

    let mut c = connect(&cluster.url("postgres")).await;
    c.execute("CREATE TABLE t (id int, v text)").await.unwrap();
    let first = write_and_switch(&mut c, 1000).await;
    let second = write_and_switch(&mut c, 1000).await;
    wait_until(30, "both segments stored", || async {
        stored(&app, &first).await && stored(&app, &second).await
    })
    .await;

    // What is stored is the segment, whole: its size, its checksum.
    let state = app.state();
    let sysid: String =
        sqlx::query_scalar("SELECT system_identifier::text FROM pg_control_system()")
            .fetch_one(&mut c)
            .await
            .unwrap();
    let seg = segments::find(&state.db, "arch", &sysid, &second)
        .await
        .unwrap()
        .unwrap();
    // Stored compressed (zstd, the default): the checksum and size are of the
    // stored file, which decompresses to the whole 16 MiB segment.
    assert!(seg.storage_key.ends_with(".zst"), "{}", seg.storage_key);
    let stored_bytes = std::fs::read(store.join(&seg.storage_key)).unwrap();
    assert_eq!(stored_bytes.len() as i64, seg.size_bytes);
    assert!(seg.size_bytes < 16 * 1024 * 1024);
    assert_eq!(hex::encode(Sha256::digest(&stored_bytes)), seg.sha256);
    let bytes = zstd::decode_all(&stored_bytes[..]).unwrap();
    assert_eq!(bytes.len(), 16 * 1024 * 1024);
    let fetched = tmp.join("fetched");
    let how = segments::fetch(&state, "arch", &sysid, &second, &fetched)
        .await
        .unwrap();
    assert_eq!(how, segments::Fetched::Whole);
    assert_eq!(std::fs::read(&fetched).unwrap(), bytes);
    // One flipped byte in storage: the fetch refuses it and leaves nothing.
    let mut bad = stored_bytes.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    std::fs::write(store.join(&seg.storage_key), &bad).unwrap();
    let damaged = tmp.join("damaged");
    let err = segments::fetch(&state, "arch", &sysid, &second, &damaged)
        .await
        .unwrap_err();
    assert!(
        !damaged.exists(),
        "nothing is left where the file was asked for"
    );
    assert!(format!("{err:?}").contains(&second), "{err:?}");
    std::fs::write(store.join(&seg.storage_key), &stored_bytes).unwrap();
    assert!(
        contiguous(&stored_names(&app).await),
        "{:?}",
        stored_names(&app).await
    );

    // A quiet server: the segment being written is stored as a snapshot, and the
    // recovery point catches up with the server within seconds, not a segment.
    c.execute("INSERT INTO t VALUES (-1, 'newest')")
        .await
        .unwrap();
    let current: String = sqlx::query_scalar("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
        .fetch_one(&mut c)
        .await
        .unwrap();
    let flushed: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(&mut c)
        .await
        .unwrap();
    let flushed = Lsn::parse(&flushed).unwrap();
    wait_until(
        30,
        "the recovery point reaches the server's position",
        || async {
            let st = pitr::archive::status(&state, &state.targets.get("arch").unwrap(), false)
                .await
                .unwrap();
            st.stored_lsn.is_some_and(|l| l >= flushed)
                && st.lag.is_some_and(|l| l < Duration::from_secs(10))
        },
    )
    .await;
    let how = segments::fetch(&state, "arch", &sysid, &current, &tmp.join("current"))
        .await
        .unwrap();
    assert_eq!(how, segments::Fetched::Snapshot);
    // A file that is not archived is said so (restore_command's normal end).
    assert!(matches!(
        segments::fetch(
            &state,
            "arch",
            &sysid,
            "0000000100000000000000FE",
            &tmp.join("none")
        )
        .await,
        Err(segments::FetchError::NotArchived(_))
    ));

    let st = pitr::archive::status(&state, &state.targets.get("arch").unwrap(), true)
        .await
        .unwrap();
    let server = st.server.clone().unwrap();
    assert!(server.problems.is_empty(), "{:?}", server.problems);
    assert!(server.slot_exists && server.slot_active);
    assert_eq!(st.slot, "dbops_arch");
    assert!(st.gaps.is_empty());
    assert!(!st.over_objective());

    // The overview shows the recovery point; /metrics has the gauges.
    let mut b = app.logged_in(Role::Viewer).await;
    let page = b.get("/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text.contains("recovery point"), "{}", page.text);
}

#[tokio::test]
async fn killing_pg_receivewal_or_restarting_the_server_loses_no_segment() {
    let tmp = temp_dir("kill");
    let cluster = PgCluster::start(&tmp.join("pg")).await.unwrap();
    let store = tmp.join("store");
    let app = spawn_app_with(&config(&store, ""), &[("ARCH", cluster.url("postgres"))]).await;
    wait_until(30, "the stream starts", || streaming(&app)).await;
    let spool = store.join(".wal-spool").join("arch");
    let mut c = connect(&cluster.url("postgres")).await;
    c.execute("CREATE TABLE t (id int, v text)").await.unwrap();
    write_and_switch(&mut c, 500).await;

    // pg_receivewal killed mid-stream, with writes going on while it is down.
    let pid = receiver_pid(&spool).expect("pg_receivewal runs");
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let mut during = vec![];
    for _ in 0..3 {
        during.push(write_and_switch(&mut c, 500).await);
    }
    wait_until(60, "streaming resumes after the kill", || async {
        matches!(stream_state(&app).await, Some((s, _, r)) if s == "streaming" && r >= 1)
    })
    .await;
    let after = write_and_switch(&mut c, 500).await;
    wait_until(
        60,
        "what was written while it was down is stored",
        || async {
            let mut all = true;
            for n in during.iter().chain([&after]) {
                all &= stored(&app, n).await;
            }
            all
        },
    )
    .await;
    let names = stored_names(&app).await;
    assert!(contiguous(&names), "no segment missing: {names:?}");
    assert_eq!(
        app.count_ops("pitr.archive.stopped", Some("failed")).await,
        1
    );

    // The server restarts: the stream retries and goes on from the slot.
    cluster.stop().await.unwrap();
    wait_until(30, "the stream notices the server is gone", || async {
        matches!(stream_state(&app).await, Some((s, _, _)) if s == "retrying")
    })
    .await;
    cluster.start_again().await.unwrap();
    let mut c = connect(&cluster.url("postgres")).await;
    let later = write_and_switch(&mut c, 500).await;
    wait_until(
        90,
        "streaming resumes after the server's restart",
        || async { streaming(&app).await && stored(&app, &later).await },
    )
    .await;
    let names = stored_names(&app).await;
    assert!(contiguous(&names), "no segment missing: {names:?}");
    let state = app.state();
    assert!(segments::gaps(&state.db, "arch").await.unwrap().is_empty());
    // No stored row without its whole file.
    for (key, size) in sqlx::query_as::<_, (String, i64)>(
        "SELECT storage_key, size_bytes FROM wal_segments WHERE target = 'arch'",
    )
    .fetch_all(&app.db)
    .await
    .unwrap()
    {
        assert_eq!(
            std::fs::metadata(store.join(&key)).unwrap().len() as i64,
            size,
            "{key}"
        );
    }
}

#[tokio::test]
async fn a_second_replica_takes_the_stream_over_when_the_first_stops() {
    let tmp = temp_dir("takeover");
    let cluster = PgCluster::start(&tmp.join("pg")).await.unwrap();
    let store = tmp.join("store");
    let env = [("ARCH", cluster.url("postgres"))];
    let first = spawn_app_with(&config(&store, ""), &env).await;
    wait_until(30, "the first replica streams", || streaming(&first)).await;
    // A second replica on the same console database (and storage) waits.
    let second = spawn_app_on(&first.database_url, &config(&store, ""), &env).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let holder = |app: &TestApp| {
        let db = app.db.clone();
        async move {
            sqlx::query_scalar::<_, Option<String>>(
                "SELECT holder FROM wal_streams WHERE target = 'arch'",
            )
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    let h1 = holder(&first).await.unwrap();
    let mut c = connect(&cluster.url("postgres")).await;
    c.execute("CREATE TABLE t (id int, v text)").await.unwrap();
    let before = write_and_switch(&mut c, 200).await;
    wait_until(30, "stored by the first", || stored(&first, &before)).await;

    // The first stops (its process ends): the second takes over.
    first.state().shutdown.cancel();
    wait_until(60, "the second replica streams", || async {
        holder(&second).await.is_some_and(|h| h != h1) && streaming(&second).await
    })
    .await;
    let after = write_and_switch(&mut c, 200).await;
    wait_until(60, "stored by the second", || stored(&second, &after)).await;
    assert!(contiguous(&stored_names(&second).await));
    // Only one pg_receivewal ever streams the slot at a time.
    let active: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_replication")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(active, 1);
}

#[tokio::test]
async fn a_role_without_replication_is_named_and_restore_points_come_before_destructive_actions() {
    let tmp = temp_dir("role");
    let cluster = PgCluster::start(&tmp.join("pg")).await.unwrap();
    let mut c = connect(&cluster.url("postgres")).await;
    c.execute("CREATE ROLE plain LOGIN PASSWORD 'plainpw'")
        .await
        .unwrap();
    let url = cluster
        .url("postgres")
        .replacen("postgres@", "plain:plainpw@", 1);
    assert!(url.contains("plain:plainpw@"), "{url}");
    let store = tmp.join("store");
    let app = spawn_app_with(&config(&store, ""), &[("ARCH", url)]).await;
    wait_until(30, "the stream says why it cannot start", || async {
        matches!(stream_state(&app).await, Some((s, Some(m), _)) if s == "retrying" && m.contains("REPLICATION"))
    })
    .await;
    let state = app.state();
    let st = pitr::archive::status(&state, &state.targets.get("arch").unwrap(), true)
        .await
        .unwrap();
    let problems = st.server.clone().unwrap().problems.join("\n");
    assert!(problems.contains("no REPLICATION right"), "{problems}");
    assert!(st.over_objective());
    // The password never shows in what is recorded.
    let (_, message, _) = stream_state(&app).await.unwrap();
    assert!(!message.unwrap().contains("plainpw"));

    // With the right, it streams; an approved terminate gets a restore point named
    // after its operation first.
    c.execute("ALTER ROLE plain REPLICATION").await.unwrap();
    c.execute("GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) TO plain")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !streaming(&app).await {
        assert!(
            Instant::now() < deadline,
            "the stream starts once the role may replicate: {:?}\n{}",
            stream_state(&app).await,
            captured_logs()
                .lines()
                .filter(|l| l.contains("arch") || l.contains("WAL"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let victim = connect(&cluster.url("postgres")).await;
    let _keep = victim;
    let (pid, started): (i32, String) = sqlx::query_as(
        "SELECT pid, to_char(backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
         FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'
           AND usename = 'postgres' ORDER BY backend_start DESC LIMIT 1",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    let op = app.current_user("op-rp", Role::Operator).await;
    let ctx = AuditCtx::system();
    let mut form = std::collections::BTreeMap::new();
    form.insert("pid".to_string(), pid.to_string());
    form.insert("backend_start".to_string(), started);
    let req = dbops::approvals::request(
        &state,
        &ctx,
        &op,
        "arch",
        "pg.backend.terminate",
        &form,
        "test",
    )
    .await
    .unwrap();
    dbops::approvals::execute(&state, &ctx, &op, req.id)
        .await
        .unwrap();
    let (name, operation, action, lsn): (String, i64, String, i64) = sqlx::query_as(
        "SELECT name, operation_id, action, lsn FROM restore_points WHERE target = 'arch'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    let op_kind: String = sqlx::query_scalar("SELECT kind FROM operations WHERE id = $1")
        .bind(operation)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(op_kind, "pg.backend.terminate");
    assert_eq!(action, "pg.backend.terminate");
    assert_eq!(name, format!("dbops-op-{operation}"));
    assert!(lsn > 0);
    assert_eq!(
        app.count_ops("pitr.restore_point", Some("succeeded")).await,
        1
    );
}

/// A `dbops serve` child, killed when the test ends, also when it fails.
struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn dbops_cli(cfg: &Path, env: &[(&str, String)], args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dbops"))
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn a_dbops_killed_mid_stream_takes_its_pg_receivewal_along_and_another_replica_goes_on() {
    let tmp = temp_dir("sigkill");
    let cluster = PgCluster::start(&tmp.join("pg")).await.unwrap();
    let store = tmp.join("store");
    let toml = config(&store, "");
    let cfg = tmp.join("dbops.toml");
    std::fs::write(&cfg, &toml).unwrap();
    let database_url = format!(
        "{}/dbops_it_{}",
        services().await.pg_base,
        uuid::Uuid::new_v4().simple()
    );
    let env = [
        ("ARCH", cluster.url("postgres")),
        ("DATABASE_URL", database_url.clone()),
    ];
    // The console database, made and migrated here; `dbops serve` streams.
    let here =
        dbops::app::Application::build(test_config(&toml, &env), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
    let db = here.state.db.clone();
    let (ok, out) = dbops_cli(&cfg, &env, &["archive", "status"]);
    assert!(!ok, "no recovery point yet is over the objective: {out}");
    assert!(out.contains("not started yet"), "{out}");

    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dbops"));
    cmd.arg("--config")
        .arg(&cfg)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let serve = Serve(cmd.spawn().unwrap());
    let child = serve.0.id();
    let holder = || {
        let db = db.clone();
        async move {
            sqlx::query_as::<_, (Option<String>, String)>(
                "SELECT holder, state FROM wal_streams WHERE target = 'arch'",
            )
            .fetch_optional(&db)
            .await
            .unwrap()
        }
    };
    wait_until(60, "dbops serve streams", || async {
        matches!(holder().await, Some((Some(h), s)) if h.contains(&format!(":{child}/")) && s == "streaming")
    })
    .await;
    let spool = store.join(".wal-spool").join("arch");
    let receiver = receiver_pid(&spool).expect("its pg_receivewal runs");
    let mut c = connect(&cluster.url("postgres")).await;
    c.execute("CREATE TABLE t (id int, v text)").await.unwrap();
    let before = write_and_switch(&mut c, 300).await;
    let stored_by = |name: String| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM wal_segments WHERE file_name = $1")
                .bind(name)
                .fetch_one(&db)
                .await
                .unwrap()
                == 1
        }
    };
    wait_until(30, "stored by dbops serve", || stored_by(before.clone())).await;
    let (ok, out) = dbops_cli(&cfg, &env, &["archive", "status"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("streaming, by") && out.contains("recovery point:"),
        "{out}"
    );
    assert!(
        out.contains("slot:            dbops_arch (active)"),
        "{out}"
    );

    // A second replica waits while the first holds the stream.
    let second = spawn_app_on(&database_url, &toml, &env[..1]).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(matches!(holder().await, Some((Some(h), _)) if h.contains(&format!(":{child}/"))));

    // SIGKILL: no clean-up runs in dbops, yet its pg_receivewal goes with it (it
    // would keep the slot busy), and the second replica takes over once the
    // lease runs out.
    unsafe { libc::kill(child as i32, libc::SIGKILL) };
    drop(serve);
    wait_until(10, "the killed dbops' pg_receivewal ends", || async {
        !std::path::Path::new(&format!("/proc/{receiver}")).exists()
            || std::fs::read_to_string(format!("/proc/{receiver}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    })
    .await;
    let during = write_and_switch(&mut c, 300).await;
    wait_until(90, "the second replica streams", || async {
        matches!(holder().await, Some((Some(h), s)) if !h.contains(&format!(":{child}/")) && s == "streaming")
    })
    .await;
    let after = write_and_switch(&mut c, 300).await;
    wait_until(60, "what was written meanwhile is stored", || async {
        stored_by(during.clone()).await && stored_by(after.clone()).await
    })
    .await;
    assert!(
        contiguous(&stored_names(&second).await),
        "{:?}",
        stored_names(&second).await
    );
}

/// The text of each cell of each row of a report section's table.
fn section_rows(html: &str, section: &str) -> Vec<Vec<String>> {
    let doc = scraper::Html::parse_document(html);
    let sel = scraper::Selector::parse(&format!("section#{section} table tbody tr")).unwrap();
    let td = scraper::Selector::parse("td").unwrap();
    doc.select(&sel)
        .map(|tr| {
            tr.select(&td)
                .map(|c| c.text().collect::<String>().trim().to_string())
                .collect()
        })
        .collect()
}

/// Refreshes the health report of `arch` through its button and returns its page.
async fn health_page(b: &mut Browser, app: &TestApp) -> String {
    let r = b.post("/targets/arch/reports/health/refresh", &[]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let id: i64 = r
        .location()
        .unwrap()
        .strip_prefix("/jobs/")
        .unwrap()
        .parse()
        .unwrap();
    wait_until(60, "the health report is computed", || async {
        let s: String = sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
        s != "queued" && s != "running"
    })
    .await;
    b.get("/targets/arch/reports/health").await.text
}

#[tokio::test]
async fn the_health_report_shows_a_real_streaming_replica_its_slot_and_the_archives_slot() {
    let tmp = temp_dir("replica");
    let primary = PgCluster::start(&tmp.join("pg")).await.unwrap();
    let store = tmp.join("store");
    let app = spawn_app_with(&config(&store, ""), &[("ARCH", primary.url("postgres"))]).await;
    wait_until(30, "the archive streams", || streaming(&app)).await;

    // A streaming replica, as a team makes one: pg_basebackup -R with its own slot.
    let rep_base = tmp.join("rep");
    std::fs::create_dir_all(&rep_base).unwrap();
    let data = rep_base.join("pgdata");
    let bin = dbops::devcluster::pg_bin_dir_for(15)
        .or_else(|| dbops::devcluster::pg_bin_dir_for(16))
        .expect("server binaries");
    let out = std::process::Command::new(bin.join("pg_basebackup"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port().to_string(),
            "-U",
            "postgres",
        ])
        .arg("-D")
        .arg(&data)
        .args([
            "-R",
            "-X",
            "stream",
            "-C",
            "-S",
            "replica1",
            "--checkpoint=fast",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        data.join("postgresql.auto.conf"),
        format!(
            "{}\nunix_socket_directories = '{}'\n",
            std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap(),
            rep_base.display()
        ),
    )
    .unwrap();
    dbops::devcluster::give_to_server_user(&rep_base).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let replica =
        PgCluster::adopt(&rep_base, &data, &bin, PgCluster::free_port().unwrap()).unwrap();
    replica.launch().await.unwrap();
    let mut primary_c = connect(&primary.url("postgres")).await;
    wait_until(60, "the replica streams from the primary", || {
        let url = primary.url("postgres");
        async move {
            let mut c = connect(&url).await;
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'walreceiver'",
            )
            .fetch_one(&mut c)
            .await
            .unwrap()
                == 1
        }
    })
    .await;
    primary_c
        .execute("CREATE TABLE t (id int, v text)")
        .await
        .unwrap();
    write_and_switch(&mut primary_c, 1000).await;

    let mut b = app.logged_in(Role::Operator).await;
    let page = health_page(&mut b, &app).await;
    let replicas = section_rows(&page, "replicas");
    assert!(
        replicas
            .iter()
            .any(|r| r.iter().any(|c| c == "walreceiver")),
        "the replica is listed: {replicas:?}"
    );
    // Both archivers: dbops' own pg_receivewal shows as a WAL sender too.
    assert_eq!(replicas.len(), 2, "{replicas:?}");
    let slots = section_rows(&page, "slots");
    for name in ["replica1", "dbops_arch"] {
        assert!(
            slots
                .iter()
                .any(|r| r.first().is_some_and(|c| c == name) && r.iter().any(|c| c == "active")),
            "{name} is an active slot: {slots:?}"
        );
    }

    // The replica stops: its slot keeps WAL, and the report says so.
    replica.stop_now().await.unwrap();
    write_and_switch(&mut primary_c, 1000).await;
    let page = health_page(&mut b, &app).await;
    let slots = section_rows(&page, "slots");
    assert!(
        slots
            .iter()
            .any(|r| r.first().is_some_and(|c| c == "replica1")
                && r.iter().any(|c| c == "inactive, retaining WAL")),
        "{slots:?}"
    );
    assert!(
        section_rows(&page, "replicas")
            .iter()
            .all(|r| !r.iter().any(|c| c == "walreceiver"))
    );
}
