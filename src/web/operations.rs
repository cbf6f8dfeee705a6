//! The operations log pages: list with filters and keyset paging, one operation,
//! and CSV export. Every one shows rows as the reader's role may see them
//! ([`audit::details_role`]).

use askama::Template;
use askama_web::WebTemplate;
use axum::{
    Extension,
    body::Body,
    extract::{Path, Query, State},
    http::header,
    response::{IntoResponse, Response},
};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use super::Layout;
use crate::{
    app::AppState,
    audit::{self, AuditCtx, Entry, Filter, OperationRow, Outcome},
    auth::{CurrentUser, roles::Roles},
    error::{AppError, AppResult},
};

/// The filter form as typed; empty fields mean "any".
#[derive(Debug, Default, Deserialize, Clone)]
pub struct FilterForm {
    #[serde(default)]
    pub actor: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub target: String,
    #[serde(default)]
    pub outcome: String,
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: String,
    #[serde(default)]
    pub before: Option<i64>,
}

fn parse_time(field: &str, s: &str) -> Result<Option<DateTime<Utc>>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    for f in [
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Ok(Some(t.and_utc()));
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(Some(d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc()));
    }
    Err(format!(
        "“{field}” must be a date like 2026-11-21 or a time like 2026-11-21T14:30 (UTC)."
    ))
}

fn non_empty(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.chars().take(200).collect())
}

impl FilterForm {
    /// Parses the form into a [`Filter`], or says which field is wrong.
    pub fn parse(&self) -> Result<Filter, String> {
        let outcome = match self.outcome.trim() {
            "" => None,
            o => Some(Outcome::parse(o).ok_or_else(|| format!("“{o}” is not an outcome."))?),
        };
        let from = parse_time("from", &self.from)?;
        let to = parse_time("to", &self.to)?;
        if let (Some(f), Some(t)) = (from, to)
            && f >= t
        {
            return Err("“from” must be before “to”.".into());
        }
        Ok(Filter {
            actor: non_empty(&self.actor),
            kind: non_empty(&self.kind),
            target: non_empty(&self.target),
            outcome,
            from,
            to,
        })
    }

    /// The query string of these filters (without `before`), for links.
    pub fn query(&self) -> String {
        serde_urlencoded::to_string([
            ("actor", self.actor.as_str()),
            ("kind", self.kind.as_str()),
            ("target", self.target.as_str()),
            ("outcome", self.outcome.as_str()),
            ("from", self.from.as_str()),
            ("to", self.to.as_str()),
        ])
        .unwrap_or_default()
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "operations/list.html")]
pub struct OperationsPage {
    layout: Layout,
    form: FilterForm,
    error: Option<String>,
    rows: Vec<OperationRow>,
    next_before: Option<i64>,
    outcomes: Vec<&'static str>,
    targets: Vec<String>,
}

const PAGE_SIZE: i64 = 50;

/// `GET /operations`
pub async fn list_operations(
    State(state): State<AppState>,
    user: CurrentUser,
    Extension(roles): Extension<Roles>,
    Query(form): Query<FilterForm>,
) -> AppResult<OperationsPage> {
    let targets = state.targets.all().map(|t| t.name().to_string()).collect();
    let outcomes = std::iter::once(Outcome::Running)
        .chain(Outcome::FINAL)
        .map(Outcome::as_str)
        .collect();
    let (rows, next_before, error) = match form.parse() {
        Ok(filter) => {
            let page = audit::list(&state.db, &filter, form.before, PAGE_SIZE, user.role).await?;
            let ids: Vec<i64> = page.rows.iter().map(|r| r.id).collect();
            let with_points =
                crate::pitr::restore_points::operations_with_points(&state.db, &ids).await?;
            let rows = page
                .rows
                .into_iter()
                .map(|r| {
                    let role = roles.on_named(&state.targets, r.target.as_deref());
                    let mut r = r.for_reader(role);
                    if with_points.contains(&r.id)
                        && let Some(t) = &r.target
                    {
                        r.recover_before =
                            Some(format!("/targets/{t}/pitr?before_operation={}", r.id));
                    }
                    r
                })
                .collect();
            (rows, page.next_before, None)
        }
        Err(e) => (vec![], None, Some(e)),
    };
    Ok(OperationsPage {
        layout: Layout::load(&state, user, "operations").await?,
        form,
        error,
        rows,
        next_before,
        outcomes,
        targets,
    })
}

