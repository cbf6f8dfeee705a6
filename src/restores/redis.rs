//! Restoring a Redis logical export (PRODUCT C5) into a Redis target, as a job:
//!
//! - into an empty server, or merged keeping existing keys — not destructive, an
//!   operator starts it ([`request`]);
//! - merged replacing existing keys, or after flushing every database — the
//!   approved action [`RedisRestoreOver`], which hands the same job the work.
//!
//! The checksum is re-read before anything is written, and the import itself
//! checks the export's trailer before its first write ([`redis_dump::logical_import`]).
//! RDB snapshots are not loaded over the network (Redis has no command for it): the
//! restore page says how to load one on the server.

use std::{collections::BTreeMap, sync::Arc};

use fred::{
    prelude::{ClientLike, Value as RedisValue},
    types::{ClusterHash, CustomCommand},
};
use futures::future::BoxFuture;
use serde_json::{Value, json};

use crate::{
    approvals::{Action, ExecCtx, Severity},
    audit::{self, AuditCtx, Entry},
    backups::{Backup, redis_dump},
    config::TargetKind,
    error::AppError,
    jobs::{self, JobCtx, JobKind},
    restores as restore,
    state::AppState,
    targets::Target,
};

/// How the export meets the keys already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisMode {
    /// Refused if any database the export has keys for holds keys already.
    IntoEmpty,
    /// Existing keys stay; the export's copy of them is skipped.
    MergeKeep,
    /// Existing keys are overwritten by the export's copy (destructive).
    MergeReplace,
    /// `FLUSHALL` first, then the export (destructive).
    FlushFirst,
}

impl RedisMode {
    pub const ALL: [RedisMode; 4] = [
        RedisMode::IntoEmpty,
        RedisMode::MergeKeep,
        RedisMode::MergeReplace,
        RedisMode::FlushFirst,
    ];

    pub fn parse(s: &str) -> Option<RedisMode> {
        RedisMode::ALL.into_iter().find(|m| m.as_str() == s.trim())
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RedisMode::IntoEmpty => "into_empty",
            RedisMode::MergeKeep => "merge_keep",
            RedisMode::MergeReplace => "merge_replace",
            RedisMode::FlushFirst => "flush_first",
        }
    }

    /// Whether it can lose data already there (then it needs approval).
    pub fn destructive(self) -> bool {
        matches!(self, RedisMode::MergeReplace | RedisMode::FlushFirst)
    }

    pub fn describe(self) -> &'static str {
        match self {
            RedisMode::IntoEmpty => {
                "into an empty server: refused if any database the export covers holds keys"
            }
            RedisMode::MergeKeep => {
                "merged: keys that exist stay as they are, the export's copy is skipped"
            }
            RedisMode::MergeReplace => {
                "merged, replacing: keys that exist are overwritten by the export's copy (RESTORE … REPLACE)"
            }
            RedisMode::FlushFirst => {
                "after FLUSHALL: every key in every database of the target is deleted first, then the export is loaded"
            }
        }
    }
}

/// The job kind of Redis restores.
pub const JOB_KIND: &str = "redis.restore";

/// The checks made before a Redis restore is queued: a good logical export of
/// Redis, its artifact there (and of the recorded checksum when small), and a
/// Redis target to load it into.
pub async fn check(
    state: &AppState,
    backup_id: i64,
    into: &str,
) -> Result<(Backup, Arc<Target>), String> {
    let b = crate::backups::find(&state.db, backup_id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("There is no backup #{backup_id}."))?;
    if b.status != "good" {
        return Err(format!(
            "Backup #{} is {}: only a good backup can be restored.",
            b.id, b.status
        ));
    }
    match b.method.as_str() {
        "redis_logical" => {}
        "redis_rdb" => {
            return Err(format!(
                "Backup #{} is an RDB snapshot: Redis loads those only from its own disk at start-up. \
                 See the restore page of the backup for the steps.",
                b.id
            ));
        }
        _ => {
            return Err(format!(
                "Backup #{} is a PostgreSQL backup: restore it into a PostgreSQL target.",
                b.id
            ));
        }
    }
    let target = state
        .targets
        .get(into)
        .ok_or_else(|| format!("There is no target called {into}."))?;
    if target.kind() != TargetKind::Redis {
        return Err(format!(
            "{into} is a PostgreSQL server: a Redis export is restored into a Redis target."
        ));
    }
    restore::check_artifact(state, &b).await?;
    Ok((b, target))
}

