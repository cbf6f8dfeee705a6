//! Migration status (PRODUCT C6): for every database of a PostgreSQL target, which
//! migration tools have left their bookkeeping tables ([`tools`]), what they say is
//! applied, the current version, and the problems the tools themselves record
//! (failed, dirty, half-applied, locks left held). Where the config names a local
//! migrations directory, what is pending on disk, applied but missing on disk, and
//! whose checksum changed since it was applied ([`disk`]); where none is, the
//! same against the newest manifest a pipeline reported with a deploy, and after a
//! failed deploy the relations created since the last successful one ([`deploys`]).
//! dbops' own schema is shown the same way, compared with the migrations embedded
//! in the binary.
//!
//! Read-only: nothing here writes to a target. Every query runs on a connection
//! whose `statement_timeout` is the target's, and each database's inspection is
//! bounded as a whole, so a slow or missing database shows as a sentence on the
//! page and never holds the page up beyond the configured timeouts.
//!
//! Over 600 lines: the per-tool rules for reading a bookkeeping table (current
//! version, failures, drift) share one report type and are compared side by side;
//! the SQL that finds the tables is in `tools.rs`, directories in `disk.rs`.

pub mod deploys;
pub mod disk;
mod disk_more;
pub mod tools;

use std::{str::FromStr, time::Duration};

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use sqlx::{
    ConnectOptions, Connection, PgConnection, PgPool, migrate::Migrator, postgres::PgConnectOptions,
};

use crate::{
    config::{Config, MigrationsDir},
    targets::{Target, bounded, postgres::describe_pg_error},
};
use disk::{DiskMigration, Drift, Recorded};

/// dbops' own migrations, as embedded in this binary (the same directory
/// [`crate::app::migrate`] applies).
static CONSOLE_MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The recognised tools as a sentence: "sqlx, Prisma, … and Graphile Migrate".
pub fn looked_for() -> String {
    let labels: Vec<&str> = ALL_TOOLS.iter().map(|t| t.label()).collect();
    match labels.split_last() {
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// A migration tool whose bookkeeping table dbops recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Sqlx,
    Prisma,
    Drizzle,
    Flyway,
    Liquibase,
    GolangMigrate,
    Rails,
    Dbmate,
    Django,
    Alembic,
    Knex,
    Sequelize,
    Goose,
    Diesel,
    Refinery,
    TypeOrm,
    NodePgMigrate,
    Atlas,
    Sqitch,
    GraphileMigrate,
    /// A `schema_migrations` table none of the rules recognise, or another
    /// `*migration*` table with a version or name column.
    Unknown,
}

/// Every tool, in the order the page's "looked for" sentence names them.
pub const ALL_TOOLS: &[Tool] = &[
    Tool::Sqlx,
    Tool::Prisma,
    Tool::Drizzle,
    Tool::Flyway,
    Tool::Liquibase,
    Tool::GolangMigrate,
    Tool::Rails,
    Tool::Dbmate,
    Tool::Django,
    Tool::Alembic,
    Tool::Knex,
    Tool::Sequelize,
    Tool::Goose,
    Tool::Diesel,
    Tool::Refinery,
    Tool::TypeOrm,
    Tool::NodePgMigrate,
    Tool::Atlas,
    Tool::Sqitch,
    Tool::GraphileMigrate,
];

impl Tool {
    /// The name people know the tool by.
    pub fn label(self) -> &'static str {
        match self {
            Tool::Sqlx => "sqlx",
            Tool::Prisma => "Prisma",
            Tool::Drizzle => "Drizzle",
            Tool::Flyway => "Flyway",
            Tool::Liquibase => "Liquibase",
            Tool::GolangMigrate => "golang-migrate",
            Tool::Rails => "Rails",
            Tool::Dbmate => "dbmate",
            Tool::Django => "Django",
            Tool::Alembic => "Alembic",
            Tool::Knex => "Knex",
            Tool::Sequelize => "Sequelize",
            Tool::Goose => "goose",
            Tool::Diesel => "Diesel",
            Tool::Refinery => "refinery",
            Tool::TypeOrm => "TypeORM",
            Tool::NodePgMigrate => "node-pg-migrate",
            Tool::Atlas => "Atlas",
            Tool::Sqitch => "Sqitch",
            Tool::GraphileMigrate => "Graphile Migrate",
            Tool::Unknown => "unrecognised, looks like migrations",
        }
    }

    /// The config's `tool` value for this tool's migrations directory.
    pub fn key(self) -> &'static str {
        match self {
            Tool::Sqlx => "sqlx",
            Tool::Prisma => "prisma",
            Tool::Drizzle => "drizzle",
            Tool::Flyway => "flyway",
            Tool::Liquibase => "liquibase",
            Tool::GolangMigrate => "golang-migrate",
            Tool::Rails => "rails",
            Tool::Dbmate => "dbmate",
            Tool::Django => "django",
            Tool::Alembic => "alembic",
            Tool::Knex => "knex",
            Tool::Sequelize => "sequelize",
            Tool::Goose => "goose",
            Tool::Diesel => "diesel",
            Tool::Refinery => "refinery",
            Tool::TypeOrm => "typeorm",
            Tool::NodePgMigrate => "node-pg-migrate",
            Tool::Atlas => "atlas",
            Tool::Sqitch => "sqitch",
            Tool::GraphileMigrate => "graphile-migrate",
            Tool::Unknown => "unknown",
        }
    }

    fn from_key(key: &str) -> Option<Tool> {
        ALL_TOOLS.iter().copied().find(|t| t.key() == key)
    }
}

