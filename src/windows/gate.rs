//! Opening a maintenance window as a gated action: one request per target of the
//! window, so each target's policy (and its approvers) decide, like for a
//! destructive action. Running the approved request is part of opening the
//! window ([`super::open`]); the executor only checks the window still waits.

use std::{collections::BTreeMap, sync::Arc};

use futures::future::BoxFuture;
use serde_json::{Value, json};

use crate::{
    approvals::{Action, ExecCtx, Severity},
    config::TargetKind,
};

/// The action kind.
pub const KIND: &str = "window.gate";

pub struct WindowGate;

impl Action for WindowGate {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn title(&self) -> &'static str {
        "Open a maintenance window"
    }

    fn target_kind(&self) -> TargetKind {
        TargetKind::Postgres
    }

    fn applies_to(&self, _kind: TargetKind) -> bool {
        true
    }

    /// A window is where destructive changes happen: approval as for one.
    fn severity(&self) -> Severity {
        Severity::Destructive
    }

    fn parse(&self, form: &BTreeMap<String, String>) -> Result<Value, String> {
        let id = form
            .get("window")
            .and_then(|v| v.trim().parse::<i64>().ok())
            .ok_or("Name the maintenance window.")?;
        Ok(json!({ "window": id }))
    }

    fn describe(&self, params: &Value) -> String {
        format!(
            "Opens maintenance window #{} (its steps: /windows/{}): the change it is for runs inside it.",
            params["window"], params["window"]
        )
    }

    fn details<'a>(
        &'a self,
        state: &'a crate::state::AppState,
        _target: &'a Arc<crate::targets::Target>,
        params: &'a Value,
    ) -> BoxFuture<'a, Vec<(String, String)>> {
        Box::pin(async move {
            let Some(id) = params["window"].as_i64() else {
                return vec![];
            };
            let Ok(Some(w)) = super::find(&state.db, id).await else {
                return vec![];
            };
            let steps = super::steps(&state.db, id).await.unwrap_or_default();
            vec![
                (
                    "Window".into(),
                    format!("#{} {} (/windows/{})", w.id, w.title, w.id),
                ),
                ("Targets".into(), w.targets_text()),
                (
                    "Planned".into(),
                    format!(
                        "{} for {} min",
                        crate::fmt::time(&w.planned_start),
                        w.planned_minutes
                    ),
                ),
                ("Owner".into(), w.owner_name),
                (
                    "Steps".into(),
                    steps
                        .iter()
                        .map(|s| {
                            format!(
                                "{}. {}{}",
                                s.position,
                                s.title,
                                if s.automatic { " (automatic)" } else { "" }
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
            ]
        })
    }

    fn execute<'a>(
        &'a self,
        ctx: ExecCtx,
        params: &'a Value,
    ) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            let id = params["window"]
                .as_i64()
                .ok_or("the request names no window")?;
            let w = super::find(&ctx.state.db, id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("there is no window #{id}"))?;
            if w.state != super::state::APPROVED {
                return Err(format!("window #{id} is {}, not waiting to open", w.state));
            }
            Ok(json!({ "window": id, "url": format!("/windows/{id}") }))
        })
    }
}
