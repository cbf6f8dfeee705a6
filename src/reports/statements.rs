//! The slow queries report, from `pg_stat_statements` when it is installed in the
//! target's database (and loaded through `shared_preload_libraries`): the
//! statements taking the most time in total and per call, for this database.
//!
//! Its counters are never reset by the report; resetting them is a separate,
//! approval-gated action (`pg.stat_statements.reset`, see [`super::maintenance`]).

use serde_json::{Value, json};
use sqlx::PgConnection;

use super::{
    Computed, Kind, Progress, ReportSettings, RowActions, Section, col, pg_error, quote_ident,
    section_rows,
};
use crate::targets::Target;

/// Statements kept per list.
pub const TOP: i64 = 200;

const COLUMNS: &[super::Column] = &[
    col("query", "Query", Kind::Code),
    col("calls", "Calls", Kind::Count),
    col("total_ms", "Total time", Kind::Ms),
    col("mean_ms", "Mean time", Kind::Ms),
    col("rows", "Rows", Kind::Count),
    col("hit_pct", "Cache hit %", Kind::Pct),
    col("user", "User", Kind::Code),
];

pub static SECTIONS: &[Section] = &[
    Section {
        key: "by_total",
        title: "Most time in total",
        meaning: "The statements the server spends most of its time on, summed over all their calls since the statistics were reset. \
                  Making one of these faster (an index, a better query, fewer calls) helps the whole server the most. \
                  Constants are replaced by $1, $2…: one line stands for every call with any values.",
        columns: COLUMNS,
        default_sort: "total_ms",
        default_asc: false,
        actions: RowActions::None,
    },
    Section {
        key: "by_mean",
        title: "Slowest per call",
        meaning: "The statements that take longest each time they run. Rarely called ones may be reports or batch jobs; \
                  often-called slow ones are what users wait for. Look at their plan with EXPLAIN (ANALYZE, BUFFERS) on a copy of the data.",
        columns: COLUMNS,
        default_sort: "mean_ms",
        default_asc: false,
        actions: RowActions::None,
    },
];

/// The schema `pg_stat_statements` is installed in, if it is.
pub async fn installed(conn: &mut PgConnection) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT n.nspname::text FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
         WHERE e.extname = 'pg_stat_statements'",
    )
    .fetch_optional(&mut *conn)
    .await
}

fn top_sql(schema: &str, order: &str, time: &str) -> String {
    let view = format!("{}.pg_stat_statements", quote_ident(schema));
    format!(
        "SELECT jsonb_strip_nulls(jsonb_build_object('queryid', s.queryid, 'query', s.query, 'calls', s.calls,
                'total_ms', round(s.total_{time}::numeric, 2), 'mean_ms', round(s.mean_{time}::numeric, 3), 'rows', s.rows,
                'hit_pct', round(100.0 * s.shared_blks_hit / nullif(s.shared_blks_hit + s.shared_blks_read, 0), 1),
                'user', s.userid::regrole::text))
         FROM {view} s
         WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND s.calls > 0
         ORDER BY s.{order}_{time} DESC NULLS LAST
         LIMIT {TOP}"
    )
}

pub(crate) async fn compute(
    conn: &mut PgConnection,
    target: &Target,
    _settings: &ReportSettings,
    progress: &dyn Progress,
    c: &mut Computed,
) -> Result<(), String> {
    progress.phase("reading pg_stat_statements");
    let schema = installed(conn).await.map_err(|e| pg_error(target, &e))?;
    let Some(schema) = schema else {
        c.facts.insert("installed".into(), json!(false));
        c.facts.insert(
            "note".into(),
            json!(
                "pg_stat_statements is not installed in this database. To see slow queries: add pg_stat_statements to \
                 shared_preload_libraries in postgresql.conf, restart PostgreSQL, then run CREATE EXTENSION pg_stat_statements; \
                 in this database, and refresh."
            ),
        );
        return Ok(());
    };
    c.facts.insert("installed".into(), json!(true));
    c.facts.insert("schema".into(), json!(schema));
    let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| pg_error(target, &e))?;
    // PostgreSQL 13 split planning from execution time.
    let time = if version >= 130000 {
        "exec_time"
    } else {
        "time"
    };
    if version >= 140000
        && let Ok(reset) = sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(&format!(
            "SELECT stats_reset FROM {}.pg_stat_statements_info",
            quote_ident(&schema)
        ))
        .fetch_one(&mut *conn)
        .await
    {
        c.facts.insert("stats_reset".into(), json!(reset));
    }
    for (i, order) in ["total", "mean"].into_iter().enumerate() {
        let section = &SECTIONS[i];
        if let Some(rows) = section_rows(
            conn,
            target,
            c,
            section,
            &top_sql(&schema, order, time),
            &[],
        )
        .await
        {
            let rows = rows
                .into_iter()
                .map(|r: Value| {
                    let label = r["query"].as_str().unwrap_or("").to_string();
                    (label, r)
                })
                .collect();
            c.set_rows(section, rows);
        }
    }
    // The usual failure: installed, but the library is not preloaded.
    if let Some(e) = c.errors.get("by_total").cloned()
        && e.contains("shared_preload_libraries")
    {
        c.facts.insert(
            "note".into(),
            json!(format!(
                "pg_stat_statements is installed in this database but not loaded: {e}. Add it to shared_preload_libraries \
                 in postgresql.conf and restart PostgreSQL."
            )),
        );
    }
    Ok(())
}
