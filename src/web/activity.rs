//! The activity page of a PostgreSQL target: the full page, and the partial (its
//! tables) that the open page fetches again every few seconds.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::{Path, Query, State};
use serde::Deserialize;

use super::Layout;
use crate::{
    activity::{self, Snapshot},
    app::AppState,
    auth::CurrentUser,
    config::TargetKind,
    error::{AppError, AppResult},
};

/// What the tables need: which target, and its snapshot or why there is none.
pub struct Live {
    pub target: String,
    pub refresh_secs: u64,
    pub snapshot: Result<Snapshot, String>,
}

#[derive(Template, WebTemplate)]
#[template(path = "activity/show.html")]
pub struct ActivityPage {
    layout: Layout,
    policy: &'static str,
    description: String,
    paused: bool,
    live: Live,
}

#[derive(Template, WebTemplate)]
#[template(path = "activity/_live.html")]
pub struct ActivityPartial {
    live: Live,
}

/// `?refresh=off` stops the page refreshing itself (to read a table in peace).
#[derive(Debug, Default, Deserialize)]
pub struct ShowQuery {
    #[serde(default)]
    refresh: Option<String>,
}

/// The target, if it exists and is PostgreSQL; then its snapshot.
async fn load(state: &AppState, name: &str) -> AppResult<(Live, &'static str, String)> {
    let target = state.targets.get(name).ok_or(AppError::NotFound)?;
    if target.kind() != TargetKind::Postgres {
        return Err(AppError::bad_request(format!(
            "{name} is a Redis server; the activity page shows the sessions of PostgreSQL targets."
        )));
    }
    let snapshot = activity::snapshot(
        &target,
        activity::time_limit(&state.config),
        state.config.activity.long_running,
    )
    .await;
    Ok((
        Live {
            target: target.name().to_string(),
            refresh_secs: state.config.activity.refresh.as_secs().max(1),
            snapshot,
        },
        target.policy().as_str(),
        target.config.description.clone().unwrap_or_default(),
    ))
}

/// `GET /targets/{target}/activity`
#[tracing::instrument(skip(state, user, q))]
pub async fn show_activity(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(target): Path<String>,
    Query(q): Query<ShowQuery>,
) -> AppResult<ActivityPage> {
    let (live, policy, description) = load(&state, &target).await?;
    Ok(ActivityPage {
        layout: Layout::load(&state, user, "overview").await?,
        policy,
        description,
        paused: q.refresh.as_deref() == Some("off"),
        live,
    })
}

/// `GET /targets/{target}/activity/live`: the tables only.
#[tracing::instrument(skip(state, _user))]
pub async fn live_activity(
    State(state): State<AppState>,
    _user: CurrentUser,
    Path(target): Path<String>,
) -> AppResult<ActivityPartial> {
    let (live, _, _) = load(&state, &target).await?;
    Ok(ActivityPartial { live })
}
