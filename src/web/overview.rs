//! The overview: every target with its state, what keeps a target red (a failed
//! destructive action nobody has acknowledged, a break-glass run nobody has
//! reviewed), and the latest operations; and the acknowledgement of a failure.

use askama::Template;
use askama_web::WebTemplate;
use axum::{
    Form,
    extract::{Path, State},
    response::Redirect,
};
use serde::Deserialize;
use tower_sessions::Session;

use super::{Layout, flash, fmt};
use crate::{
    app::AppState,
    approvals::{self, Request, incidents::Incident},
    audit::{self, AuditCtx, OperationRow},
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
    /// An unacknowledged failure or an unreviewed break-glass run: the row is red.
    pub attention: bool,
    /// With continuous archiving: the recovery point's age ("4 s ago", "unknown")
    /// and whether it is older than the objective.
    pub recovery_point: Option<(String, bool)>,
}

/// An open incident, with where to look.
pub struct IncidentView {
    pub incident: Incident,
    /// The action's title ("Restore a backup over a database").
    pub title: String,
    /// The page of what the failed job worked on (the restore), if any.
    pub outcome: Option<String>,
}

#[derive(Template, WebTemplate)]
#[template(path = "overview.html")]
pub struct OverviewPage {
    layout: Layout,
    targets: Vec<TargetCard>,
    rows: Vec<OperationRow>,
    /// Requests waiting for an approver (anyone's).
    waiting: i64,
    /// Failed destructive actions nobody has acknowledged yet.
    incidents: Vec<IncidentView>,
    /// Break-glass runs nobody has reviewed yet.
    reviews: Vec<Request>,
    /// The viewer may acknowledge failures (approver or admin).
    can_acknowledge: bool,
    flash: Option<flash::Flash>,
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
            attention: false,
            recovery_point: None,
        };
        if t.config.archive.is_some()
            && let Ok(st) = crate::pitr::archive::status(state, t, false).await
        {
            let age = match st.lag {
                Some(l) => format!("{} ago", fmt::duration_short(l)),
                None => "unknown".to_string(),
            };
            card.recovery_point = Some((age, st.over_objective()));
        }
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
    let report = crate::migration_status::inspect_target(t, &state.config, &state.db, limit).await;
    crate::migration_status::summarise(&report)
}

/// An incident with its action's title and the page of what its job worked on.
async fn incident_view(state: &AppState, incident: Incident) -> IncidentView {
    let title = state
        .actions
        .get(&incident.action)
        .map(|a| a.title().to_string())
        .unwrap_or_else(|| incident.action.clone());
    let outcome = match incident.job_id {
        Some(j) => match crate::jobs::find(&state.db, j).await {
            Ok(Some(job)) => state
                .job_kinds
                .get(&job.kind)
                .and_then(|k| k.result_url(&job)),
            _ => None,
        },
        None => None,
    };
    IncidentView {
        incident,
        title,
        outcome,
    }
}

/// `GET /`
pub async fn overview(
    State(state): State<AppState>,
    user: CurrentUser,
    axum::Extension(roles): axum::Extension<crate::auth::roles::Roles>,
    session: Session,
) -> AppResult<OverviewPage> {
    let everything = audit::Filter::default();
    let (mut targets, recent) = tokio::join!(
        target_cards(&state),
        audit::list(&state.db, &everything, None, 8, user.role)
    );
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM approval_requests WHERE state = 'pending' AND expires_at > now()",
    )
    .fetch_one(&state.db)
    .await?;
    let mut incidents = vec![];
    for i in approvals::incidents::open(&state.db).await? {
        incidents.push(incident_view(&state, i).await);
    }
    let reviews = approvals::incidents::unreviewed(&state.db).await?;
    for t in &mut targets {
        t.attention = incidents.iter().any(|i| i.incident.target == t.name)
            || reviews.iter().any(|r| r.target == t.name);
    }
    Ok(OverviewPage {
        can_acknowledge: user.has(crate::auth::Role::Approver),
        flash: flash::take(&session).await,
        layout: Layout::load(&state, user, "overview").await?,
        targets,
        // Per-target roles: each row as its target's role allows.
        rows: recent?
            .rows
            .into_iter()
            .map(|r| {
                let role = roles.on_named(&state.targets, r.target.as_deref());
                r.for_reader(role)
            })
            .collect(),
        waiting,
        incidents,
        reviews,
    })
}

#[derive(Deserialize)]
pub struct AcknowledgeForm {
    #[serde(default)]
    note: String,
}

/// `POST /incidents/{id}/acknowledge`: an approver (or admin) says what was done
/// about a failure; its target is no longer red for it.
pub async fn acknowledge_incident(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
    Form(form): Form<AcknowledgeForm>,
) -> AppResult<Redirect> {
    match approvals::incidents::acknowledge(&state, &ctx, &user, id, &form.note).await {
        Ok(i) => {
            flash::ok(
                &session,
                format!(
                    "Acknowledged the failure of request #{} on {}.",
                    i.approval_id, i.target
                ),
            )
            .await
        }
        Err(approvals::ApprovalError::Refused(m)) => flash::error(&session, m).await,
        Err(e) => return Err(e.into()),
    }
    Ok(Redirect::to("/"))
}
