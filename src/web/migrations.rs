//! Migration status pages: a PostgreSQL target's databases with every migration
//! tool found in them (applied, current, failed/dirty, pending and drift), and the
//! same for dbops' own console schema. Read-only, so viewers may read them.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::{Path, State};

use super::Layout;
use crate::{
    app::AppState,
    auth::{CurrentUser, Role},
    config::TargetKind,
    error::{AppError, AppResult},
    migration_status::{self, DatabaseReport, ToolReport},
};

#[derive(Template, WebTemplate)]
#[template(path = "migrations/target.html")]
pub struct TargetMigrationsPage {
    layout: Layout,
    target: String,
    policy: &'static str,
    description: String,
    /// Operators may start a backup; others get a link to the history.
    can_backup: bool,
    /// Migrations directories configured for the target.
    configured_dirs: usize,
    databases: Vec<DatabaseReport>,
    /// The tools dbops recognises, for the "none found" sentence.
    looked_for: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "migrations/console.html")]
pub struct ConsoleMigrationsPage {
    layout: Layout,
    outcome: Result<Vec<ToolReport>, String>,
}

/// `GET /targets/{target}/migrations`
#[tracing::instrument(skip(state, user))]
pub async fn show_target_migrations(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(name): Path<String>,
) -> AppResult<TargetMigrationsPage> {
    let target = state.targets.get(&name).ok_or(AppError::NotFound)?;
    if target.kind() != TargetKind::Postgres {
        return Err(AppError::bad_request(format!(
            "{name} is a Redis server; migration status is for PostgreSQL targets."
        )));
    }
    let report = migration_status::inspect_target(
        &target,
        &state.config,
        migration_status::time_limit(&state.config),
    )
    .await;
    Ok(TargetMigrationsPage {
        can_backup: user.has(Role::Operator),
        layout: Layout::load(&state, user, "overview").await?,
        target: name,
        policy: target.policy().as_str(),
        description: target.config.description.clone().unwrap_or_default(),
        configured_dirs: target.config.migrations.len(),
        databases: report.databases,
        looked_for: migration_status::looked_for(),
    })
}

/// `GET /migrations/console`: dbops' own schema migrations.
#[tracing::instrument(skip(state, user))]
pub async fn show_console_migrations(
    State(state): State<AppState>,
    user: CurrentUser,
) -> AppResult<ConsoleMigrationsPage> {
    let outcome =
        migration_status::inspect_console(&state.db, migration_status::time_limit(&state.config))
            .await;
    Ok(ConsoleMigrationsPage {
        layout: Layout::load(&state, user, "overview").await?,
        outcome,
    })
}
