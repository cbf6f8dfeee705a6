//! Building and running the web application: the console database, the shared
//! state, the middleware stack, binding and graceful shutdown.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use axum::{Router, extract::ConnectInfo, http::HeaderName};
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::ExposeSecret;
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tower_http::{
    catch_panic::CatchPanicLayer,
    limit::RequestBodyLimitLayer,
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    timeout::TimeoutLayer,
    trace::TraceLayer,
};
use tower_sessions::{Expiry, SessionManagerLayer, cookie::SameSite};
use tower_sessions_sqlx_store::PostgresStore;

pub use crate::state::{AppState, Inner, quote_ident};
use crate::{config::Config, targets::Registry, web};

/// The request id header, set on every request and response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Installs the process-wide TLS provider and metrics recorder (once).
pub fn process_init() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Several crates bring rustls; pick aws-lc-rs explicitly so none panics.
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .expect("the metrics recorder is installed once per process")
        })
        .clone()
}

/// Connects to the console database, creating the database itself if the server
/// has none of that name yet (a fresh machine's first `dbops migrate`).
pub async fn connect_console(config: &Config) -> anyhow::Result<PgPool> {
    let opts: PgConnectOptions = config
        .database_url
        .expose_secret()
        .parse()
        .context("database_url is not a valid PostgreSQL URL")?;
    // Every page query is prepared with different filters; a cached generic plan
    // picks the wrong index for time ranges (bench/operations_log.sh measured 48 ms
    // → 4 ms), so plan each execution for its parameters. The console database's
    // tables are small and hot: index scans are cheap.
    let opts = opts.application_name("dbops-console").options([
        ("plan_cache_mode", "force_custom_plan"),
        ("random_page_cost", "1.1"),
    ]);
    let pool_opts = || {
        PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
    };
    match pool_opts().connect_with(opts.clone()).await {
        Ok(pool) => Ok(pool),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
            let name = opts.get_database().unwrap_or("dbops").to_string();
            tracing::info!(database = %name, "console database does not exist yet; creating it");
            let admin = pool_opts()
                .max_connections(1)
                .connect_with(opts.clone().database("postgres"))
                .await
                .context("connecting to the server's `postgres` database to create the console database")?;
            match sqlx::query(&format!("CREATE DATABASE {}", quote_ident(&name)))
                .execute(&admin)
                .await
            {
                Ok(_) => {}
                // Another dbops (a replica, or the CLI) created it at the same moment.
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some("42P04") || e.code().as_deref() == Some("23505") => {}
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!("creating the console database {name}")));
                }
            }
            admin.close().await;
            Ok(pool_opts().connect_with(opts).await.context("connecting to the console database")?)
        }
        Err(e) => Err(anyhow::Error::new(e).context(
            "cannot connect to the console database (set database_url in the config file or DATABASE_URL)",
        )),
    }
}

/// The console schema version this binary carries: its newest migration.
pub fn schema_version() -> i64 {
    sqlx::migrate!("./migrations")
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0)
}

/// `dbops --version`: the package version and the console schema it carries.
pub fn version_line() -> String {
    format!(
        "{} (console schema {})",
        env!("CARGO_PKG_VERSION"),
        schema_version()
    )
}

/// The console schema version of the database: its newest applied migration
/// (during a rolling upgrade, newer than [`schema_version`] on old replicas).
pub async fn applied_schema_version(db: &PgPool) -> anyhow::Result<i64> {
    sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM _sqlx_migrations WHERE success")
        .fetch_one(db)
        .await
        .context("reading the console schema version")
}

/// Applies dbops' schema migrations, the session store's table and the job
/// queue's tables. Several dbops starting at once (replicas, the CLI) take turns.
pub async fn migrate(db: &PgPool) -> anyhow::Result<()> {
    const LOCK: i64 = 0x6462_6f70_735f_6d69; // "dbops_mi"
    let mut lock = db.acquire().await.context("connecting to migrate")?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(LOCK)
        .execute(&mut *lock)
        .await
        .context("waiting for another dbops to finish migrating")?;
    let result = migrate_locked(db).await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(LOCK)
        .execute(&mut *lock)
        .await;
    result
}

async fn migrate_locked(db: &PgPool) -> anyhow::Result<()> {
    if !can_migrate(db).await? {
        // The runtime role owns nothing, so it cannot change the schema: the
        // owner's `dbops migrate` must have run for this version.
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(db)
                .await
                .context("reading which migrations were applied")?;
        let missing: Vec<i64> = sqlx::migrate!("./migrations")
            .iter()
            .map(|m| m.version)
            .filter(|v| !applied.contains(v))
            .collect();
        if !missing.is_empty() {
            anyhow::bail!(
                "the console database lacks {} migration(s) of this dbops (first: {}), and the role dbops runs as \
                 does not own the schema: run `dbops migrate` with owner_database_url set (as the owner)",
                missing.len(),
                missing[0]
            );
        }
        return Ok(());
    }
    // A newer dbops may have applied migrations this one does not know (a rolling
    // upgrade: the new version migrates while old replicas still serve and may
    // restart). Migrations only expand the schema an older version reads
    // (docs/OPERATIONS.md, "Upgrades"), so those are not an error.
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
        .run(db)
        .await
        .context("applying dbops' schema migrations")?;
    PostgresStore::new(db.clone())
        .migrate()
        .await
        .context("creating the session table")?;
    underway::run_migrations(db)
        .await
        .context("creating the job queue's tables")?;
    Ok(())
}

