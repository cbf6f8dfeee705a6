//! Per-target roles: a user's role may differ per target, or per target policy
//! (`production`, `staging`, `dev`).
//!
//! The rule (also in the README's Roles section):
//! - The user's global role (`users.role`) is the default on every target.
//! - A grant for the target by name wins over a grant for the target's policy,
//!   which wins over the global role; a grant may raise or lower the role there.
//!   Viewer is the lowest role: everyone signed in may look at every target.
//! - Grants are viewer, operator or approver. An admin is an admin on every target
//!   (grants of an admin's account have no effect): admin is about the console
//!   itself (users, tokens), and an admin could grant themselves anything anyway.
//! - A route that acts on one target (its path names the target, or a backup,
//!   restore, job, approval request or incident of it) checks the role on that
//!   target; a route about no single target checks the highest role the user has
//!   anywhere, and its page shows per target only what that target's role allows.
//!
//! Grants come from an admin (the user's page) or from a provider's
//! `[[oidc.target_roles]]` mapping, re-evaluated at every sign-in. All SQL about
//! `user_target_roles` lives here; callers own the transaction and the log.

use serde::{Deserialize, Serialize};
use sqlx::PgExecutor;

use super::Role;
use crate::config::Policy;

/// What a grant applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "name")]
pub enum Selector {
    /// One target, by name.
    Target(String),
    /// Every target with this policy.
    Policy(Policy),
}

impl Selector {
    /// A policy by name (`production`, `staging`, `dev`), case-insensitive.
    pub fn policy_from_str(s: &str) -> Option<Policy> {
        match s.trim().to_ascii_lowercase().as_str() {
            "production" => Some(Policy::Production),
            "staging" => Some(Policy::Staging),
            "dev" => Some(Policy::Dev),
            _ => None,
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Target(t) => write!(f, "target {t}"),
            Selector::Policy(p) => write!(f, "policy = {}", p.as_str()),
        }
    }
}

/// Where a grant came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// An admin set it on the user's page.
    Admin,
    /// A provider's `[[oidc.target_roles]]` mapping at the last sign-in.
    Oidc,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Admin => "admin",
            Source::Oidc => "oidc",
        }
    }
}

/// One row of `user_target_roles`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub id: i64,
    pub selector: Selector,
    pub role: Role,
    pub source: Source,
    /// Who or which mapping granted it (shown on the user's page).
    pub granted_by: String,
}

/// The roles that may be granted per target.
pub const GRANTABLE: [Role; 3] = [Role::Viewer, Role::Operator, Role::Approver];

/// A user's global role and per-target grants: what every access decision reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roles {
    pub global: Role,
    pub grants: Vec<Grant>,
}

impl Roles {
    /// Only a global role (no grants).
    pub fn global(role: Role) -> Roles {
        Roles {
            global: role,
            grants: vec![],
        }
    }

    /// The role on the target called `target`, whose policy is `policy`.
    pub fn on(&self, target: &str, policy: Policy) -> Role {
        self.explain(target, policy).0
    }

    /// The role on a target and why (`None`: the global role).
    pub fn explain(&self, target: &str, policy: Policy) -> (Role, Option<&Grant>) {
        if self.global == Role::Admin {
            return (Role::Admin, None);
        }
        let by_name = self
            .grants
            .iter()
            .find(|g| matches!(&g.selector, Selector::Target(t) if t == target));
        let by_policy = || {
            self.grants
                .iter()
                .find(|g| g.selector == Selector::Policy(policy))
        };
        match by_name.or_else(by_policy) {
            Some(g) => (g.role, Some(g)),
            None => (self.global, None),
        }
    }

    /// The role on the configured target called `target`; the global role for
    /// what belongs to no target (or to one no longer configured).
    pub fn on_named(&self, targets: &crate::targets::Registry, target: Option<&str>) -> Role {
        match target.and_then(|t| targets.get(t)) {
            Some(t) => self.on(t.name(), t.policy()),
            None => self.global,
        }
    }

    /// The highest role anywhere (the global one or a grant's): what a route
    /// about no single target checks.
    pub fn highest(&self) -> Role {
        self.grants
            .iter()
            .map(|g| g.role)
            .chain(std::iter::once(self.global))
            .max()
            .unwrap_or(self.global)
    }

