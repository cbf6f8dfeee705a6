//! The indexes report: unused, duplicate (redundant) and invalid indexes, and
//! tables read sequentially far more than through an index.
//!
//! The rules follow pgHero (<https://github.com/ankane/pghero>, MIT): an index is
//! *unused* when it is valid, not unique, not the primary key, backs no constraint
//! and has `idx_scan = 0` since the statistics were last reset (the page shows how
//! long ago that was, so that "never" means something); an index is *redundant*
//! when its key columns are a leading prefix of another valid index on the same
//! table with the same access method, expressions and predicate (dbops also
//! compares operator classes, collations and sort options, and applies the prefix
//! rule to B-trees only — other methods must match exactly); a table is *scanned
//! sequentially a lot* when it has at least `[reports] seq_scan_min_rows` live rows
//! and fewer than 95% of its scans use an index.
//!
//! Everything but the index sizes comes from the catalog and the statistics
//! views in one statement per section; sizes go through [`super::measure`].

use serde_json::{Value, json};
use sqlx::PgConnection;

use super::{
    Computed, FromFiles, Kind, Progress, RelRef, ReportSettings, RowActions, Section, USER_SCHEMAS,
    col, json_rows, label_of, measure, section_result,
};
use crate::targets::Target;

pub static SECTIONS: &[Section] = &[
    Section {
        key: "unused",
        title: "Unused indexes",
        meaning: "These indexes have not been used by a single query since the statistics were reset (see above how long ago). \
                  Every insert and update still maintains them, and they take space and cache. \
                  If the statistics cover a representative period (including month-end jobs and reports) and no replica serves reads that use them, \
                  drop them with DROP INDEX CONCURRENTLY, which does not block reads or writes. \
                  Unique indexes and primary keys are never listed: they enforce constraints.",
        columns: &[
            col("schema", "Schema", Kind::Code),
            col("table", "Table", Kind::Code),
            col("name", "Index", Kind::Code),
            col("size_bytes", "Size", Kind::Bytes),
            col("scans", "Scans", Kind::Count),
            col("table_rows", "Table rows (est.)", Kind::Count),
            col("definition", "Definition", Kind::Code),
        ],
        default_sort: "size_bytes",
        default_asc: false,
        actions: RowActions::IndexDrop,
    },
    Section {
        key: "duplicate",
        title: "Duplicate and redundant indexes",
        meaning: "Each index listed is covered by another index on the same table: its columns are the leading columns of the other one, \
                  with the same method, expressions and condition, so every query it could serve can use the other index instead. \
                  It only costs writes and space: drop it with DROP INDEX CONCURRENTLY (keep the covering one).",
        columns: &[
            col("schema", "Schema", Kind::Code),
            col("table", "Table", Kind::Code),
            col("name", "Redundant index", Kind::Code),
            col("size_bytes", "Size", Kind::Bytes),
            col("covered_by", "Covered by", Kind::Code),
            col("definition", "Definition", Kind::Code),
            col("covering_definition", "Covering definition", Kind::Code),
        ],
        default_sort: "size_bytes",
        default_asc: false,
        actions: RowActions::IndexDrop,
    },
    Section {
        key: "invalid",
        title: "Invalid indexes",
        meaning: "An invalid index is what a failed CREATE INDEX CONCURRENTLY or REINDEX CONCURRENTLY leaves behind \
                  (for example a unique index on data that has duplicates). Queries never use it, but every write still maintains it. \
                  Fix the cause and rebuild it with REINDEX INDEX CONCURRENTLY, or drop it with DROP INDEX CONCURRENTLY. \
                  One shown as “being built” is a concurrent build in progress right now: leave it alone.",
        columns: &[
            col("schema", "Schema", Kind::Code),
            col("table", "Table", Kind::Code),
            col("name", "Index", Kind::Code),
            col("state", "State", Kind::Status),
            col("size_bytes", "Size", Kind::Bytes),
            col("definition", "Definition", Kind::Code),
        ],
        default_sort: "size_bytes",
        default_asc: false,
        actions: RowActions::Index,
    },
    Section {
        key: "seq_scans",
        title: "Tables scanned sequentially",
        meaning: "Large tables that queries read from start to end far more often than through an index. \
                  On a big table each sequential scan reads all of it: usually a query filters or joins on a column without an index. \
                  Find the queries in the slow queries report (or with EXPLAIN) and add the index they need. \
                  Small lookup tables are left out (see seq_scan_min_rows).",
        columns: &[
            col("schema", "Schema", Kind::Code),
            col("name", "Table", Kind::Code),
            col("live_tuples", "Live rows", Kind::Count),
            col("seq_scan", "Sequential scans", Kind::Count),
            col("seq_tup_read", "Rows read sequentially", Kind::Count),
            col("idx_scan", "Index scans", Kind::Count),
            col("index_pct", "Index use %", Kind::Pct),
        ],
        default_sort: "seq_tup_read",
        default_asc: false,
        actions: RowActions::Table,
    },
];