/// Queues a non-destructive Redis restore (into empty, or merging and keeping
/// what is there). A refusal is logged as a failed `redis.restore`. Returns the
/// job's id.
pub async fn request(
    state: &AppState,
    ctx: &AuditCtx,
    backup_id: i64,
    into: &str,
    mode: RedisMode,
) -> Result<i64, AppError> {
    let params = json!({ "backup_id": backup_id, "mode": mode.as_str() });
    let checked = if mode.destructive() {
        Err(format!(
            "Restoring {} can lose keys that are there now: it is asked for as an approved request.",
            mode.describe()
        ))
    } else {
        check(state, backup_id, into).await.map(|_| ())
    };
    if let Err(msg) = checked {
        audit::record(
            &state.db,
            ctx,
            Entry::new(JOB_KIND)
                .target(into)
                .params(params)
                .failed(msg.clone()),
        )
        .await?;
        return Err(AppError::BadRequest(msg));
    }
    jobs::submit(state, ctx, JOB_KIND, into, params).await
}

/// Runs Redis restores as jobs.
pub struct RedisRestoreJob;

impl JobKind for RedisRestoreJob {
    fn kind(&self) -> &'static str {
        JOB_KIND
    }

    fn title(&self) -> &'static str {
        "Redis restore"
    }

    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(run(ctx))
    }
}

async fn run(ctx: &JobCtx) -> Result<Value, String> {
    let p = &ctx.job.params;
    let backup_id = p["backup_id"].as_i64().ok_or("the job names no backup")?;
    let mode = p["mode"]
        .as_str()
        .and_then(RedisMode::parse)
        .ok_or("the job names no restore mode")?;
    let (b, target) = check(&ctx.state, backup_id, &ctx.job.target).await?;
    let storage = ctx.state.storage_for(&b.storage)?;
    let key = b.storage_key.clone().unwrap_or_default();
    // 1. The checksum, re-read whole, before anything is written.
    let bytes = restore::reverify(storage.as_ref(), &b, &ctx.progress, &ctx.cancel).await?;
    let client = target.redis().await?;
    // 2. Before anything is deleted or replaced: the export is read whole and
    // checked (a damaged one is refused while the keys are still there), and a
    // safety backup of the target is taken, which is put back if the import
    // fails half-way.
    let safety = if mode.destructive() {
        ctx.progress.set_phase("checking the export");
        let mut input = b.reader(storage.open(&key).await.map_err(|e| e.to_string())?)?;
        redis_dump::verify_export(&mut input)
            .await
            .map_err(|e| format!("{e}; nothing was touched"))?;
        ctx.progress.set_phase("safety backup");
        Some(
            crate::backups::run::safety_backup(
                &ctx.state,
                target.name(),
                Some("logical"),
                None,
                &ctx.cancel,
            )
            .await?,
        )
    } else {
        None
    };
    if mode == RedisMode::FlushFirst {
        ctx.progress.set_phase("flushing");
        flushall(&client, &target).await.map_err(|e| {
            format!(
                "{e}; nothing was restored (safety backup #{})",
                safety.unwrap_or_default()
            )
        })?;
    }
    ctx.progress.set_phase("restoring");
    let import_mode = match mode {
        RedisMode::IntoEmpty | RedisMode::FlushFirst => redis_dump::ImportMode::IntoEmpty,
        RedisMode::MergeKeep => redis_dump::ImportMode::MergeKeep,
        RedisMode::MergeReplace => redis_dump::ImportMode::MergeReplace,
    };
    let mut input = b.reader(storage.open(&key).await.map_err(|e| e.to_string())?)?;
    let imported = redis_dump::logical_import(&client, &mut input, import_mode, &ctx.progress)
        .await
        .map_err(|e| target.scrub(&e));
    let stats = match (imported, safety) {
        (Ok(s), _) => s,
        (Err(e), None) => return Err(e),
        (Err(e), Some(id)) => {
            ctx.progress.set_phase("putting back what was there");
            return Err(
                match put_back(&ctx.state, &client, &target, id, &ctx.progress).await {
                    Ok(n) => format!(
                        "{e}; what was there before was put back from safety backup #{id} ({n} keys): the target is as it was"
                    ),
                    Err(e2) => format!(
                        "{e}; putting back safety backup #{id} failed too ({e2}): it holds what was there before — restore it"
                    ),
                },
            );
        }
    };
    Ok(json!({
        "backup_id": b.id,
        "source_target": b.target,
        "mode": mode.as_str(),
        "restored": stats.restored,
        "skipped_existing": stats.skipped_existing,
        "expired_skipped": stats.expired_skipped,
        "bytes_read": bytes,
        "safety_backup_id": safety,
    }))
}

