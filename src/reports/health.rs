//! The health report: cache hit ratio, transaction-ID wraparound per database and
//! per table, sequences running out of numbers, replicas and replication slots.
//!
//! Thresholds follow pgHero (<https://github.com/ankane/pghero>, MIT): a sequence is
//! listed above 90% of the range of the column it feeds (or of its own maximum,
//! whichever is lower); XID age is a danger when fewer than 1.5 billion
//! transactions remain before wraparound, and a warning once it passes
//! `autovacuum_freeze_max_age` (an anti-wraparound autovacuum is then due).
//!
//! Reading a sequence's last value locks the sequence until the end of the
//! transaction, so sequences are read in batches through
//! [`super::per_relation`]; everything else is catalog and statistics views.

use serde_json::{Value, json};
use sqlx::PgConnection;

use super::{
    Computed, Kind, Progress, RelRef, ReportSettings, RowActions, Section, USER_SCHEMAS, col,
    label_of, per_relation, section_rows,
};
use crate::targets::Target;

/// Sequences at or above this share of their range are listed.
pub const SEQUENCE_ALERT_PCT: f64 = 90.0;

/// XID age is a danger when fewer than this many transactions remain.
pub const XID_DANGER_REMAINING: i64 = 1_500_000_000;

/// Transaction IDs available before wraparound (2^31, less PostgreSQL's margin).
pub const XID_MAX: i64 = 2_146_483_648;

pub static SECTIONS: &[Section] = &[
    Section {
        key: "databases",
        title: "Transaction-ID wraparound by database",
        meaning: "PostgreSQL must freeze old rows before a database's oldest unfrozen transaction ID is about 2 billion transactions old, \
                  or it stops accepting writes to protect the data. Autovacuum does this by itself once a table passes autovacuum_freeze_max_age; \
                  “warn” means that point is passed (an anti-wraparound vacuum is due or running), “danger” means fewer than 1.5 billion remain: \
                  find what blocks vacuum (long transactions, abandoned replication slots or prepared transactions) and VACUUM the oldest tables.",
        columns: &[
            col("name", "Database", Kind::Code),
            col("xid_age", "XID age", Kind::Count),
            col("remaining", "Remaining", Kind::Count),
            col("pct", "Used %", Kind::Pct),
            col("state", "State", Kind::Status),
            col("mxid_age", "Multixact age", Kind::Count),
        ],
        default_sort: "xid_age",
        default_asc: false,
        actions: RowActions::None,
    },
    Section {
        key: "tables",
        title: "Oldest tables (transaction-ID age)",
        meaning: "The tables holding back their database's frozen transaction ID, oldest first (the 200 oldest). \
                  A VACUUM of the oldest ones advances it; on very large tables run it in a quiet hour.",
        columns: &[
            col("schema", "Schema", Kind::Code),
            col("name", "Table", Kind::Code),
            col("xid_age", "XID age", Kind::Count),
            col("remaining", "Remaining", Kind::Count),
            col("state", "State", Kind::Status),
            col("size_bytes", "Size (est.)", Kind::Bytes),
        ],
        default_sort: "xid_age",
        default_asc: false,
        actions: RowActions::Table,
    },
    Section {
        key: "sequences",
        title: "Sequences running out",
        meaning: "Sequences that have used more than 90% of the numbers the column they feed can hold (an integer column stops at 2,147,483,647). \
                  When they run out, every insert fails. Change the column (and the sequence) to bigint before that, \
                  ideally in a planned window: ALTER COLUMN … TYPE bigint rewrites the table under an ACCESS EXCLUSIVE lock.",
        columns: &[
            col("schema", "Schema", Kind::Code),
            col("name", "Sequence", Kind::Code),
            col("column", "Column", Kind::Code),
            col("column_type", "Type", Kind::Text),
            col("last_value", "Last value", Kind::Count),
            col("limit", "Limit", Kind::Count),
            col("pct", "Used %", Kind::Pct),
        ],
        default_sort: "pct",
        default_asc: false,
        actions: RowActions::None,
    },
    Section {
        key: "replicas",
        title: "Replicas",
        meaning: "Each standby streaming from this server, with how far behind it is. \
                  Growing lag means the replica cannot keep up (network, disk, or long queries on the replica holding back replay); \
                  reads from it see old data, and a failover to it would lose what it has not received.",
        columns: &[
            col("name", "Application", Kind::Code),
            col("client", "Address", Kind::Text),
            col("state", "State", Kind::Text),
            col("sync_state", "Sync", Kind::Text),
            col("lag_bytes", "Replay lag (WAL)", Kind::Bytes),
            col("write_lag_s", "Write lag", Kind::Secs),
            col("flush_lag_s", "Flush lag", Kind::Secs),
            col("replay_lag_s", "Replay lag", Kind::Secs),
        ],
        default_sort: "lag_bytes",
        default_asc: false,
        actions: RowActions::None,
    },
    Section {
        key: "slots",
        title: "Replication slots",
        meaning: "A slot keeps every WAL file its consumer has not confirmed. An inactive slot whose consumer is gone keeps WAL forever: \
                  the disk fills and, before PostgreSQL 13's max_slot_wal_keep_size, nothing stops it; it also holds back vacuum (xmin). \
                  Drop slots nobody uses (SELECT pg_drop_replication_slot('name')) after checking with their owner.",
        columns: &[
            col("name", "Slot", Kind::Code),
            col("type", "Type", Kind::Text),
            col("database", "Database", Kind::Code),
            col("state", "State", Kind::Status),
            col("retained_bytes", "WAL retained", Kind::Bytes),
            col("wal_status", "WAL status", Kind::Text),
        ],
        default_sort: "retained_bytes",
        default_asc: false,
        actions: RowActions::None,
    },
];

