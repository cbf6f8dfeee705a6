//! Reading the operations log: filtered, keyset-paginated pages and CSV export,
//! each shown per the reader's role ([`details_role`]: the one rule for who may
//! read an operation's parameters, result and error).
//!
//! Pages are ordered by id, newest first, and continue from the last id seen
//! (`id < $before`), so every page costs the same however deep it is; the indexes
//! `(kind, id)`, `(actor_name, id)`, `(target, id)`, `(outcome, id)` and
//! `(started_at)` serve the filters.

use chrono::{DateTime, Utc};
use futures::Stream;
use serde_json::Value;
use sqlx::{PgPool, Postgres, QueryBuilder};

use crate::auth::Role;

/// Kinds (exact, or a prefix ending in `.`) whose parameters, result and error a
/// role below the one named may not read; the first match wins. Each entry is the
/// lowest role that may open the page the operation comes from: the key browser,
/// memory by prefix, delete by pattern, activity (query text of sessions), reports
/// and approvals are operator pages; users and API tokens are admin pages. A kind
/// not listed is an operator's: new kinds start hidden from viewers.
const DETAILS: &[(&str, Role)] = &[
    // The name typed at a failed login may be someone's password typed in the
    // wrong field; lockouts are handled on the admin's users page.
    ("auth.login.failed", Role::Admin),
    ("auth.lockout", Role::Admin),
    ("auth.", Role::Viewer),
    ("console.", Role::Viewer),
    ("backup.", Role::Viewer),
    // Restore pages (`/restores/{id}`) are a viewer's; a Redis restore is `redis.`.
    ("restore.", Role::Viewer),
    ("job.cancel", Role::Viewer),
    ("incident.", Role::Viewer),
    // Reported deploys show on the migrations page, a viewer's.
    ("migrations.", Role::Viewer),
    ("operations.export", Role::Viewer),
    ("user.", Role::Admin),
    ("token.", Role::Admin),
];

/// The lowest role that may read the parameters, result and error of operations
/// of `kind` (everyone who may open the log sees kind, target, who, when and
/// outcome). This is the one rule the page, the detail page, the overview, the
/// approvals page, the job page and the CSV export all go through.
pub fn details_role(kind: &str) -> Role {
    DETAILS
        .iter()
        .find(|(k, _)| {
            if k.ends_with('.') {
                kind.starts_with(k)
            } else {
                kind == *k
            }
        })
        .map(|(_, role)| *role)
        .unwrap_or(Role::Operator)
}

/// Whether `reader` may read the parameters, result and error of a `kind` operation.
pub fn details_visible(kind: &str, reader: Role) -> bool {
    reader >= details_role(kind)
}

/// What is shown instead of hidden parameters, result and error.
pub fn hidden_marker(kind: &str, reader: Role) -> String {
    format!(
        "hidden from {}s: needs the {} role",
        reader.as_str(),
        details_role(kind).as_str()
    )
}

/// The filters a person can set on the operations page. Empty means "any".
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// The start of the actor's name (`ann` finds `ann` and `anna`).
    pub actor: Option<String>,
    /// A kind and every kind under it (`redis.keys` finds `redis.keys` and
    /// `redis.keys.delete`, not `redis.keyspace`), or any prefix ending in `.`
    /// or `*` (`auth.`, `backup.cr*`).
    pub kind: Option<String>,
    pub target: Option<String>,
    pub outcome: Option<super::Outcome>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

/// One row as shown on the page and in the CSV.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OperationRow {
    pub id: i64,
    pub request_id: Option<String>,
    pub actor_id: Option<i64>,
    pub actor_name: Option<String>,
    pub actor_role: Option<String>,
    pub kind: String,
    pub target: Option<String>,
    pub params: Value,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub outcome: String,
    pub error: Option<String>,
    pub result: Option<Value>,
    pub approval_id: Option<i64>,
    pub client_addr: Option<String>,
    /// Set when the reader may not see this row's parameters, result and error
    /// (which are then emptied): the marker shown in their place.
    #[sqlx(skip)]
    pub hidden: Option<String>,
    /// Where to recover the target to just before this operation, when a
    /// page that knows (the operations log) filled it in.
    #[sqlx(skip)]
    pub recover_before: Option<String>,
}

