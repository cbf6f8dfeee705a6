//! When backups run and which are kept: cron schedules in a time zone
//! ([`cron`]), grandfather-father-son retention ([`retention`]), and here the
//! part that touches the database: the scheduler's tick that queues due
//! backups, a target's retention plan from its rows, and pruning.

pub mod cron;
pub mod retention;
#[cfg(test)]
mod tests;

use chrono::{DateTime, Utc};

pub use cron::{Schedule, Zone};
pub use retention::{Candidate, Plan, Policy, plan, reason};

use crate::{
    audit::AuditCtx,
    backups::{
        BackupError,
        run::{self, BackupRequest, Trigger},
    },
    state::AppState,
    targets::Target,
};

/// Queues a backup for every target whose schedule (or test-restore schedule) has
/// an instant in (from, to].
pub async fn schedule_tick(state: &AppState, from: DateTime<Utc>, to: DateTime<Utc>) {
    for target in state.targets.all() {
        let policy = &target.config.backup;
        let due = |expr: &Option<String>| {
            expr.as_deref()
                .and_then(|e| crate::schedules::Schedule::parse(e, &policy.timezone).ok())
                .and_then(|s| s.due_between(from, to))
        };
        let backup_slot = due(&policy.schedule);
        let test_slot = due(&policy.test_restore_schedule);
        let Some(slot) = backup_slot.max(test_slot) else {
            continue;
        };
        let test_restore = test_slot == Some(slot);
        match run::request(
            state,
            &AuditCtx::system(),
            target.name(),
            Trigger::Schedule,
            BackupRequest {
                schedule_slot: Some(slot),
                test_restore,
                ..Default::default()
            },
        )
        .await
        {
            Ok(id) => {
                tracing::info!(target = target.name(), backup = id, %slot, "scheduled backup queued")
            }
            Err(BackupError::AlreadyScheduled) => {}
            Err(e) => {
                tracing::error!(target = target.name(), error = %e, "could not queue a scheduled backup")
            }
        }
    }
}

/// What retention would do for `target` now.
/// With `what_if`, the plan of that policy instead of the configured one (the
/// preview of a policy change).
pub async fn retention_plan(
    state: &AppState,
    target: &Target,
    what_if: Option<crate::schedules::Policy>,
) -> Result<crate::schedules::Plan, String> {
    use crate::schedules::{Candidate, Policy, Zone, plan};
    let p = &target.config.backup;
    let rows: Vec<(i64, DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT id, coalesce(started_at, created_at), status FROM backups
         WHERE target = $1 AND status IN ('good', 'failed', 'interrupted') ORDER BY id DESC",
    )
    .bind(target.name())
    .fetch_all(&state.db)
    .await
    .map_err(|e| e.to_string())?;
    let pinned = crate::backups::pins::pinned_of_target(&state.db, target.name())
        .await
        .map_err(|e| e.to_string())?;
    let candidates: Vec<Candidate> = rows
        .iter()
        .map(|(id, at, status)| Candidate {
            id: *id,
            started_at: *at,
            good: status == "good",
            pinned: pinned.contains_key(id),
        })
        .collect();
    let policy = what_if.unwrap_or(Policy {
        keep_last: p.keep_last,
        daily: p.daily,
        weekly: p.weekly,
        monthly: p.monthly,
    });
    policy.validate()?;
    let zone = Zone::parse(&p.timezone)?;
    Ok(plan(&policy, &candidates, Utc::now(), &zone))
}

/// Applies retention to `target`: deletes the artifacts the plan says to delete and
/// marks their rows `deleted`, each deletion in the operations log as `backup.prune`.
pub async fn prune(state: &AppState, target: &Target) -> Result<u64, String> {
    let plan = retention_plan(state, target, None).await?;
    if let Some(why) = &plan.held_back {
        tracing::warn!(target = target.name(), why, "retention held back");
        return Ok(0);
    }
    let mut n = 0;
    for id in plan.delete {
        match run::delete_backup(state, &AuditCtx::system(), id, "retention", "backup.prune").await
        {
            Ok(Some(_)) => n += 1,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(backup = id, error = %e, "retention could not delete a backup")
            }
        }
    }
    Ok(n)
}