fn xid_state(age: i64, freeze_max: i64) -> &'static str {
    if XID_MAX - age < XID_DANGER_REMAINING {
        "danger"
    } else if age > freeze_max {
        "warn"
    } else {
        "ok"
    }
}

const DATABASES_SQL: &str = "
    SELECT jsonb_build_object('name', datname, 'xid_age', age(datfrozenxid), 'mxid_age', mxid_age(datminmxid))
    FROM pg_database WHERE datallowconn OR age(datfrozenxid) > 0";

fn tables_sql() -> String {
    format!(
        "SELECT jsonb_build_object('oid', c.oid::int8, 'schema', n.nspname, 'name', c.relname,
                'xid_age', greatest(age(c.relfrozenxid), coalesce(age(t.relfrozenxid), 0)),
                'size_bytes', ((c.relpages + coalesce(t.relpages, 0))::int8 * current_setting('block_size')::int8))
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         LEFT JOIN pg_class t ON t.oid = c.reltoastrelid
         WHERE c.relkind IN ('r', 'm') AND c.relfrozenxid <> '0' AND {USER_SCHEMAS}
         ORDER BY greatest(age(c.relfrozenxid), coalesce(age(t.relfrozenxid), 0)) DESC
         LIMIT 200"
    )
}

fn sequences_sql() -> String {
    format!(
        "SELECT jsonb_strip_nulls(jsonb_build_object('oid', s.seqrelid::int8, 'schema', n.nspname, 'name', c.relname,
                'increment', s.seqincrement, 'min', s.seqmin, 'max', s.seqmax,
                'column', CASE WHEN a.attname IS NOT NULL THEN tn.nspname || '.' || t.relname || '.' || a.attname END,
                'column_type', coalesce(format_type(a.atttypid, NULL), format_type(s.seqtypid, NULL)),
                'type_min', CASE a.atttypid WHEN 'int2'::regtype THEN -32768 WHEN 'int4'::regtype THEN -2147483648 END,
                'type_max', CASE a.atttypid WHEN 'int2'::regtype THEN 32767 WHEN 'int4'::regtype THEN 2147483647 END))
         FROM pg_sequence s
         JOIN pg_class c ON c.oid = s.seqrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace
         LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.seqrelid
                              AND d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0 AND d.deptype IN ('a', 'i')
         LEFT JOIN pg_class t ON t.oid = d.refobjid
         LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace
         LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
         WHERE {USER_SCHEMAS}"
    )
}

/// The last value of each sequence of a batch (NULL when never used or not
/// readable by dbops' role).
const SEQUENCE_VALUES_SQL: &str = "
    SELECT jsonb_build_object('oid', c.oid::int8,
           'last_value', CASE WHEN has_sequence_privilege(c.oid, 'SELECT,USAGE') THEN pg_sequence_last_value(c.oid::regclass) END)
    FROM pg_class c WHERE c.oid = ANY($1::oid[]) AND c.relkind = 'S'";

