//! PostgreSQL targets: a small lazily-connected pool per target, and the facts the
//! overview shows.

use std::str::FromStr;

use secrecy::ExposeSecret;
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use super::{Health, Target, bounded};

/// What the overview shows of a PostgreSQL target.
#[derive(Debug, Clone)]
pub struct PgStatus {
    pub version: String,
    pub database: String,
    pub size_bytes: i64,
    /// Client sessions on the whole server (every database, dbops' own too),
    /// which is what `max_connections` limits.
    pub connections: i64,
    pub max_connections: i64,
}

impl Target {
    /// The target's pool, made on first use. It connects lazily, at most 4
    /// connections, each with a statement timeout and `application_name=dbops`.
    pub async fn pg(&self) -> Result<PgPool, String> {
        self.pg
            .get_or_try_init(|| async {
                let opts = PgConnectOptions::from_str(self.config.url.expose_secret())
                    .map_err(|e| self.scrub(&format!("invalid connection URL: {e}")))?
                    .application_name("dbops")
                    .options([(
                        "statement_timeout",
                        format!("{}s", self.statement_timeout.as_secs()),
                    )]);
                Ok::<_, String>(
                    PgPoolOptions::new()
                        .max_connections(4)
                        .min_connections(0)
                        .acquire_timeout(self.connect_timeout)
                        .idle_timeout(std::time::Duration::from_secs(120))
                        .connect_lazy_with(opts),
                )
            })
            .await
            .cloned()
    }

    /// Reachability and basic facts, within the connect timeout.
    #[tracing::instrument(skip(self), fields(target = %self.config.name))]
    pub async fn pg_status(&self) -> Health<PgStatus> {
        let pool = match self.pg().await {
            Ok(p) => p,
            Err(e) => return Health::Down(e),
        };
        let query = sqlx::query_as::<_, (String, String, i64, i64, i64)>(
            "SELECT current_setting('server_version'), current_database(),
                    pg_database_size(current_database()),
                    (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),
                    current_setting('max_connections')::bigint",
        )
        .fetch_one(&pool);
        match bounded(self.connect_timeout * 2, query).await {
            Ok((version, database, size_bytes, connections, max_connections)) => {
                Health::Up(PgStatus {
                    version,
                    database,
                    size_bytes,
                    connections,
                    max_connections,
                })
            }
            Err(e) if e.contains("pool timed out") => {
                // The pool retries refused connections until its timeout and then
                // only says it timed out; one direct attempt tells the real reason.
                Health::Down(describe_pg_error(
                    &self.scrub(&self.pg_connect_error().await.unwrap_or(e)),
                ))
            }
            Err(e) => Health::Down(describe_pg_error(&self.scrub(&e))),
        }
    }

    /// The error of one direct connection attempt, if it fails.
    async fn pg_connect_error(&self) -> Option<String> {
        use sqlx::Connection;
        let opts = PgConnectOptions::from_str(self.config.url.expose_secret()).ok()?;
        match bounded(
            self.connect_timeout,
            sqlx::PgConnection::connect_with(&opts),
        )
        .await
        {
            Ok(conn) => {
                let _ = conn.close().await;
                None
            }
            Err(e) => Some(e),
        }
    }
}

/// Turns driver messages into what an operator would say.
pub fn describe_pg_error(message: &str) -> String {
    let lower = message.to_lowercase();
    let hint = if lower.contains("connection refused") {
        "connection refused: is PostgreSQL running and listening on that address?"
    } else if lower.contains("timed out") || lower.contains("pool timed out") {
        "no answer within the connect timeout: the server or network is not responding"
    } else if lower.contains("password authentication failed") {
        "password authentication failed: check the user and password of the target's URL"
    } else if lower.contains("no pg_hba.conf entry") {
        "the server's pg_hba.conf does not allow this connection"
    } else {
        return message.to_string();
    };
    hint.to_string()
}
