//! The `[reports]` section of the config file. Every key has a default, so configs
//! written before reports existed keep working.

use std::time::Duration;

use serde::Deserialize;

/// `[reports]` as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReports {
    statement_timeout_seconds: Option<u64>,
    lock_timeout_ms: Option<u64>,
    batch_size: Option<usize>,
    sizes_from_files: Option<bool>,
    connections: Option<usize>,
    keep_snapshots: Option<i64>,
    size_history_minutes: Option<u64>,
    refresh_minutes: Option<u64>,
    seq_scan_min_rows: Option<i64>,
    maintenance_lock_timeout_seconds: Option<u64>,
}

/// How reports are computed and kept.
#[derive(Debug, Clone)]
pub struct ReportSettings {
    /// Longest one statement of a report computation may run on the target.
    pub statement_timeout: Duration,
    /// How long a report waits for a lock on one relation before skipping it.
    pub lock_timeout: Duration,
    /// Relations per statement for the per-relation functions (sizes, sequences).
    pub batch_size: usize,
    /// Read relation sizes from the database directory's file listing
    /// (`pg_ls_dir` + `pg_stat_file`, no lock on any relation) when dbops' role may
    /// call those functions; otherwise, or when `false`, relations are opened in
    /// batches (see [`super::measure`]).
    pub sizes_from_files: bool,
    /// Connections to the target a space or indexes report splits its work over
    /// (each with the timeouts above).
    pub connections: usize,
    /// Snapshots kept (with their rows) per target and report.
    pub keep_snapshots: i64,
    /// How often the size of every PostgreSQL target's database is sampled for the
    /// growth chart (`None`: only when the space report is refreshed).
    pub size_history: Option<Duration>,
    /// How often every report of every PostgreSQL target is refreshed in the
    /// background (`None`: only on demand).
    pub refresh: Option<Duration>,
    /// Tables with fewer live rows are not listed as "scanned sequentially".
    pub seq_scan_min_rows: i64,
    /// How long VACUUM FULL, REINDEX and DROP INDEX wait for their lock before giving
    /// up (so that they never queue every other query of the table behind them).
    pub maintenance_lock_timeout: Duration,
}

impl Default for ReportSettings {
    fn default() -> Self {
        RawReports::default()
            .validate()
            .expect("the defaults are valid")
    }
}

impl RawReports {
    /// Checks the values; an error names the key.
    pub fn validate(&self) -> Result<ReportSettings, (String, String)> {
        let bad = |k: &str, m: &str| Err((format!("reports.{k}"), m.to_string()));
        let statement = self.statement_timeout_seconds.unwrap_or(120);
        if !(1..=3600).contains(&statement) {
            return bad("statement_timeout_seconds", "must be between 1 and 3600");
        }
        let lock = self.lock_timeout_ms.unwrap_or(500);
        if !(10..=60_000).contains(&lock) {
            return bad("lock_timeout_ms", "must be between 10 and 60000");
        }
        let batch = self.batch_size.unwrap_or(500);
        if !(1..=10_000).contains(&batch) {
            return bad("batch_size", "must be between 1 and 10000");
        }
        let connections = self.connections.unwrap_or(2);
        if !(1..=8).contains(&connections) {
            return bad("connections", "must be between 1 and 8");
        }
        let keep = self.keep_snapshots.unwrap_or(5);
        if !(1..=1000).contains(&keep) {
            return bad("keep_snapshots", "must be between 1 and 1000");
        }
        let minutes = |v: Option<u64>, default: u64| match v.unwrap_or(default) {
            0 => None,
            m => Some(Duration::from_secs(m * 60)),
        };
        let seq = self.seq_scan_min_rows.unwrap_or(10_000);
        if seq < 0 {
            return bad("seq_scan_min_rows", "must not be negative");
        }
        let maint = self.maintenance_lock_timeout_seconds.unwrap_or(10);
        if !(1..=3600).contains(&maint) {
            return bad(
                "maintenance_lock_timeout_seconds",
                "must be between 1 and 3600",
            );
        }
        Ok(ReportSettings {
            statement_timeout: Duration::from_secs(statement),
            lock_timeout: Duration::from_millis(lock),
            batch_size: batch,
            sizes_from_files: self.sizes_from_files.unwrap_or(true),
            connections,
            keep_snapshots: keep,
            size_history: minutes(self.size_history_minutes, 60),
            refresh: minutes(self.refresh_minutes, 0),
            seq_scan_min_rows: seq,
            maintenance_lock_timeout: Duration::from_secs(maint),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_sane_and_bad_values_name_their_key() {
        let d = ReportSettings::default();
        assert_eq!(d.batch_size, 500);
        assert!(d.sizes_from_files);
        assert!(d.refresh.is_none());
        assert_eq!(d.size_history, Some(Duration::from_secs(3600)));
        let raw = RawReports {
            lock_timeout_ms: Some(1),
            ..Default::default()
        };
        assert_eq!(raw.validate().unwrap_err().0, "reports.lock_timeout_ms");
    }
}
