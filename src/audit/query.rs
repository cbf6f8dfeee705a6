//! Reading the operations log: filtered, keyset-paginated pages and CSV export.
//!
//! Pages are ordered by id, newest first, and continue from the last id seen
//! (`id < $before`), so every page costs the same however deep it is; the indexes
//! `(kind, id)`, `(actor_name, id)`, `(target, id)`, `(outcome, id)` and
//! `(started_at)` serve the filters.

use chrono::{DateTime, Utc};
use futures::Stream;
use serde_json::Value;
use sqlx::{PgPool, Postgres, QueryBuilder};

/// The filters a person can set on the operations page. Empty means "any".
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub actor: Option<String>,
    /// An exact kind (`auth.login`) or a prefix ending in `.` or `*` (`auth.`).
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
}

impl OperationRow {
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
        q.push(" AND actor_name = ").push_bind(actor.clone());
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
            q.push(" AND kind = ").push_bind(kind.clone());
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

/// One page of at most `limit` rows older than `before`, newest first.
pub async fn list(
    db: &PgPool,
    filter: &Filter,
    before: Option<i64>,
    limit: i64,
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
    Ok(Page { rows, next_before })
}

/// The rows matching `filter` as CSV, produced in keyset chunks so that memory stays
/// flat however many rows match. Cells that a spreadsheet would run as a formula
/// are prefixed with `'`.
pub fn stream_csv(
    db: PgPool,
    filter: Filter,
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
                State::Rows(before) => match list(&db, &filter, before, CHUNK).await {
                    Err(e) => Some((Err(e), State::Done)),
                    Ok(page) => {
                        let mut out = String::with_capacity(page.rows.len() * 200);
                        for r in &page.rows {
                            let cells = [
                                r.id.to_string(),
                                r.started_at.to_rfc3339(),
                                r.ended_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                                r.actor_name.clone().unwrap_or_default(),
                                r.actor_role.clone().unwrap_or_default(),
                                r.kind.clone(),
                                r.target.clone().unwrap_or_default(),
                                r.outcome.clone(),
                                r.error.clone().unwrap_or_default(),
                                r.params.to_string(),
                                r.result.as_ref().map(Value::to_string).unwrap_or_default(),
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

/// Every operation that belongs to an approval request, oldest first.
pub async fn for_approval(db: &PgPool, approval_id: i64) -> Result<Vec<OperationRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM operations WHERE approval_id = $1 ORDER BY id"
    ))
    .bind(approval_id)
    .fetch_all(db)
    .await
}

/// One operation by id.
pub async fn find(db: &PgPool, id: i64) -> Result<Option<OperationRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM operations WHERE id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await
}

#[cfg(test)]
mod tests {
    use super::csv_cell;

    #[test]
    fn csv_cells_are_quoted_and_formulas_defused() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("=HYPERLINK(1)"), "'=HYPERLINK(1)");
    }
}
