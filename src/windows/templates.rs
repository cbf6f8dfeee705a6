//! Window templates: named, ordered steps, each automatic (dbops runs it and
//! records it) or manual (a named person ticks it, with a note). Two are built
//! in — the seed runbooks' checklists — and more come from the config file
//! (`[[windows.templates]]`).

use serde::Serialize;
use serde_json::{Value, json};

/// What a step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum StepKind {
    /// Announce the window (webhook): who, what, when, expected duration.
    Announce,
    /// A backup of every target, waited for until good, pinned for the window.
    Backup,
    /// A restore point on every archived PostgreSQL target.
    RestorePoint,
    /// Migration status of every PostgreSQL target, before the change.
    MigrationsBefore,
    /// Migration status again, with the difference from before.
    MigrationsAfter,
    /// An HTTP health URL, asked until it answers as configured.
    HealthUrl,
    /// Every target: reachable, no blocked sessions, replica lag.
    TargetHealth,
    /// Announce the close with a summary (run when the window closes).
    AnnounceClose,
    /// Done by a person, who ticks it with a note.
    Manual,
}

impl StepKind {
    pub const ALL: [StepKind; 9] = [
        StepKind::Announce,
        StepKind::Backup,
        StepKind::RestorePoint,
        StepKind::MigrationsBefore,
        StepKind::MigrationsAfter,
        StepKind::HealthUrl,
        StepKind::TargetHealth,
        StepKind::AnnounceClose,
        StepKind::Manual,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Announce => "announce",
            StepKind::Backup => "backup",
            StepKind::RestorePoint => "restore_point",
            StepKind::MigrationsBefore => "migrations_before",
            StepKind::MigrationsAfter => "migrations_after",
            StepKind::HealthUrl => "health_url",
            StepKind::TargetHealth => "target_health",
            StepKind::AnnounceClose => "announce_close",
            StepKind::Manual => "manual",
        }
    }

    pub fn parse(s: &str) -> Option<StepKind> {
        StepKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn automatic(self) -> bool {
        self != StepKind::Manual
    }

    /// The title a step of this kind gets when its template names none.
    pub fn default_title(self) -> &'static str {
        match self {
            StepKind::Announce => "Announce the window",
            StepKind::Backup => "Take a backup of each target and wait until it is good (pinned)",
            StepKind::RestorePoint => "Create a restore point (archived targets)",
            StepKind::MigrationsBefore => "Read migration status before",
            StepKind::MigrationsAfter => "Read migration status after (and the difference)",
            StepKind::HealthUrl => "Check the health URL until it answers",
            StepKind::TargetHealth => {
                "Check target health (reachable, no blocked sessions, replica lag)"
            }
            StepKind::AnnounceClose => "Announce the close with a summary",
            StepKind::Manual => "Manual step",
        }
    }
}

/// One step of a template.
#[derive(Debug, Clone, Serialize)]
pub struct StepSpec {
    pub kind: StepKind,
    pub title: String,
    /// Settings of the step (`expect_status`, `timeout_seconds`, `contains` for
    /// the health URL).
    pub config: Value,
}

impl StepSpec {
    fn auto(kind: StepKind) -> StepSpec {
        StepSpec {
            kind,
            title: kind.default_title().to_string(),
            config: json!({}),
        }
    }

    fn manual(title: &str) -> StepSpec {
        StepSpec {
            kind: StepKind::Manual,
            title: title.to_string(),
            config: json!({}),
        }
    }
}

/// A named list of steps.
#[derive(Debug, Clone, Serialize)]
pub struct Template {
    /// The name used on the command line (`--template marketplace`).
    pub name: String,
    pub title: String,
    pub description: String,
    pub builtin: bool,
    pub steps: Vec<StepSpec>,
}

