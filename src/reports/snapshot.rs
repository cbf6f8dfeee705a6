//! Report snapshots in the console database: storing a computed report, reading
//! the newest one, a page of a section's rows (filtered, sorted, paged in SQL),
//! and the database size history for the growth chart.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

use super::{Computed, Report, Section, Skipped};

/// A stored snapshot (without its rows).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Snapshot {
    pub id: i64,
    pub target: String,
    pub report: String,
    pub database: Option<String>,
    pub taken_at: DateTime<Utc>,
    pub duration_ms: i64,
    pub job_id: Option<i64>,
    pub facts: Value,
    pub skipped: Value,
    pub errors: Value,
    pub counts: Value,
}

impl Snapshot {
    pub fn skipped(&self) -> Vec<Skipped> {
        serde_json::from_value(self.skipped.clone()).unwrap_or_default()
    }

    /// Rows of a section in the whole snapshot.
    pub fn count(&self, section: &str) -> i64 {
        self.counts
            .get(section)
            .and_then(Value::as_i64)
            .unwrap_or(0)
    }

    pub fn error(&self, section: &str) -> Option<String> {
        self.errors
            .get(section)
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    pub fn fact(&self, key: &str) -> Option<&Value> {
        self.facts.get(key).filter(|v| !v.is_null())
    }
}

const COLUMNS: &str =
    "id, target, report, database, taken_at, duration_ms, job_id, facts, skipped, errors, counts";

/// Stores a computed report with its rows (in batches), the database size for the
/// growth chart, and removes snapshots beyond the newest `keep`.
pub async fn store(
    db: &PgPool,
    target: &str,
    report: Report,
    computed: &Computed,
    duration_ms: i64,
    job_id: Option<i64>,
    keep: i64,
) -> Result<i64, sqlx::Error> {
    let counts: serde_json::Map<String, Value> = computed
        .sections
        .iter()
        .map(|(k, v)| (k.clone(), Value::from(v.len())))
        .collect();
    let mut tx = db.begin().await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO report_snapshots (target, report, database, duration_ms, job_id, facts, skipped, errors, counts)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
    )
    .bind(target)
    .bind(report.as_str())
    .bind(&computed.database)
    .bind(duration_ms)
    .bind(job_id)
    .bind(Value::Object(computed.facts.clone()))
    .bind(serde_json::to_value(&computed.skipped).unwrap_or_default())
    .bind(serde_json::to_value(&computed.errors).unwrap_or_default())
    .bind(Value::Object(counts))
    .fetch_one(&mut *tx)
    .await?;
    for (section, rows) in &computed.sections {
        for (start, chunk) in rows.chunks(5000).enumerate().map(|(i, c)| (i * 5000, c)) {
            let ns: Vec<i32> = (0..chunk.len()).map(|i| (start + i) as i32).collect();
            let labels: Vec<&str> = chunk.iter().map(|r| r.0.as_str()).collect();
            let data: Vec<&Value> = chunk.iter().map(|r| &r.1).collect();
            sqlx::query(
                "INSERT INTO report_rows (snapshot_id, section, n, label, data)
                 SELECT $1, $2, n, label, data FROM unnest($3::int[], $4::text[], $5::jsonb[]) AS u(n, label, data)",
            )
            .bind(id)
            .bind(section)
            .bind(&ns)
            .bind(&labels)
            .bind(&data)
            .execute(&mut *tx)
            .await?;
        }
    }
    if let Some(bytes) = computed.facts.get("database_bytes").and_then(Value::as_i64) {
        record_size(&mut *tx, target, &computed.database, bytes).await?;
    }
    // Older snapshots of this report go, rows and all.
    sqlx::query(
        "DELETE FROM report_snapshots WHERE target = $1 AND report = $2 AND id NOT IN
           (SELECT id FROM report_snapshots WHERE target = $1 AND report = $2 ORDER BY id DESC LIMIT $3)",
    )
    .bind(target)
    .bind(report.as_str())
    .bind(keep)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(id)
}

/// Adds a point to the size history.
pub async fn record_size(
    db: impl sqlx::PgExecutor<'_>,
    target: &str,
    database: &str,
    bytes: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO report_db_sizes (target, database, taken_at, bytes) VALUES ($1, $2, clock_timestamp(), $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(target)
    .bind(database)
    .bind(bytes)
    .execute(db)
    .await?;
    Ok(())
}

/// The newest snapshot of a report.
pub async fn latest(
    db: &PgPool,
    target: &str,
    report: Report,
) -> Result<Option<Snapshot>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM report_snapshots WHERE target = $1 AND report = $2 ORDER BY id DESC LIMIT 1"
    ))
    .bind(target)
    .bind(report.as_str())
    .fetch_optional(db)
    .await
}