    /// The lowest role on any of these targets (and the global one, for what
    /// belongs to no target).
    pub fn lowest<'a>(&self, targets: impl IntoIterator<Item = (&'a str, Policy)>) -> Role {
        targets
            .into_iter()
            .map(|(t, p)| self.on(t, p))
            .chain(std::iter::once(self.global))
            .min()
            .unwrap_or(self.global)
    }

    /// Whether the role on any of these targets, or the global one, is lower in
    /// `self` than in `before` (a session that had the higher one ends).
    pub fn dropped_from<'a>(
        &self,
        before: &Roles,
        targets: impl IntoIterator<Item = (&'a str, Policy)>,
    ) -> bool {
        self.global < before.global
            || targets
                .into_iter()
                .any(|(t, p)| self.on(t, p) < before.on(t, p))
    }
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    target: Option<String>,
    policy: Option<String>,
    role: String,
    source: String,
    granted_by: String,
}

impl Row {
    fn grant(self) -> Option<Grant> {
        let selector = match (self.target, self.policy) {
            (Some(t), None) => Selector::Target(t),
            (None, Some(p)) => Selector::Policy(Selector::policy_from_str(&p)?),
            _ => return None,
        };
        Some(Grant {
            id: self.id,
            selector,
            role: Role::parse(&self.role)?,
            source: if self.source == "oidc" {
                Source::Oidc
            } else {
                Source::Admin
            },
            granted_by: self.granted_by,
        })
    }
}

fn columns(s: &Selector) -> (Option<&str>, Option<&'static str>) {
    match s {
        Selector::Target(t) => (Some(t.as_str()), None),
        Selector::Policy(p) => (None, Some(p.as_str())),
    }
}

/// A user's grants, targets by name first, then policies.
pub async fn grants(db: impl PgExecutor<'_>, user_id: i64) -> Result<Vec<Grant>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, target, policy, role, source, granted_by FROM user_target_roles
         WHERE user_id = $1 ORDER BY target IS NULL, target, policy",
    )
    .bind(user_id)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().filter_map(Row::grant).collect())
}

/// The user's roles: the global one and the grants.
pub async fn load(
    db: impl PgExecutor<'_>,
    user_id: i64,
    global: Role,
) -> Result<Roles, sqlx::Error> {
    Ok(Roles {
        global,
        grants: grants(db, user_id).await?,
    })
}

/// Sets the role on a target or policy (replacing any grant for the same one).
/// Returns the role it replaced, if any.
pub async fn set(
    db: impl PgExecutor<'_>,
    user_id: i64,
    selector: &Selector,
    role: Role,
    source: Source,
    granted_by: &str,
) -> Result<Option<Role>, sqlx::Error> {
    let (target, policy) = columns(selector);
    let conflict = if target.is_some() {
        "(user_id, target) WHERE target IS NOT NULL"
    } else {
        "(user_id, policy) WHERE policy IS NOT NULL"
    };
    let old: Option<Option<String>> = sqlx::query_scalar(&format!(
        "WITH old AS (SELECT role FROM user_target_roles
                      WHERE user_id = $1 AND target IS NOT DISTINCT FROM $2 AND policy IS NOT DISTINCT FROM $3)
         INSERT INTO user_target_roles (user_id, target, policy, role, source, granted_by)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT {conflict} DO UPDATE SET role = EXCLUDED.role, source = EXCLUDED.source,
             granted_by = EXCLUDED.granted_by, updated_at = now()
         RETURNING (SELECT role FROM old)"
    ))
    .bind(user_id)
    .bind(target)
    .bind(policy)
    .bind(role.as_str())
    .bind(source.as_str())
    .bind(granted_by)
    .fetch_optional(db)
    .await?;
    Ok(old.flatten().as_deref().and_then(Role::parse))
}

/// Removes one grant of a user; returns it when there was one.
pub async fn remove(
    db: impl PgExecutor<'_>,
    user_id: i64,
    grant_id: i64,
) -> Result<Option<Grant>, sqlx::Error> {
    let row: Option<Row> = sqlx::query_as(
        "DELETE FROM user_target_roles WHERE user_id = $1 AND id = $2
         RETURNING id, target, policy, role, source, granted_by",
    )
    .bind(user_id)
    .bind(grant_id)
    .fetch_optional(db)
    .await?;
    Ok(row.and_then(Row::grant))
}