#[derive(Template, WebTemplate)]
#[template(path = "operations/show.html")]
pub struct OperationPage {
    layout: Layout,
    op: OperationRow,
    params: String,
    result: String,
    /// "Recover to just before this": the point-in-time recovery form filled
    /// in, for an operation on an archived target that has a restore point
    /// (every destructive action dbops ran there).
    recover_before: Option<String>,
}

/// `GET /operations/{id}`
pub async fn show_operation(
    State(state): State<AppState>,
    user: CurrentUser,
    Extension(roles): Extension<Roles>,
    Path(id): Path<i64>,
) -> AppResult<OperationPage> {
    let op = audit::find(&state.db, id, user.role)
        .await?
        .ok_or(AppError::NotFound)?;
    let op = {
        let role = roles.on_named(&state.targets, op.target.as_deref());
        op.for_reader(role)
    };
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let archived = op
        .target
        .as_deref()
        .and_then(|t| state.targets.get(t))
        .is_some_and(|t| t.config.archive.is_some());
    let recover_before = match (archived, &op.target) {
        (true, Some(t)) => crate::pitr::restore_points::before_operation(&state.db, op.id)
            .await?
            .map(|_| format!("/targets/{t}/pitr?before_operation={}", op.id)),
        _ => None,
    };
    Ok(OperationPage {
        recover_before,
        layout: Layout::load(&state, user, "operations").await?,
        params: pretty(&op.params),
        result: op.result.as_ref().map(pretty).unwrap_or_default(),
        op,
    })
}

/// `GET /operations/export.csv`: every row matching the filters, streamed. The
/// export itself is an operation.
pub async fn export_operations(
    State(state): State<AppState>,
    Extension(roles): Extension<Roles>,
    ctx: AuditCtx,
    Query(form): Query<FilterForm>,
) -> AppResult<Response> {
    let filter = form.parse().map_err(AppError::BadRequest)?;
    audit::record(
        &state.db,
        &ctx,
        Entry::new("operations.export").params(json!({
            "actor": filter.actor, "kind": filter.kind, "target": filter.target,
            "outcome": filter.outcome.map(Outcome::as_str),
            "from": filter.from.map(|t| t.to_rfc3339()), "to": filter.to.map(|t| t.to_rfc3339()),
        })),
    )
    .await?;
    // One role for the whole file: the lowest this user has on any target (per-target
    // roles), so that no row shows more than its target's role allows.
    let reader = roles.lowest(state.targets.all().map(|t| (t.name(), t.policy())));
    let stream = audit::stream_csv(state.db.clone(), filter, reader).map(|chunk| {
        chunk.map_err(|e| {
            tracing::error!(error = %e, "CSV export stopped");
            std::io::Error::other("export stopped")
        })
    });
    let name = format!(
        "dbops-operations-{}.csv",
        Utc::now().format("%Y%m%d-%H%M%S")
    );
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_bad_dates_say_which_field() {
        let f = FilterForm {
            kind: "auth.".into(),
            from: "2026-11-01".into(),
            to: "2026-11-21T10:00".into(),
            ..Default::default()
        }
        .parse()
        .unwrap();
        assert_eq!(f.kind.as_deref(), Some("auth."));
        assert!(f.from.unwrap() < f.to.unwrap());
        let err = FilterForm {
            from: "yesterday".into(),
            ..Default::default()
        }
        .parse()
        .unwrap_err();
        assert!(err.contains("from"), "{err}");
        let err = FilterForm {
            outcome: "exploded".into(),
            ..Default::default()
        }
        .parse()
        .unwrap_err();
        assert!(err.contains("exploded"));
    }
}
