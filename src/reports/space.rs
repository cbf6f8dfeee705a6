//! The space report: every table (and materialized view) with its total size split
//! into the table itself, its indexes and its TOAST data; the database's size, kept
//! over time for the growth chart.
//!
//! The list of relations comes from the catalog (no locks). The sizes come, when
//! dbops' role may list the database directory, from its files ([`FILES`]: one
//! statement that locks no relation), else from `pg_total_relation_size`,
//! `pg_indexes_size` and `pg_relation_size`, which open each relation with an
//! `AccessShareLock` for the duration of the call, so they run in batches through
//! [`super::per_relation`]. Either way exclusively locked relations are skipped,
//! and a relation dropped meanwhile is skipped too (see [`super::measure`]).

use serde_json::{Value, json};
use sqlx::PgConnection;

use super::{
    Computed, FromFiles, Kind, Progress, RelRef, ReportSettings, RowActions, Section, USER_SCHEMAS,
    col, label_of, measure, pg_error,
};
use crate::targets::Target;

pub static SECTIONS: &[Section] = &[Section {
    key: "relations",
    title: "Tables by total size",
    meaning: "Total = the table's own data + its indexes + its TOAST data (large values stored out of line). \
              A table much larger than its row count suggests may be bloated (see the bloat report); \
              indexes larger than the table are worth a look in the indexes report. \
              Sizes are read from disk when the report runs; the estimated rows come from the last VACUUM or ANALYZE.",
    columns: &[
        col("schema", "Schema", Kind::Code),
        col("name", "Table", Kind::Code),
        col("kind", "Kind", Kind::Text),
        col("total_bytes", "Total", Kind::Bytes),
        col("table_bytes", "Table", Kind::Bytes),
        col("index_bytes", "Indexes", Kind::Bytes),
        col("toast_bytes", "TOAST", Kind::Bytes),
        col("est_rows", "Rows (est.)", Kind::Count),
    ],
    default_sort: "total_bytes",
    default_asc: false,
    actions: RowActions::Table,
}];

/// The sizes of a batch of relations; NULL sizes (a relation dropped since the
/// catalog was read) mark the row `gone`.
pub const SIZES_SQL: &str = "
    SELECT jsonb_build_object('oid', c.oid::int8, 'total', s.total, 'indexes', s.indexes, 'toast', s.toast,
                              'gone', s.total IS NULL)
    FROM pg_class c
    CROSS JOIN LATERAL (SELECT pg_total_relation_size(c.oid) AS total, pg_indexes_size(c.oid) AS indexes,
                               CASE WHEN c.reltoastrelid = 0 THEN 0 ELSE pg_total_relation_size(c.reltoastrelid) END AS toast) s
    WHERE c.oid = ANY($1::oid[])";

/// The same sizes from the files: a table's total is its own forks, its TOAST
/// table's and that one's index's, and its indexes' (what
/// `pg_total_relation_size` adds up), split into indexes and TOAST like
/// [`SIZES_SQL`].
pub const FILES: FromFiles = FromFiles {
    members: "m (rel, member, part) AS (
        SELECT c.oid, c.oid, 'table' FROM pg_class c WHERE c.oid = ANY($1::oid[])
        UNION ALL
        SELECT c.oid, c.reltoastrelid, 'toast' FROM pg_class c
        WHERE c.oid = ANY($1::oid[]) AND c.reltoastrelid <> 0
        UNION ALL
        SELECT c.oid, ti.indexrelid, 'toast' FROM pg_class c JOIN pg_index ti ON ti.indrelid = c.reltoastrelid
        WHERE c.oid = ANY($1::oid[]) AND c.reltoastrelid <> 0
        UNION ALL
        SELECT i.indrelid, i.indexrelid, 'index' FROM pg_index i WHERE i.indrelid = ANY($1::oid[]))",
    directory: true,
    fields: "'total', coalesce(sum(f.bytes), 0),
             'indexes', coalesce(sum(f.bytes) FILTER (WHERE m.part = 'index'), 0),
             'toast', coalesce(sum(f.bytes) FILTER (WHERE m.part = 'toast'), 0)",
};

pub(crate) async fn compute(
    conns: &mut [PgConnection],
    target: &Target,
    settings: &ReportSettings,
    progress: &dyn Progress,
    c: &mut Computed,
) -> Result<(), String> {
    let conn = conns.first_mut().ok_or("no connection")?;
    progress.phase("reading the catalog");
    let rels: Vec<Value> = super::json_rows(
        conn,
        &format!(
            "SELECT jsonb_build_object('oid', c.oid::int8, 'schema', n.nspname, 'name', c.relname,
                    'kind', CASE c.relkind WHEN 'm' THEN 'materialized view' ELSE 'table' END,
                    'est_rows', CASE WHEN c.reltuples < 0 THEN NULL ELSE c.reltuples::int8 END)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'm') AND {USER_SCHEMAS}"
        ),
        &[],
    )
    .await
    .map_err(|e| pg_error(target, &e))?;
    progress.total(rels.len() as u64);
    progress.phase("measuring relations");
    let refs: Vec<RelRef> = rels
        .iter()
        .map(|r| RelRef {
            oid: r["oid"].as_i64().unwrap_or(0),
            owner: None,
            name: label_of(r, &["schema", "name"]),
        })
        .collect();
    let measured = measure(
        conns,
        settings.sizes_from_files.then_some(&FILES),
        SIZES_SQL,
        &refs,
        settings.batch_size,
        progress,
        &mut c.skipped,
    )
    .await?;
    c.facts
        .insert("measured_from_files".into(), json!(measured.from_files));
    let sizes = measured.rows;
    let mut rows = Vec::with_capacity(sizes.len());
    for mut r in rels {
        let oid = r["oid"].as_i64().unwrap_or(0);
        let Some(s) = sizes.get(&oid) else { continue };
        let total = s["total"].as_i64().unwrap_or(0);
        let indexes = s["indexes"].as_i64().unwrap_or(0);
        let toast = s["toast"].as_i64().unwrap_or(0);
        let obj = r.as_object_mut().expect("an object");
        obj.insert("total_bytes".into(), json!(total));
        obj.insert("index_bytes".into(), json!(indexes));
        obj.insert("toast_bytes".into(), json!(toast));
        obj.insert(
            "table_bytes".into(),
            json!((total - indexes - toast).max(0)),
        );
        rows.push((label_of(&r, &["schema", "name"]), r));
    }
    progress.phase("measuring the database");
    let database_bytes = match measured.database_bytes {
        // The directory just listed is the whole database.
        Some(bytes) => Ok(bytes),
        None => {
            sqlx::query_scalar::<_, i64>("SELECT pg_database_size(current_database())")
                .fetch_one(&mut conns[0])
                .await
        }
    };
    match database_bytes {
        Ok(bytes) => {
            c.facts.insert("database_bytes".into(), json!(bytes));
        }
        Err(e) => {
            c.errors.insert(
                "database".into(),
                format!("database size: {}", pg_error(target, &e)),
            );
        }
    }
    let sum: i64 = rows
        .iter()
        .map(|r| r.1["total_bytes"].as_i64().unwrap_or(0))
        .sum();
    c.facts.insert("relations_bytes".into(), json!(sum));
    c.facts.insert("relations".into(), json!(rows.len()));
    c.set_rows(&SECTIONS[0], rows);
    Ok(())
}
