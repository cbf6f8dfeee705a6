//! The bloat report: estimated bloat of tables and B-tree indexes, dead tuples, and
//! the last (auto)vacuum and (auto)analyze of each table; exact figures for one
//! relation on demand with `pgstattuple`.
//!
//! The estimates follow the statistical method of Jehan-Guillaume (ioguix) de
//! Rorthais, <https://github.com/ioguix/pgsql-bloat-estimation>
//! (`table/table_bloat.sql` and `btree/btree_bloat.sql`, BSD-2-Clause): from the
//! planner statistics (`pg_stats.avg_width` and `null_frac` of each column,
//! `pg_class.reltuples`) compute the average tuple size with its header and
//! alignment padding, hence how many pages the live rows need at the relation's
//! fillfactor; what the relation has beyond that is bloat. The queries here are
//! rewritten for dbops (joins on OIDs, a single pass over `pg_stats`, the
//! statistics' freshness alongside), the formula is theirs.
//!
//! The estimate is only as good as the statistics, so it is hidden — "unknown —
//! run ANALYZE" — when the table was never analyzed, a column has no statistics,
//! a column is of type `name` (its statistics are known to be wrong for this), or
//! the statistics are stale: more rows changed since the last ANALYZE than
//! autovacuum's own analyze threshold (`autovacuum_analyze_threshold +
//! autovacuum_analyze_scale_factor × reltuples`).

use serde_json::{Value, json};
use sqlx::PgConnection;

use super::{
    Computed, Kind, Progress, ReportSettings, RowActions, Section, USER_SCHEMAS, col, label_of,
    section_rows,
};
use crate::targets::Target;

pub static SECTIONS: &[Section] = &[
    Section {
        key: "tables",
        title: "Tables",
        meaning: "Bloat is space inside the table taken by dead rows and free space that ordinary queries still read. \
                  Some is normal (updates need room); tens of percent on a large table is worth acting on. \
                  Plain VACUUM makes the space reusable but rarely returns it to the operating system; \
                  VACUUM FULL rewrites the table and returns it, but locks the table (ACCESS EXCLUSIVE) while it runs. \
                  Many dead tuples with an old last (auto)vacuum mean autovacuum is not keeping up. \
                  “unknown — run ANALYZE” means the statistics the estimate relies on are missing or stale: run ANALYZE, then refresh.",
        columns: &[
            col("schema", "Schema", Kind::Code),
            col("name", "Table", Kind::Code),
            col("size_bytes", "Size", Kind::Bytes),
            col("bloat_bytes", "Bloat (est.)", Kind::Bytes),
            col("bloat_pct", "Bloat %", Kind::Pct),
            col("stats", "Statistics", Kind::Status),
            col("live_tuples", "Live rows", Kind::Count),
            col("dead_tuples", "Dead rows", Kind::Count),
            col("mod_since_analyze", "Changed since ANALYZE", Kind::Count),
            col("last_vacuum", "Last VACUUM", Kind::Time),
            col("last_autovacuum", "Last autovacuum", Kind::Time),
            col("last_analyze", "Last ANALYZE", Kind::Time),
            col("last_autoanalyze", "Last autoanalyze", Kind::Time),
        ],
        default_sort: "bloat_bytes",
        default_asc: false,
        actions: RowActions::Table,
    },
    Section {
        key: "indexes",
        title: "B-tree indexes",
        meaning: "Index bloat is empty or half-empty pages in an index, left by deletes and updates. \
                  A bloated index is larger and slower to scan than it needs to be; REINDEX CONCURRENTLY rebuilds it \
                  without blocking reads or writes (it takes a SHARE UPDATE EXCLUSIVE lock). \
                  The estimate relies on the table's statistics: “unknown — run ANALYZE” means they are missing or stale.",
        columns: &[
            col("schema", "Schema", Kind::Code),
            col("table", "Table", Kind::Code),
            col("name", "Index", Kind::Code),
            col("size_bytes", "Size", Kind::Bytes),
            col("bloat_bytes", "Bloat (est.)", Kind::Bytes),
            col("bloat_pct", "Bloat %", Kind::Pct),
            col("stats", "Statistics", Kind::Status),
        ],
        default_sort: "bloat_bytes",
        default_asc: false,
        actions: RowActions::Index,
    },
];