/// What a tool's row says about one migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowState {
    Applied,
    /// sqlx/Flyway `success = false`, Prisma unfinished and not rolled back,
    /// Liquibase `FAILED`.
    Failed,
    /// Prisma: rolled back (resolved); not applied.
    RolledBack,
    /// golang-migrate: `dirty`.
    Dirty,
    /// Liquibase `SKIPPED`.
    Skipped,
    /// Liquibase `MARK_RAN`: recorded as run without running.
    Marked,
    /// goose: migrated down.
    Down,
}

impl RowState {
    fn from_sql(s: &str) -> RowState {
        match s {
            "failed" => RowState::Failed,
            "rolled_back" => RowState::RolledBack,
            "dirty" => RowState::Dirty,
            "skipped" => RowState::Skipped,
            "marked" => RowState::Marked,
            "down" => RowState::Down,
            _ => RowState::Applied,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            RowState::Applied => "applied",
            RowState::Failed => "failed",
            RowState::RolledBack => "rolled back",
            RowState::Dirty => "dirty",
            RowState::Skipped => "skipped",
            RowState::Marked => "marked as run",
            RowState::Down => "migrated down",
        }
    }

    /// A CSS class for the state.
    pub fn class(self) -> &'static str {
        match self {
            RowState::Failed | RowState::Dirty => "bad",
            RowState::Applied => "ok",
            _ => "other",
        }
    }

    pub fn is_problem(self) -> bool {
        matches!(self, RowState::Failed | RowState::Dirty)
    }
}

/// One row of a tool's table.
#[derive(Debug, Clone)]
pub struct Applied {
    /// Version, revision, or name where the tool has no version.
    pub version: String,
    /// Description / name / file, where the tool records one.
    pub name: String,
    pub applied_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<f64>,
    pub checksum: Option<String>,
    pub state: RowState,
    /// Tool-specific details (Knex batch, Flyway type and script, Liquibase author…).
    pub note: String,
    /// Prisma's `logs` of a failed migration.
    pub logs: Option<String>,
}

impl Applied {
    pub fn when(&self) -> String {
        self.applied_at
            .as_ref()
            .map(crate::fmt::time)
            .unwrap_or_default()
    }

    pub fn duration(&self) -> String {
        match self.duration_ms {
            None => String::new(),
            Some(ms) if ms < 1.0 => format!("{ms:.2} ms"),
            Some(ms) if ms < 1000.0 => format!("{ms:.0} ms"),
            Some(ms) => format!("{:.1} s", ms / 1000.0),
        }
    }

    /// The checksum shortened for a table cell.
    pub fn short_checksum(&self) -> String {
        match &self.checksum {
            Some(c) if c.chars().count() > 16 => {
                format!("{}…", c.chars().take(12).collect::<String>())
            }
            Some(c) => c.clone(),
            None => String::new(),
        }
    }
}

/// One unit a tool versions separately: a Django app, an Alembic head (branch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// `blog`; `head 0003 (branch label)`.
    pub name: String,
    /// The newest applied migration of the app; the `alembic_version` row on the branch.
    pub current: Option<String>,
    /// Alembic with a directory: whether the current revision is this head.
    pub at_head: Option<bool>,
    /// Migrations of the unit on disk and not applied (known with a directory).
    pub pending: usize,
}

impl Unit {
    /// `blog 0003_tags`, `0002 (head)`, `0002 (1 pending to head 0003)`.
    pub fn describe(&self) -> String {
        let current = self.current.as_deref().unwrap_or("none applied");
        match self.at_head {
            Some(true) => format!("{current} (head)"),
            Some(false) => format!("{current} → {}", self.name),
            None => format!("{} {current}", self.name),
        }
    }
}

/// What one tool's table in one database says.
#[derive(Debug, Clone)]
pub struct ToolReport {
    pub tool: Tool,
    pub schema: String,
    /// Empty when a migrations directory is configured but no table was found.
    pub table: String,
    /// In applied order, oldest first (the newest [`tools::ROW_LIMIT`] at most).
    pub applied: Vec<Applied>,
    /// Rows in the table.
    pub total: i64,
    pub current: Option<String>,
    /// What the tool itself records as wrong: failed, dirty, locks held.
    pub problems: Vec<String>,
    /// Facts worth knowing (Rails environment, Alembic keeps no history…).
    pub notes: Vec<String>,
    /// Comparisons with configured migrations directories.
    pub drift: Vec<Drift>,
    /// Versions per unit, for tools that keep several (Django apps, Alembic heads).
    pub units: Vec<Unit>,
    /// The table could not be read.
    pub error: Option<String>,
    /// Deploys a pipeline reported for this tool and database.
    pub deploy: Option<deploys::DeployStatus>,
}

impl ToolReport {
    fn new(tool: Tool, schema: &str, table: &str) -> ToolReport {
        ToolReport {
            tool,
            schema: schema.to_string(),
            table: table.to_string(),
            applied: vec![],
            total: 0,
            current: None,
            problems: vec![],
            notes: vec![],
            drift: vec![],
            units: vec![],
            error: None,
            deploy: None,
        }
    }