impl OperationRow {
    /// The row as `reader` may see it ([`details_role`]).
    pub fn for_reader(mut self, reader: Role) -> OperationRow {
        if !details_visible(&self.kind, reader) {
            self.hidden = Some(hidden_marker(&self.kind, reader));
            // That a run was break-glass is part of what happened, not a detail.
            self.params = if self.is_break_glass() {
                serde_json::json!({ "break_glass": true })
            } else {
                Value::Null
            };
            self.result = None;
            self.error = None;
        }
        self
    }

    /// A step or run of a break-glass request (its parameters say so).
    pub fn is_break_glass(&self) -> bool {
        self.params.get("break_glass") == Some(&Value::Bool(true))
    }

    /// How long it took, for people (`1.2 s`, `3 min`), or empty while running.
    pub fn duration(&self) -> String {
        let Some(end) = self.ended_at else {
            return String::new();
        };
        let ms = (end - self.started_at).num_milliseconds().max(0);
        match ms {
            0..1_000 => format!("{ms} ms"),
            1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
            _ => format!("{} min", ms / 60_000),
        }
    }
}

/// A page of rows and where the next one starts.
#[derive(Debug)]
pub struct Page {
    pub rows: Vec<OperationRow>,
    /// Pass as `before` to get the next (older) page; `None` on the last page.
    pub next_before: Option<i64>,
}

const COLUMNS: &str = "id, request_id, actor_id, actor_name, actor_role, kind, target, params, \
                       started_at, ended_at, outcome, error, result, approval_id, client_addr";

fn push_filters(q: &mut QueryBuilder<'_, Postgres>, f: &Filter, before: Option<i64>) {
    q.push(" WHERE true");
    if let Some(actor) = &f.actor {
        q.push(" AND starts_with(actor_name, ")
            .push_bind(actor.clone())
            .push(")");
    }
    if let Some(kind) = &f.kind {
        if let Some(prefix) = kind
            .strip_suffix('*')
            .or_else(|| kind.ends_with('.').then_some(kind.as_str()))
        {
            // A range instead of LIKE so that the (kind, id) index serves it in any collation.
            q.push(" AND kind >= ").push_bind(prefix.to_string());
            q.push(" AND kind < ")
                .push_bind(format!("{prefix}\u{10FFFF}"));
        } else {
            // The kind itself, or one under it (at a dot).
            q.push(" AND (kind = ").push_bind(kind.clone());
            q.push(" OR (kind >= ").push_bind(format!("{kind}."));
            q.push(" AND kind < ")
                .push_bind(format!("{kind}.\u{10FFFF}"));
            q.push("))");
        }
    }
    if let Some(target) = &f.target {
        q.push(" AND target = ").push_bind(target.clone());
    }
    if let Some(outcome) = f.outcome {
        q.push(" AND outcome = ").push_bind(outcome.as_str());
    }
    if let Some(from) = f.from {
        q.push(" AND started_at >= ").push_bind(from);
    }
    if let Some(to) = f.to {
        q.push(" AND started_at < ").push_bind(to);
    }
    if let Some(before) = before {
        q.push(" AND id < ").push_bind(before);
    }
}

/// One page of at most `limit` rows older than `before`, newest first, as
/// `reader` may see them.
pub async fn list(
    db: &PgPool,
    filter: &Filter,
    before: Option<i64>,
    limit: i64,
    reader: Role,
) -> Result<Page, sqlx::Error> {
    let limit = limit.clamp(1, 500);
    let mut q = QueryBuilder::new(format!("SELECT {COLUMNS} FROM operations"));
    push_filters(&mut q, filter, before);
    q.push(" ORDER BY id DESC LIMIT ").push_bind(limit + 1);
    let mut rows: Vec<OperationRow> = q.build_query_as().fetch_all(db).await?;
    let next_before = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|r| r.id)
    } else {
        None
    };
    let rows = rows.into_iter().map(|r| r.for_reader(reader)).collect();
    Ok(Page { rows, next_before })
}

