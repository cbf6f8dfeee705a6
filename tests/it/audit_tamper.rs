//! The operations log against the people who own its database (issue 14): the
//! role that owns the log rewrites a row and recomputes the whole chain, a
//! superuser removes the newest rows — the hash chain alone says "whole", the
//! signed checkpoints outside the database do not. The role dbops runs as owns
//! nothing and cannot switch the triggers off; a running row's parameters are
//! frozen.

use std::path::Path;

use dbops::audit::{self, AuditCtx, Entry};
use serde_json::json;
use sqlx::{Connection, Executor, PgConnection};

use crate::{
    backups::temp_dir,
    helpers::{services, spawn_app_on},
};

/// A fresh login role (no superuser) and a console database it owns.
async fn owned_console(tag: &str) -> (String, String, String) {
    let base = &services().await.pg_base;
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let role = format!("dbops_it_{tag}_{suffix}");
    let db = format!("dbops_it_{tag}_{suffix}");
    let mut admin = PgConnection::connect(&format!("{base}/postgres"))
        .await
        .unwrap();
    admin
        .execute(format!("CREATE ROLE {role} LOGIN CREATEROLE").as_str())
        .await
        .unwrap();
    admin
        .execute(format!("CREATE DATABASE {db} OWNER {role}").as_str())
        .await
        .unwrap();
    let url = base.replacen("postgres@", &format!("{role}@"), 1) + "/" + &db;
    (role, db, url)
}

fn checkpoint_config(dir: &Path) -> (String, String) {
    let (seed, public) = audit::checkpoint::generate();
    let key = dir.join("checkpoint.key");
    std::fs::write(&key, &seed).unwrap();
    (
        format!(
            "[audit.checkpoints]\nsigning_key_file = \"{}\"\nfile = \"{}\"\ninterval_seconds = 3600\n",
            key.display(),
            dir.join("witness").join("checkpoints.jsonl").display()
        ),
        public,
    )
}