/// The role `user` has on the target called `target`, read from the console
/// database whatever role the caller's `CurrentUser` carries: what the approval
/// rules check. A target no longer configured gets the global role; a user not in
/// the database (none there) the role passed.
pub async fn role_on(
    state: &crate::state::AppState,
    user: &super::CurrentUser,
    target: &str,
) -> Result<Role, sqlx::Error> {
    let Some(u) = super::users::find(&state.db, user.id).await? else {
        return Ok(user.role);
    };
    let roles = load(&state.db, u.id, u.role()).await?;
    Ok(match state.targets.get(target) {
        Some(t) => roles.on(t.name(), t.policy()),
        None => roles.global,
    })
}

/// Makes a user's provider-set grants exactly `mapped` (selector, role, which
/// mapping): sets new and changed ones (a provider's mapping replaces an admin's
/// grant for the same target or policy), removes the ones the provider no longer
/// maps. Returns what changed, for the operations log (empty: nothing).
pub async fn replace_from_provider(
    conn: &mut sqlx::PgConnection,
    user_id: i64,
    mapped: &[(Selector, Role, String)],
) -> Result<Vec<serde_json::Value>, sqlx::Error> {
    use serde_json::json;
    let current = grants(&mut *conn, user_id).await?;
    let mut changes = vec![];
    for (selector, role, why) in mapped {
        let old = current.iter().find(|g| g.selector == *selector);
        if old.is_some_and(|g| g.source == Source::Oidc && g.role == *role && g.granted_by == *why)
        {
            continue;
        }
        set(&mut *conn, user_id, selector, *role, Source::Oidc, why).await?;
        changes.push(json!({
            "on": selector.to_string(),
            "from": old.map(|g| g.role.as_str()),
            "from_source": old.map(|g| g.source.as_str()),
            "to": role.as_str(),
            "mapping": why,
        }));
    }
    for g in current.iter().filter(|g| g.source == Source::Oidc) {
        if mapped.iter().any(|(s, _, _)| *s == g.selector) {
            continue;
        }
        remove(&mut *conn, user_id, g.id).await?;
        changes.push(json!({
            "on": g.selector.to_string(),
            "from": g.role.as_str(),
            "to": null,
            "mapping": format!("no longer mapped (was: {})", g.granted_by),
        }));
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(selector: Selector, role: Role) -> Grant {
        Grant {
            id: 0,
            selector,
            role,
            source: Source::Admin,
            granted_by: String::new(),
        }
    }

    #[test]
    fn a_target_grant_wins_over_a_policy_grant_which_wins_over_the_global_role() {
        let r = Roles {
            global: Role::Operator,
            grants: vec![
                grant(Selector::Policy(Policy::Production), Role::Viewer),
                grant(Selector::Target("stage".into()), Role::Approver),
                grant(Selector::Target("prod-reports".into()), Role::Operator),
            ],
        };
        assert_eq!(r.on("stage", Policy::Staging), Role::Approver);
        assert_eq!(r.on("prod", Policy::Production), Role::Viewer);
        assert_eq!(r.on("prod-reports", Policy::Production), Role::Operator);
        assert_eq!(r.on("dev", Policy::Dev), Role::Operator);
        assert_eq!(r.highest(), Role::Approver);
        assert_eq!(
            r.lowest([("dev", Policy::Dev), ("prod", Policy::Production)]),
            Role::Viewer
        );
    }

    #[test]
    fn an_admin_is_an_admin_everywhere() {
        let r = Roles {
            global: Role::Admin,
            grants: vec![grant(Selector::Policy(Policy::Production), Role::Viewer)],
        };
        assert_eq!(r.on("prod", Policy::Production), Role::Admin);
    }

    #[test]
    fn a_drop_on_one_target_is_a_drop() {
        let before = Roles {
            global: Role::Viewer,
            grants: vec![grant(Selector::Target("stage".into()), Role::Approver)],
        };
        let targets = [("stage", Policy::Staging), ("prod", Policy::Production)];
        let mut after = before.clone();
        after.grants[0].role = Role::Operator;
        assert!(after.dropped_from(&before, targets));
        let mut raised = before.clone();
        raised.global = Role::Operator;
        assert!(!raised.dropped_from(&before, targets));
        // A grant removed: the global role (viewer) applies again, lower than approver.
        assert!(Roles::global(Role::Viewer).dropped_from(&before, targets));
        // A grant for a target that is not configured changes nothing.
        let mut elsewhere = before.clone();
        elsewhere
            .grants
            .push(grant(Selector::Target("gone".into()), Role::Viewer));
        assert!(!before.dropped_from(&elsewhere, targets));
    }
}
