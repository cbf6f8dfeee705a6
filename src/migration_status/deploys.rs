//! Deploys reported by pipelines: the manifest of a repository's migrations
//! (`dbops migrations manifest DIR --tool T`, made with the same directory readers
//! the page uses), the deploy's outcome and reference, and a snapshot of the
//! database's relations taken when the deploy is reported (table
//! `migration_deploys`, append-only).
//!
//! What this gives the migrations page: where no directory is configured, pending
//! and drift against the newest manifest; after a failed deploy, the target stays
//! red until a later deploy of the same tool succeeds, and the relations that were
//! not there when the last successful deploy was reported are listed as possibly
//! left behind (a failed non-transactional migration's tables and indexes). What
//! the snapshot can and cannot see is said on the page ([`LEFTOVERS_SEE`]).

use std::{collections::HashSet, path::Path};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{PgConnection, PgPool};

use super::{Tool, disk, disk::DiskMigration};
use crate::{
    audit::{self, AuditCtx, Entry},
    config::Config,
    targets::{Target, bounded},
};

/// The manifest format this dbops writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// Migrations in one manifest at most (a body of that size stays well under the
/// API's request size limit).
pub const MAX_MIGRATIONS: usize = 20_000;

/// What a repository's migrations directory holds, as dbops reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// The config's `tool` key (`knex`, `django`, …).
    pub tool: String,
    /// The units the tool versions separately (Django apps); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<String>,
    pub migrations: Vec<DiskMigration>,
}

impl Manifest {
    /// Reads `dir` as `tool` does (the same reader the page uses for a configured
    /// directory).
    pub fn from_dir(tool: &str, dir: &Path) -> Result<Manifest, String> {
        let tool = tool.trim().to_ascii_lowercase();
        if !disk::DIRECTORY_TOOLS.contains(&tool.as_str()) {
            return Err(format!(
                "dbops cannot read {tool} migrations directories; it reads {}",
                disk::DIRECTORY_TOOLS.join(", ")
            ));
        }
        let migrations = disk::read_dir(&tool, dir)?;
        let mut units: Vec<String> = vec![];
        for m in &migrations {
            if !m.unit.is_empty() && !units.contains(&m.unit) {
                units.push(m.unit.clone());
            }
        }
        Ok(Manifest {
            format: MANIFEST_FORMAT,
            tool,
            units,
            migrations,
        })
    }

    /// Checks a manifest that came from outside; the error is a sentence.
    pub fn check(&self) -> Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!(
                "manifest format {} is not one this dbops reads (it reads format {MANIFEST_FORMAT}); make the manifest with the same dbops version",
                self.format
            ));
        }
        if !disk::DIRECTORY_TOOLS.contains(&self.tool.as_str()) {
            return Err(format!(
                "the manifest's tool “{}” is not one dbops compares: {}",
                self.tool,
                disk::DIRECTORY_TOOLS.join(", ")
            ));
        }
        if self.migrations.len() > MAX_MIGRATIONS {
            return Err(format!(
                "the manifest lists {} migrations; dbops takes {MAX_MIGRATIONS} at most",
                self.migrations.len()
            ));
        }
        for (i, m) in self.migrations.iter().enumerate() {
            if m.key.trim().is_empty() {
                return Err(format!("migration {} of the manifest has no key", i + 1));
            }
            let long = [&m.key, &m.name, &m.file, &m.checksum, &m.unit]
                .into_iter()
                .chain(m.parents.iter())
                .chain(m.also_accepted.iter())
                .any(|s| s.len() > 1000);
            if long || m.parents.len() > 100 || m.also_accepted.len() > 10 {
                return Err(format!(
                    "migration {} of the manifest ({}) has a field longer than dbops takes",
                    i + 1,
                    m.key.chars().take(80).collect::<String>()
                ));
            }
        }
        Ok(())
    }

    pub fn tool(&self) -> Option<Tool> {
        Tool::from_key(&self.tool)
    }
}

/// How a reported deploy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Succeeded,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
        }
    }
}

/// What a pipeline posts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployReport {
    pub outcome: Outcome,
    /// A commit, a pipeline URL, a release name.
    #[serde(default)]
    pub reference: Option<String>,
    /// The database migrated; default the target URL's database.
    #[serde(default)]
    pub database: Option<String>,
    pub manifest: Manifest,
}

/// A reported deploy that was stored.
#[derive(Debug, Clone)]
pub struct Reported {
    pub id: i64,
    pub database: String,
    /// Relations in the snapshot, or why there is none.
    pub snapshot: Result<usize, String>,
}

