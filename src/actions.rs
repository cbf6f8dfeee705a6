//! The list of every gated action kind dbops has. A capability adds its kinds here;
//! the approval code ([`crate::approvals`]) stays untouched.

use std::sync::Arc;

use crate::approvals::{Action, ActionRegistry};

/// Every registered action kind.
pub fn all() -> ActionRegistry {
    let mut actions: Vec<Arc<dyn Action>> = vec![];
    actions.extend(crate::activity::actions());
    actions.push(Arc::new(crate::backups::actions::DeleteBackup));
    actions.push(Arc::new(crate::backups::restore::RestoreOver));
    ActionRegistry::new(actions)
}