/// Valid, non-unique, non-primary indexes backing no constraint, never scanned.
/// ("No constraint" is a `NOT IN` over `pg_constraint`, which PostgreSQL hashes
/// once: that catalog has no index on `conindid`, and a `NOT EXISTS` planned as
/// a nested loop — as it is for a part of the indexes — scans it once per index.)
pub fn unused_sql() -> String {
    format!(
        "SELECT jsonb_strip_nulls(jsonb_build_object('oid', i.indexrelid::int8, 'table_oid', i.indrelid::int8,
                'schema', n.nspname, 'table', ct.relname, 'name', ci.relname, 'scans', s.idx_scan,
                'table_rows', CASE WHEN ct.reltuples < 0 THEN NULL ELSE ct.reltuples::int8 END,
                'definition', pg_get_indexdef(i.indexrelid)))
         FROM pg_index i
         JOIN pg_class ci ON ci.oid = i.indexrelid
         JOIN pg_class ct ON ct.oid = i.indrelid
         JOIN pg_namespace n ON n.oid = ct.relnamespace
         JOIN pg_stat_user_indexes s ON s.indexrelid = i.indexrelid
         WHERE s.idx_scan = 0 AND i.indisvalid AND NOT i.indisunique AND NOT i.indisprimary
           AND i.indexrelid NOT IN (SELECT k.conindid FROM pg_constraint k)
           AND {USER_SCHEMAS}"
    )
}

/// For each redundant index, the index covering it (the primary key or a unique
/// one first, then the narrowest).
pub fn duplicate_sql() -> String {
    format!(
        "WITH x AS (
            SELECT i.indexrelid, i.indrelid, ci.relname, ci.relam, am.amname, n.nspname, ct.relname AS tblname,
                   i.indisunique, i.indisprimary, i.indisvalid, i.indnatts, i.indnkeyatts AS nk,
                   (string_to_array(i.indkey::text, ' ')::int[])[1:i.indnkeyatts] AS keys,
                   string_to_array(i.indclass::text, ' ')::oid[] AS classes,
                   string_to_array(i.indcollation::text, ' ')::oid[] AS colls,
                   string_to_array(i.indoption::text, ' ')::int[] AS opts,
                   coalesce(pg_get_expr(i.indexprs, i.indrelid), '') AS exprs,
                   coalesce(pg_get_expr(i.indpred, i.indrelid), '') AS pred
            FROM pg_index i
            JOIN pg_class ci ON ci.oid = i.indexrelid
            JOIN pg_class ct ON ct.oid = i.indrelid
            JOIN pg_namespace n ON n.oid = ct.relnamespace
            JOIN pg_am am ON am.oid = ci.relam
            WHERE {USER_SCHEMAS}
         )
         SELECT DISTINCT ON (a.indexrelid)
                jsonb_build_object('oid', a.indexrelid::int8, 'table_oid', a.indrelid::int8, 'schema', a.nspname,
                                   'table', a.tblname, 'name', a.relname, 'covered_by', b.relname,
                                   'definition', pg_get_indexdef(a.indexrelid),
                                   'covering_definition', pg_get_indexdef(b.indexrelid))
         FROM x a JOIN x b ON b.indrelid = a.indrelid AND b.indexrelid <> a.indexrelid
         WHERE a.indisvalid AND b.indisvalid AND NOT a.indisunique AND NOT a.indisprimary
           AND a.indnatts = a.nk
           AND a.indexrelid NOT IN (SELECT k.conindid FROM pg_constraint k)
           AND a.relam = b.relam AND a.exprs = b.exprs AND a.pred = b.pred
           AND (a.nk = b.nk OR (a.amname = 'btree' AND a.nk < b.nk))
           AND b.keys[1:a.nk] = a.keys AND b.classes[1:a.nk] = a.classes
           AND b.colls[1:a.nk] = a.colls AND b.opts[1:a.nk] = a.opts
           AND (a.nk < b.nk OR b.indisunique OR b.indisprimary OR a.relname > b.relname)
         ORDER BY a.indexrelid, b.indisprimary DESC, b.indisunique DESC, b.nk, b.relname"
    )
}

