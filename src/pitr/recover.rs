//! Recovery to a chosen point: a scratch PostgreSQL on dbops' own host,
//! recovered from the newest good base backup before the point and the archived
//! WAL, kept until a person is done with it (or `recovery_limit` passes).
//!
//! - [`request`] checks the point against the recoverable window (the oldest
//!   good base backup's end to the newest stored WAL, no gap in between) and
//!   writes the `recoveries` row, its job (`pitr.recover`) and operation; a
//!   refusal says the window and is logged.
//! - The job unpacks the base backup (checksum re-checked) under
//!   `<backups directory>/.pitr/`, writes `recovery.signal`, the recovery target
//!   and `recovery_target_action = 'promote'`, starts the server from the
//!   machine's binaries of the same major version and serves it WAL (see
//!   [`super::scratch`]) with live progress, until it is promoted.
//!   Since PostgreSQL 13 recovery stops with "recovery ended before configured
//!   recovery target was reached" when no WAL record follows a target time (a
//!   quiet server): the state at that time is then the end of the archived WAL,
//!   so the recovery is restarted without a target and says so.
//! - Then: [`tables`] (browse), [`copy`] (a database into a NEW database on any
//!   PostgreSQL target: `pg_dump | pg_restore`), [`remove`] (Done). [`sweep`]
//!   removes this host's expired, abandoned or orphaned scratch servers.
//!
//! Over 600 lines: the request (window checks), the job (unpack, start, wait),
//! browsing, the copy job and the sweeper of one recovery's life; the copy job
//! is the first part to move out when `pitr.replace` joins it.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::{Value, json};
use sqlx::{Connection, postgres::PgConnectOptions};

use super::{Lsn, WalFile, base_backups, restore_points, scratch};
use crate::{
    audit::{self, AuditCtx, Entry},
    config::TargetKind,
    devcluster::PgCluster,
    jobs::{self, Job, JobCtx, JobKind, Limit, NewJob, Progress},
    pg_tools::{self, DumpOptions, Format, PgConn, RestoreTo},
    state::{AppState, quote_ident},
    targets::Target,
};

pub const JOB_KIND: &str = "pitr.recover";
pub const COPY_KIND: &str = "pitr.copy";

/// Where to recover to.
#[derive(Debug, Clone, PartialEq)]
pub enum Point {
    /// The state at this second (every transaction committed at or before it).
    Time(DateTime<Utc>),
    /// A named restore point of the target.
    RestorePoint(String),
    /// Just before operation #N: its restore point, or its start time.
    BeforeOperation(i64),
}

impl Point {
    /// Reads what a person typed: `restore-point:NAME`, `op:N` / `#N`, or a time
    /// (`2026-12-03 14:05:09`, in `tz`; RFC 3339 with an offset as given).
    pub fn parse(text: &str, tz: &str) -> Result<Point, String> {
        let t = text.trim();
        if let Some(name) = t.strip_prefix("restore-point:") {
            return Ok(Point::RestorePoint(name.trim().to_string()));
        }
        if let Some(n) = t.strip_prefix("op:").or_else(|| t.strip_prefix('#')) {
            return n
                .trim()
                .parse()
                .map(Point::BeforeOperation)
                .map_err(|_| format!("`{t}` is not an operation number"));
        }
        parse_time(t, tz).map(Point::Time)
    }

    pub fn describe(&self, tz: &str) -> String {
        match self {
            Point::Time(t) => match crate::schedules::Zone::parse(tz) {
                Ok(crate::schedules::Zone::Utc) | Err(_) => {
                    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
                }
                Ok(z) => format!(
                    "{} {tz} ({})",
                    z.local(*t).format("%Y-%m-%d %H:%M:%S"),
                    t.format("%Y-%m-%d %H:%M:%S UTC")
                ),
            },
            Point::RestorePoint(n) => format!("restore point {n}"),
            Point::BeforeOperation(n) => format!("just before operation #{n}"),
        }
    }
}

/// A time to the second, in `tz` unless it carries an offset.
pub fn parse_time(t: &str, tz: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Ok(d.with_timezone(&Utc));
    }
    let t = t.trim_end_matches(" UTC").trim_end_matches('Z');
    let naive = [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ]
    .iter()
    .find_map(|f| chrono::NaiveDateTime::parse_from_str(t, f).ok())
    .ok_or_else(|| format!("`{t}` is not a time: write it as 2026-12-03 14:05:09"))?;
    use chrono::TimeZone;
    let zone = crate::schedules::Zone::parse(tz)?;
    let local = match zone {
        crate::schedules::Zone::Utc => Some(naive.and_utc()),
        crate::schedules::Zone::Fixed(o) => o
            .from_local_datetime(&naive)
            .earliest()
            .map(|d| d.with_timezone(&Utc)),
        crate::schedules::Zone::Named(z) => z
            .from_local_datetime(&naive)
            .earliest()
            .map(|d| d.with_timezone(&Utc)),
    };
    local.ok_or_else(|| format!("{t} does not exist in {tz} (a daylight-saving gap)"))
}

