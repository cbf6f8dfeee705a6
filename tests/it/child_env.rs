//! What the programs dbops runs can see of dbops' own secrets: nothing. A real
//! `dbops serve` runs with target URLs, `DATABASE_URL` and cloud keys in its
//! environment; the `pg_dump` it starts is caught while it waits on a lock and its
//! `/proc/PID/environ` and command line are read.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    time::{Duration, Instant},
};

use dbops::{
    audit::AuditCtx,
    backups::run::{self, BackupRequest, Trigger},
};
use sqlx::{Connection, Executor, PgConnection};

use crate::{
    backups::{source_db, temp_dir},
    helpers::{services, test_config},
};

/// A `dbops serve` child, killed when the test ends, also when it fails.
struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The parent pid of a process, from `/proc/PID/stat` (the field after the
/// parenthesised command name, which may itself hold spaces and parentheses).
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// NUL-separated `/proc/PID/<file>` as strings.
fn proc_strings(pid: u32, file: &str) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// The pid of a dumping `pg_dump` whose parent is `parent`, waiting up to `secs`.
async fn pg_dump_child_of(parent: u32, secs: u64) -> Option<u32> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let argv = proc_strings(pid, "cmdline");
            // Not the `pg_dump --version` dbops runs to pick the tool's version.
            if argv
                .first()
                .is_some_and(|a| Path::new(a).ends_with("pg_dump"))
                && !argv.iter().any(|a| a == "--version")
                && parent_pid(pid) == Some(parent)
            {
                return Some(pid);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test]
async fn a_running_pg_dump_sees_no_target_url_no_database_url_and_no_password_only_its_passfile() {
    let tmp = temp_dir("child-env");
    let base = services().await.pg_base.clone();
    let src = source_db(10).await;
    // Trust authentication accepts any password: the one in the URL is a canary.
    let password = format!("pw-canary-{}", uuid::Uuid::new_v4().simple());
    let with_password = |url: &str| {
        let u = url.replacen(
            "postgres://postgres@",
            &format!("postgres://postgres:{password}@"),
            1,
        );
        assert!(
            u.contains(&password),
            "the test PostgreSQL URL has the expected form: {url}"
        );
        u
    };
    let src_url = with_password(&src.url);
    let console = format!("dbops_it_{}", uuid::Uuid::new_v4().simple());
    let database_url = with_password(&format!("{base}/{console}"));
    let store = tmp.join("store");
    let toml = format!(
        "[backups]\ndirectory = \"{}\"\nlease_seconds = 3\n\
         [[postgres]]\nname = \"src\"\nurl_env = \"SRC_URL_CANARY\"\npolicy = \"dev\"\n",
        store.display()
    );
    let cfg = tmp.join("dbops.toml");
    std::fs::write(&cfg, &toml).unwrap();
    let secret = format!("secret-canary-{}", uuid::Uuid::new_v4().simple());
    let env = [
        ("SRC_URL_CANARY", src_url.clone()),
        ("DATABASE_URL", database_url.clone()),
        ("AWS_SECRET_ACCESS_KEY", secret.clone()),
        (
            "DBOPS_WEBHOOK_URL",
            format!("https://hooks.example/{secret}"),
        ),
        // Would change what pg_dump connects with, or break it, if it leaked (not
        // PGOPTIONS: dbops' own connections read that one too).
        ("PGPASSWORD", secret.clone()),
        ("PGSERVICE", format!("no-such-service-{secret}")),
        ("REDISCLI_AUTH", secret.clone()),
    ];

    // This process creates the console database and queues the work (its
    // application is built, never run); the serving child takes it.
    let here =
        dbops::app::Application::build(test_config(&toml, &env), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
    let state = here.state.clone();
    let log = tmp.join("serve.log");
    let serve_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dbops"));
    cmd.arg("--config")
        .arg(&cfg)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let serve = Serve(cmd.spawn().unwrap());

    // pg_dump waits on this lock, long enough to be looked at.
    let mut lock = PgConnection::connect(&src.url).await.unwrap();
    lock.execute("BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let id = run::request(
        &state,
        &AuditCtx::system(),
        "src",
        Trigger::Person,
        BackupRequest::default(),
    )
    .await
    .unwrap();
    let Some(pid) = pg_dump_child_of(serve.0.id(), 60).await else {
        let (status, error): (String, Option<String>) =
            sqlx::query_as("SELECT status, error FROM backups WHERE id = $1")
                .bind(id)
                .fetch_one(&state.db)
                .await
                .unwrap();
        panic!(
            "no waiting pg_dump started by dbops serve; the backup is {status} ({error:?})\n{}",
            serve_log()
        );
    };

    let environ = proc_strings(pid, "environ");
    let cmdline = proc_strings(pid, "cmdline");
    let var = |name: &str| {
        environ
            .iter()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_string))
    };
    for kv in &environ {
        assert!(
            !kv.contains(&password) && !kv.contains(&secret),
            "a secret reached pg_dump's environment: {kv}"
        );
    }
    for name in [
        "SRC_URL_CANARY",
        "DATABASE_URL",
        "AWS_SECRET_ACCESS_KEY",
        "DBOPS_WEBHOOK_URL",
        "PGPASSWORD",
        "PGSERVICE",
        "REDISCLI_AUTH",
    ] {
        assert_eq!(var(name), None, "{name} reached pg_dump's environment");
    }
    // Nothing beyond the allowlist and what dbops sets for the connection.
    let set_by_dbops = [
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGAPPNAME",
        "PGCONNECT_TIMEOUT",
        "PGPASSFILE",
        "PGSSLMODE",
    ];
    for kv in &environ {
        let name = kv.split('=').next().unwrap();
        assert!(
            set_by_dbops.contains(&name) || dbops::process::is_allowed(name.as_ref()),
            "{name} is neither allowed nor set by dbops, yet pg_dump has it"
        );
    }
    assert_eq!(
        var("PGDATABASE").as_deref(),
        Some(src.name.as_str()),
        "{environ:?} {cmdline:?}"
    );
    assert!(var("PATH").is_some(), "PATH is passed on");
    // The password is in a 0600 passfile, named in the environment.
    let passfile = var("PGPASSFILE").expect("pg_dump has a PGPASSFILE");
    let meta = std::fs::metadata(&passfile).expect("the passfile exists while pg_dump runs");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(
        std::fs::read_to_string(&passfile)
            .unwrap()
            .contains(&password)
    );
    // And never on the command line.
    assert!(
        cmdline.iter().any(|a| a.ends_with("pg_dump")),
        "{cmdline:?}"
    );
    for arg in &cmdline {
        assert!(
            !arg.contains(&password) && !arg.contains(&secret) && !arg.contains("postgres://"),
            "pg_dump's command line holds a secret: {cmdline:?}"
        );
    }

    // With that clean environment the backup still works.
    drop(lock);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (status, error) = loop {
        let (status, error): (String, Option<String>) =
            sqlx::query_as("SELECT status, error FROM backups WHERE id = $1")
                .bind(id)
                .fetch_one(&state.db)
                .await
                .unwrap();
        if !matches!(status.as_str(), "queued" | "running") {
            break (status, error);
        }
        assert!(
            Instant::now() < deadline,
            "the backup never ended\n{}",
            serve_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, "good", "{error:?}\n{}", serve_log());
    assert!(
        !Path::new(&passfile).exists(),
        "the passfile is removed once pg_dump has ended"
    );
    drop(serve);
    let _ = std::fs::remove_dir_all(&tmp);
}