/// The marketplace runbook's "Maintenance windows" checklist: announce in #ops,
/// pg_dump backup, stop the backend, perform the operation, restart, verify
/// health, close the window.
pub fn marketplace() -> Template {
    Template {
        name: "marketplace".into(),
        title: "Maintenance window (marketplace runbook)".into(),
        description:
            "For a major version bump, a restore or a destructive migration: announce, back up, \
                      stop the backend, perform the operation, restart, verify health, close."
                .into(),
        builtin: true,
        steps: vec![
            StepSpec::auto(StepKind::Announce),
            StepSpec::auto(StepKind::Backup),
            StepSpec::auto(StepKind::RestorePoint),
            StepSpec::auto(StepKind::MigrationsBefore),
            StepSpec::manual("Stop the backend so writes stop (docker compose stop backend)"),
            StepSpec::manual("Perform the operation"),
            StepSpec::manual("Restart the backend (docker compose start backend)"),
            StepSpec::auto(StepKind::MigrationsAfter),
            StepSpec::auto(StepKind::HealthUrl),
            StepSpec::auto(StepKind::TargetHealth),
            StepSpec::auto(StepKind::AnnounceClose),
        ],
    }
}

/// The customer-portal runbook's "Migration checklist": tested on staging,
/// rollback verified, duration estimated, window scheduled, backup before
/// migrating, team notified.
pub fn migration_checklist() -> Template {
    Template {
        name: "migration-checklist".into(),
        title: "Migration checklist (customer-portal runbook)".into(),
        description:
            "Before deploying migrations to production: tested on staging, rollback verified, \
                      duration estimated, a backup before migrating, the team notified."
                .into(),
        builtin: true,
        steps: vec![
            StepSpec::manual("Test the migration on staging"),
            StepSpec::manual("Verify the rollback procedure exists"),
            StepSpec::manual("Estimate the migration's duration"),
            StepSpec::auto(StepKind::Announce),
            StepSpec::auto(StepKind::Backup),
            StepSpec::auto(StepKind::RestorePoint),
            StepSpec::auto(StepKind::MigrationsBefore),
            StepSpec::manual("Run the migration"),
            StepSpec::auto(StepKind::MigrationsAfter),
            StepSpec::auto(StepKind::HealthUrl),
            StepSpec::auto(StepKind::TargetHealth),
            StepSpec::auto(StepKind::AnnounceClose),
        ],
    }
}

/// Every template: the built-in ones, then the config's (a config template with
/// a built-in's name replaces it).
pub fn all(config: &crate::config::Config) -> Vec<Template> {
    let mut list = vec![marketplace(), migration_checklist()];
    for raw in &config.windows.templates {
        let t = from_config(raw);
        list.retain(|b| b.name != t.name);
        list.push(t);
    }
    list
}

/// The template called `name`.
pub fn find(config: &crate::config::Config, name: &str) -> Option<Template> {
    all(config).into_iter().find(|t| t.name == name)
}

/// A template from `[[windows.templates]]` (checked when the config was read).
fn from_config(raw: &crate::config::WindowTemplateConfig) -> Template {
    Template {
        name: raw.name.clone(),
        title: raw.title.clone().unwrap_or_else(|| raw.name.clone()),
        description: raw.description.clone().unwrap_or_default(),
        builtin: false,
        steps: raw
            .steps
            .iter()
            .map(|s| {
                let kind = StepKind::parse(&s.kind).unwrap_or(StepKind::Manual);
                StepSpec {
                    kind,
                    title: s
                        .title
                        .clone()
                        .unwrap_or_else(|| kind.default_title().to_string()),
                    config: json!({
                        "expect_status": s.expect_status,
                        "contains": s.contains,
                        "timeout_seconds": s.timeout_seconds,
                    }),
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_templates_follow_the_runbooks_and_end_by_announcing_the_close() {
        for t in [marketplace(), migration_checklist()] {
            assert_eq!(t.steps.last().unwrap().kind, StepKind::AnnounceClose);
            assert!(t.steps.iter().any(|s| s.kind == StepKind::Backup));
            assert!(t.steps.iter().any(|s| s.kind == StepKind::Manual));
        }
        for k in StepKind::ALL {
            assert_eq!(StepKind::parse(k.as_str()), Some(k));
        }
    }
}
