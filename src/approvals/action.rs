//! Action kinds: how a capability plugs a destructive action into approvals.
//!
//! A capability implements [`Action`] for each destructive thing it can do (its
//! parameters, a sentence for the approver, its executor) and lists it in
//! [`crate::actions::all`]. The approval code never needs to know what an action
//! does.

use std::{collections::BTreeMap, sync::Arc};

use futures::future::BoxFuture;
use serde_json::Value;

use crate::{
    config::{Policy, TargetKind},
    state::AppState,
    targets::Target,
};

/// How much harm an action can do; with the target's policy it decides whether a
/// second person must approve (see [`needs_approval`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Interrupts work but loses nothing (cancel a query).
    Disruptive,
    /// Loses work or data, or takes strong locks (terminate a session, drop an
    /// index, flush Redis, restore over a database).
    Destructive,
}

/// Whether `severity` on a target with `policy` needs a second person: always on
/// `production`, for destructive actions on `staging`, never on `dev` (the request
/// is then approved automatically, so the log reads the same way).
pub fn needs_approval(policy: Policy, severity: Severity) -> bool {
    match policy {
        Policy::Production => true,
        Policy::Staging => severity == Severity::Destructive,
        Policy::Dev => false,
    }
}

/// What an action found when it looked at the target as a request was made
/// (see [`Action::assess`]).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Assessment {
    /// Facts to merge into the request's parameters (top-level keys, replacing any
    /// of the same name from the form): they are covered by the parameters' hash,
    /// shown to the approver and handed to the executor.
    pub facts: serde_json::Map<String, Value>,
    /// A sentence saying why this request needs an approver whatever the target's
    /// policy (as if [`Action::always_needs_approval`] were set for it), or `None`
    /// to keep the usual rule.
    pub needs_approver: Option<String>,
}

/// What an executor gets.
pub struct ExecCtx {
    pub state: AppState,
    pub target: Arc<Target>,
    /// Who runs it.
    pub audit: crate::audit::AuditCtx,
    /// The approval request being executed.
    pub approval: i64,
    /// The execution's operations-log row (a job the executor hands its work to
    /// ends it; see [`crate::jobs::hand_off`]).
    pub operation: i64,
}

/// One kind of gated action.
pub trait Action: Send + Sync + 'static {
    /// The dotted kind, also the operations-log kind of its execution
    /// (`pg.backend.terminate`).
    fn kind(&self) -> &'static str;
    /// A short title for lists and buttons ("Terminate a session").
    fn title(&self) -> &'static str;
    /// Which kind of target it runs on.
    fn target_kind(&self) -> TargetKind;
    /// Whether it can run on a target of `kind` (by default: its [`Action::target_kind`]).
    fn applies_to(&self, kind: TargetKind) -> bool {
        kind == self.target_kind()
    }
    fn severity(&self) -> Severity;
    /// Needs a second person whatever the target's policy (flushing Redis): never
    /// approved automatically, not even on `dev`.
    fn always_needs_approval(&self) -> bool {
        false
    }
    /// Whoever runs it must type the target's name to confirm (checked at
    /// execution, before anything runs).
    fn confirm_name(&self) -> bool {
        false
    }
    /// Checks the parameters from a form and returns them as canonical JSON, or a
    /// sentence saying what is wrong.
    fn parse(&self, form: &BTreeMap<String, String>) -> Result<Value, String>;
    /// A server-side look at the target when the request is made (and when its
    /// form is shown), with the parsed `params`: what dbops itself measured, never
    /// what the form claims. The facts are merged into the parameters before they
    /// are hashed; [`Assessment::needs_approver`] makes this request need an
    /// approver on every policy (a delete by pattern that matches every key is a
    /// flush). An error is a sentence; the request is then refused. Nothing to add
    /// by default.
    fn assess<'a>(
        &'a self,
        _state: &'a AppState,
        _target: &'a Arc<Target>,
        _params: &'a Value,
    ) -> BoxFuture<'a, Result<Assessment, String>> {
        Box::pin(async { Ok(Assessment::default()) })
    }
    /// Exactly what will run, in words, for the approver: the statement, what it
    /// affects, the locks it takes.
    fn describe(&self, params: &Value) -> String;
    /// Facts for the approver, read when the request's page is shown (the
    /// backup's size and checksum, what will be dropped): label and text pairs.
    /// None by default.
    fn details<'a>(
        &'a self,
        _state: &'a AppState,
        _target: &'a Arc<Target>,
        _params: &'a Value,
    ) -> BoxFuture<'a, Vec<(String, String)>> {
        Box::pin(async { vec![] })
    }
    /// The facts that decide whether a request still means what it meant when it
    /// was made (the backup it restores and its checksum, the tables of the
    /// database it replaces). Read when the request is made and stored with it,
    /// and read again before it is approved or run: if they differ, a person must
    /// say they have seen what changed. None by default (nothing to compare).
    fn world<'a>(
        &'a self,
        _state: &'a AppState,
        _target: &'a Arc<Target>,
        _params: &'a Value,
    ) -> BoxFuture<'a, World> {
        Box::pin(async { World::none() })
    }
    /// Runs the action with the approved parameters; returns a result for the log,
    /// or an error sentence.
    fn execute<'a>(
        &'a self,
        ctx: ExecCtx,
        params: &'a Value,
    ) -> BoxFuture<'a, Result<Value, String>>;
}