/// Indexes with `indisvalid = false`, and whether a build is running right now.
pub fn invalid_sql() -> String {
    format!(
        "SELECT jsonb_build_object('oid', i.indexrelid::int8, 'table_oid', i.indrelid::int8, 'schema', n.nspname,
                'table', ct.relname, 'name', ci.relname, 'definition', pg_get_indexdef(i.indexrelid),
                'state', CASE WHEN EXISTS (SELECT 1 FROM pg_stat_progress_create_index p WHERE p.index_relid = i.indexrelid)
                              THEN 'being built' ELSE 'invalid' END)
         FROM pg_index i
         JOIN pg_class ci ON ci.oid = i.indexrelid
         JOIN pg_class ct ON ct.oid = i.indrelid
         JOIN pg_namespace n ON n.oid = ct.relnamespace
         WHERE NOT i.indisvalid AND {USER_SCHEMAS}"
    )
}

/// Tables with at least `$1` live rows and fewer than 95% index scans.
pub const SEQ_SCANS_SQL: &str = "
    SELECT jsonb_build_object('oid', relid::int8, 'schema', schemaname, 'name', relname,
           'live_tuples', n_live_tup, 'seq_scan', seq_scan, 'seq_tup_read', seq_tup_read,
           'idx_scan', coalesce(idx_scan, 0),
           'index_pct', round(100.0 * coalesce(idx_scan, 0) / (seq_scan + coalesce(idx_scan, 0)), 1))
    FROM pg_stat_user_tables
    WHERE seq_scan > 0 AND n_live_tup >= ($1::jsonb)::int8
      AND 100.0 * coalesce(idx_scan, 0) / (seq_scan + coalesce(idx_scan, 0)) < 95";

/// The size of each index of a batch.
pub const INDEX_SIZE_SQL: &str = "
    SELECT jsonb_build_object('oid', c.oid::int8, 'size', s.size, 'gone', s.size IS NULL)
    FROM pg_class c CROSS JOIN LATERAL (SELECT pg_relation_size(c.oid) AS size) s
    WHERE c.oid = ANY($1::oid[])";

/// The same sizes from the files (see [`super::measure`]); not used by default.
pub const INDEX_FILES: FromFiles = FromFiles {
    members: "m (rel, member, part) AS (
        SELECT c.oid, c.oid, 'index' FROM pg_class c WHERE c.oid = ANY($1::oid[]))",
    directory: false,
    fields: "'size', coalesce(sum(f.bytes), 0)",
};

/// When the statistics of this database were last reset (they count "unused"),
/// and when the server started.
pub async fn stats_since(conn: &mut PgConnection, c: &mut Computed) {
    if let Ok((reset, started)) = sqlx::query_as::<
        _,
        (
            Option<chrono::DateTime<chrono::Utc>>,
            chrono::DateTime<chrono::Utc>,
        ),
    >(
        "SELECT (SELECT stats_reset FROM pg_stat_database WHERE datname = current_database()),
                pg_postmaster_start_time()",
    )
    .fetch_one(&mut *conn)
    .await
    {
        c.facts.insert("stats_reset".into(), json!(reset));
        c.facts.insert("server_started".into(), json!(started));
    }
}