/// Why a deploy report was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// One stored deploy.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Deploy {
    pub id: i64,
    pub tool: String,
    pub outcome: String,
    pub reference: Option<String>,
    pub reported_by: String,
    pub reported_at: DateTime<Utc>,
    pub migrations: i32,
    pub manifest: sqlx::types::Json<Manifest>,
    pub relation_oids: Option<Vec<i64>>,
    pub snapshot_error: Option<String>,
}

impl Deploy {
    pub fn failed(&self) -> bool {
        self.outcome == Outcome::Failed.as_str()
    }

    /// `abc123` or `no reference`.
    pub fn reference(&self) -> &str {
        self.reference.as_deref().unwrap_or("no reference given")
    }

    pub fn ago(&self) -> String {
        crate::fmt::ago(&self.reported_at)
    }

    pub fn when(&self) -> String {
        crate::fmt::time(&self.reported_at)
    }

    /// What the page's "Compared with" line names.
    pub fn label(&self) -> String {
        format!(
            "the manifest reported with deploy #{} ({}, {}, {} by {})",
            self.id,
            self.reference(),
            self.outcome,
            self.ago(),
            self.reported_by
        )
    }
}

/// A relation not in the snapshot of the last successful deploy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    pub schema: String,
    pub name: String,
    /// `table`, `index`, `sequence`, `view`, …
    pub kind: &'static str,
    /// New indexes and sequences that belong to it (`orders_pkey (index)`).
    pub with: Vec<String>,
}

impl Leftover {
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// What the page says the leftover list can and cannot see.
pub const LEFTOVERS_SEE: &str = "Relations (tables, partitioned tables, indexes, sequences, views, materialized views, foreign tables) that exist now and were not in the catalog snapshot dbops took when the last successful deploy was reported, outside the tool's own bookkeeping tables. It cannot see changes to objects that existed then (added or dropped columns, constraints, altered types, data), dropped objects, functions, types, extensions or schemas, nor tell who created a relation: anything created since by other people or programs is listed too.";

/// The deploy state of one tool in one database, as the page shows it.
#[derive(Debug, Clone)]
pub struct DeployStatus {
    pub newest: Deploy,
    /// The newest succeeded deploy (the same as `newest` when that succeeded).
    pub last_success: Option<(i64, String, DateTime<Utc>)>,
    /// After a failed deploy: relations not in the last successful deploy's
    /// snapshot, or why they cannot be known.
    pub leftovers: Option<Result<Vec<Leftover>, String>>,
    /// After a failed deploy: migrations the tool recorded as applied that were not
    /// in the last successful deploy's manifest.
    pub applied_since: Vec<String>,
}

impl DeployStatus {
    pub fn failed(&self) -> bool {
        self.newest.failed()
    }

    /// The overview's words: `last deploy failed: abc123, 5 min ago`.
    pub fn flag(&self) -> Option<String> {
        self.failed().then(|| {
            format!(
                "last deploy failed: {}, {}",
                self.newest.reference(),
                self.newest.ago()
            )
        })
    }

    pub fn last_success_text(&self) -> String {
        match &self.last_success {
            Some((id, reference, at)) => {
                format!("deploy #{id} ({reference}, {})", crate::fmt::ago(at))
            }
            None => "none recorded".into(),
        }
    }
}

/// Relation kinds the snapshot records, and their names.
const KINDS: &[(&str, &str)] = &[
    ("r", "table"),
    ("p", "partitioned table"),
    ("i", "index"),
    ("I", "partitioned index"),
    ("S", "sequence"),
    ("v", "view"),
    ("m", "materialized view"),
    ("f", "foreign table"),
];

/// The catalog filter shared by the snapshot and the comparison: user relations
/// of the kinds above, outside the system and temporary schemas.
const USER_RELATIONS: &str = "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind IN ('r', 'p', 'i', 'I', 'S', 'v', 'm', 'f')
       AND n.nspname NOT IN ('pg_catalog', 'information_schema')
       AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'";

/// The oids of the database's user relations, and the largest.
pub async fn snapshot(conn: &mut PgConnection) -> Result<(Vec<i64>, i64), sqlx::Error> {
    let oids: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT c.oid::bigint {USER_RELATIONS} ORDER BY c.oid"
    ))
    .fetch_all(&mut *conn)
    .await?;
    let max = oids.last().copied().unwrap_or(0);
    Ok((oids, max))
}