/// What [`Action::world`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct World {
    /// The facts compared between the request and now (plain JSON: strings,
    /// integers, booleans, lists and objects; no floats, so it hashes the same
    /// after a round trip through the database).
    pub facts: Value,
    /// Why the request cannot be approved or run at all any more (the backup it
    /// needs was deleted), as a sentence; `None` when it still can.
    pub blocked: Option<String>,
}

impl World {
    /// Nothing to compare and nothing in the way.
    pub fn none() -> World {
        World {
            facts: Value::Null,
            blocked: None,
        }
    }
}

/// Every registered action kind, by kind.
#[derive(Clone, Default)]
pub struct ActionRegistry {
    kinds: BTreeMap<&'static str, Arc<dyn Action>>,
    before_destructive: Option<BeforeDestructive>,
}

/// What runs just before every destructive action's executor (after its
/// operations-log row is written): point-in-time recovery's restore point, so
/// that "just before operation #N" can be recovered to. It cannot stop the
/// action; it logs its own failures.
pub type BeforeDestructive =
    Arc<dyn for<'a> Fn(&'a ExecCtx, &'static str) -> BoxFuture<'a, ()> + Send + Sync>;

impl ActionRegistry {
    pub fn new(actions: Vec<Arc<dyn Action>>) -> ActionRegistry {
        let mut kinds = BTreeMap::new();
        for a in actions {
            let previous = kinds.insert(a.kind(), a);
            assert!(previous.is_none(), "an action kind is registered twice");
        }
        ActionRegistry {
            kinds,
            before_destructive: None,
        }
    }

    /// Sets what runs before every destructive action (see [`BeforeDestructive`]).
    pub fn before_destructive(mut self, hook: BeforeDestructive) -> ActionRegistry {
        self.before_destructive = Some(hook);
        self
    }

    /// Runs the [`BeforeDestructive`] hook for `action` when it is destructive.
    pub async fn run_before(&self, ctx: &ExecCtx, action: &dyn Action) {
        if action.severity() == Severity::Destructive
            && let Some(hook) = &self.before_destructive
        {
            hook(ctx, action.kind()).await;
        }
    }

    pub fn get(&self, kind: &str) -> Option<Arc<dyn Action>> {
        self.kinds.get(kind).cloned()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn Action>> {
        self.kinds.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_always_needs_approval_and_dev_never() {
        for s in [Severity::Disruptive, Severity::Destructive] {
            assert!(needs_approval(Policy::Production, s));
            assert!(!needs_approval(Policy::Dev, s));
        }
        assert!(needs_approval(Policy::Staging, Severity::Destructive));
        assert!(!needs_approval(Policy::Staging, Severity::Disruptive));
    }
}