fn dbops(cfg: &Path, database_url: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dbops"))
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
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

async fn history(db: &sqlx::PgPool, n: i64) {
    for i in 0..n {
        audit::record(
            db,
            &AuditCtx::system(),
            Entry::new("test.step").params(json!({ "i": i })),
        )
        .await
        .unwrap();
    }
}

/// What an owner who knows the schema does: triggers off, one row edited, every
/// later hash and the chain head recomputed, triggers on.
const REWRITE: &str = r#"
ALTER TABLE operations DISABLE TRIGGER USER;
ALTER TABLE operations_chain_head DISABLE TRIGGER USER;
UPDATE operations SET params = '{"i": "forged"}' WHERE chain_seq = 2;
DO $$
DECLARE r record; prev bytea := '\x00'::bytea; h bytea;
BEGIN
  FOR r IN SELECT id FROM operations WHERE chain_seq IS NOT NULL ORDER BY chain_seq LOOP
    UPDATE operations o SET prev_hash = prev,
           hash = sha256(prev || convert_to(operations_canonical(o), 'UTF8'))
     WHERE id = r.id RETURNING hash INTO h;
    prev := h;
  END LOOP;
  UPDATE operations_chain_head SET last_hash = prev;
END $$;
ALTER TABLE operations_chain_head ENABLE TRIGGER USER;
ALTER TABLE operations ENABLE TRIGGER USER;
"#;

#[tokio::test]
async fn the_owner_rewriting_a_row_and_recomputing_the_chain_is_caught_by_the_signed_checkpoints() {
    let (_role, _db, url) = owned_console("owner").await;
    let dir = temp_dir("tamper-owner");
    let (toml, _) = checkpoint_config(&dir);
    let cfg = dir.join("dbops.toml");
    std::fs::write(&cfg, &toml).unwrap();
    let app = spawn_app_on(&url, &toml, &[]).await;
    history(&app.db, 6).await;
    dbops::audit::checkpoint::checkpoint_now(&app.state(), true).await;
    let (ok, out) = dbops(&cfg, &url, &["audit", "verify"]);
    assert!(ok, "{out}");
    assert!(out.contains("signed checkpoint(s) verified"), "{out}");

    // The owner (not a superuser) rewrites row 2 and the whole chain after it.
    let mut owner = PgConnection::connect(&url).await.unwrap();
    owner.execute(REWRITE).await.unwrap();
    let chain_only = audit::verify(&app.db).await.unwrap();
    assert!(
        chain_only.ok(),
        "the recomputed chain fools the chain alone: {chain_only:?}"
    );
    let (ok, out) = dbops(&cfg, &url, &["audit", "verify"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("altered or removed and the chain recomputed"),
        "{out}"
    );
}

#[tokio::test]
async fn a_superuser_removing_the_newest_rows_is_caught_and_a_forged_checkpoint_is_refused() {
    let (_role, db, url) = owned_console("super").await;
    let dir = temp_dir("tamper-super");
    let (toml, _) = checkpoint_config(&dir);
    let cfg = dir.join("dbops.toml");
    std::fs::write(&cfg, &toml).unwrap();
    let app = spawn_app_on(&url, &toml, &[]).await;
    history(&app.db, 4).await;
    dbops::audit::checkpoint::checkpoint_now(&app.state(), true).await;
    let end: i64 = sqlx::query_scalar("SELECT max(chain_seq) FROM operations")
        .fetch_one(&app.db)
        .await
        .unwrap();
    // A superuser deletes the two newest rows and moves the head back.
    let base = &services().await.pg_base;
    let mut su = PgConnection::connect(&format!("{base}/{db}"))
        .await
        .unwrap();
    su.execute(
        format!(
            "SET session_replication_role = replica;
             DELETE FROM operations WHERE chain_seq > {};
             UPDATE operations_chain_head SET last_seq = {0}, last_hash = (SELECT hash FROM operations WHERE chain_seq = {0});
             SET session_replication_role = origin;",
            end - 2
        )
        .as_str(),
    )
    .await
    .unwrap();
    assert!(
        audit::verify(&app.db).await.unwrap().ok(),
        "the chain alone is fooled"
    );
    let (ok, out) = dbops(&cfg, &url, &["audit", "verify"]);
    assert!(!ok, "{out}");
    assert!(out.contains("rows were removed"), "{out}");

    // A checkpoint written without the key is refused.
    let witness = dir.join("witness").join("checkpoints.jsonl");
    let text = std::fs::read_to_string(&witness).unwrap();
    let mut cp: audit::checkpoint::Checkpoint =
        serde_json::from_str(text.lines().last().unwrap()).unwrap();
    cp.seq = end - 2;
    std::fs::write(&witness, serde_json::to_string(&cp).unwrap() + "\n").unwrap();
    let (ok, out) = dbops(&cfg, &url, &["audit", "verify"]);
    assert!(!ok, "{out}");
    assert!(out.contains("forged or altered"), "{out}");
}

#[tokio::test]
async fn dbops_runs_as_a_role_that_owns_nothing_and_cannot_switch_the_log_s_triggers_off() {
    let (_owner, _db, owner_url) = owned_console("runtime").await;
    let runtime = format!(
        "dbops_it_rt_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let dir = temp_dir("tamper-runtime");
    let cfg = dir.join("dbops.toml");
    std::fs::write(&cfg, "owner_database_url_env = \"OWNER_URL\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dbops"))
        .arg("--config")
        .arg(&cfg)
        .args(["migrate", "--runtime-role", &runtime])
        .env("OWNER_URL", &owner_url)
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let runtime_url = owner_url.replacen(
        &owner_url[owner_url.find("//").unwrap() + 2..owner_url.find('@').unwrap()],
        &runtime,
        1,
    );
    // dbops serves as the runtime role: the schema is there, it migrates nothing.
    let app = spawn_app_on(&runtime_url, "", &[]).await;
    assert_eq!(
        dbops::app::runtime_owns_the_log(&app.db).await.unwrap(),
        None
    );
    history(&app.db, 3).await;
    let mut rt = PgConnection::connect(&runtime_url).await.unwrap();
    for sql in [
        "ALTER TABLE operations DISABLE TRIGGER USER",
        "ALTER TABLE operations_chain_head DISABLE TRIGGER USER",
        "DELETE FROM operations",
        "TRUNCATE operations",
        "UPDATE operations SET params = '{}' WHERE chain_seq = 1",
        "CREATE TRIGGER x BEFORE INSERT ON operations FOR EACH ROW EXECUTE FUNCTION operations_guard()",
    ] {
        let err = rt.execute(sql).await.expect_err(sql).to_string();
        assert!(
            err.contains("must be owner")
                || err.contains("permission denied")
                || err.contains("append-only"),
            "{sql}: {err}"
        );
    }
    assert!(audit::verify(&app.db).await.unwrap().ok());
}

#[tokio::test]
async fn a_running_operation_s_parameters_are_frozen_and_refusing_owner_runtime_stops_the_start() {
    let app = crate::helpers::spawn_app().await;
    let id = audit::start(
        &app.db,
        &AuditCtx::system(),
        Entry::new("test.long").params(json!({ "database": "shop" })),
    )
    .await
    .unwrap();
    let err =
        sqlx::query("UPDATE operations SET params = '{\"database\": \"other\"}' WHERE id = $1")
            .bind(id)
            .execute(&app.db)
            .await
            .expect_err("parameters are frozen")
            .to_string();
    assert!(err.contains("frozen"), "{err}");
    audit::finish(&app.db, id, audit::Outcome::Succeeded, None, None)
        .await
        .unwrap();
    // The tests connect as a superuser: with refuse_owner_runtime, dbops stops.
    let config = crate::helpers::test_config(
        "[audit]\nrefuse_owner_runtime = true\n",
        &[("DATABASE_URL", app.database_url.clone())],
    );
    let err = dbops::app::Application::build(config, "127.0.0.1:0".parse().unwrap())
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("superuser"), "{err}");
}