/// Per table: whether its statistics can be trusted (`fresh`), and why not
/// otherwise. Shared by both estimates.
const STATS_STATE: &str = "
    CASE WHEN c.reltuples < 0 OR (st.last_analyze IS NULL AND st.last_autoanalyze IS NULL AND cs.with_stats = 0 AND c.relpages > 0)
              THEN 'never analyzed'
         WHEN cs.has_name THEN 'unreliable (name column)'
         WHEN c.reltuples > 0 AND cs.with_stats < cs.ncols THEN 'missing'
         WHEN coalesce(st.n_mod_since_analyze, 0) >
              current_setting('autovacuum_analyze_threshold')::float8
              + current_setting('autovacuum_analyze_scale_factor')::float8 * greatest(c.reltuples, 0)
              THEN 'stale'
         ELSE 'fresh' END";

/// Table bloat (ioguix `table_bloat.sql`, see the module docs) with dead tuples
/// and vacuum/analyze times.
pub fn table_sql() -> String {
    format!(
        "WITH t AS (
            SELECT c.oid, n.nspname, c.relname, c.reltuples::float8 AS reltuples, c.relpages::float8 AS relpages,
                   coalesce(tt.relpages, 0)::float8 AS toastpages, coalesce(tt.reltuples, 0)::float8 AS toasttuples,
                   coalesce((SELECT substring(o FROM '^fillfactor=([0-9]+)$')::float8 FROM unnest(c.reloptions) o
                             WHERE o LIKE 'fillfactor=%'), 100) AS fillfactor
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            LEFT JOIN pg_class tt ON tt.oid = c.reltoastrelid
            WHERE c.relkind IN ('r', 'm') AND {USER_SCHEMAS}
         ),
         cs AS (
            SELECT t.oid, count(*) AS ncols, count(s.attname) AS with_stats,
                   bool_or(a.atttypid = 'pg_catalog.name'::regtype) AS has_name,
                   max(coalesce(s.null_frac, 0)) AS max_null_frac,
                   sum((1 - coalesce(s.null_frac, 0)) * coalesce(s.avg_width, 1024))::float8 AS data_width
            FROM t JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped
            LEFT JOIN pg_stats s ON s.schemaname = t.nspname AND s.tablename = t.relname
                                AND s.attname = a.attname AND NOT s.inherited
            GROUP BY t.oid
         ),
         sz AS (
            SELECT t.*, cs.ncols, cs.with_stats, cs.has_name, cs.data_width,
                   current_setting('block_size')::float8 AS bs,
                   CASE WHEN version() ~ 'mingw32|64-bit|x86_64|ppc64|ia64|amd64|aarch64' THEN 8 ELSE 4 END AS ma,
                   23 + CASE WHEN cs.max_null_frac > 0 THEN (7 + cs.ncols) / 8 ELSE 0 END AS hdr
            FROM t JOIN cs ON cs.oid = t.oid
         ),
         est AS (
            SELECT sz.*,
                   (4 + hdr + data_width + 2 * ma
                    - CASE WHEN hdr % ma = 0 THEN ma ELSE hdr % ma END
                    - CASE WHEN ceil(data_width)::int % ma = 0 THEN ma ELSE ceil(data_width)::int % ma END) AS tpl_size
            FROM sz
         ),
         pages AS (
            SELECT est.*, relpages + toastpages AS tblpages,
                   ceil(greatest(reltuples, 0) / ((bs - 24) * fillfactor / (tpl_size * 100))) + ceil(toasttuples / 4) AS est_pages_ff
            FROM est
         )
         SELECT jsonb_strip_nulls(jsonb_build_object(
            'oid', p.oid::int8, 'schema', p.nspname, 'name', p.relname,
            'size_bytes', (p.tblpages * p.bs)::int8,
            'stats', x.state,
            'bloat_bytes', CASE WHEN x.state = 'fresh' THEN (greatest(p.tblpages - p.est_pages_ff, 0) * p.bs)::int8 END,
            'bloat_pct', CASE WHEN x.state = 'fresh' THEN
                round((CASE WHEN p.tblpages > 0 THEN 100 * greatest(p.tblpages - p.est_pages_ff, 0) / p.tblpages ELSE 0 END)::numeric, 1) END,
            'live_tuples', st.n_live_tup, 'dead_tuples', st.n_dead_tup, 'mod_since_analyze', st.n_mod_since_analyze,
            'last_vacuum', st.last_vacuum, 'last_autovacuum', st.last_autovacuum,
            'last_analyze', st.last_analyze, 'last_autoanalyze', st.last_autoanalyze))
         FROM pages p
         JOIN pg_class c ON c.oid = p.oid
         JOIN cs ON cs.oid = p.oid
         LEFT JOIN pg_stat_user_tables st ON st.relid = p.oid
         CROSS JOIN LATERAL (SELECT {STATS_STATE} AS state) x"
    )
}