/// One row of `recoveries`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Recovery {
    pub id: i64,
    pub target: String,
    pub job_id: Option<i64>,
    pub operation_id: Option<i64>,
    pub status: String,
    pub point_kind: String,
    pub target_time: Option<DateTime<Utc>>,
    pub restore_point: Option<String>,
    pub before_operation: Option<i64>,
    pub point_text: String,
    pub base_backup_id: Option<i64>,
    pub system_identifier: Option<String>,
    pub host: Option<String>,
    pub scratch_dir: Option<String>,
    pub socket_dir: Option<String>,
    pub superuser: Option<String>,
    pub port: Option<i32>,
    pub target_lsn: Option<i64>,
    pub replayed_lsn: Option<i64>,
    pub outcome: Option<String>,
    pub error: Option<String>,
    pub requested_by_name: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub ready_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub remove_requested_at: Option<DateTime<Utc>>,
    pub removed_at: Option<DateTime<Utc>>,
    pub removed_by_name: Option<String>,
}

const COLUMNS: &str = "id, target, job_id, operation_id, status, point_kind, target_time, restore_point, \
     before_operation, point_text, base_backup_id, system_identifier, host, scratch_dir, socket_dir, superuser, \
     port, target_lsn, replayed_lsn, outcome, error, requested_by_name, created_at, started_at, ready_at, \
     expires_at, remove_requested_at, removed_at, removed_by_name";

impl Recovery {
    pub fn is_open(&self) -> bool {
        matches!(self.status.as_str(), "queued" | "recovering" | "ready")
    }
    pub fn replayed(&self) -> String {
        self.replayed_lsn
            .map(|l| Lsn::from_i64(l).to_string())
            .unwrap_or_default()
    }
    pub fn target_position(&self) -> String {
        self.target_lsn
            .map(|l| Lsn::from_i64(l).to_string())
            .unwrap_or_default()
    }
    /// Replayed of the way to the target position, in percent, when both are known.
    pub fn percent(&self) -> Option<i64> {
        let (r, t) = (self.replayed_lsn?, self.target_lsn?);
        (t > 0).then(|| ((r.min(t) as f64 / t as f64) * 100.0) as i64)
    }
    /// A connection to database `db` of the scratch server (its Unix socket).
    pub fn connect_options(&self, db: &str) -> Option<PgConnectOptions> {
        Some(
            PgConnectOptions::new()
                .socket(self.socket_dir.as_deref()?)
                .port(u16::try_from(self.port?).ok()?)
                .username(self.superuser.as_deref()?)
                .database(db)
                .application_name("dbops"),
        )
    }
    /// The same for the `pg_*` tools.
    pub fn pg_conn(&self, db: &str) -> Option<PgConn> {
        let url = format!(
            "postgres://{}@localhost:{}/{}?host={}",
            urlencode(self.superuser.as_deref()?),
            self.port?,
            urlencode(db),
            urlencode(self.socket_dir.as_deref()?)
        );
        PgConn::from_url(&url).ok()
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

pub async fn find(db: &sqlx::PgPool, id: i64) -> Result<Option<Recovery>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM recoveries WHERE id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await
}

pub async fn list(
    db: &sqlx::PgPool,
    target: &str,
    limit: i64,
) -> Result<Vec<Recovery>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM recoveries WHERE target = $1 ORDER BY id DESC LIMIT $2"
    ))
    .bind(target)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The recoverable window of a target: from the oldest good base backup's end
/// to the newest stored WAL, with the gaps no recovery can cross.
#[derive(Debug, Clone, Default)]
pub struct Window {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub gaps: Vec<super::segments::Gap>,
}

impl Window {
    pub fn describe(&self) -> String {
        match (self.from, self.to) {
            (Some(f), Some(t)) if f <= t => format!(
                "from {} to {} UTC",
                f.format("%Y-%m-%d %H:%M:%S"),
                t.format("%Y-%m-%d %H:%M:%S")
            ),
            (None, _) => "empty: there is no good base backup yet".into(),
            _ => "empty: no WAL is stored after the oldest base backup yet".into(),
        }
    }
}

pub async fn window(state: &AppState, target: &str) -> Result<Window, String> {
    let from: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT min(finished_at) FROM base_backups WHERE target = $1 AND status = 'good'",
    )
    .bind(target)
    .fetch_one(&state.db)
    .await
    .map_err(|e| e.to_string())?;
    let to: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT stored_through_at FROM wal_streams WHERE target = $1")
            .bind(target)
            .fetch_optional(&state.db)
            .await
            .map_err(|e| e.to_string())?
            .flatten();
    let gaps = super::segments::gaps(&state.db, target)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Window { from, to, gaps })
}

/// A point made concrete: what goes in the server's configuration, and the
/// time (or position) that picks the base backup.
struct Resolved {
    kind: &'static str,
    time: Option<DateTime<Utc>>,
    name: Option<String>,
    lsn: Option<Lsn>,
    sysid: Option<String>,
    operation: Option<i64>,
    inclusive: bool,
}