/// The newest snapshot of every report of a target (for the index page).
pub async fn latest_all(db: &PgPool, target: &str) -> Result<Vec<Snapshot>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT DISTINCT ON (report) {COLUMNS} FROM report_snapshots WHERE target = $1 ORDER BY report, id DESC"
    ))
    .bind(target)
    .fetch_all(db)
    .await
}

/// What a page of rows is: filter, order, page.
#[derive(Debug, Clone)]
pub struct View {
    /// Substring of the label (schema.relation, query), case-insensitive.
    pub filter: String,
    /// A column of the section (checked against it; anything else means the default).
    pub sort: String,
    pub asc: bool,
    pub page: i64,
    pub per_page: i64,
}

impl View {
    /// The sort column if it is one of the section's, else the default order.
    pub fn sort_key(&self, section: &Section) -> Option<&'static str> {
        section.column(&self.sort).map(|c| c.key)
    }
}

/// Escapes `%`, `_` and `\` for LIKE.
fn like_pattern(s: &str) -> String {
    let mut out = String::from("%");
    for ch in s.chars() {
        if matches!(ch, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out.push('%');
    out
}

/// One page of a section: rows and how many match the filter.
pub async fn rows(
    db: &PgPool,
    snapshot_id: i64,
    section: &Section,
    view: &View,
) -> Result<(Vec<Value>, i64), sqlx::Error> {
    let filter = view.filter.trim();
    let pattern = (!filter.is_empty()).then(|| like_pattern(filter));
    let total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM report_rows WHERE snapshot_id = $1 AND section = $2
           AND ($3::text IS NULL OR label ILIKE $3)",
    )
    .bind(snapshot_id)
    .bind(section.key)
    .bind(&pattern)
    .fetch_one(db)
    .await?;
    let rows = select(db, snapshot_id, section, view, pattern, Some(view.per_page)).await?;
    Ok((rows, total))
}

/// Every row of a section matching the filter, in the view's order (CSV export).
pub async fn all_rows(
    db: &PgPool,
    snapshot_id: i64,
    section: &Section,
    view: &View,
) -> Result<Vec<Value>, sqlx::Error> {
    let filter = view.filter.trim();
    let pattern = (!filter.is_empty()).then(|| like_pattern(filter));
    select(db, snapshot_id, section, view, pattern, None).await
}

async fn select(
    db: &PgPool,
    snapshot_id: i64,
    section: &Section,
    view: &View,
    pattern: Option<String>,
    limit: Option<i64>,
) -> Result<Vec<Value>, sqlx::Error> {
    // The sort key is bound as a value (jsonb -> $4), never written into the SQL;
    // only the direction, chosen from two fixed words, is.
    let order = match view.sort_key(section) {
        None => "n".to_string(),
        Some(_) if view.asc => "data -> $4 ASC NULLS LAST, n".to_string(),
        Some(_) => "data -> $4 DESC NULLS LAST, n".to_string(),
    };
    let sql = format!(
        "SELECT data FROM report_rows WHERE snapshot_id = $1 AND section = $2
           AND ($3::text IS NULL OR label ILIKE $3) AND ($4::text IS NOT NULL OR true)
         ORDER BY {order} LIMIT $5 OFFSET $6"
    );
    let offset = limit.map_or(0, |l| (view.page.max(1) - 1) * l);
    sqlx::query_scalar(&sql)
        .bind(snapshot_id)
        .bind(section.key)
        .bind(pattern)
        .bind(view.sort_key(section).unwrap_or(""))
        .bind(limit)
        .bind(offset)
        .fetch_all(db)
        .await
}

/// The database size history of a target, oldest first (at most the newest 200
/// points).
pub async fn size_history(
    db: &PgPool,
    target: &str,
) -> Result<Vec<(DateTime<Utc>, i64)>, sqlx::Error> {
    let mut rows: Vec<(DateTime<Utc>, i64)> = sqlx::query_as(
        "SELECT taken_at, bytes FROM report_db_sizes WHERE target = $1 ORDER BY taken_at DESC LIMIT 200",
    )
    .bind(target)
    .fetch_all(db)
    .await?;
    rows.reverse();
    Ok(rows)
}

#[cfg(test)]
mod tests {
    #[test]
    fn filters_match_literally() {
        assert_eq!(super::like_pattern("a_b%c\\"), "%a\\_b\\%c\\\\%");
    }
}