async fn flushall(client: &fred::prelude::Client, target: &Target) -> Result<(), String> {
    let _: RedisValue = client
        .custom(
            CustomCommand::new_static("FLUSHALL", ClusterHash::Random, false),
            Vec::<RedisValue>::new(),
        )
        .await
        .map_err(|e| format!("FLUSHALL failed: {}", target.scrub(&e.to_string())))?;
    Ok(())
}

/// After a failed import: every key goes, then the safety backup is loaded back.
async fn put_back(
    state: &AppState,
    client: &fred::prelude::Client,
    target: &Target,
    safety: i64,
    progress: &crate::jobs::Progress,
) -> Result<u64, String> {
    let b = crate::backups::find(&state.db, safety)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the safety backup is gone")?;
    let storage = state.storage_for(&b.storage)?;
    let mut input = b.reader(
        storage
            .open(b.storage_key.as_deref().unwrap_or_default())
            .await
            .map_err(|e| e.to_string())?,
    )?;
    flushall(client, target).await?;
    let stats = redis_dump::logical_import(
        client,
        &mut input,
        redis_dump::ImportMode::IntoEmpty,
        progress,
    )
    .await
    .map_err(|e| target.scrub(&e))?;
    Ok(stats.restored)
}

/// `redis.restore.over`: a Redis export loaded over what a Redis target holds —
/// replacing existing keys, or after `FLUSHALL`. Destructive: approved first.
pub struct RedisRestoreOver;

impl Action for RedisRestoreOver {
    fn kind(&self) -> &'static str {
        "redis.restore.over"
    }

    fn title(&self) -> &'static str {
        "Restore a Redis export over the keys there"
    }

    fn target_kind(&self) -> TargetKind {
        TargetKind::Redis
    }

    fn severity(&self) -> Severity {
        Severity::Destructive
    }

    fn parse(&self, form: &BTreeMap<String, String>) -> Result<Value, String> {
        let id = crate::backups::backup_id_param(form)?;
        let mode = form
            .get("mode")
            .and_then(|m| RedisMode::parse(m))
            .filter(|m| m.destructive())
            .ok_or("Say how: mode must be merge_replace or flush_first.")?;
        Ok(json!({ "backup_id": id, "mode": mode.as_str() }))
    }

    fn describe(&self, params: &Value) -> String {
        let mode = params["mode"]
            .as_str()
            .and_then(RedisMode::parse)
            .unwrap_or(RedisMode::MergeReplace);
        format!(
            "Load the Redis export of backup #{} {}. The file's checksum and trailer are checked before the first write. \
             Takes no lock, but every write is a command on the server: clients see keys change while it runs.",
            params["backup_id"],
            mode.describe()
        )
    }

    fn details<'a>(
        &'a self,
        state: &'a AppState,
        _target: &'a Arc<Target>,
        params: &'a Value,
    ) -> BoxFuture<'a, Vec<(String, String)>> {
        Box::pin(async move {
            let id = params["backup_id"].as_i64().unwrap_or(0);
            match crate::backups::find(&state.db, id).await {
                Ok(Some(b)) => {
                    let keys = b
                        .verification
                        .as_ref()
                        .and_then(|v| v["keys"].as_i64().or(v["export"]["keys"].as_i64()));
                    vec![(
                        "Backup".into(),
                        format!(
                            "#{} of {}, {}{}{}",
                            b.id,
                            b.target,
                            b.size(),
                            keys.map(|k| format!(", {k} keys")).unwrap_or_default(),
                            b.finished_at
                                .map(|t| format!(", taken {}", t.format("%Y-%m-%d %H:%M:%S UTC")))
                                .unwrap_or_default()
                        ),
                    )]
                }
                _ => vec![("Backup".into(), format!("#{id} does not exist"))],
            }
        })
    }

    fn execute<'a>(
        &'a self,
        ctx: ExecCtx,
        params: &'a Value,
    ) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            let id = params["backup_id"].as_i64().unwrap_or(0);
            check(&ctx.state, id, ctx.target.name())
                .await
                .map_err(|e| format!("{e} Nothing was restored."))?;
            jobs::hand_off(&ctx, JOB_KIND, params.clone()).await
        })
    }
}
