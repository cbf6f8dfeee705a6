//! The list of every gated action kind and every job kind dbops has. A capability
//! adds its kinds here; the approval code ([`crate::approvals`]) and the job runner
//! ([`crate::jobs`]) stay untouched.

use std::sync::Arc;

use crate::approvals::{Action, ActionRegistry};

/// Every registered action kind.
pub fn all() -> ActionRegistry {
    let mut actions: Vec<Arc<dyn Action>> = vec![];
    actions.extend(crate::activity::actions());
    actions.push(Arc::new(crate::backups::actions::DeleteBackup));
    actions.push(Arc::new(crate::backups::restore::RestoreOver));
    actions.push(Arc::new(crate::backups::swap::SwapBack));
    actions.push(Arc::new(crate::backups::swap::DropPrevious));
    actions.push(Arc::new(crate::backups::redis_restore::RedisRestoreOver));
    actions.extend(crate::redis_tools::actions::actions());
    actions.extend(crate::reports::actions());
    ActionRegistry::new(actions)
}

/// Every registered job kind.
pub fn job_kinds() -> Vec<Arc<dyn crate::jobs::JobKind>> {
    let mut kinds: Vec<Arc<dyn crate::jobs::JobKind>> = vec![
        Arc::new(crate::backups::restore::RestoreJob),
        Arc::new(crate::backups::redis_restore::RedisRestoreJob),
    ];
    kinds.extend(crate::redis_tools::actions::job_kinds());
    kinds.extend(crate::reports::jobs::kinds());
    kinds
}