/// The rows matching `filter` as CSV, produced in keyset chunks so that memory stays
/// flat however many rows match. Cells that a spreadsheet would run as a formula
/// are prefixed with `'`. Rows are as `reader` may see them: hidden parameters,
/// results and errors are replaced by the marker.
pub fn stream_csv(
    db: PgPool,
    filter: Filter,
    reader: Role,
) -> impl Stream<Item = Result<String, sqlx::Error>> + Send + 'static {
    const CHUNK: i64 = 2_000;
    enum State {
        Header,
        Rows(Option<i64>),
        Done,
    }
    futures::stream::unfold(State::Header, move |state| {
        let db = db.clone();
        let filter = filter.clone();
        async move {
            match state {
                State::Done => None,
                State::Header => Some((
                    Ok("id,started_at,ended_at,actor,role,kind,target,outcome,error,params,result,approval_id,client_addr,request_id\n".to_string()),
                    State::Rows(None),
                )),
                State::Rows(before) => match list(&db, &filter, before, CHUNK, reader).await {
                    Err(e) => Some((Err(e), State::Done)),
                    Ok(page) => {
                        let mut out = String::with_capacity(page.rows.len() * 200);
                        for r in &page.rows {
                            let hidden = |shown: String| match &r.hidden {
                                Some(marker) => format!("[{marker}]"),
                                None => shown,
                            };
                            let cells = [
                                r.id.to_string(),
                                r.started_at.to_rfc3339(),
                                r.ended_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                                r.actor_name.clone().unwrap_or_default(),
                                r.actor_role.clone().unwrap_or_default(),
                                r.kind.clone(),
                                r.target.clone().unwrap_or_default(),
                                r.outcome.clone(),
                                hidden(r.error.clone().unwrap_or_default()),
                                hidden(r.params.to_string()),
                                hidden(r.result.as_ref().map(Value::to_string).unwrap_or_default()),
                                r.approval_id.map(|a| a.to_string()).unwrap_or_default(),
                                r.client_addr.clone().unwrap_or_default(),
                                r.request_id.clone().unwrap_or_default(),
                            ];
                            let line: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
                            out.push_str(&line.join(","));
                            out.push('\n');
                        }
                        let next = match page.next_before {
                            Some(b) => State::Rows(Some(b)),
                            None => State::Done,
                        };
                        Some((Ok(out), next))
                    }
                },
            }
        }
    })
}

/// Quotes one CSV cell (RFC 4180) and defuses spreadsheet formulas.
pub fn csv_cell(value: &str) -> String {
    let defused = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{value}")
    } else {
        value.to_string()
    };
    if defused.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", defused.replace('"', "\"\""))
    } else {
        defused
    }
}

/// Every operation that belongs to an approval request, oldest first, as `reader`
/// may see them.
pub async fn for_approval(
    db: &PgPool,
    approval_id: i64,
    reader: Role,
) -> Result<Vec<OperationRow>, sqlx::Error> {
    let rows: Vec<OperationRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM operations WHERE approval_id = $1 ORDER BY id"
    ))
    .bind(approval_id)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| r.for_reader(reader)).collect())
}

/// One operation by id, as `reader` may see it.
pub async fn find(db: &PgPool, id: i64, reader: Role) -> Result<Option<OperationRow>, sqlx::Error> {
    let row: Option<OperationRow> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM operations WHERE id = $1"))
            .bind(id)
            .fetch_optional(db)
            .await?;
    Ok(row.map(|r| r.for_reader(reader)))
}

#[cfg(test)]
mod tests {
    use super::{Role, csv_cell, details_role, details_visible};

    #[test]
    fn operator_pages_details_are_hidden_from_viewers_and_unknown_kinds_too() {
        for kind in [
            "redis.key.view",
            "redis.memory_by_prefix",
            "redis.keys.delete",
            "pg.backend.cancel",
            "pg.backend.terminate",
            "pg.maintenance",
            "approval.requested",
            "some.future.kind",
        ] {
            assert!(!details_visible(kind, Role::Viewer), "{kind}");
            assert!(details_visible(kind, Role::Operator), "{kind}");
        }
        for kind in [
            "backup.create",
            "auth.login",
            "console.start",
            "restore.run",
        ] {
            assert!(details_visible(kind, Role::Viewer), "{kind}");
        }
        assert_eq!(details_role("user.create"), Role::Admin);
        assert_eq!(details_role("auth.login.failed"), Role::Admin);
        // A prefix entry matches only at a dot: `backups_x` is no backup kind.
        assert_eq!(details_role("backupx.create"), Role::Operator);
    }

    #[test]
    fn csv_cells_are_quoted_and_formulas_defused() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("=HYPERLINK(1)"), "'=HYPERLINK(1)");
    }
}
