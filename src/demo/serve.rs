//! `dbops demo`: a throwaway PostgreSQL cluster and Redis server from the machine's
//! binaries, a sample shop database and cache, one user per role, and the console
//! serving them. Everything lives under one temporary directory that is removed on
//! Ctrl-C.

use std::{net::SocketAddr, os::unix::fs::PermissionsExt, path::PathBuf};

use anyhow::Context;
use serde_json::json;

use super::seed;
use crate::{
    app::{self, Application},
    audit::{self, AuditCtx, Entry},
    auth::{Role, password, users},
    config::Config,
    devcluster::{self, PgCluster, RedisServer},
};

/// Removes the demo directory however the demo ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_secret(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// Picks `wanted` (default 127.0.0.1:8080) if it is free, else a free port.
fn pick_listen(wanted: Option<SocketAddr>) -> SocketAddr {
    let addr = wanted.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
    if wanted.is_some() || std::net::TcpListener::bind(addr).is_ok() {
        addr
    } else {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }
}

/// Runs the demo until Ctrl-C.
pub async fn run(listen: Option<SocketAddr>) -> anyhow::Result<()> {
    crate::cli::init_logging(false);
    devcluster::ensure_binaries()?;
    let dir = TempDir(std::env::temp_dir().join(format!("dbops-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    eprintln!(
        "Starting a throwaway PostgreSQL and Redis under {} …",
        dir.0.display()
    );
    let pg = PgCluster::start(&dir.0)
        .await
        .context("starting the demo PostgreSQL")?;
    let mut redis = RedisServer::start(&dir.0)
        .await
        .context("starting the demo Redis")?;
    pg.create_database("dbops").await?;
    pg.create_database("shop").await?;
    eprintln!("Filling the sample shop database and cache …");
    seed::seed_postgres(&pg.url("shop"))
        .await
        .context("filling the sample database")?;
    seed::seed_redis(&redis.url())
        .await
        .context("filling the sample Redis")?;

    // Connection strings go into 0600 files the config names, as they would in
    // production: never into the config file itself.
    let secrets = dir.0.join("secrets");
    std::fs::create_dir_all(&secrets)?;
    write_secret(&secrets.join("shop.url"), &pg.url("shop"))?;
    write_secret(&secrets.join("cache.url"), &redis.url())?;
    // The operations log as production should have it: the schema is migrated
    // by its owner, dbops runs as `dbops_app`, which owns nothing, and the chain
    // head is signed into a witness file outside the database.
    let owner_url = pg.url("dbops");
    let runtime_url =
        owner_url.replacen(&format!("{}@", devcluster::PG_SUPERUSER), "dbops_app@", 1);
    {
        let owner = app::connect_console(&Config::from_toml(
            &format!("database_url = \"{owner_url}\""),
            &dir.0.join("owner.toml"),
            &dir.0,
            |_| None,
        )?)
        .await?;
        app::migrate(&owner).await?;
        sqlx::query("CREATE ROLE dbops_app LOGIN")
            .execute(&owner)
            .await?;
        sqlx::query("SELECT dbops_grant_runtime('dbops_app')")
            .execute(&owner)
            .await?;
        owner.close().await;
    }
    write_secret(&secrets.join("console.url"), &runtime_url)?;
    write_secret(&secrets.join("owner.url"), &owner_url)?;
    let (seed, public_key) = crate::audit::checkpoint::generate();
    write_secret(&secrets.join("checkpoint.key"), &seed)?;
    let toml = format!(
        r#"database_url_file = "secrets/console.url"
owner_database_url_file = "secrets/owner.url"
[audit.checkpoints]
signing_key_file = "secrets/checkpoint.key"
public_key = "{public_key}"
file = "witness/checkpoints.jsonl"
interval_seconds = 60
[backups]
directory = "backups"

[[postgres]]
name = "shop"
description = "Sample online shop (demo)"
url_file = "secrets/shop.url"
policy = "production"
[postgres.backup]
schedule = "*/30 * * * *"
keep_last = 5

[[redis]]
name = "cache"
description = "Sessions, carts, rate limits (demo)"
url_file = "secrets/cache.url"
policy = "dev"
"#
    );
    let config_path = dir.0.join("dbops.toml");
    std::fs::write(&config_path, &toml)?;
    let config = Config::from_toml(&toml, &config_path, &dir.0, |_| None)?;

    let app = Application::build(config, pick_listen(listen)).await?;
    let ctx = AuditCtx::system();
    let mut credentials = vec![];
    for role in Role::ALL {
        let name = users::Username::parse(role.as_str()).map_err(anyhow::Error::msg)?;
        let pw = password::generate();
        let hash = password::hash(&pw)?;
        let id = users::create(&app.state.db, &name, &hash, role).await?;
        audit::record(
            &app.state.db,
            &ctx,
            Entry::new("user.create")
                .params(json!({ "username": name.as_str(), "role": role.as_str() }))
                .result(json!({ "user_id": id })),
        )
        .await?;
        credentials.push((role, pw));
    }

    // A first backup of each target, so that the history is not empty.
    for target in ["shop", "cache"] {
        crate::backups::run::request(
            &app.state,
            &ctx,
            target,
            crate::backups::run::Trigger::Cli,
            Default::default(),
        )
        .await?;
    }
    let url = format!("http://{}", app.local_addr());
    println!();
    println!("  dbops demo is running at {url}");
    println!();
    println!("  Sign in as one of (passwords are new for every demo run):");
    for (role, pw) in &credentials {
        println!("    {:<9} password {pw}", role.as_str());
    }
    println!();
    println!(
        "  Targets: PostgreSQL `shop` (policy production, port {}), Redis `cache` (policy dev, port {}).",
        pg.port(),
        redis.port()
    );
    println!("  Config used: {}", config_path.display());
    println!(
        "  The operations log: dbops runs as dbops_app (owns nothing); signed checkpoints go to {}.",
        dir.0.join("witness/checkpoints.jsonl").display()
    );
    println!(
        "  Check it: dbops --config {} audit verify",
        config_path.display()
    );
    println!("  Press Ctrl-C to stop; the demo's servers and data are removed.");
    println!();

    let served = app.run_until(app::shutdown_signal()).await;
    eprintln!("Stopping the demo servers …");
    let _ = redis.stop().await;
    let _ = pg.stop().await;
    drop(dir);
    served
}