/// Relations that are not among `baseline`, except the bookkeeping tables named in
/// `bookkeeping` (`(schema, table)`) and what is named after them
/// (`knex_migrations_lock`, `SequelizeMeta_pkey`). New indexes and sequences of a
/// new table are listed with it.
pub async fn leftovers(
    conn: &mut PgConnection,
    baseline: &[i64],
    bookkeeping: &[(String, String)],
) -> Result<Vec<Leftover>, sqlx::Error> {
    type Row = (i64, String, String, String, Option<i64>);
    // An index belongs to its table (pg_index); a sequence to the column that owns
    // it (serial: pg_depend 'a'; identity: 'i').
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT c.oid::bigint, n.nspname::text, c.relname::text, c.relkind::text,
                CASE WHEN c.relkind IN ('i', 'I')
                     THEN (SELECT x.indrelid::bigint FROM pg_index x WHERE x.indexrelid = c.oid)
                     WHEN c.relkind = 'S'
                     THEN (SELECT d.refobjid::bigint FROM pg_depend d
                            WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                              AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
                            LIMIT 1)
                END
         {USER_RELATIONS}
           AND c.oid::bigint NOT IN (SELECT unnest($1::bigint[]))
         ORDER BY c.oid"
    ))
    .bind(baseline)
    .fetch_all(&mut *conn)
    .await?;
    let is_bookkeeping = |schema: &str, name: &str| {
        bookkeeping.iter().any(|(s, t)| {
            s == schema
                && (name == t
                    || name
                        .strip_prefix(t.as_str())
                        .is_some_and(|rest| rest.starts_with('_')))
        })
    };
    let kind = |k: &str| {
        KINDS
            .iter()
            .find(|(c, _)| *c == k)
            .map(|(_, n)| *n)
            .unwrap_or("relation")
    };
    let skipped: HashSet<i64> = rows
        .iter()
        .filter(|(_, s, n, _, _)| is_bookkeeping(s, n))
        .map(|(oid, ..)| *oid)
        .collect();
    let new: HashSet<i64> = rows.iter().map(|(oid, ..)| *oid).collect();
    let mut out: Vec<(i64, Leftover)> = vec![];
    let mut belongs: Vec<(i64, String)> = vec![];
    for (oid, schema, name, k, owner) in &rows {
        if skipped.contains(oid) || owner.is_some_and(|o| skipped.contains(&o)) {
            continue;
        }
        match owner {
            Some(o) if new.contains(o) => {
                belongs.push((*o, format!("{name} ({})", kind(k))));
            }
            _ => out.push((
                *oid,
                Leftover {
                    schema: schema.clone(),
                    name: name.clone(),
                    kind: kind(k),
                    with: vec![],
                },
            )),
        }
    }
    for (owner, what) in belongs {
        if let Some((_, l)) = out.iter_mut().find(|(oid, _)| *oid == owner) {
            l.with.push(what);
        }
    }
    Ok(out.into_iter().map(|(_, l)| l).collect())
}

const COLUMNS: &str = "id, tool, outcome, reference, reported_by, reported_at, migrations, manifest, relation_oids, snapshot_error";

/// The newest deploy of each tool reported for a database, and the newest
/// succeeded one of each.
pub async fn newest(
    db: &PgPool,
    target: &str,
    database: &str,
) -> Result<(Vec<Deploy>, Vec<Deploy>), sqlx::Error> {
    let newest: Vec<Deploy> = sqlx::query_as(&format!(
        "SELECT DISTINCT ON (tool) {COLUMNS} FROM migration_deploys
          WHERE target = $1 AND database = $2 ORDER BY tool, id DESC"
    ))
    .bind(target)
    .bind(database)
    .fetch_all(db)
    .await?;
    let succeeded: Vec<Deploy> = sqlx::query_as(&format!(
        "SELECT DISTINCT ON (tool) {COLUMNS} FROM migration_deploys
          WHERE target = $1 AND database = $2 AND outcome = 'succeeded' ORDER BY tool, id DESC"
    ))
    .bind(target)
    .bind(database)
    .fetch_all(db)
    .await?;
    Ok((newest, succeeded))
}