/// Whether the role connected to `db` may change dbops' schema: a superuser, or
/// a member of the role owning the log (or there is no log yet).
pub async fn can_migrate(db: &PgPool) -> anyhow::Result<bool> {
    sqlx::query_scalar(
        "SELECT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
             OR to_regclass('public.operations') IS NULL
             OR pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = to_regclass('public.operations')), 'MEMBER')",
    )
    .fetch_one(db)
    .await
    .context("checking who owns the operations log")
}

/// What the role dbops runs as could do to its own log, if anything: it is a
/// superuser or owns the log, so it could switch the log's triggers off and
/// rewrite the chain (only signed checkpoints outside the database would tell).
pub async fn runtime_owns_the_log(db: &PgPool) -> anyhow::Result<Option<String>> {
    let (me, superuser, owner): (String, bool, bool) = sqlx::query_as(
        "SELECT current_user::text, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
                pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = 'public.operations'::regclass), 'MEMBER')",
    )
    .fetch_one(db)
    .await
    .context("checking who owns the operations log")?;
    Ok(match (superuser, owner) {
        (true, _) => Some(format!("dbops runs as {me}, a superuser")),
        (false, true) => Some(format!("dbops runs as {me}, which owns the operations log")),
        _ => None,
    })
}

/// A built application, bound to its port, ready to run.
pub struct Application {
    listener: tokio::net::TcpListener,
    router: Router,
    pub state: AppState,
}