/// B-tree index bloat (ioguix `btree_bloat.sql`, see the module docs); the
/// statistics state is the table's (expression columns use the index's own
/// statistics, as ANALYZE gathers them there).
pub fn index_sql() -> String {
    format!(
        "WITH i AS (
            SELECT ci.oid, n.nspname, ct.relname AS tblname, ci.relname AS idxname, ct.oid AS tbloid,
                   ci.reltuples::float8 AS reltuples, ci.relpages::float8 AS relpages, x.indnatts,
                   string_to_array(x.indkey::text, ' ')::int[] AS keys,
                   coalesce((SELECT substring(o FROM '^fillfactor=([0-9]+)$')::float8 FROM unnest(ci.reloptions) o
                             WHERE o LIKE 'fillfactor=%'), 90) AS fillfactor
            FROM pg_index x
            JOIN pg_class ci ON ci.oid = x.indexrelid
            JOIN pg_class ct ON ct.oid = x.indrelid
            JOIN pg_namespace n ON n.oid = ct.relnamespace
            JOIN pg_am am ON am.oid = ci.relam AND am.amname = 'btree'
            WHERE ci.relpages > 0 AND {USER_SCHEMAS}
         ),
         att AS (
            SELECT i.oid, coalesce(ta.attname, ia.attname) AS attname,
                   coalesce(ta.atttypid, ia.atttypid) AS atttypid,
                   CASE WHEN i.keys[pos] <> 0 THEN i.tblname ELSE i.idxname END AS statrel
            FROM i CROSS JOIN LATERAL generate_series(1, i.indnatts) pos
            LEFT JOIN pg_attribute ta ON i.keys[pos] <> 0 AND ta.attrelid = i.tbloid AND ta.attnum = i.keys[pos]
            LEFT JOIN pg_attribute ia ON i.keys[pos] = 0 AND ia.attrelid = i.oid AND ia.attnum = pos
         ),
         w AS (
            SELECT i.oid, count(s.attname) AS with_stats, count(*) AS ncols,
                   bool_or(att.atttypid = 'pg_catalog.name'::regtype) AS has_name,
                   max(coalesce(s.null_frac, 0)) AS max_null_frac,
                   sum((1 - coalesce(s.null_frac, 0)) * coalesce(s.avg_width, 1024))::float8 AS data_width
            FROM i JOIN att ON att.oid = i.oid
            LEFT JOIN pg_stats s ON s.schemaname = i.nspname AND s.tablename = att.statrel AND s.attname = att.attname
            GROUP BY i.oid
         ),
         hw AS (
            SELECT i.*, w.with_stats AS idx_with_stats, w.ncols AS idx_ncols, w.has_name AS idx_has_name,
                   current_setting('block_size')::float8 AS bs,
                   CASE WHEN version() ~ 'mingw32|64-bit|x86_64|ppc64|ia64|amd64|aarch64' THEN 8 ELSE 4 END AS ma,
                   CASE WHEN w.max_null_frac = 0 THEN 2 ELSE 2 + (32 + 8 - 1) / 8 END AS hdr,
                   w.data_width
            FROM i JOIN w ON w.oid = i.oid
         ),
         est AS (
            SELECT hw.*,
                   (hdr + ma - CASE WHEN hdr % ma = 0 THEN ma ELSE hdr % ma END
                    + data_width + ma - CASE WHEN data_width = 0 THEN 0
                                             WHEN data_width::int % ma = 0 THEN ma
                                             ELSE data_width::int % ma END) AS tuple_width
            FROM hw
         ),
         pages AS (
            SELECT est.*,
                   coalesce(1 + ceil(reltuples / floor((bs - 16 - 24) * fillfactor / (100 * (4 + tuple_width)))), 0) AS est_pages_ff
            FROM est
         ),
         tcs AS (
            SELECT t.oid, count(*) AS ncols, count(s.attname) AS with_stats,
                   bool_or(a.atttypid = 'pg_catalog.name'::regtype) AS has_name
            FROM (SELECT DISTINCT tbloid AS oid, nspname, tblname FROM i) t
            JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped
            LEFT JOIN pg_stats s ON s.schemaname = t.nspname AND s.tablename = t.tblname
                                AND s.attname = a.attname AND NOT s.inherited
            GROUP BY t.oid
         )
         SELECT jsonb_strip_nulls(jsonb_build_object(
            'oid', p.oid::int8, 'schema', p.nspname, 'table', p.tblname, 'name', p.idxname,
            'size_bytes', (p.relpages * p.bs)::int8,
            'stats', y.state,
            'bloat_bytes', CASE WHEN y.state = 'fresh' THEN (greatest(p.relpages - p.est_pages_ff, 0) * p.bs)::int8 END,
            'bloat_pct', CASE WHEN y.state = 'fresh' THEN
                round((100 * greatest(p.relpages - p.est_pages_ff, 0) / p.relpages)::numeric, 1) END))
         FROM pages p
         JOIN pg_class c ON c.oid = p.tbloid
         JOIN tcs cs ON cs.oid = p.tbloid
         LEFT JOIN pg_stat_user_tables st ON st.relid = p.tbloid
         CROSS JOIN LATERAL (SELECT CASE WHEN p.idx_has_name THEN 'unreliable (name column)'
                                         WHEN p.reltuples > 0 AND p.idx_with_stats < p.idx_ncols AND ({STATS_STATE}) = 'fresh' THEN 'missing'
                                         ELSE {STATS_STATE} END AS state) y"
    )
}