/// Stores a deploy a pipeline reported for `target`: checks it, takes the
/// snapshot of the database's relations, and writes the deploy and its
/// operations row in one transaction. A database that cannot be read does not
/// refuse the report; the deploy is stored with the reason instead of a snapshot.
#[tracing::instrument(skip_all, fields(target = %target.name()))]
pub async fn report(
    db: &PgPool,
    config: &Config,
    target: &Target,
    ctx: &AuditCtx,
    input: DeployReport,
) -> Result<Reported, DeployError> {
    let names = super::database_names(target);
    let database = match input.database.as_deref().map(str::trim) {
        None | Some("") => names[0].clone(),
        Some(d) if names.iter().any(|n| n == d) => d.to_string(),
        Some(d) => {
            return Err(DeployError::Invalid(format!(
                "{d} is not a database dbops knows on {}: add it to the target's `databases` ({} known)",
                target.name(),
                names.join(", ")
            )));
        }
    };
    let reference = input
        .reference
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty());
    if let Some(r) = &reference
        && (r.chars().count() > 500 || r.chars().any(char::is_control))
    {
        return Err(DeployError::Invalid(
            "the reference must be one line of 500 characters at most".into(),
        ));
    }
    input.manifest.check().map_err(DeployError::Invalid)?;
    let snapshot = bounded(super::time_limit(config), async {
        let mut conn = super::connect(target, config, &database).await?;
        let s = snapshot(&mut conn).await.map_err(|e| super::readable(&e));
        let _ = sqlx::Connection::close(conn).await;
        s
    })
    .await
    .map_err(|e| crate::targets::postgres::describe_pg_error(&target.scrub(&e)));
    let count = input.manifest.migrations.len();
    let mut tx = db.begin().await?;
    let op = audit::record(
        &mut *tx,
        ctx,
        Entry::new("migrations.deploy")
            .target(target.name())
            .params(json!({
                "database": database,
                "tool": input.manifest.tool,
                "outcome": input.outcome.as_str(),
                "reference": reference,
                "migrations": count,
            }))
            .result(match &snapshot {
                Ok((oids, _)) => json!({ "snapshot_relations": oids.len() }),
                Err(e) => json!({ "snapshot_error": e }),
            }),
    )
    .await?;
    let (oids, max, error) = match &snapshot {
        Ok((o, m)) => (Some(o.clone()), Some(*m), None),
        Err(e) => (None, None, Some(e.clone())),
    };
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO migration_deploys (target, database, tool, outcome, reference, manifest, migrations,
                                        reported_by, operation_id, relation_oids, max_relation_oid, snapshot_error)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id",
    )
    .bind(target.name())
    .bind(&database)
    .bind(&input.manifest.tool)
    .bind(input.outcome.as_str())
    .bind(&reference)
    .bind(sqlx::types::Json(&input.manifest))
    .bind(count as i32)
    .bind(ctx.actor.name.as_deref().unwrap_or("unknown"))
    .bind(op)
    .bind(oids)
    .bind(max)
    .bind(error)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Reported {
        id,
        database,
        snapshot: snapshot.map(|(o, _)| o.len()),
    })
}

/// Writes the operations row of a refused report (bad body, unknown database).
pub async fn record_refusal(db: &PgPool, ctx: &AuditCtx, target: &str, reason: &str) {
    if let Err(e) = audit::record(
        db,
        ctx,
        Entry::new("migrations.deploy")
            .target(target)
            .failed(reason),
    )
    .await
    {
        tracing::error!(error = %e, "could not record a refused deploy report");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_round_trips_and_foreign_ones_are_checked() {
        let dir = std::env::temp_dir().join(format!("dbops-manifest-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("1_a.sql"), "CREATE TABLE a (id int);\n").unwrap();
        std::fs::write(dir.join("2_b.sql"), "CREATE TABLE b (id int);\n").unwrap();
        let m = Manifest::from_dir("SQLX", &dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(m.tool, "sqlx");
        assert_eq!(m.migrations.len(), 2);
        assert_eq!(m.migrations[0].checksum.len(), 96);
        let text = serde_json::to_string(&m).unwrap();
        let back: Manifest = serde_json::from_str(&text).unwrap();
        assert!(back.check().is_ok());
        assert_eq!(back.migrations, m.migrations);

        let mut bad = back.clone();
        bad.tool = "liquibase-x".into();
        assert!(bad.check().unwrap_err().contains("not one dbops compares"));
        let mut bad = back.clone();
        bad.migrations[0].key = " ".into();
        assert!(bad.check().unwrap_err().contains("no key"));
        let mut bad = back;
        bad.format = 2;
        assert!(bad.check().unwrap_err().contains("format 2"));
        assert!(Manifest::from_dir("nope", Path::new("/")).is_err());
    }
}