    /// `schema.table`.
    pub fn location(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// More rows in the table than were read.
    pub fn truncated(&self) -> bool {
        self.total > self.applied.len() as i64
    }

    /// Short words for what is wrong (for the overview's red mark); empty = fine.
    pub fn flags(&self) -> Vec<String> {
        let mut out = vec![];
        if let Some(f) = self.deploy.as_ref().and_then(|d| d.flag()) {
            out.push(f);
        }
        if self.applied.iter().any(|a| a.state == RowState::Failed) {
            out.push("failed".to_string());
        }
        if self.applied.iter().any(|a| a.state == RowState::Dirty) {
            out.push("dirty".to_string());
        }
        if self.problems.iter().any(|p| p.contains("lock is held")) {
            out.push("locked".to_string());
        }
        let pending: usize = self.drift.iter().map(|d| d.pending.len()).sum();
        let units: Vec<&Unit> = self.units.iter().filter(|u| u.pending > 0).collect();
        if !units.is_empty() {
            for u in units {
                out.push(format!("{}: {} pending", u.name, u.pending));
            }
        } else if pending > 0 {
            out.push(format!("{pending} pending"));
        }
        if self
            .drift
            .iter()
            .any(|d| !d.mismatched.is_empty() || !d.missing.is_empty())
        {
            out.push("drifted".to_string());
        }
        if self.drift.iter().any(|d| d.error.is_some()) {
            out.push("directory unreadable".to_string());
        }
        if self.error.is_some() {
            out.push("unreadable".to_string());
        }
        out
    }

    pub fn is_red(&self) -> bool {
        !self.flags().is_empty()
    }

    /// Which optional columns this tool records (empty ones are left off the table).
    pub fn has_names(&self) -> bool {
        self.applied.iter().any(|a| !a.name.is_empty())
    }

    pub fn has_times(&self) -> bool {
        self.applied.iter().any(|a| a.applied_at.is_some())
    }

    pub fn has_durations(&self) -> bool {
        self.applied.iter().any(|a| a.duration_ms.is_some())
    }

    pub fn has_checksums(&self) -> bool {
        self.applied.iter().any(|a| a.checksum.is_some())
    }

    pub fn has_details(&self) -> bool {
        self.applied
            .iter()
            .any(|a| !a.note.is_empty() || a.logs.is_some())
    }
}

/// One database of a target.
#[derive(Debug, Clone)]
pub struct DatabaseReport {
    pub name: String,
    /// The tools found, or why the database could not be inspected.
    pub outcome: Result<Vec<ToolReport>, String>,
    /// What could not be known besides (the reported deploys could not be read).
    pub notes: Vec<String>,
}

/// Every configured database of a target.
#[derive(Debug, Clone)]
pub struct TargetReport {
    pub databases: Vec<DatabaseReport>,
}

fn current_and_problems(report: &mut ToolReport) {
    let rows = &report.applied;
    let last_applied = rows.iter().rev().find(|a| a.state == RowState::Applied);
    report.current = match report.tool {
        Tool::Alembic => {
            let current: Vec<&str> = rows.iter().map(|a| a.version.as_str()).collect();
            (!current.is_empty()).then(|| current.join(", "))
        }
        Tool::Goose => {
            // goose's own rule (GetDBVersion): newest row first; a version whose
            // newest row is a down does not count.
            let mut down = std::collections::HashSet::new();
            let mut current = None;
            for a in rows.iter().rev() {
                if down.contains(&a.version) {
                    continue;
                }
                if a.state == RowState::Applied {
                    current = Some(a.version.clone());
                    break;
                }
                down.insert(a.version.clone());
            }
            current
        }
        Tool::Flyway => rows
            .iter()
            .rev()
            .find(|a| {
                a.state == RowState::Applied && !a.version.is_empty() && !flyway_bookkeeping(a)
            })
            .map(|a| a.version.clone()),
        Tool::Django => {
            // Django versions each app on its own: the newest row per app.
            let mut units: Vec<Unit> = vec![];
            for a in rows {
                match units.iter_mut().find(|u| u.name == a.version) {
                    Some(u) => u.current = Some(a.name.clone()),
                    None => units.push(Unit {
                        name: a.version.clone(),
                        current: Some(a.name.clone()),
                        at_head: None,
                        pending: 0,
                    }),
                }
            }
            units.sort_by(|a, b| a.name.cmp(&b.name));
            report.units = units;
            None
        }
        // The version golang-migrate is at, dirty or not.
        Tool::GolangMigrate => rows.last().map(|a| a.version.clone()),
        _ => last_applied.map(|a| a.version.clone()),
    };
    for a in rows {
        let name = if a.name.is_empty() {
            String::new()
        } else {
            format!(" ({})", a.name)
        };
        let v = &a.version;
        let problem = match (report.tool, a.state) {
            (Tool::Sqlx, RowState::Failed) => format!(
                "migration {v}{name} failed (success = false): sqlx refuses to run further migrations until it is repaired"
            ),
            (Tool::Flyway, RowState::Failed) => format!(
                "migration {v}{name} failed (success = false): fix the schema, then run `flyway repair`"
            ),
            (Tool::Prisma, RowState::Failed) => format!(
                "migration {v} started {} but neither finished nor rolled back: `prisma migrate deploy` stops here until it is resolved (`prisma migrate resolve`); its logs are below",
                a.when()
            ),
            (Tool::Liquibase, RowState::Failed) => {
                format!("change set {v}{name} failed (EXECTYPE = FAILED)")
            }
            (_, RowState::Dirty) => format!(
                "version {v} is dirty: a migration failed half-way; fix the schema by hand, then `migrate force` the right version"
            ),
            (_, RowState::Failed) => format!("migration {v}{name} failed"),
            _ => continue,
        };
        report.problems.push(problem);
    }
    if report.tool == Tool::Alembic {
        report.notes.push(
            "Alembic records only the current revision of each branch, not a history; which revisions are heads, and what is pending, is known only from its versions directory.".into(),
        );
    }
    if matches!(
        report.tool,
        Tool::Sequelize | Tool::Rails | Tool::Dbmate | Tool::Unknown
    ) {
        report
            .notes
            .push(format!("{} records no apply times.", report.tool.label()));
    }
    if report.tool == Tool::GolangMigrate {
        report.notes.push(
            "golang-migrate records only the current version and whether it is dirty.".into(),
        );
    }
    if report.tool == Tool::Unknown && report.table != "schema_migrations" {
        report.notes.push(
            "No supported tool uses this table, but its name and its version/name column look like migration bookkeeping: shown as it is, without failures or pending.".into(),
        );
    } else if report.tool == Tool::Unknown {
        report.notes.push(
            "This schema_migrations table has neither golang-migrate's `dirty` column, nor Rails' ar_internal_metadata beside it, nor dbmate's single `version` column.".into(),
        );
    }
}

/// Flyway rows that are bookkeeping, not migration files.
fn flyway_bookkeeping(a: &Applied) -> bool {
    ["SCHEMA", "BASELINE", "DELETE", "UNDO"]
        .iter()
        .any(|t| a.note.starts_with(t))
}

/// What a report records, as the directory comparison needs it.
fn recorded(report: &ToolReport) -> Vec<Recorded> {
    report
        .applied
        .iter()
        .filter(|a| !matches!(a.state, RowState::RolledBack | RowState::Down))
        .filter(|a| !(report.tool == Tool::Flyway && flyway_bookkeeping(a)))
        .map(|a| Recorded {
            key: match report.tool {
                Tool::Flyway if a.version.is_empty() => format!("R:{}", a.name),
                Tool::Flyway => disk::flyway_version_key(&a.version),
                Tool::Django => format!("{}.{}", a.version, a.name),
                Tool::TypeOrm => a.name.clone(),
                Tool::Dbmate | Tool::Goose | Tool::GolangMigrate | Tool::Rails => {
                    let v = a.version.trim_start_matches('0');
                    if v.is_empty() {
                        "0".into()
                    } else {
                        v.to_string()
                    }
                }
                _ => a.version.clone(),
            },
            // Atlas' sum file writes `h1:` before the hash; the column may not.
            checksum: match report.tool {
                Tool::Atlas => a
                    .checksum
                    .as_deref()
                    .map(|c| c.trim().trim_start_matches("h1:").to_string()),
                _ => a.checksum.clone(),
            },
        })
        .collect()
}

/// What the tool itself counts as on disk and as applied, where that is more than
/// the rows: golang-migrate's one version covers every file numbered up to it;
/// Alembic's current revisions cover what they descend from; Django's squashed
/// migrations stand for the ones they replace, and apps outside the directory are
/// not compared.
fn tool_view(
    report: &mut ToolReport,
    files: Vec<DiskMigration>,
) -> (Vec<DiskMigration>, Vec<Recorded>) {
    let rows = recorded(report);
    let plain = |key: &str| Recorded {
        key: key.to_string(),
        checksum: None,
    };
    match report.tool {
        Tool::Goose => {
            // A version counts as applied when its newest row is an up.
            let mut newest: std::collections::HashMap<&str, bool> = Default::default();
            for a in &report.applied {
                newest.insert(
                    a.version.trim_start_matches('0'),
                    a.state == RowState::Applied,
                );
            }
            let rec = rows
                .into_iter()
                .filter(|r| newest.get(r.key.as_str()).copied().unwrap_or(true))
                .collect();
            (files, rec)
        }
        Tool::GolangMigrate => {
            let current: Option<u128> = rows.last().and_then(|r| r.key.parse().ok());
            let mut rec: Vec<Recorded> = files
                .iter()
                .filter(|f| current.is_some_and(|c| f.key.parse::<u128>().is_ok_and(|v| v <= c)))
                .map(|f| plain(&f.key))
                .collect();
            if let Some(last) = rows.last()
                && !rec.iter().any(|r| r.key == last.key)
            {
                rec.push(plain(&last.key));
            }
            (files, rec)
        }
        Tool::Alembic => {
            let current: Vec<String> = rows.iter().map(|r| r.key.clone()).collect();
            let (applied, heads) = disk::alembic_heads(&files, &current);
            let mut rec: Vec<Recorded> = files
                .iter()
                .filter(|f| applied.contains(&f.key))
                .map(|f| plain(&f.key))
                .collect();
            rec.extend(
                current
                    .iter()
                    .filter(|c| !files.iter().any(|f| &f.key == *c))
                    .map(|c| plain(c)),
            );
            let is_head = |r: &str| heads.iter().any(|h| h.head == r);
            if !current.is_empty() {
                report.current = Some(
                    current
                        .iter()
                        .map(|c| {
                            if is_head(c) {
                                format!("{c} (head)")
                            } else {
                                c.clone()
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                );
            }
            for a in &mut report.applied {
                a.note = if is_head(&a.version) {
                    "head".into()
                } else {
                    "not a head".into()
                };
            }
            report.units = heads
                .into_iter()
                .map(|h| Unit {
                    name: if h.labels.is_empty() {
                        format!("head {}", h.head)
                    } else {
                        format!("head {} ({})", h.head, h.labels)
                    },
                    at_head: Some(h.current.as_deref() == Some(h.head.as_str())),
                    current: h.current,
                    pending: h.pending,
                })
                .collect();
            (files, rec)
        }
        Tool::Django => {
            let apps: std::collections::HashSet<&str> =
                files.iter().map(|f| f.unit.as_str()).collect();
            let keys = rows.iter().map(|r| r.key.clone()).collect();
            let (kept, applied) = disk::django_resolve_squashes(&files, &keys);
            let mut rec: Vec<Recorded> = rows
                .iter()
                .filter(|r| {
                    r.key
                        .split_once('.')
                        .is_some_and(|(app, _)| apps.contains(app))
                })
                .cloned()
                .collect();
            rec.extend(
                applied
                    .iter()
                    .filter(|k| !rows.iter().any(|r| &r.key == *k))
                    .map(|k| plain(k)),
            );
            let outside: Vec<&str> = report
                .units
                .iter()
                .map(|u| u.name.as_str())
                .filter(|u| !apps.contains(u))
                .collect();
            if !outside.is_empty() {
                report.notes.push(format!(
                    "Apps whose migrations are not in the directory are not compared: {}.",
                    outside.join(", ")
                ));
            }
            (kept, rec)
        }
        _ => (files, rows),
    }
}

/// Django's pending migrations per app.
fn units_from_drift(report: &mut ToolReport, d: &Drift) {
    if report.tool != Tool::Django {
        return;
    }
    for m in &d.pending {
        match report.units.iter_mut().find(|u| u.name == m.unit) {
            Some(u) => u.pending += 1,
            None => report.units.push(Unit {
                name: m.unit.clone(),
                current: None,
                at_head: None,
                pending: 1,
            }),
        }
    }
    report.units.sort_by(|a, b| a.name.cmp(&b.name));
}

/// Attaches a directory's comparison to a report (and Drizzle's names, which
/// only the journal knows).
fn attach_drift(report: &mut ToolReport, label: &str, disk: Result<Vec<DiskMigration>, String>) {
    let drift = match disk {
        Ok(files) => {
            if report.truncated() {
                report.notes.push(format!(
                    "Only the newest {} of {} rows were compared with the directory.",
                    report.applied.len(),
                    report.total
                ));
            }
            if report.tool == Tool::Drizzle {
                for a in &mut report.applied {
                    if let Some(f) = files.iter().find(|f| f.key == a.version) {
                        a.name = f.name.clone();
                    }
                }
                if let Some(last) = report.applied.iter().rev().find(|a| !a.name.is_empty()) {
                    report.current = Some(last.name.clone());
                }
            }
            let (files, recorded) = tool_view(report, files);
            let mut d = disk::compare(report.tool.key(), label, &files, &recorded);
            units_from_drift(report, &d);
            if report.truncated() {
                // Rows beyond the limit were not read: they are not "missing".
                d.pending.clear();
            }
            d
        }
        Err(e) => Drift {
            tool: report.tool.key().to_string(),
            directory: label.to_string(),
            error: Some(e),
            ..Drift::default()
        },
    };
    report.drift.push(drift);
}

/// Reads one tool's table into a report.
async fn read_tool(conn: &mut PgConnection, d: &tools::Detected) -> ToolReport {
    let mut report = ToolReport::new(d.tool, &d.schema, &d.table);
    if let Some(why) = &d.unexpected {
        report.error = Some(why.clone());
        return report;
    }
    if !d.readable {
        report.error = Some(format!(
            "dbops' role may not read {} (no SELECT privilege)",
            report.location()
        ));
        return report;
    }
    match tools::read_rows(conn, d).await {
        Ok((rows, total)) => {
            report.applied = rows;
            report.total = total;
        }
        Err(e) => {
            report.error = Some(format!("reading {}: {}", report.location(), readable(&e)));
            return report;
        }
    }
    current_and_problems(&mut report);
    let extra =
        match (d.tool, &d.lock_table, &d.metadata_table) {
            (Tool::Liquibase, Some(lock), _) => tools::liquibase_lock(conn, &d.schema, lock).await,
            (Tool::Knex, Some(lock), _) => tools::knex_lock(conn, &d.schema, lock).await,
            (Tool::Sqitch, Some(events), _) => tools::sqitch_failures(conn, &d.schema, events)
                .await
                .map(|failed| {
                    for f in failed {
                        report.problems.push(format!(
                            "change {} ({}) failed to deploy at {} and was reverted; it is not deployed",
                            f.version,
                            f.name,
                            f.when()
                        ));
                        report.applied.push(f);
                    }
                    None
                }),
            (Tool::Rails, _, Some(meta)) => tools::rails_environment(conn, &d.schema, meta)
                .await
                .map(|env| {
                    if let Some(env) = env {
                        report.notes.push(format!(
                            "ar_internal_metadata says this is the {env} environment."
                        ));
                    }
                    None
                }),
            _ => Ok(None),
        };
    match extra {
        Ok(Some(lock)) => report.problems.push(lock),
        Ok(None) => {}
        Err(e) => report.notes.push(format!(
            "The lock or metadata table could not be read: {}",
            readable(&e)
        )),
    }
    report
}

/// The driver's error without its "error returned from database:" prefix.
fn readable(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.message().to_string(),
        other => other.to_string(),
    }
}

/// Finds and reads every tool's table in the database `conn` is connected to, and
/// compares the configured directories.
pub async fn inspect_database(
    conn: &mut PgConnection,
    dirs: &[MigrationsDir],
) -> Result<Vec<ToolReport>, sqlx::Error> {
    let found = tools::find_tables(conn).await?;
    let mut reports = vec![];
    for d in tools::classify(&found) {
        reports.push(read_tool(conn, &d).await);
    }
    for dir in dirs {
        let label = dir.directory.display().to_string();
        let path = dir.directory.clone();
        let tool_key = dir.tool.clone();
        let files = tokio::task::spawn_blocking(move || disk::read_dir(&tool_key, &path))
            .await
            .unwrap_or_else(|e| Err(format!("reading the directory failed: {e}")));
        attach_source(&mut reports, &dir.tool, &label, "directory", files);
    }
    // What needs attention first; otherwise in catalog order.
    reports.sort_by_key(|r| !r.is_red());
    Ok(reports)
}

/// Compares every readable report of `tool` with `files` (a directory's or a
/// manifest's); a tool configured but not run yet gets a report where everything is
/// pending.
fn attach_source(
    reports: &mut Vec<ToolReport>,
    tool: &str,
    label: &str,
    what: &str,
    files: Result<Vec<DiskMigration>, String>,
) {
    let mut matched = false;
    for r in reports
        .iter_mut()
        .filter(|r| r.tool.key() == tool && r.error.is_none())
    {
        attach_drift(r, label, files.clone());
        matched = true;
    }
    if !matched && let Some(tool) = Tool::from_key(tool) {
        let mut r = ToolReport::new(tool, "", "");
        r.notes.push(format!(
            "No {} bookkeeping table was found in this database: every migration in the {what} is pending.",
            tool.label()
        ));
        attach_drift(&mut r, label, files);
        reports.push(r);
    }
}

/// Adds what pipelines reported (see [`deploys`]) to the reports of one database:
/// for a tool with no directory configured, pending and drift against the newest
/// manifest; for every tool with reported deploys, the newest deploy, and after a
/// failed one the relations created since the last successful deploy.
async fn attach_deploys(
    conn: &mut PgConnection,
    reports: &mut Vec<ToolReport>,
    dirs: &[MigrationsDir],
    newest: Vec<deploys::Deploy>,
    succeeded: Vec<deploys::Deploy>,
) {
    for deploy in newest {
        let tool = deploy.tool.clone();
        if Tool::from_key(&tool).is_none() {
            continue;
        }
        if !dirs.iter().any(|d| d.tool == tool) {
            attach_source(
                reports,
                &tool,
                &deploy.label(),
                "manifest",
                Ok(deploy.manifest.0.migrations.clone()),
            );
        }
        let last = succeeded.iter().find(|d| d.tool == tool);
        let bookkeeping: Vec<(String, String)> = reports
            .iter()
            .filter(|r| !r.table.is_empty())
            .map(|r| (r.schema.clone(), r.table.clone()))
            .collect();
        let (leftovers, applied_since) = if deploy.failed() {
            let leftovers = match last {
                None => Err(format!(
                    "No successful {tool} deploy of this database has been reported yet, so there is no snapshot to compare the catalog with."
                )),
                Some(l) => match (&l.relation_oids, &l.snapshot_error) {
                    (Some(oids), _) => deploys::leftovers(conn, oids, &bookkeeping)
                        .await
                        .map_err(|e| format!("The catalog could not be read: {}", readable(&e))),
                    (None, e) => Err(format!(
                        "The last successful deploy (#{}) has no snapshot: {}",
                        l.id,
                        e.as_deref().unwrap_or("the database could not be read")
                    )),
                },
            };
            let before: std::collections::HashSet<&str> = last
                .map(|l| {
                    l.manifest
                        .0
                        .migrations
                        .iter()
                        .map(|m| m.key.as_str())
                        .collect()
                })
                .unwrap_or_default();
            let since: Vec<String> = reports
                .iter()
                .filter(|r| r.tool.key() == tool)
                .flat_map(recorded)
                .map(|r| r.key)
                .filter(|k| last.is_some() && !before.contains(k.as_str()))
                .collect();
            (Some(leftovers), since)
        } else {
            (None, vec![])
        };
        let status = deploys::DeployStatus {
            last_success: last.map(|l| (l.id, l.reference().to_string(), l.reported_at)),
            newest: deploy,
            leftovers,
            applied_since,
        };
        for r in reports.iter_mut().filter(|r| r.tool.key() == tool) {
            r.deploy = Some(status.clone());
        }
    }
    reports.sort_by_key(|r| !r.is_red());
}

/// The database names of a target: the URL's first, then `databases`, then any
/// named only by a migrations directory.
pub fn database_names(target: &Target) -> Vec<String> {
    let url_db = PgConnectOptions::from_str(target.config.url.expose_secret())
        .ok()
        .map(|o| {
            o.get_database()
                .map(str::to_string)
                .unwrap_or_else(|| o.get_username().to_string())
        })
        .unwrap_or_else(|| "postgres".into());
    let mut names = vec![url_db];
    for d in target.config.databases.iter().chain(
        target
            .config
            .migrations
            .iter()
            .filter_map(|m| m.database.as_ref()),
    ) {
        if !names.contains(d) {
            names.push(d.clone());
        }
    }
    names
}

/// How long one database's whole inspection may take.
pub fn time_limit(config: &Config) -> Duration {
    config.connect_timeout + config.statement_timeout * 2
}

/// A direct connection to the database `name` of a target, with the target's
/// statement timeout; the error is the server's sentence.
pub(crate) async fn connect(
    target: &Target,
    config: &Config,
    name: &str,
) -> Result<PgConnection, String> {
    let opts = PgConnectOptions::from_str(target.config.url.expose_secret())
        .map_err(|e| format!("invalid connection URL: {e}"))?
        .database(name)
        .application_name("dbops")
        .options([(
            "statement_timeout",
            format!("{}s", config.statement_timeout.as_secs()),
        )])
        .disable_statement_logging();
    bounded(config.connect_timeout, PgConnection::connect_with(&opts))
        .await
        .map_err(|e| {
            e.strip_prefix("error returned from database: ")
                .unwrap_or(&e)
                .to_string()
        })
}

async fn inspect_one(
    target: &Target,
    config: &Config,
    console: &PgPool,
    name: &str,
    is_url_db: bool,
    limit: Duration,
) -> DatabaseReport {
    let dirs: Vec<MigrationsDir> = target
        .config
        .migrations
        .iter()
        .filter(|m| match &m.database {
            None => is_url_db,
            Some(d) => d == name,
        })
        .cloned()
        .collect();
    let direct = || connect(target, config, name);
    let mut notes = vec![];
    let reported = match deploys::newest(console, target.name(), name).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "reading the reported deploys failed");
            notes.push(format!(
                "The deploys pipelines reported could not be read from dbops' database: {}",
                readable(&e)
            ));
            (vec![], vec![])
        }
    };
    let work = async {
        if is_url_db {
            let pool = target.pg().await?;
            let mut conn = match pool.acquire().await {
                Ok(c) => c,
                // The pool retries a refused connection until its timeout and then
                // only says it timed out; one direct attempt tells the real reason.
                Err(e) => {
                    return Err(match direct().await {
                        Err(reason) => reason,
                        Ok(c) => {
                            let _ = c.close().await;
                            e.to_string()
                        }
                    });
                }
            };
            let mut reports = inspect_database(&mut conn, &dirs)
                .await
                .map_err(|e| readable(&e))?;
            attach_deploys(&mut conn, &mut reports, &dirs, reported.0, reported.1).await;
            Ok(reports)
        } else {
            let mut conn = direct().await?;
            let out = match inspect_database(&mut conn, &dirs).await {
                Ok(mut reports) => {
                    attach_deploys(&mut conn, &mut reports, &dirs, reported.0, reported.1).await;
                    Ok(reports)
                }
                Err(e) => Err(readable(&e)),
            };
            let _ = conn.close().await;
            out
        }
    };
    let outcome = bounded(limit, work)
        .await
        .map_err(|e| describe_pg_error(&target.scrub(&e)));
    DatabaseReport {
        name: name.to_string(),
        outcome,
        notes,
    }
}