pub(crate) async fn compute(
    conn: &mut PgConnection,
    target: &Target,
    _settings: &ReportSettings,
    progress: &dyn Progress,
    c: &mut Computed,
) -> Result<(), String> {
    progress.total(2);
    progress.phase("estimating table bloat");
    if let Some(rows) = section_rows(conn, target, c, &SECTIONS[0], &table_sql(), &[]).await {
        let unknown = rows.iter().filter(|r| r["stats"] != "fresh").count();
        c.facts.insert("tables_unknown".into(), json!(unknown));
        let rows = labelled(rows, &["schema", "name"]);
        c.set_rows(&SECTIONS[0], rows);
    }
    progress.add(1);
    if progress.cancelled() {
        return Err("stopped".into());
    }
    progress.phase("estimating B-tree index bloat");
    if let Some(rows) = section_rows(conn, target, c, &SECTIONS[1], &index_sql(), &[]).await {
        let rows = labelled(rows, &["schema", "table", "name"]);
        c.set_rows(&SECTIONS[1], rows);
    }
    progress.add(1);
    c.facts
        .insert("pgstattuple".into(), json!(pgstattuple_schema(conn).await));
    Ok(())
}

fn labelled(rows: Vec<Value>, keys: &[&str]) -> Vec<(String, Value)> {
    rows.into_iter().map(|r| (label_of(&r, keys), r)).collect()
}

/// The schema `pgstattuple` is installed in, if it is.
pub async fn pgstattuple_schema(conn: &mut PgConnection) -> Option<String> {
    sqlx::query_scalar(
        "SELECT n.nspname::text FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
         WHERE e.extname = 'pgstattuple'",
    )
    .fetch_optional(&mut *conn)
    .await
    .ok()
    .flatten()
}