async fn resolve(state: &AppState, target: &str, point: &Point) -> Result<Resolved, String> {
    match point {
        Point::Time(t) => Ok(Resolved {
            kind: "time",
            time: Some(*t),
            name: None,
            lsn: None,
            sysid: None,
            operation: None,
            inclusive: true,
        }),
        Point::RestorePoint(name) => {
            let rp = restore_points::find(&state.db, target, name)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("{target} has no restore point called {name}"))?;
            Ok(Resolved {
                kind: "restore_point",
                time: Some(rp.created_at),
                name: Some(rp.name.clone()),
                lsn: Some(rp.position()),
                sysid: rp.system_identifier.clone(),
                operation: rp.operation_id,
                inclusive: true,
            })
        }
        Point::BeforeOperation(op) => {
            if let Some(rp) = restore_points::before_operation(&state.db, *op)
                .await
                .map_err(|e| e.to_string())?
                .filter(|rp| rp.target == target)
            {
                return Ok(Resolved {
                    kind: "operation",
                    time: Some(rp.created_at),
                    name: Some(rp.name.clone()),
                    lsn: Some(rp.position()),
                    sysid: rp.system_identifier.clone(),
                    operation: Some(*op),
                    inclusive: true,
                });
            }
            let started: Option<(DateTime<Utc>, Option<String>)> =
                sqlx::query_as("SELECT created_at, target FROM operations WHERE id = $1")
                    .bind(op)
                    .fetch_optional(&state.db)
                    .await
                    .map_err(|e| e.to_string())?;
            match started {
                Some((at, Some(t))) if t == target => Ok(Resolved {
                    kind: "operation",
                    time: Some(at),
                    name: None,
                    lsn: None,
                    sysid: None,
                    operation: Some(*op),
                    inclusive: false,
                }),
                Some(_) => Err(format!("operation #{op} was not on {target}")),
                None => Err(format!("there is no operation #{op}")),
            }
        }
    }
}

/// Checks the point and queues the recovery. A refusal is logged (failed
/// `pitr.recover`) and says the recoverable window. Returns the recovery's and
/// its job's ids.
pub async fn request(
    state: &AppState,
    ctx: &AuditCtx,
    target: &str,
    point: &Point,
    run_here: bool,
) -> Result<(i64, i64), String> {
    let tz = state
        .targets
        .get(target)
        .map(|t| t.config.backup.timezone.clone())
        .unwrap_or_else(|| "UTC".into());
    let point_text = point.describe(&tz);
    let refuse = |msg: String| async {
        let _ = audit::record(
            &state.db,
            ctx,
            Entry::new(JOB_KIND)
                .target(target)
                .params(json!({ "point": point_text }))
                .failed(msg.clone()),
        )
        .await;
        Err::<(i64, i64), String>(msg)
    };
    let Some(t) = state.targets.get(target) else {
        return refuse(format!("there is no target called {target}")).await;
    };
    if t.kind() != TargetKind::Postgres || t.config.archive.is_none() {
        return refuse(format!(
            "{target} has no WAL archive ([postgres.archive]): it cannot be recovered to a point in time"
        ))
        .await;
    }
    let resolved = match resolve(state, target, point).await {
        Ok(r) => r,
        Err(e) => return refuse(e).await,
    };
    let w = match window(state, target).await {
        Ok(w) => w,
        Err(e) => return refuse(e).await,
    };
    let when = resolved.time.expect("every point has a time");
    let inside = matches!((w.from, w.to), (Some(f), Some(t)) if f <= when && when <= t);
    if !inside {
        return refuse(format!(
            "{point_text} is outside the recoverable window of {target}, which is {}",
            w.describe()
        ))
        .await;
    }
    // The newest good base backup that ended before the point.
    let bb: Option<base_backups::BaseBackup> = base_backups::good(&state.db, target)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|b| b.finished_at.is_some_and(|f| f <= when))
        .rfind(|b| match (resolved.lsn, b.end(), &resolved.sysid) {
            (Some(l), Some(e), sysid) => {
                e <= l
                    && sysid
                        .as_ref()
                        .is_none_or(|s| b.system_identifier.as_ref() == Some(s))
            }
            _ => true,
        });
    let Some(bb) = bb else {
        return refuse(format!(
            "no good base backup of {target} ended before {point_text}; the recoverable window is {}",
            w.describe()
        ))
        .await;
    };
    let sysid = bb.system_identifier.clone().unwrap_or_default();
    if let Some(g) = w.gaps.iter().find(|g| {
        g.system_identifier == sysid
            && g.from() >= bb.start().unwrap_or_default()
            && g.after <= when
    }) {
        return refuse(format!(
            "WAL from {} to {} (stored between {} and {}) is missing from the archive, so {point_text} cannot be reached from base backup #{}; choose a point before the gap or after a newer base backup",
            g.from(), g.to(), g.after.format("%Y-%m-%d %H:%M:%S"), g.before.format("%Y-%m-%d %H:%M:%S"), bb.id
        ))
        .await;
    }
    let archive = t.config.archive.as_ref().expect("checked");
    let params = json!({
        "point": point_text, "point_kind": resolved.kind, "time": resolved.time,
        "restore_point": resolved.name, "before_operation": resolved.operation,
        "base_backup_id": bb.id,
    });
    let mut tx = state.db.begin().await.map_err(|e| e.to_string())?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO recoveries (target, status, point_kind, target_time, restore_point, before_operation,
                                 point_text, base_backup_id, system_identifier, target_lsn, requested_by_name, host)
         VALUES ($1, 'queued', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id",
    )
    .bind(target)
    .bind(resolved.kind)
    .bind(if resolved.name.is_some() { None } else { resolved.time })
    .bind(&resolved.name)
    .bind(resolved.operation)
    .bind(&point_text)
    .bind(bb.id)
    .bind(&sysid)
    .bind(resolved.lsn.map(Lsn::as_i64))
    .bind(&ctx.actor.name)
    .bind(host_name())
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| e.to_string())?;
    let mut params = params;
    params["recovery_id"] = json!(id);
    params["inclusive"] = json!(resolved.inclusive);
    params["limit_seconds"] = json!(archive.recovery_limit.as_secs());
    let (job, op) = jobs::submit_in(
        &mut tx,
        state,
        ctx,
        NewJob {
            kind: JOB_KIND,
            target,
            params,
            operation: None,
            approval: None,
            run_here,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    sqlx::query("UPDATE recoveries SET job_id = $2, operation_id = $3 WHERE id = $1")
        .bind(id)
        .bind(job)
        .bind(op)
        .execute(&mut *tx)
        .await
        .map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    Ok((id, job))
}

/// The machine this dbops runs on (a scratch server is reachable only there).
pub fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Recoveries as jobs: at most two at once per target (each is a whole server).
pub struct RecoverJob;

impl JobKind for RecoverJob {
    fn kind(&self) -> &'static str {
        JOB_KIND
    }
    fn title(&self) -> &'static str {
        "Point-in-time recovery"
    }
    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            let id = ctx.job.params["recovery_id"]
                .as_i64()
                .ok_or("the job names no recovery")?;
            let r = run(ctx, id).await;
            if let Err(e) = &r {
                fail(&ctx.state, id, e).await;
            }
            r
        })
    }
    fn subject(&self, job: &Job) -> Option<(String, String)> {
        let id = job.params["recovery_id"].as_i64()?;
        Some((
            format!("recovery #{id}"),
            format!("/targets/{}/pitr/recoveries/{id}", job.target),
        ))
    }
    fn result_url(&self, job: &Job) -> Option<String> {
        self.subject(job).map(|s| s.1)
    }
    fn limit(&self, _state: &AppState) -> Limit {
        Limit {
            per_target: Some(2),
            overall: Some(4),
        }
    }
}