pub(crate) async fn compute(
    conns: &mut [PgConnection],
    target: &Target,
    settings: &ReportSettings,
    progress: &dyn Progress,
    c: &mut Computed,
) -> Result<(), String> {
    let (first, others) = conns.split_first_mut().ok_or("no connection")?;
    stats_since(first, c).await;
    progress.phase("reading index statistics");
    let min_rows = [json!(settings.seq_scan_min_rows)];
    let (unused, duplicate, invalid, seq) = match others.first_mut() {
        // Two backends: the unused indexes (their definitions are the costly
        // part) split between both, the other sections alongside.
        Some(second) => {
            let part = format!(
                "{} AND i.indexrelid::int8 % 2 = ($1::jsonb)::int8",
                unused_sql()
            );
            let (a, b) = tokio::join!(
                async {
                    let u = json_rows(&mut *first, &part, &[json!(0)]).await;
                    let d = json_rows(&mut *first, &duplicate_sql(), &[]).await;
                    (u, d)
                },
                async {
                    let u = json_rows(&mut *second, &part, &[json!(1)]).await;
                    let i = json_rows(&mut *second, &invalid_sql(), &[]).await;
                    let s = json_rows(&mut *second, SEQ_SCANS_SQL, &min_rows).await;
                    (u, i, s)
                },
            );
            let unused = match (a.0, b.0) {
                (Ok(mut x), Ok(y)) => {
                    x.extend(y);
                    Ok(x)
                }
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
            (unused, a.1, b.1, b.2)
        }
        None => (
            json_rows(first, &unused_sql(), &[]).await,
            json_rows(first, &duplicate_sql(), &[]).await,
            json_rows(first, &invalid_sql(), &[]).await,
            json_rows(first, SEQ_SCANS_SQL, &min_rows).await,
        ),
    };
    let unused = section_result(target, c, &SECTIONS[0], unused);
    let duplicate = section_result(target, c, &SECTIONS[1], duplicate);
    let invalid = section_result(target, c, &SECTIONS[2], invalid);
    let seq = section_result(target, c, &SECTIONS[3], seq);
    // Sizes of every index listed, once each.
    let mut refs: Vec<RelRef> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for r in [&unused, &duplicate, &invalid]
        .into_iter()
        .flatten()
        .flatten()
    {
        let oid = r["oid"].as_i64().unwrap_or(0);
        if seen.insert(oid) {
            refs.push(RelRef {
                oid,
                owner: r["table_oid"].as_i64(),
                name: label_of(r, &["schema", "name"]),
            });
        }
    }
    progress.total(refs.len() as u64);
    progress.phase("measuring indexes");
    // Not from the files by default: for one index per table, `stat`-ing each
    // index's files measured slower than opening them (docs/BENCHMARKS.md,
    // 2026-12-03); `INDEX_FILES` stays for catalogs where that turns.
    let sizes = measure(
        conns,
        None,
        INDEX_SIZE_SQL,
        &refs,
        settings.batch_size,
        progress,
        &mut c.skipped,
    )
    .await?
    .rows;
    let with_size = |rows: Vec<Value>| -> Vec<(String, Value)> {
        rows.into_iter()
            .filter_map(|mut r| {
                let oid = r["oid"].as_i64()?;
                let size = sizes.get(&oid)?["size"].as_i64();
                r.as_object_mut()?.insert("size_bytes".into(), json!(size));
                Some((label_of(&r, &["schema", "table", "name"]), r))
            })
            .collect()
    };
    for (i, rows) in [unused, duplicate, invalid].into_iter().enumerate() {
        if let Some(rows) = rows {
            c.set_rows(&SECTIONS[i], with_size(rows));
        }
    }
    if let Some(rows) = seq {
        let rows = rows
            .into_iter()
            .map(|r| (label_of(&r, &["schema", "name"]), r))
            .collect();
        c.set_rows(&SECTIONS[3], rows);
    }
    Ok(())
}