impl Application {
    /// Connects, migrates, builds the router and binds `listen` (port 0 picks a free
    /// port; tests use that).
    pub async fn build(mut config: Config, listen: SocketAddr) -> anyhow::Result<Application> {
        // The address actually served decides the cookie's default (`--listen` may
        // override the config file's).
        config.listen = listen;
        if let Some(warning) = config.session.cookie_warning(listen) {
            tracing::warn!("{warning}");
        }
        let metrics = process_init();
        let db = connect_console(&config).await?;
        migrate(&db).await?;
        if let Some(why) = runtime_owns_the_log(&db).await? {
            if config.audit.refuse_owner_runtime {
                anyhow::bail!(
                    "{why}: it could switch the operations log's triggers off and rewrite it. Run dbops as a role \
                     that owns nothing (`dbops migrate --runtime-role NAME`), or unset [audit] refuse_owner_runtime"
                );
            }
            tracing::warn!(
                "{why}: it could switch the operations log's triggers off and rewrite it unnoticed by the hash chain \
                 alone{}. Run dbops as a role that owns nothing (`dbops migrate --runtime-role NAME`; see \
                 docs/OPERATIONS.md)",
                if config.audit.checkpoints.enabled() {
                    " (signed checkpoints outside the database still detect it)"
                } else {
                    ", and no signed checkpoints are configured"
                }
            );
        }
        let targets = Registry::new(&config);
        let job_queue = Arc::new(
            underway::Queue::builder()
                .name(crate::jobs::QUEUE)
                .pool(db.clone())
                .build()
                .await
                .context("opening the job queue")?,
        );
        let local_storage = Arc::new(
            crate::storage::LocalStorage::new(config.backups.directory.clone())
                .map_err(|e| anyhow::anyhow!("backups.directory: {e}"))?,
        );
        let s3_storage = match &config.backups.s3 {
            None => None,
            Some(s3) => Some(Arc::new(
                crate::storage::S3Storage::from_config(s3)
                    .map_err(|e| anyhow::anyhow!("backups.s3: {e}"))?,
            )),
        };
        let config_oidc = config.oidc.clone();
        let state = AppState::new(Inner {
            config,
            db,
            targets,
            actions: crate::actions::all(),
            metrics,
            started: std::time::Instant::now(),
            job_kinds: crate::jobs::JobRegistry::new(crate::actions::job_kinds()),
            job_queue,
            local_storage,
            s3_storage,
            oidc: crate::auth::oidc::Providers::new(&config_oidc)?,
            shutdown: tokio_util::sync::CancellationToken::new(),
        });
        for warning in &state.config.warnings {
            tracing::warn!("{warning}");
        }
        // Work left running by a dbops that died ends as interrupted.
        crate::actions::sweep(&state)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let router = router(state.clone());
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        // Recorded once the port is bound, so the row means "this console is up".
        let targets: Vec<String> = state
            .targets
            .all()
            .map(|t| {
                format!(
                    "{} ({}, {})",
                    t.name(),
                    t.kind().as_str(),
                    t.policy().as_str()
                )
            })
            .collect();
        crate::audit::record(
            &state.db,
            &crate::audit::AuditCtx::system(),
            crate::audit::Entry::new("console.start").params(serde_json::json!({
                "listen": listener.local_addr()?.to_string(),
                "version": env!("CARGO_PKG_VERSION"),
                "targets": targets,
            })),
        )
        .await?;
        Ok(Application {
            listener,
            router,
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let ctx = crate::audit::AuditCtx::system();
        let job_worker = crate::jobs::start_worker(&self.state);
        let scheduler =
            crate::jobs::scheduler::start(&self.state, crate::actions::periodic(&self.state));
        tracing::info!(address = %self.local_addr(), "dbops is serving");
        axum::serve(
            self.listener,
            self.router
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await?;
        scheduler.stop().await;
        // Running jobs are cancelled and end as interrupted, with their temp files removed.
        self.state.shutdown.cancel();
        job_worker.stop().await;
        if let Err(e) = crate::audit::record(
            &self.state.db,
            &ctx,
            crate::audit::Entry::new("console.stop"),
        )
        .await
        {
            tracing::warn!(error = %e, "could not record the stop");
        }
        self.state.db.close().await;
        tracing::info!("dbops stopped");
        Ok(())
    }
}

/// The session cookie and store: `dbops_session`, HttpOnly, SameSite=Strict, and
/// `Secure` as [`crate::config::SessionSettings::secure_cookies_for`] decides for
/// the address dbops listens on.
pub fn session_layer(
    db: PgPool,
    settings: &crate::config::SessionSettings,
    listen: SocketAddr,
) -> SessionManagerLayer<PostgresStore> {
    SessionManagerLayer::new(PostgresStore::new(db))
        .with_name("dbops_session")
        .with_http_only(true)
        .with_same_site(SameSite::Strict)
        .with_secure(settings.secure_cookies_for(listen))
        .with_path("/")
        .with_expiry(Expiry::OnInactivity(
            time::Duration::try_from(settings.idle_timeout).unwrap_or(time::Duration::minutes(30)),
        ))
}

/// The whole router: every route from [`web::routes`], behind the middleware stack.
pub fn router(state: AppState) -> Router {
    let sessions = session_layer(state.db.clone(), &state.config.session, state.config.listen);

    // Router::layer wraps everything added before it: the last layer here is the
    // outermost one a request meets.
    web::router(state.clone())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::csrf::check,
        ))
        // Inside render_errors, so that a refused body gets a page, not plain text.
        .layer(RequestBodyLimitLayer::new(1024 * 1024))
        .layer(axum::middleware::from_fn(web::render_errors))
        .layer(sessions)
        .layer(axum::middleware::from_fn(request_meta))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(60),
        ))
        .layer(axum::middleware::from_fn(web::count_requests))
        .layer(axum::middleware::from_fn(web::security_headers))
        .layer(CatchPanicLayer::custom(web::panic_response))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
                let id = req
                    .headers()
                    .get(REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let client = req
                    .extensions()
                    .get::<ClientRequestId>()
                    .map(|c| c.0.as_str())
                    .unwrap_or("");
                tracing::info_span!("request", request_id = %id, client_request_id = %client, method = %req.method(), path = %req.uri().path())
            }),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        // Outermost: the client's X-Request-Id is taken away before dbops sets its own.
        .layer(axum::middleware::from_fn(take_client_request_id))
}

/// The `X-Request-Id` a client sent, if it was short and plain: kept apart from
/// dbops' own id and only in the log lines of the request (`client_request_id`),
/// so that a proxy's id can be followed — never as dbops' id, which is what the
/// operations log and the response carry.
#[derive(Debug, Clone)]
pub struct ClientRequestId(pub String);

/// At most 64 characters of letters, digits and `. _ : -`; anything else is dropped.
pub fn parse_client_request_id(value: &str) -> Option<ClientRequestId> {
    let v = value.trim();
    (!v.is_empty()
        && v.len() <= 64
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    .then(|| ClientRequestId(v.to_string()))
}

/// Removes every `X-Request-Id` the client sent (so that [`SetRequestIdLayer`]
/// always makes a new one), keeping a plain one as [`ClientRequestId`].
async fn take_client_request_id(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if let axum::http::header::Entry::Occupied(e) = req.headers_mut().entry(REQUEST_ID) {
        let (_, mut values) = e.remove_entry_mult();
        let client = values
            .next()
            .and_then(|v| v.to_str().ok().and_then(parse_client_request_id));
        drop(values);
        if let Some(c) = client {
            req.extensions_mut().insert(c);
        }
    }
    next.run(req).await
}

/// Puts [`crate::audit::RequestMeta`] (request id, client address) into the request.
async fn request_meta(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let request_id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let client_addr = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    req.extensions_mut().insert(crate::audit::RequestMeta {
        request_id,
        client_addr,
    });
    next.run(req).await
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}