/// Inspects every configured database of a PostgreSQL target, all at once, each
/// bounded by `limit`.
#[tracing::instrument(skip_all, fields(target = %target.name()))]
pub async fn inspect_target(
    target: &Target,
    config: &Config,
    console: &PgPool,
    limit: Duration,
) -> TargetReport {
    let names = database_names(target);
    let jobs = names
        .iter()
        .enumerate()
        .map(|(i, n)| inspect_one(target, config, console, n, i == 0, limit));
    TargetReport {
        databases: futures::future::join_all(jobs).await,
    }
}

/// The overview's cell for one target.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// `tool current-version` per tool found (with the database when there are several).
    pub tools: Vec<String>,
    /// Tools found beyond those in `tools` (the cell shows a few).
    pub more: usize,
    /// What is wrong, in short words; empty = nothing.
    pub flags: Vec<String>,
    /// Nothing answered (within the time limit).
    pub error: Option<String>,
}

impl Summary {
    pub fn is_red(&self) -> bool {
        !self.flags.is_empty()
    }
}

/// Tools named in the overview's cell at most (those with problems come first).
const SUMMARY_TOOLS: usize = 3;

/// Units (Django apps, Alembic heads) named in a tool's line at most.
const SUMMARY_UNITS: usize = 3;

/// Summarises a report for the overview.
pub fn summarise(report: &TargetReport) -> Summary {
    let mut s = Summary::default();
    let several = report.databases.len() > 1;
    for db in &report.databases {
        if !db.notes.is_empty() {
            s.flags.push(if several {
                format!("{}: deploys unreadable", db.name)
            } else {
                "deploys unreadable".into()
            });
        }
        match &db.outcome {
            Err(e) => {
                if several {
                    s.flags.push(format!("{}: unreachable", db.name));
                } else {
                    s.error = Some(e.clone());
                }
            }
            Ok(tools) => {
                for t in tools {
                    let mut line = t.tool.label().to_string();
                    if !t.units.is_empty() {
                        // Units with something pending first, a few by name.
                        let mut units: Vec<&Unit> = t.units.iter().collect();
                        units.sort_by_key(|u| u.pending == 0);
                        let shown: Vec<String> = units
                            .iter()
                            .take(SUMMARY_UNITS)
                            .map(|u| u.describe())
                            .collect();
                        line.push(' ');
                        line.push_str(&shown.join(", "));
                        if units.len() > SUMMARY_UNITS {
                            line.push_str(&format!(" (+{} more)", units.len() - SUMMARY_UNITS));
                        }
                    } else if let Some(c) = &t.current {
                        line.push(' ');
                        line.push_str(c);
                    } else if t.table.is_empty() {
                        line.push_str(" (not run yet)");
                    }
                    if several {
                        line = format!("{}: {line}", db.name);
                    }
                    if s.tools.len() < SUMMARY_TOOLS {
                        s.tools.push(line);
                    } else {
                        s.more += 1;
                    }
                    for f in t.flags() {
                        // Named with the tool (and the unit, where the flag has one).
                        let f = if t
                            .units
                            .iter()
                            .any(|u| f.starts_with(&format!("{}: ", u.name)))
                        {
                            format!("{} {f}", t.tool.label())
                        } else {
                            format!("{}: {f}", t.tool.label())
                        };
                        let f = if several {
                            format!("{}: {f}", db.name)
                        } else {
                            f
                        };
                        if !s.flags.contains(&f) {
                            s.flags.push(f);
                        }
                    }
                }
            }
        }
    }
    s
}

