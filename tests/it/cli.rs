//! The `dbops` binary's subcommands against a real console database.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::helpers::spawn_app;

fn dbops(config: &std::path::Path, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dbops"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn the_first_admin_is_created_from_the_command_line_and_can_log_in() {
    let app = spawn_app().await;
    let dir = tempdir();
    let cfg = app.config_file(&dir);
    let out = dbops(
        &cfg,
        &[
            "user",
            "add",
            "--username",
            "root-admin",
            "--role",
            "admin",
            "--password-stdin",
        ],
        Some("a-long-enough-password\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut b = app.browser();
    assert_eq!(
        b.login("root-admin", "a-long-enough-password").await.status,
        reqwest::StatusCode::SEE_OTHER
    );

    let out = dbops(&cfg, &["user", "list"], None);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("root-admin") && listing.contains("admin"));

    let out = dbops(
        &cfg,
        &[
            "user",
            "add",
            "--username",
            "weak",
            "--role",
            "viewer",
            "--password-stdin",
        ],
        Some("short\n"),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 12"));
    let out = dbops(
        &cfg,
        &[
            "user",
            "set-role",
            "--username",
            "root-admin",
            "--role",
            "viewer",
        ],
        None,
    );
    assert!(!out.status.success(), "the last admin cannot be demoted");
    let out = dbops(
        &cfg,
        &[
            "user",
            "add",
            "--username",
            "second",
            "--role",
            "wizard",
            "--password-stdin",
        ],
        Some("a-long-enough-password\n"),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a role"));

    let actor: String =
        sqlx::query_scalar("SELECT actor_name FROM operations WHERE kind = 'user.create'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(actor.starts_with("cli:"), "{actor}");
}

#[tokio::test]
async fn audit_verify_exits_non_zero_naming_the_row_that_was_altered() {
    let app = spawn_app().await;
    let dir = tempdir();
    let cfg = app.config_file(&dir);
    let mut b = app.browser();
    b.login("ghost", "not-a-real-password").await;
    b.login("ghost", "not-a-real-password").await;
    let out = dbops(&cfg, &["audit", "verify"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("is whole"));

    let id: i64 = sqlx::query_scalar("SELECT min(id) FROM operations")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let mut conn = app.db.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("UPDATE operations SET error = 'nothing happened' WHERE id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    let out = dbops(&cfg, &["audit", "verify"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("operation {id}")), "{err}");
}

#[tokio::test]
async fn a_config_error_names_the_key_and_stops_the_start() {
    let dir = tempdir();
    let cfg = dir.join("bad.toml");
    std::fs::write(
        &cfg,
        "[[postgres]]\nname = \"x\"\nurl_env = \"DBOPS_SURELY_UNSET\"\npolicy = \"dev\"\n",
    )
    .unwrap();
    let out = dbops(&cfg, &["serve"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("postgres[0].url_env") && err.contains("DBOPS_SURELY_UNSET"),
        "{err}"
    );
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("dbops-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