/// Marks a recovery failed and removes what it left (its server, its files).
async fn fail(state: &AppState, id: i64, error: &str) {
    if let Ok(Some(r)) = find(&state.db, id).await {
        stop_and_remove(&r).await;
    }
    let _ = sqlx::query(
        "UPDATE recoveries SET status = 'failed', error = $2, removed_at = now() WHERE id = $1 AND status IN ('queued', 'recovering')",
    )
    .bind(id)
    .bind(error)
    .execute(&state.db)
    .await;
}

fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

async fn run(ctx: &JobCtx, id: i64) -> Result<Value, String> {
    let state = &ctx.state;
    let progress = &ctx.progress;
    let r = sqlx::query_as::<_, Recovery>(&format!(
        "UPDATE recoveries SET status = 'recovering', started_at = now(), host = $2
         WHERE id = $1 AND status = 'queued' RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(host_name())
    .fetch_optional(&state.db)
    .await
    .map_err(|e| e.to_string())?
    .ok_or_else(|| format!("recovery #{id} is not waiting to run"))?;
    let bb = base_backups::find(&state.db, r.base_backup_id.unwrap_or(0))
        .await
        .map_err(|e| e.to_string())?
        .filter(|b| b.status == "good")
        .ok_or("its base backup is no longer good")?;
    let target = ctx.target.clone();
    let sysid = bb.system_identifier.clone().unwrap_or_default();
    let major: u32 = bb
        .server_version
        .as_deref()
        .and_then(|v| v.split(['.', ' ']).next())
        .and_then(|m| m.parse().ok())
        .ok_or("the base backup does not say its server's version")?;
    let bin_dir = crate::devcluster::pg_bin_dir_for(major).ok_or_else(|| {
        format!(
            "the PostgreSQL {major} server binaries are not installed on the dbops machine: install postgresql-{major} (recovery runs a scratch server of the target's major version)"
        )
    })?;
    // Who the recovered cluster's superuser is (the role that ran initdb).
    let superuser: String = match target.pg().await {
        Ok(pool) => sqlx::query_scalar("SELECT rolname::text FROM pg_roles WHERE oid = 10")
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|_| "postgres".into()),
        Err(_) => "postgres".into(),
    };

    progress.set_phase("unpacking the base backup");
    let dir = scratch::ScratchDir::at(scratch::root(state).join(format!("recovery-{id}")))?;
    let data = dir.path().join("pgdata");
    std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
    let storage = state.storage_for(&bb.storage)?;
    let (_, sha) = scratch::unpack(
        storage.as_ref(),
        bb.storage_key.as_deref().unwrap_or_default(),
        &data,
        progress,
        &ctx.cancel,
    )
    .await?;
    if Some(&sha) != bb.sha256.as_ref() {
        return Err(format!(
            "base backup #{} in storage does not match its recorded checksum: refusing to use it",
            bb.id
        ));
    }
    let socket_dir = std::env::temp_dir().join(format!(
        "dbops-rec-{id}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&socket_dir).map_err(|e| e.to_string())?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| e.to_string())?;
    }
    let port = PgCluster::free_port().map_err(|e| e.to_string())?;
    sqlx::query("UPDATE recoveries SET scratch_dir = $2, socket_dir = $3, port = $4, superuser = $5 WHERE id = $1")
        .bind(id)
        .bind(dir.path().to_string_lossy().as_ref())
        .bind(socket_dir.to_string_lossy().as_ref())
        .bind(i32::from(port))
        .bind(&superuser)
        .execute(&state.db)
        .await
        .map_err(|e| e.to_string())?;

    let wal = scratch::WalServer {
        dir: dir.path().join("wal"),
        target: r.target.clone(),
        system_identifier: sysid.clone(),
    };
    let script = wal.prepare()?;
    // The target's own settings are not wanted (paths, libraries, archiving):
    // the scratch server gets its own, and recovery's.
    for f in ["postgresql.auto.conf", "standby.signal"] {
        let p = data.join(f);
        if p.exists() {
            let _ = std::fs::rename(&p, data.join(format!("{f}.from-target")));
        }
    }
    std::fs::write(data.join("postgresql.auto.conf"), "").map_err(|e| e.to_string())?;
    std::fs::write(data.join("recovery.signal"), "").map_err(|e| e.to_string())?;
    std::fs::write(
        data.join("pg_hba.conf"),
        "# dbops recovery scratch server: dbops connects on its private socket;\n\
         # on 127.0.0.1 only with a recovered role's password.\n\
         local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
    )
    .map_err(|e| e.to_string())?;
    let _ = std::fs::write(data.join("pg_ident.conf"), "");
    let inclusive = ctx.job.params["inclusive"].as_bool().unwrap_or(true);
    let target_line = match (&r.restore_point, r.target_time) {
        (Some(name), _) => format!("recovery_target_name = {}\n", conf_quote(name)),
        (None, Some(t)) => format!(
            "recovery_target_time = '{}'\nrecovery_target_inclusive = {}\n",
            t.format("%Y-%m-%d %H:%M:%S%.6f+00"),
            if inclusive { "on" } else { "off" }
        ),
        (None, None) => String::new(),
    };
    let base_conf = format!(
        "# Written by dbops for recovery #{id} of {}: a scratch server, removed when done.\n\
         listen_addresses = '127.0.0.1'\n\
         unix_socket_directories = {}\n\
         unix_socket_permissions = 0700\n\
         hba_file = {}\n\
         ident_file = {}\n\
         hot_standby = off\n\
         archive_mode = off\n\
         fsync = off\n\
         logging_collector = off\n\
         max_connections = 20\n\
         restore_command = {}\n\
         recovery_target_action = 'promote'\n",
        r.target,
        conf_quote(&socket_dir.to_string_lossy()),
        conf_quote(&data.join("pg_hba.conf").to_string_lossy()),
        conf_quote(&data.join("pg_ident.conf").to_string_lossy()),
        conf_quote(&format!("{} %f %p", script.display())),
    );
    std::fs::write(
        data.join("postgresql.conf"),
        format!("{base_conf}{target_line}"),
    )
    .map_err(|e| e.to_string())?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700));
    }
    crate::devcluster::give_to_server_user(dir.path()).map_err(|e| format!("{e:#}"))?;
    crate::devcluster::give_to_server_user(&socket_dir).map_err(|e| format!("{e:#}"))?;

    progress.set_phase("recovering");
    let cluster =
        PgCluster::adopt(dir.path(), &data, &bin_dir, port).map_err(|e| format!("{e:#}"))?;
    let served = Arc::new(Mutex::new(scratch::Served::default()));
    let stop_serving = ctx.cancel.child_token();
    let server = {
        let st = state.clone();
        let served = served.clone();
        let stop = stop_serving.clone();
        tokio::spawn(async move { wal.serve(&st, &served, &stop).await })
    };
    let outcome = recover_loop(
        ctx,
        &r,
        &cluster,
        &data,
        &base_conf,
        &served,
        bb.start().unwrap_or_default(),
    )
    .await;
    stop_serving.cancel();
    let _ = server.await;
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            let _ = cluster.stop_now().await;
            let _ = std::fs::remove_dir_all(&socket_dir);
            return Err(e);
        }
    };
    let limit = ctx.job.params["limit_seconds"].as_i64().unwrap_or(4 * 3600);
    sqlx::query(
        "UPDATE recoveries SET status = 'ready', ready_at = now(), expires_at = now() + make_interval(secs => $2),
                outcome = $3, replayed_lsn = coalesce($4, replayed_lsn)
         WHERE id = $1",
    )
    .bind(id)
    .bind(limit as f64)
    .bind(&outcome.0)
    .bind(outcome.1.map(Lsn::as_i64))
    .execute(&state.db)
    .await
    .map_err(|e| e.to_string())?;
    dir.keep();
    cluster.detach();
    Ok(json!({
        "recovery_id": id, "base_backup_id": bb.id, "outcome": outcome.0,
        "replayed_lsn": outcome.1.map(|l| l.to_string()),
        "url": format!("/targets/{}/pitr/recoveries/{id}", r.target),
    }))
}