/// dbops' own schema: the tools found in the console database, with the sqlx
/// table of dbops' schema compared with the migrations embedded in this binary.
pub async fn inspect_console(db: &PgPool, limit: Duration) -> Result<Vec<ToolReport>, String> {
    let work = async {
        let mut conn = db.acquire().await?;
        let schema: String = sqlx::query_scalar("SELECT current_schema()::text")
            .fetch_one(&mut *conn)
            .await?;
        let mut reports = inspect_database(&mut conn, &[]).await?;
        let embedded: Vec<DiskMigration> = CONSOLE_MIGRATOR
            .iter()
            .filter(|m| !m.migration_type.is_down_migration())
            .map(|m| DiskMigration {
                key: m.version.to_string(),
                name: m.description.to_string(),
                file: format!("{}_{}.sql", m.version, m.description.replace(' ', "_")),
                checksum: hex::encode(&m.checksum),
                also_accepted: vec![],
                unit: String::new(),
                parents: vec![],
            })
            .collect();
        let mut matched = false;
        for r in reports
            .iter_mut()
            .filter(|r| r.tool == Tool::Sqlx && r.schema == schema)
        {
            attach_drift(r, "embedded in this dbops binary", Ok(embedded.clone()));
            r.notes.push(
                "dbops' own schema migrations (applied by `dbops migrate` and at start-up).".into(),
            );
            matched = true;
        }
        if !matched {
            let mut r = ToolReport::new(Tool::Sqlx, &schema, "");
            attach_drift(&mut r, "embedded in this dbops binary", Ok(embedded));
            reports.push(r);
        }
        for r in reports
            .iter_mut()
            .filter(|r| r.tool == Tool::Sqlx && r.schema == "underway")
        {
            r.notes.push(
                "The job queue's own migrations (underway), applied at start-up; they are embedded in the underway library, so no comparison."
                    .into(),
            );
        }
        Ok::<_, sqlx::Error>(reports)
    };
    bounded(limit, work).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(version: &str, state: RowState) -> Applied {
        Applied {
            version: version.into(),
            name: String::new(),
            applied_at: None,
            duration_ms: None,
            checksum: None,
            state,
            note: String::new(),
            logs: None,
        }
    }

    #[test]
    fn goose_current_version_skips_versions_migrated_down() {
        let mut r = ToolReport::new(Tool::Goose, "public", "goose_db_version");
        r.applied = vec![
            row("1", RowState::Applied),
            row("2", RowState::Applied),
            row("3", RowState::Applied),
            row("3", RowState::Down),
        ];
        current_and_problems(&mut r);
        assert_eq!(r.current.as_deref(), Some("2"));
        assert!(r.problems.is_empty());
    }

    #[test]
    fn failed_and_dirty_rows_are_problems_and_flags() {
        let mut r = ToolReport::new(Tool::GolangMigrate, "public", "schema_migrations");
        r.applied = vec![row("7", RowState::Dirty)];
        current_and_problems(&mut r);
        assert_eq!(r.problems.len(), 1);
        assert_eq!(r.flags(), ["dirty"]);
        let mut r = ToolReport::new(Tool::Sqlx, "public", "_sqlx_migrations");
        r.applied = vec![row("1", RowState::Applied), row("2", RowState::Failed)];
        current_and_problems(&mut r);
        assert_eq!(r.current.as_deref(), Some("1"));
        assert!(r.problems[0].contains("success = false"));
        assert_eq!(r.flags(), ["failed"]);
    }

    #[test]
    fn the_console_migrations_are_embedded() {
        assert!(CONSOLE_MIGRATOR.iter().count() >= 5);
    }

    #[test]
    fn config_takes_databases_and_migrations_directories() {
        let parse = |text: &str| {
            Config::from_toml(
                text,
                std::path::Path::new("t.toml"),
                std::path::Path::new("/etc/dbops"),
                |k| (k == "U").then(|| "postgres://app@db/app".to_string()),
            )
        };
        let c = parse(
            r#"
            [[postgres]]
            name = "app"
            url_env = "U"
            policy = "dev"
            databases = ["billing"]
            [[postgres.migrations]]
            tool = "sqlx"
            directory = "migrations"
            [[postgres.migrations]]
            database = "billing"
            tool = "Prisma"
            directory = "/srv/billing/prisma/migrations"
            "#,
        )
        .unwrap();
        let t = c.target("app").unwrap();
        assert_eq!(t.databases, ["billing"]);
        assert_eq!(t.migrations.len(), 2);
        assert_eq!(
            t.migrations[0].directory,
            std::path::Path::new("/etc/dbops/migrations")
        );
        assert_eq!(t.migrations[1].tool, "prisma");
        let err = parse(
            "[[postgres]]\nname = \"app\"\nurl_env = \"U\"\npolicy = \"dev\"\n[[postgres.migrations]]\ntool = \"cobol\"\ndirectory = \"x\"",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("postgres[0].migrations[0].tool"), "{err}");
        assert!(err.contains("sqlx, prisma, flyway, drizzle"), "{err}");
        // Old configs still parse.
        assert!(parse("[[postgres]]\nname = \"app\"\nurl_env = \"U\"\npolicy = \"dev\"").is_ok());
    }
}
