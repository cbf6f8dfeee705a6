//! The list of every gated action kind, every job kind and every periodic task
//! dbops has. A capability adds its kinds here; the approval code
//! ([`crate::approvals`]), the job runner and the scheduler ([`crate::jobs`])
//! stay untouched.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::Utc;

use crate::{
    approvals::{Action, ActionRegistry},
    jobs::scheduler::Periodic,
    state::AppState,
};

/// Every registered action kind.
pub fn all() -> ActionRegistry {
    let mut actions: Vec<Arc<dyn Action>> = vec![];
    actions.extend(crate::activity::actions());
    actions.push(Arc::new(crate::backups::actions::DeleteBackup));
    actions.push(Arc::new(crate::restores::RestoreOver));
    actions.push(Arc::new(crate::restores::swap::SwapBack));
    actions.push(Arc::new(crate::restores::swap::DropPrevious));
    actions.push(Arc::new(crate::restores::redis::RedisRestoreOver));
    actions.push(Arc::new(crate::pitr::replace::Replace));
    actions.extend(crate::redis_tools::actions::actions());
    actions.extend(crate::reports::actions());
    actions.push(Arc::new(crate::windows::gate::WindowGate));
    ActionRegistry::new(actions).before_destructive(std::sync::Arc::new(|ctx, kind| {
        Box::pin(crate::pitr::restore_points::before_action(ctx, kind))
    }))
}

/// Every registered job kind.
pub fn job_kinds() -> Vec<Arc<dyn crate::jobs::JobKind>> {
    let mut kinds: Vec<Arc<dyn crate::jobs::JobKind>> = vec![
        Arc::new(crate::backups::run::BackupJob),
        Arc::new(crate::restores::RestoreJob),
        Arc::new(crate::restores::redis::RedisRestoreJob),
        Arc::new(crate::pitr::base_backups::BaseBackupJob),
        Arc::new(crate::pitr::recover::RecoverJob),
        Arc::new(crate::pitr::recover::CopyJob),
        Arc::new(crate::pitr::replace::ReplaceJob),
        Arc::new(crate::windows::run::StepJob),
    ];
    kinds.extend(crate::redis_tools::actions::job_kinds());
    kinds.extend(crate::reports::jobs::kinds());
    kinds
}

/// Ends what a dbops that stopped left running: jobs whose heartbeat is older
/// than the lease first, then the backups and restores whose job ended without
/// them (and what those left on disk and on the servers).
pub async fn sweep(state: &AppState) -> Result<(), String> {
    let jobs = crate::jobs::sweep(state, state.config.jobs.lease)
        .await
        .map_err(|e| format!("could not look for orphaned jobs: {e}"))?;
    let backups = crate::backups::run::sweep(state, None)
        .await
        .map_err(|e| format!("could not settle orphaned backups: {e}"))?;
    let restores = crate::restores::sweep(state)
        .await
        .map_err(|e| format!("could not settle orphaned restores: {e}"))?;
    let base_backups = crate::pitr::base_backups::sweep(state)
        .await
        .map_err(|e| format!("could not settle orphaned base backups: {e}"))?;
    // Scratch servers of recoveries: expired, asked to go, or orphaned.
    let recoveries = crate::pitr::recover::sweep(state)
        .await
        .map_err(|e| format!("could not remove scratch servers of recoveries: {e}"))?;
    if jobs + backups + restores + base_backups + recoveries > 0 {
        tracing::warn!(
            jobs,
            backups,
            restores,
            base_backups,
            recoveries,
            "work left running by a stopped dbops was ended as interrupted"
        );
    }
    Ok(())
}

/// Every periodic task of a dbops process, for [`crate::jobs::scheduler`].
pub fn periodic(state: &AppState) -> Vec<Periodic> {
    // Each scheduled instant in (last tick, this tick] becomes one backup
    // (however many replicas tick: a unique index decides).
    let last = Arc::new(Mutex::new(Utc::now() - chrono::Duration::seconds(60)));
    let mut tasks = vec![
        Periodic::new("backups.schedule", Duration::from_secs(15), move |st| {
            let last = last.clone();
            async move {
                let now = Utc::now();
                let from = std::mem::replace(&mut *last.lock().expect("not poisoned"), now);
                crate::schedules::schedule_tick(&st, from, now).await;
                Ok(())
            }
        }),
        Periodic::new("pitr.base_backup_schedule", Duration::from_secs(15), {
            let last = Arc::new(Mutex::new(Utc::now() - chrono::Duration::seconds(60)));
            move |st| {
                let last = last.clone();
                async move {
                    let now = Utc::now();
                    let from = std::mem::replace(&mut *last.lock().expect("not poisoned"), now);
                    crate::pitr::base_backups::schedule_tick(&st, from, now).await;
                    Ok(())
                }
            }
        }),
        Periodic::new("sweep", Duration::from_secs(15), |st| async move {
            sweep(&st).await
        }),
        Periodic::new(
            "approvals.expire",
            Duration::from_secs(30),
            |st| async move {
                crate::approvals::expire_due(&st.db)
                    .await
                    .map_err(|e| format!("could not expire approval requests: {e}"))?;
                crate::approvals::end_orphaned_executions(&st.db, Duration::from_secs(3600))
                    .await
                    .map_err(|e| format!("could not end orphaned executions: {e}"))?;
                Ok(())
            },
        ),
        // Maintenance windows: overrun notices, steps whose job ended without them.
        Periodic::new("windows", Duration::from_secs(20), |st| async move {
            crate::windows::tick_periodic(&st).await
        }),
        // Database size samples and scheduled report refreshes.
        Periodic::new("reports", Duration::from_secs(60), |st| async move {
            crate::reports::jobs::tick(&st).await;
            Ok(())
        }),
        Periodic::new(
            "sessions.expire",
            Duration::from_secs(600),
            |st| async move {
                use tower_sessions::ExpiredDeletion;
                tower_sessions_sqlx_store::PostgresStore::new(st.db.clone())
                    .delete_expired()
                    .await
                    .map_err(|e| format!("could not delete expired sessions: {e}"))
            },
        ),
    ];
    if state.config.targets.iter().any(|t| t.archive.is_some()) {
        // Continuous WAL archiving: leases, streams, uploads (src/pitr/archive.rs).
        let streams = crate::pitr::archive::Streams::new();
        tasks.push(Periodic::new(
            "pitr.archive",
            crate::pitr::archive::TICK,
            move |st| {
                let streams = streams.clone();
                async move { crate::pitr::archive::tick(&st, &streams).await }
            },
        ));
        tasks.push(Periodic::new(
            "pitr.metrics",
            Duration::from_secs(15),
            |st| async move {
                crate::pitr::archive::export_metrics(&st).await;
                Ok(())
            },
        ));
    }
    if state.config.audit.checkpoints.enabled() {
        // Signed checkpoints of the log (also after every approved action).
        tasks.push(Periodic::new(
            "audit.checkpoint",
            state.config.audit.checkpoints.interval,
            |st| async move {
                crate::audit::checkpoint::checkpoint_now(&st, false).await;
                Ok(())
            },
        ));
    }
    tasks
}