/// Starts the server and waits until it is promoted; restarts it once without
/// a target when a target time lies past the last archived record. Returns the
/// outcome in words and the position recovery ended at.
async fn recover_loop(
    ctx: &JobCtx,
    r: &Recovery,
    cluster: &PgCluster,
    data: &Path,
    base_conf: &str,
    served: &Arc<Mutex<scratch::Served>>,
    start: Lsn,
) -> Result<(String, Option<Lsn>), String> {
    let mut to_end_note = None;
    cluster.launch().await.map_err(|e| format!("{e:#}"))?;
    let log = cluster.log_path().to_path_buf();
    let seg_size = 16 * 1024 * 1024u64;
    let target_lsn = r.target_lsn.map(Lsn::from_i64);
    if let Some(t) = target_lsn {
        ctx.progress
            .set_items_total(t.0.saturating_sub(start.0) / (1024 * 1024) + 1);
    }
    let mut last_saved = None;
    loop {
        tokio::select! {
            _ = ctx.cancel.cancelled() => return Err("stopped".into()),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let snapshot = served.lock().expect("not poisoned").clone();
        if let Some(f) = &snapshot.failure {
            return Err(format!("recovery could not fetch the WAL it needs: {f}"));
        }
        if let Some(name) = &snapshot.newest
            && let Some(WalFile::Segment { .. }) = WalFile::parse(name, seg_size)
        {
            let (_, end) = WalFile::parse(name, seg_size)
                .and_then(|w| w.range(seg_size))
                .expect("a segment");
            let replayed = target_lsn.map_or(end, |t| end.min(t));
            let mb = replayed.0.saturating_sub(start.0) / (1024 * 1024);
            let now = ctx.progress.items();
            if mb > now {
                ctx.progress.add_items(mb - now);
            }
            ctx.progress.set_phase(&format!("replaying {name}"));
            if last_saved != Some(replayed) {
                let _ = sqlx::query("UPDATE recoveries SET replayed_lsn = $2 WHERE id = $1")
                    .bind(r.id)
                    .bind(replayed.as_i64())
                    .execute(&ctx.state.db)
                    .await;
                last_saved = Some(replayed);
            }
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("database system is ready to accept connections") {
            let mut lines: Vec<String> = text
                .lines()
                .filter(|l| {
                    l.contains("recovery stopping")
                        || l.contains("last completed transaction")
                        || l.contains("redo done at")
                        || l.contains("selected new timeline")
                })
                .map(|l| {
                    l.split_once("LOG:")
                        .map_or(l, |(_, m)| m)
                        .trim()
                        .to_string()
                })
                .collect();
            if let Some(note) = &to_end_note {
                lines.insert(0, String::from(note));
            }
            let ended = text
                .lines()
                .find_map(|l| l.split("redo done at ").nth(1))
                .and_then(|r| r.split_whitespace().next())
                .and_then(Lsn::parse);
            return Ok((lines.join("; "), ended));
        }
        if !cluster.running().await.map_err(|e| format!("{e:#}"))? {
            let tail: String = text
                .lines()
                .rev()
                .take(8)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join(" / ");
            if text.contains("recovery ended before configured recovery target was reached")
                && to_end_note.is_none()
                && r.restore_point.is_none()
            {
                // No record after the target time was archived: nothing changed
                // between the last archived record and the target, so the end
                // of the archived WAL is the state at the target time.
                to_end_note = Some(format!(
                    "no change was archived after the last record before {}: recovered to the end of the archived WAL, which is the state at that time",
                    r.point_text
                ));
                std::fs::write(data.join("postgresql.conf"), base_conf)
                    .map_err(|e| e.to_string())?;
                crate::devcluster::give_to_server_user(&data.join("postgresql.conf"))
                    .map_err(|e| format!("{e:#}"))?;
                cluster.launch().await.map_err(|e| format!("{e:#}"))?;
                continue;
            }
            return Err(format!(
                "the scratch server stopped during recovery: {tail}"
            ));
        }
    }
}

/// Stops a recovery's scratch server and removes its files (this host only).
async fn stop_and_remove(r: &Recovery) {
    let (Some(dir), Some(port)) = (r.scratch_dir.as_deref(), r.port) else {
        return;
    };
    if r.host.as_deref() != Some(host_name().as_str()) {
        return;
    }
    let dir = PathBuf::from(dir);
    let data = dir.join("pgdata");
    if let Some(bin) = bin_dir_of(&data)
        && let Ok(c) = PgCluster::adopt(&dir, &data, &bin, port as u16)
    {
        let _ = c.stop_now().await;
        c.detach();
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(s) = &r.socket_dir {
        let _ = std::fs::remove_dir_all(s);
    }
}

/// The server binaries for a data directory (its `PG_VERSION`).
fn bin_dir_of(data: &Path) -> Option<PathBuf> {
    let v: u32 = std::fs::read_to_string(data.join("PG_VERSION"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    crate::devcluster::pg_bin_dir_for(v)
}

/// Done: the scratch server is stopped and its files removed (here, or by the
/// dbops on its host at its next sweep), logged as `pitr.recovery.remove`.
pub async fn remove(state: &AppState, ctx: &AuditCtx, id: i64, why: &str) -> Result<(), String> {
    let r = find(&state.db, id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("there is no recovery #{id}"))?;
    let entry = Entry::new("pitr.recovery.remove")
        .target(r.target.clone())
        .params(json!({ "recovery_id": id, "reason": why }));
    if r.status != "ready" {
        let msg = format!(
            "recovery #{id} is {}: only a ready one is removed this way (stop a running one from its job)",
            r.status
        );
        let _ = audit::record(&state.db, ctx, entry.failed(msg.clone())).await;
        return Err(msg);
    }
    if r.host.as_deref() == Some(host_name().as_str()) {
        stop_and_remove(&r).await;
        sqlx::query("UPDATE recoveries SET status = 'removed', removed_at = now(), removed_by_name = $2 WHERE id = $1")
            .bind(id)
            .bind(ctx.actor.name.clone().unwrap_or_else(|| why.to_string()))
            .execute(&state.db)
            .await
            .map_err(|e| e.to_string())?;
        audit::record(&state.db, ctx, entry)
            .await
            .map_err(|e| e.to_string())?;
    } else {
        sqlx::query(
            "UPDATE recoveries SET remove_requested_at = now(), removed_by_name = $2 WHERE id = $1",
        )
        .bind(id)
        .bind(ctx.actor.name.clone())
        .execute(&state.db)
        .await
        .map_err(|e| e.to_string())?;
        audit::record(
            &state.db,
            ctx,
            entry.result(json!({ "removed_by": r.host, "when": "at its next sweep" })),
        )
        .await
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// This host's scratch servers that must go: past their limit, asked to be
/// removed elsewhere, or left by a job that ended without finishing (a crash).
/// Returns how many were removed.
pub async fn sweep(state: &AppState) -> Result<u64, sqlx::Error> {
    let rows: Vec<Recovery> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM recoveries r WHERE host = $1 AND (
            (status = 'ready' AND (expires_at < now() OR remove_requested_at IS NOT NULL))
            OR (status IN ('queued', 'recovering') AND NOT EXISTS (
                SELECT 1 FROM jobs j WHERE j.id = r.job_id AND j.status IN ('queued', 'running'))))"
    ))
    .bind(host_name())
    .fetch_all(&state.db)
    .await?;
    for r in &rows {
        stop_and_remove(r).await;
        let (status, why) = match r.status.as_str() {
            "ready" if r.remove_requested_at.is_some() => ("removed", "asked for"),
            "ready" => ("removed", "its time limit passed"),
            _ => ("failed", "the dbops process running it stopped"),
        };
        sqlx::query(
            "UPDATE recoveries SET status = $2, removed_at = now(),
                    error = CASE WHEN $2 = 'failed' THEN coalesce(error, $3) ELSE error END
             WHERE id = $1",
        )
        .bind(r.id)
        .bind(status)
        .bind(why)
        .execute(&state.db)
        .await?;
        audit::record(
            &state.db,
            &AuditCtx::system(),
            Entry::new("pitr.recovery.remove")
                .target(r.target.clone())
                .params(json!({ "recovery_id": r.id, "reason": why })),
        )
        .await?;
    }
    Ok(rows.len() as u64)
}

/// The user tables of every database of a ready recovery, with exact row counts
/// (database, `schema.table`, rows).
pub async fn tables(r: &Recovery) -> Result<Vec<(String, String, i64)>, String> {
    if r.status != "ready" {
        return Err(format!("recovery #{} is {}", r.id, r.status));
    }
    let opts = r
        .connect_options("postgres")
        .ok_or("the recovery has no server")?;
    let mut c = sqlx::PgConnection::connect_with(&opts).await.map_err(|e| {
        format!(
            "cannot reach the scratch server (it runs on {}): {e}",
            r.host.as_deref().unwrap_or("?")
        )
    })?;
    let dbs: Vec<String> = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname",
    )
    .fetch_all(&mut c)
    .await
    .map_err(|e| e.to_string())?;
    let mut out = vec![];
    for db in dbs {
        let Some(o) = r.connect_options(&db) else {
            continue;
        };
        let Ok(mut c) = sqlx::PgConnection::connect_with(&o).await else {
            continue;
        };
        let names: Vec<(String, String)> = sqlx::query_as(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
               AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1, 2 LIMIT 500",
        )
        .fetch_all(&mut c)
        .await
        .map_err(|e| e.to_string())?;
        for (s, t) in names {
            let n: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM {}.{}",
                quote_ident(&s),
                quote_ident(&t)
            ))
            .fetch_one(&mut c)
            .await
            .unwrap_or(-1);
            out.push((db.clone(), format!("{s}.{t}"), n));
        }
    }
    Ok(out)
}

/// Queues a copy of database `database` of a ready recovery (or only `tables`
/// of it) into a NEW database `new_name` on PostgreSQL target `into`.
#[allow(clippy::too_many_arguments)]
pub async fn request_copy(
    state: &AppState,
    ctx: &AuditCtx,
    id: i64,
    database: &str,
    tables: &[String],
    into: &str,
    new_name: &str,
    run_here: bool,
) -> Result<i64, String> {
    let params = json!({ "recovery_id": id, "database": database, "tables": tables, "into": into, "new_database": new_name });
    let refuse = |msg: String| async {
        let _ = audit::record(
            &state.db,
            ctx,
            Entry::new(COPY_KIND)
                .target(into)
                .params(params.clone())
                .failed(msg.clone()),
        )
        .await;
        Err::<i64, String>(msg)
    };
    let r = match find(&state.db, id).await.map_err(|e| e.to_string())? {
        Some(r) if r.status == "ready" => r,
        Some(r) => return refuse(format!("recovery #{id} is {}, not ready", r.status)).await,
        None => return refuse(format!("there is no recovery #{id}")).await,
    };
    if r.host.as_deref() != Some(host_name().as_str()) {
        return refuse(format!(
            "recovery #{id} runs on {}: copy from the dbops there",
            r.host.unwrap_or_default()
        ))
        .await;
    }
    match state.targets.get(into) {
        Some(t) if t.kind() == TargetKind::Postgres => {}
        _ => return refuse(format!("{into} is not a PostgreSQL target")).await,
    }
    if let Err(e) = crate::restores::DatabaseName::parse(new_name) {
        return refuse(e).await;
    }
    if database.is_empty() || database.len() > 63 {
        return refuse("choose the recovered database to copy".into()).await;
    }
    let mut tx = state.db.begin().await.map_err(|e| e.to_string())?;
    let (job, _) = jobs::submit_in(
        &mut tx,
        state,
        ctx,
        NewJob {
            kind: COPY_KIND,
            target: into,
            params,
            operation: None,
            approval: None,
            run_here,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    Ok(job)
}

/// Copies a recovered database into a new database: `pg_dump -Fc` from the
/// scratch server piped into `pg_restore` on the target (the new database is
/// created first and dropped again when the copy fails).
pub struct CopyJob;

impl JobKind for CopyJob {
    fn kind(&self) -> &'static str {
        COPY_KIND
    }
    fn title(&self) -> &'static str {
        "Copy a recovered database"
    }
    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(copy(ctx))
    }
    fn subject(&self, job: &Job) -> Option<(String, String)> {
        let id = job.params["recovery_id"].as_i64()?;
        let src = job.params["recovery_target"]
            .as_str()
            .unwrap_or(&job.target)
            .to_string();
        Some((
            format!("recovery #{id}"),
            format!("/targets/{src}/pitr/recoveries/{id}"),
        ))
    }
}

async fn copy(ctx: &JobCtx) -> Result<Value, String> {
    use secrecy::ExposeSecret;
    let p = &ctx.job.params;
    let id = p["recovery_id"].as_i64().ok_or("no recovery")?;
    let database = p["database"].as_str().ok_or("no database")?.to_string();
    let new_name = p["new_database"]
        .as_str()
        .ok_or("no new database name")?
        .to_string();
    let tables: Vec<String> = p["tables"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let r = find(&ctx.state.db, id)
        .await
        .map_err(|e| e.to_string())?
        .filter(|r| r.status == "ready")
        .ok_or_else(|| format!("recovery #{id} is not ready"))?;
    let src = r.pg_conn(&database).ok_or("the recovery has no server")?;
    let target: &Arc<Target> = &ctx.target;
    let pool = target.pg().await?;
    let num: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(&pool)
        .await
        .map_err(|e| target.scrub(&e.to_string()))?;
    let dump_tool = pg_tools::pick("pg_dump", (num / 10000) as u32)?;
    let restore_tool = pg_tools::pick("pg_restore", (num / 10000) as u32)?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&new_name)
            .fetch_one(&pool)
            .await
            .map_err(|e| target.scrub(&e.to_string()))?;
    if exists {
        return Err(format!(
            "{new_name} already exists on {}: choose a new name",
            target.name()
        ));
    }
    ctx.progress.set_phase("creating the database");
    sqlx::query(&format!("CREATE DATABASE {}", quote_ident(&new_name)))
        .execute(&pool)
        .await
        .map_err(|e| {
            format!(
                "could not create {new_name}: {}",
                target.scrub(&e.to_string())
            )
        })?;
    let conn = PgConn::from_url(target.config.url.expose_secret())
        .map_err(|e| target.scrub(&e))?
        .with_database(&new_name);
    let opts = DumpOptions {
        format: Format::Custom,
        no_owner: true,
        tables: tables.clone(),
        ..DumpOptions::default()
    };
    ctx.progress.set_phase("copying");
    let piped = pipe_database(
        &ctx.state,
        Pipe {
            dump_tool: &dump_tool,
            restore_tool: &restore_tool,
            from: &src,
            to: &conn,
            opts: &opts,
        },
        &ctx.progress,
        &ctx.cancel,
    )
    .await;
    if let Err(e) = piped {
        let _ = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(&new_name)
        ))
        .execute(&pool)
        .await;
        return Err(format!(
            "the copy failed, so {new_name} was dropped again: {e}"
        ));
    }
    // Row counts of what arrived.
    let mut counts = serde_json::Map::new();
    if let Ok(mut c) = crate::restores::connect_to(target, &new_name, Duration::from_secs(10)).await
    {
        let names: Vec<(String, String)> = sqlx::query_as(
            "SELECT schemaname::text, relname::text FROM pg_stat_user_tables ORDER BY 1, 2 LIMIT 500",
        )
        .fetch_all(&mut c)
        .await
        .unwrap_or_default();
        for (s, t) in names {
            let n: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM {}.{}",
                quote_ident(&s),
                quote_ident(&t)
            ))
            .fetch_one(&mut c)
            .await
            .unwrap_or(-1);
            counts.insert(format!("{s}.{t}"), json!(n));
        }
    }
    Ok(
        json!({ "recovery_id": id, "database": database, "new_database": new_name, "target": target.name(), "row_counts": counts }),
    )
}

