//! Deleting a backup by hand: a destructive action, so it goes through approvals
//! (on `production` a second person approves it). Retention's own pruning is not a
//! request: it follows the policy and is logged as `backup.prune`.

use std::{collections::BTreeMap, sync::Arc};

use futures::future::BoxFuture;
use serde_json::{Value, json};

use crate::{
    approvals::{Action, ExecCtx, Severity, World},
    config::TargetKind,
    state::AppState,
    targets::Target,
};

/// `backup.delete`: removes one good backup's artifact and marks it deleted.
pub struct DeleteBackup;

impl Action for DeleteBackup {
    fn kind(&self) -> &'static str {
        "backup.delete"
    }

    fn title(&self) -> &'static str {
        "Delete a backup"
    }

    fn target_kind(&self) -> TargetKind {
        TargetKind::Postgres
    }

    fn applies_to(&self, _kind: TargetKind) -> bool {
        true
    }

    fn severity(&self) -> Severity {
        Severity::Destructive
    }

    fn parse(&self, form: &BTreeMap<String, String>) -> Result<Value, String> {
        let id = super::backup_id_param(form)?;
        Ok(json!({ "backup_id": id }))
    }

    fn describe(&self, params: &Value) -> String {
        format!(
            "Delete backup #{} of this target: its file is removed from storage and it can no longer be restored. Its history stays in the log.",
            params["backup_id"]
        )
    }

    fn world<'a>(
        &'a self,
        state: &'a AppState,
        _target: &'a Arc<Target>,
        params: &'a Value,
    ) -> BoxFuture<'a, World> {
        Box::pin(async move {
            let (facts, blocked) =
                backup_facts(state, params["backup_id"].as_i64().unwrap_or(0)).await;
            World { facts, blocked }
        })
    }

    fn execute<'a>(
        &'a self,
        ctx: ExecCtx,
        params: &'a Value,
    ) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            let id = params["backup_id"]
                .as_i64()
                .ok_or("the request has no backup number")?;
            let b = super::find(&ctx.state.db, id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("there is no backup #{id}"))?;
            // The approval was for this target: a backup of another target is
            // never touched (that would bypass the other target's policy).
            if b.target != ctx.target.name() {
                return Err(format!(
                    "backup #{id} belongs to {}, not to {}; nothing was deleted",
                    b.target,
                    ctx.target.name()
                ));
            }
            if b.status != "good" {
                return Err(format!("backup #{id} is {}; nothing was deleted", b.status));
            }
            // The row goes first (only if nothing pins the backup), with its
            // log row; the file after the commit.
            super::run::delete_backup(
                &ctx.state,
                &ctx.audit,
                id,
                "approved request",
                "backup.delete.file",
            )
            .await?
            .ok_or_else(|| format!("backup #{id} is gone; nothing was deleted"))
        })
    }
}

/// What a request that needs backup `id` is approved on (its id, status and
/// checksum), and, when the backup is gone or no longer good, the sentence that
/// stops the request. A backup that cannot be read now (the console database
/// does not answer) reads as unknown: it differs from what was recorded, so a
/// person must look again.
pub(crate) async fn backup_facts(state: &AppState, id: i64) -> (Value, Option<String>) {
    match super::find(&state.db, id).await {
        Ok(Some(b)) => {
            let blocked = (b.status != "good")
                .then(|| format!("Backup #{id} is {} now, no longer a good backup.", b.status));
            (
                json!({ "id": id, "status": b.status, "sha256": b.sha256 }),
                blocked,
            )
        }
        Ok(None) => (
            json!({ "id": id, "status": "missing", "sha256": null }),
            Some(format!("Backup #{id} does not exist (any more).")),
        ),
        Err(e) => {
            tracing::warn!(backup = id, error = %e, "could not read a backup for an approval");
            (
                json!({ "id": id, "status": "unknown", "sha256": null }),
                None,
            )
        }
    }
}
