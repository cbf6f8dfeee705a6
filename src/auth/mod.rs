//! Accounts, roles, sessions, CSRF and the authorization check that every route
//! goes through.
//!
//! - [`Role`]: `viewer < operator < approver < admin`, each including the one before.
//! - [`guard`]: the per-route authorization middleware; the web layer's `routes()` attaches
//!   it to every route from the route's declared [`Access`], so no route exists
//!   without an access decision.
//! - [`csrf`]: the synchronizer token checked on every state-changing request.
//! - [`login`]: password check with lockout; [`users`]: the users table.
//! - [`totp`]: two-factor sign-in (TOTP and recovery codes) for local accounts.
//! - [`oidc`]: single sign-on through OpenID Connect providers (`[[oidc]]`).
//! - [`roles`]: per-target roles (a user's role on one target or on every target of
//!   a policy), which the authorization check reads for the target a route acts on.

pub mod csrf;
pub mod guard;
pub mod login;
pub mod oidc;
pub mod password;
pub mod roles;
pub mod session;
pub mod tokens;
pub mod totp;
pub mod users;

use serde::{Deserialize, Serialize};

/// What a user may do. Ordered: each role includes everything of the ones before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Approver,
    Admin,
}

impl Role {
    /// All roles, lowest first.
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Operator, Role::Approver, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Approver => "approver",
            Role::Admin => "admin",
        }
    }

    /// Parses a role name as typed by a person (case-insensitive).
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, logged in or not (login page, health checks, static files).
    Public,
    /// Logged-in users whose role is at least this one: on the target the route
    /// acts on (see [`guard`]), or anywhere for a route about no single target.
    AtLeast(Role),
    /// API clients with a bearer token that has this scope (sessions do not count).
    Token(&'static str),
    /// The metrics scrape: the `[metrics]` bearer token, or anyone when `[metrics]
    /// public = true`; otherwise no such page (404). Sessions do not count.
    Metrics,
}

/// The logged-in user of a request, put into the request's extensions by
/// [`guard`]. Handlers take it as an extractor.
#[derive(Debug, Clone)]
pub struct CurrentUser {
    pub id: i64,
    pub username: String,
    /// The role this request acts with: the role on the route's target (per-target
    /// roles, [`roles`]), or the highest one anywhere on a route about no single
    /// target. Set by [`guard`].
    pub role: Role,
    /// The CSRF token of this session, for forms rendered on the page.
    pub csrf_token: String,
}

impl CurrentUser {
    pub fn has(&self, role: Role) -> bool {
        self.role >= role
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for CurrentUser {
    type Rejection = crate::error::AppError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<CurrentUser>()
            .cloned()
            .ok_or(crate::error::AppError::Unauthenticated)
    }
}

impl<S: Send + Sync> axum::extract::OptionalFromRequestParts<S> for CurrentUser {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<CurrentUser>().cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_include_the_ones_before_them() {
        assert!(Role::Admin > Role::Approver);
        assert!(Role::Approver > Role::Operator);
        assert!(Role::Operator > Role::Viewer);
        assert_eq!(Role::parse(" Approver "), Some(Role::Approver));
        assert_eq!(Role::parse("root"), None);
    }
}