const REPLICAS_SQL: &str = "
    SELECT jsonb_strip_nulls(jsonb_build_object('name', coalesce(application_name, ''), 'client', client_addr::text,
           'state', state, 'sync_state', sync_state,
           'lag_bytes', pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::int8,
           'write_lag_s', extract(epoch FROM write_lag)::float8, 'flush_lag_s', extract(epoch FROM flush_lag)::float8,
           'replay_lag_s', extract(epoch FROM replay_lag)::float8))
    FROM pg_stat_replication";

const SLOTS_SQL: &str = "
    SELECT jsonb_strip_nulls(jsonb_build_object('name', slot_name, 'type', slot_type, 'database', database, 'active', active,
           'retained_bytes', CASE WHEN restart_lsn IS NOT NULL THEN
               pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END, restart_lsn)::int8 END,
           'wal_status', wal_status,
           'state', CASE WHEN active THEN 'active' WHEN restart_lsn IS NOT NULL THEN 'inactive, retaining WAL' ELSE 'inactive' END))
    FROM pg_replication_slots";

/// How far through its range a sequence is, in percent (the range being the
/// narrower of the sequence's own and its column type's).
pub fn sequence_pct(row: &Value, last: i64) -> (i64, f64) {
    let get = |k: &str| row.get(k).and_then(Value::as_i64);
    let inc = get("increment").unwrap_or(1);
    let (min, max) = (get("min").unwrap_or(1), get("max").unwrap_or(i64::MAX));
    if inc >= 0 {
        let limit = get("type_max").map_or(max, |t| t.min(max));
        let span = (limit as i128 - min as i128).max(1) as f64;
        (
            limit,
            ((last as i128 - min as i128) as f64 / span * 100.0).max(0.0),
        )
    } else {
        let limit = get("type_min").map_or(min, |t| t.max(min));
        let span = (max as i128 - limit as i128).max(1) as f64;
        (
            limit,
            ((max as i128 - last as i128) as f64 / span * 100.0).max(0.0),
        )
    }
}