/// What [`pipe_database`] copies: a database `from` (the recovery's server)
/// into the existing, empty database `to`, with `opts` (`no_owner` also makes
/// pg_restore leave owners and privileges out).
pub(super) struct Pipe<'a> {
    pub dump_tool: &'a pg_tools::Tool,
    pub restore_tool: &'a pg_tools::Tool,
    pub from: &'a PgConn,
    pub to: &'a PgConn,
    pub opts: &'a DumpOptions,
}

/// `pg_dump -Fc | pg_restore`, streamed (no file in between): the copy of a
/// recovered database into a new one and the copy a replace swaps in.
pub(super) async fn pipe_database(
    state: &AppState,
    p: Pipe<'_>,
    progress: &Arc<Progress>,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(), String> {
    let scratch_dir = scratch::root(state).join("copy");
    let _ = std::fs::create_dir_all(&scratch_dir);
    let (mut w, mut rd) = tokio::io::duplex(1024 * 1024);
    let dump = pg_tools::Dump {
        tool: p.dump_tool,
        conn: p.from,
        opts: p.opts,
        snapshot: None,
        compress: None,
    };
    let to = RestoreTo {
        tool: p.restore_tool,
        conn: p.to,
        format: Format::Custom,
        jobs: 1,
        clean: false,
        extra: &[],
        keep_owner: !p.opts.no_owner,
    };
    let dumping = async {
        let r = pg_tools::dump_stream(&dump, &mut w, progress, cancel).await;
        drop(w);
        r
    };
    let restore_progress = Arc::new(Progress::default());
    let restoring =
        pg_tools::restore_archive(&to, &mut rd, &scratch_dir, &restore_progress, cancel);
    let (d, rs) = tokio::join!(dumping, restoring);
    d.map(|_| ()).and(rs)
}
