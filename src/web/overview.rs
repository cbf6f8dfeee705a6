//! The overview: every target with its state, and the latest operations.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::State;

use super::{Layout, fmt};
use crate::{
    app::AppState,
    audit::{self, OperationRow},
    auth::CurrentUser,
    config::TargetKind,
    error::AppResult,
    targets::Health,
};

/// One row of the targets table, already formatted.
pub struct TargetCard {
    pub name: String,
    pub kind: &'static str,
    pub policy: &'static str,
    pub description: String,
    pub up: bool,
    pub problem: String,
    pub version: String,
    /// Database size (PostgreSQL) or memory used (Redis).
    pub size: String,
    /// Connections (PostgreSQL) or clients (Redis).
    pub connections: String,
    /// Keys (Redis); empty for PostgreSQL.
    pub keys: String,
    /// Age of the newest good backup ("3 h ago", "none").
    pub backup_age: String,
    /// No good backup within the target's objective.
    pub backup_overdue: bool,
    /// Migration tools, current versions and what is wrong (PostgreSQL only).
    pub migrations: Option<crate::migration_status::Summary>,
}

#[derive(Template, WebTemplate)]
#[template(path = "overview.html")]
pub struct OverviewPage {
    layout: Layout,
    targets: Vec<TargetCard>,
    rows: Vec<OperationRow>,
    /// Requests waiting for an approver (anyone's).
    waiting: i64,
}

/// Probes every target at once; each probe is bounded by the connect timeout, so a
/// down target costs the page at most that long.
pub async fn target_cards(state: &AppState) -> Vec<TargetCard> {
    let newest = crate::backups::newest_good(&state.db)
        .await
        .unwrap_or_default();
    let newest = &newest;
    let probes = state.targets.all().map(|t| async move {
        let last = newest
            .iter()
            .find(|(n, _)| n == t.name())
            .map(|(_, at)| *at);
        let objective = chrono::Duration::from_std(t.config.backup.objective)
            .unwrap_or(chrono::Duration::hours(26));
        let (backup_age, backup_overdue) = match last {
            Some(at) => {
                let age = chrono::Utc::now() - at;
                let text = match age.num_minutes() {
                    ..1 => "just now".to_string(),
                    m @ 1..120 => format!("{m} min ago"),
                    m @ 120..2880 => format!("{} h ago", m / 60),
                    m => format!("{} days ago", m / 1440),
                };
                (text, age > objective)
            }
            None => ("none".to_string(), true),
        };
        let mut card = TargetCard {
            name: t.name().to_string(),
            kind: t.kind().as_str(),
            policy: t.policy().as_str(),
            description: t.config.description.clone().unwrap_or_default(),
            up: false,
            problem: String::new(),
            version: String::new(),
            size: String::new(),
            connections: String::new(),
            keys: String::new(),
            backup_age,
            backup_overdue,
            migrations: None,
        };
        match t.kind() {
            TargetKind::Postgres => {
                // Probed side by side: the migrations cell costs the page no extra time.
                let (health, migrations) = tokio::join!(t.pg_status(), migrations_cell(state, t));
                card.migrations = Some(migrations);
                match health {
                    Health::Up(s) => {
                        card.up = true;
                        card.version = format!("PostgreSQL {}", s.version);
                        card.size = format!("{} ({})", fmt::bytes(s.size_bytes), s.database);
                        card.connections = format!("{} of {}", s.connections, s.max_connections);
                    }
                    Health::Down(e) => card.problem = e,
                }
            }
            TargetKind::Redis => match t.redis_status().await {
                Health::Up(s) => {
                    card.up = true;
                    card.version = format!("Redis {} ({})", s.version, s.role);
                    card.size = if s.maxmemory > 0 {
                        format!(
                            "{} of {}",
                            fmt::bytes(s.used_memory),
                            fmt::bytes(s.maxmemory)
                        )
                    } else {
                        fmt::bytes(s.used_memory)
                    };
                    card.connections = s.clients.to_string();
                    card.keys = fmt::count(s.keys);
                }
                Health::Down(e) => card.problem = e,
            },
        }
        metrics::gauge!("dbops_target_up", "target" => card.name.clone()).set(if card.up {
            1.0
        } else {
            0.0
        });
        card
    });
    futures::future::join_all(probes).await
}

/// The migrations cell of a PostgreSQL target, within the same bound as its probe.
async fn migrations_cell(
    state: &AppState,
    t: &crate::targets::Target,
) -> crate::migration_status::Summary {
    let limit = state.config.connect_timeout * 2;
    let report = crate::migration_status::inspect_target(t, &state.config, limit).await;
    crate::migration_status::summarise(&report)
}

/// `GET /`
pub async fn overview(State(state): State<AppState>, user: CurrentUser) -> AppResult<OverviewPage> {
    let everything = audit::Filter::default();
    let (targets, recent) = tokio::join!(
        target_cards(&state),
        audit::list(&state.db, &everything, None, 8)
    );
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM approval_requests WHERE state = 'pending' AND expires_at > now()",
    )
    .fetch_one(&state.db)
    .await?;
    Ok(OverviewPage {
        layout: Layout::load(&state, user, "overview").await?,
        targets,
        rows: recent?.rows,
        waiting,
    })
}