pub(crate) async fn compute(
    conn: &mut PgConnection,
    target: &Target,
    settings: &ReportSettings,
    progress: &dyn Progress,
    c: &mut Computed,
) -> Result<(), String> {
    progress.phase("cache and wraparound");
    let in_recovery = c
        .facts
        .get("in_recovery")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if let Ok((tables, indexes, freeze)) = sqlx::query_as::<_, (Option<f64>, Option<f64>, i64)>(
        "SELECT (SELECT round(100.0 * sum(heap_blks_hit) / nullif(sum(heap_blks_hit) + sum(heap_blks_read), 0), 2)::float8
                 FROM pg_statio_user_tables),
                (SELECT round(100.0 * sum(idx_blks_hit) / nullif(sum(idx_blks_hit) + sum(idx_blks_read), 0), 2)::float8
                 FROM pg_statio_user_indexes),
                current_setting('autovacuum_freeze_max_age')::int8",
    )
    .fetch_one(&mut *conn)
    .await
    {
        c.facts.insert("cache_hit_tables".into(), json!(tables));
        c.facts.insert("cache_hit_indexes".into(), json!(indexes));
        c.facts.insert("freeze_max_age".into(), json!(freeze));
    }
    super::indexes::stats_since(conn, c).await;
    let freeze = c
        .facts
        .get("freeze_max_age")
        .and_then(Value::as_i64)
        .unwrap_or(200_000_000);
    let with_xid = |rows: Vec<Value>, keys: &[&str]| -> Vec<(String, Value)> {
        rows.into_iter()
            .map(|mut r| {
                let age = r["xid_age"].as_i64().unwrap_or(0);
                if let Some(o) = r.as_object_mut() {
                    o.insert("remaining".into(), json!(XID_MAX - age));
                    o.insert(
                        "pct".into(),
                        json!((age as f64 / XID_MAX as f64 * 1000.0).round() / 10.0),
                    );
                    o.insert("state".into(), json!(xid_state(age, freeze)));
                }
                (label_of(&r, keys), r)
            })
            .collect()
    };
    if let Some(rows) = section_rows(conn, target, c, &SECTIONS[0], DATABASES_SQL, &[]).await {
        c.set_rows(&SECTIONS[0], with_xid(rows, &["name"]));
    }
    if let Some(rows) = section_rows(conn, target, c, &SECTIONS[1], &tables_sql(), &[]).await {
        c.set_rows(&SECTIONS[1], with_xid(rows, &["schema", "name"]));
    }
    if progress.cancelled() {
        return Err("stopped".into());
    }

    progress.phase("reading sequences");
    if let Some(seqs) = section_rows(conn, target, c, &SECTIONS[2], &sequences_sql(), &[]).await {
        // A sequence owned by two columns (rare) is listed once.
        let mut seen = std::collections::BTreeSet::new();
        let seqs: Vec<Value> = seqs
            .into_iter()
            .filter(|r| seen.insert(r["oid"].as_i64().unwrap_or(0)))
            .collect();
        progress.total(seqs.len() as u64);
        let refs: Vec<RelRef> = seqs
            .iter()
            .map(|r| RelRef {
                oid: r["oid"].as_i64().unwrap_or(0),
                owner: None,
                name: label_of(r, &["schema", "name"]),
            })
            .collect();
        // Each value read keeps a lock on its sequence to the end of the
        // transaction: smaller batches.
        let values = per_relation(
            conn,
            SEQUENCE_VALUES_SQL,
            &refs,
            (settings.batch_size / 2).max(1),
            progress,
            &mut c.skipped,
        )
        .await?;
        c.facts
            .insert("sequences_checked".into(), json!(seqs.len()));
        let mut rows = Vec::new();
        for mut r in seqs {
            let oid = r["oid"].as_i64().unwrap_or(0);
            let Some(last) = values.get(&oid).and_then(|v| v["last_value"].as_i64()) else {
                continue;
            };
            let (limit, pct) = sequence_pct(&r, last);
            if pct < SEQUENCE_ALERT_PCT {
                continue;
            }
            if let Some(o) = r.as_object_mut() {
                o.insert("last_value".into(), json!(last));
                o.insert("limit".into(), json!(limit));
                o.insert("pct".into(), json!((pct * 100.0).round() / 100.0));
            }
            rows.push((label_of(&r, &["schema", "name"]), r));
        }
        c.set_rows(&SECTIONS[2], rows);
    }

    progress.phase("replication");
    if in_recovery {
        if let Ok(lag) = sqlx::query_scalar::<_, Option<f64>>(
            "SELECT extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8",
        )
        .fetch_one(&mut *conn)
        .await
        {
            c.facts.insert("replay_delay_s".into(), json!(lag));
        }
        c.set_rows(&SECTIONS[3], vec![]);
    } else if let Some(rows) = section_rows(conn, target, c, &SECTIONS[3], REPLICAS_SQL, &[]).await
    {
        let rows = rows
            .into_iter()
            .map(|r| (label_of(&r, &["name"]), r))
            .collect();
        c.set_rows(&SECTIONS[3], rows);
    }
    if let Some(rows) = section_rows(conn, target, c, &SECTIONS[4], SLOTS_SQL, &[]).await {
        let inactive = rows
            .iter()
            .filter(|r| r["state"] == "inactive, retaining WAL")
            .count();
        c.facts.insert("inactive_slots".into(), json!(inactive));
        let rows = rows
            .into_iter()
            .map(|r| (label_of(&r, &["name"]), r))
            .collect();
        c.set_rows(&SECTIONS[4], rows);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_serial_column_limits_a_bigint_sequence() {
        let row = json!({"increment": 1, "min": 1, "max": i64::MAX, "type_max": 2147483647});
        let (limit, pct) = sequence_pct(&row, 2_000_000_000);
        assert_eq!(limit, 2147483647);
        assert!((pct - 93.13).abs() < 0.01, "{pct}");
        let own = json!({"increment": 1, "min": 1, "max": 1000});
        assert_eq!(sequence_pct(&own, 950).0, 1000);
        let down = json!({"increment": -1, "min": -100, "max": -1});
        let (limit, pct) = sequence_pct(&down, -95);
        assert_eq!(limit, -100);
        assert!(pct > 90.0, "{pct}");
    }

    #[test]
    fn xid_states_follow_the_thresholds() {
        assert_eq!(xid_state(1_000, 200_000_000), "ok");
        assert_eq!(xid_state(300_000_000, 200_000_000), "warn");
        assert_eq!(xid_state(700_000_000, 200_000_000), "danger");
    }
}