/// Which exact measurement to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exact {
    /// `pgstattuple(regclass)`: reads the whole table.
    Table,
    /// `pgstattuple_approx(regclass)`: skips all-visible pages (visibility map).
    TableApprox,
    /// `pgstatindex(regclass)`: B-tree indexes.
    Index,
}

impl Exact {
    pub fn parse(s: &str) -> Option<Exact> {
        match s {
            "table" => Some(Exact::Table),
            "approx" => Some(Exact::TableApprox),
            "index" => Some(Exact::Index),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Exact::Table => "table",
            Exact::TableApprox => "approx",
            Exact::Index => "index",
        }
    }
}

/// Measures one relation with pgstattuple (installed in `ext_schema`); the
/// relation is found by schema and name (never by text pasted into SQL) and must
/// be of the right kind. Returns the function's columns plus `bloat_pct`: free
/// space + dead tuples for tables, 100 − average leaf density for indexes.
pub async fn exact(
    conn: &mut PgConnection,
    ext_schema: &str,
    what: Exact,
    schema: &str,
    name: &str,
) -> Result<Value, sqlx::Error> {
    let relkinds = match what {
        Exact::Index => "('i')",
        _ => "('r', 'm', 't')",
    };
    let oid: Option<i64> = sqlx::query_scalar(&format!(
        "SELECT c.oid::int8 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN {relkinds}"
    ))
    .bind(schema)
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(oid) = oid else {
        return Err(sqlx::Error::RowNotFound);
    };
    let f = |func: &str| format!("{}.{}", super::quote_ident(ext_schema), func);
    let sql = match what {
        Exact::Table => format!(
            "SELECT jsonb_build_object('function', 'pgstattuple', 'table_len', table_len, 'tuple_count', tuple_count,
                    'tuple_len', tuple_len, 'tuple_percent', tuple_percent, 'dead_tuple_count', dead_tuple_count,
                    'dead_tuple_len', dead_tuple_len, 'dead_tuple_percent', dead_tuple_percent,
                    'free_space', free_space, 'free_percent', free_percent,
                    'bloat_pct', round((dead_tuple_percent + free_percent)::numeric, 1),
                    'bloat_bytes', dead_tuple_len + free_space)
             FROM {}($1::oid::regclass)",
            f("pgstattuple")
        ),
        Exact::TableApprox => format!(
            "SELECT jsonb_build_object('function', 'pgstattuple_approx', 'table_len', table_len,
                    'scanned_percent', scanned_percent, 'approx_tuple_count', approx_tuple_count,
                    'approx_tuple_percent', approx_tuple_percent, 'dead_tuple_count', dead_tuple_count,
                    'dead_tuple_len', dead_tuple_len, 'dead_tuple_percent', dead_tuple_percent,
                    'approx_free_space', approx_free_space, 'approx_free_percent', approx_free_percent,
                    'bloat_pct', round((dead_tuple_percent + approx_free_percent)::numeric, 1),
                    'bloat_bytes', dead_tuple_len + approx_free_space)
             FROM {}($1::oid::regclass)",
            f("pgstattuple_approx")
        ),
        Exact::Index => format!(
            "SELECT jsonb_build_object('function', 'pgstatindex', 'index_size', index_size, 'tree_level', tree_level,
                    'leaf_pages', leaf_pages, 'empty_pages', empty_pages, 'deleted_pages', deleted_pages,
                    'avg_leaf_density', avg_leaf_density, 'leaf_fragmentation', leaf_fragmentation,
                    'bloat_pct', CASE WHEN avg_leaf_density = 'NaN' THEN NULL ELSE round((100 - avg_leaf_density)::numeric, 1) END)
             FROM {}($1::oid::regclass)",
            f("pgstatindex")
        ),
    };
    sqlx::query_scalar::<_, Value>(&sql)
        .bind(oid)
        .fetch_one(&mut *conn)
        .await
}
