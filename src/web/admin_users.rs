//! Admin pages for users: list, create, change role, disable/enable, reset
//! password; a user's own page with their role on every target, their per-target
//! roles (set and removed here) and the reset of their second factor. Each change
//! is written to the operations log in the same transaction.
//!
//! Over 600 lines: the user administration pages (list, create, roles per target,
//! disable, password and two-factor resets) share the admin checks and the refusal
//! rules (never lock out the last admin).

use askama::Template;
use askama_web::WebTemplate;
use axum::{
    Form,
    extract::{Path, State},
    response::Redirect,
};
use serde::Deserialize;
use serde_json::json;
use tower_sessions::Session;

use super::{Layout, flash};
use crate::{
    app::AppState,
    audit::{self, AuditCtx, Entry},
    auth::{
        CurrentUser, Role, password, roles, totp,
        users::{self, User, UserError, Username},
    },
    config::Policy,
    error::{AppError, AppResult},
};

#[derive(Template, WebTemplate)]
#[template(path = "admin/users.html")]
pub struct UsersPage {
    layout: Layout,
    users: Vec<User>,
    roles: [Role; 4],
    flash: Option<flash::Flash>,
    /// Only admins may sign in with a password.
    password_admins_only: bool,
    /// Whether any `[[oidc]]` provider is configured.
    has_sso: bool,
}

/// `GET /admin/users`
pub async fn list_users(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
) -> AppResult<UsersPage> {
    Ok(UsersPage {
        layout: Layout::load(&state, user, "users").await?,
        users: users::list(&state.db).await?,
        roles: Role::ALL,
        flash: flash::take(&session).await,
        password_admins_only: users::password_sign_in(&state.db).await?
            == users::PasswordSignIn::AdminsOnly,
        has_sso: !state.config.oidc.is_empty(),
    })
}

#[derive(Deserialize)]
pub struct PasswordSignInForm {
    #[serde(default)]
    value: String,
}

/// `POST /admin/settings/password-sign-in`: password sign-in for everyone, or only
/// for admins (the break-glass accounts) once everyone else uses a provider.
pub async fn set_password_sign_in(
    State(state): State<AppState>,
    session: Session,
    ctx: AuditCtx,
    Form(form): Form<PasswordSignInForm>,
) -> AppResult<Redirect> {
    let params = json!({ "value": form.value.chars().take(20).collect::<String>() });
    let Some(value) = users::PasswordSignIn::parse(&form.value) else {
        return refuse(
            &state,
            &session,
            &ctx,
            "auth.settings.password_sign_in",
            params,
            "Choose everyone or admins.".into(),
        )
        .await;
    };
    let mut tx = state.db.begin().await?;
    users::set_password_sign_in(&mut *tx, value).await?;
    audit::record(
        &mut *tx,
        &ctx,
        Entry::new("auth.settings.password_sign_in").params(params),
    )
    .await?;
    tx.commit().await?;
    flash::ok(
        &session,
        match value {
            users::PasswordSignIn::Everyone => "Everyone may sign in with a password again.",
            users::PasswordSignIn::AdminsOnly => {
                "Password sign-in is now limited to admins; everyone else signs in through a provider."
            }
        },
    )
    .await;
    Ok(Redirect::to(BACK))
}

const BACK: &str = "/admin/users";

/// Records a refused user change and shows why on the next page.
async fn refuse(
    state: &AppState,
    session: &Session,
    ctx: &AuditCtx,
    kind: &'static str,
    params: serde_json::Value,
    message: String,
) -> AppResult<Redirect> {
    audit::record(
        &state.db,
        ctx,
        Entry::new(kind).params(params).failed(message.clone()),
    )
    .await?;
    flash::error(session, message).await;
    Ok(Redirect::to(BACK))
}

#[derive(Deserialize)]
pub struct NewUserForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    role: String,
    /// Empty: a password is generated and shown once.
    #[serde(default)]
    password: String,
}

/// `POST /admin/users`
pub async fn create_user(
    State(state): State<AppState>,
    session: Session,
    ctx: AuditCtx,
    Form(form): Form<NewUserForm>,
) -> AppResult<Redirect> {
    let params = json!({ "username": form.username.chars().take(64).collect::<String>(), "role": form.role });
    let username = match Username::parse(&form.username) {
        Ok(u) => u,
        Err(m) => return refuse(&state, &session, &ctx, "user.create", params, m).await,
    };
    let Some(role) = Role::parse(&form.role) else {
        return refuse(
            &state,
            &session,
            &ctx,
            "user.create",
            params,
            "Choose a role.".into(),
        )
        .await;
    };
    let generated = form.password.is_empty();
    let pw = if generated {
        password::generate()
    } else {
        form.password.clone()
    };
    if let Err(m) = password::check_strength(&pw) {
        return refuse(&state, &session, &ctx, "user.create", params, m).await;
    }
    let hash = tokio::task::spawn_blocking(move || password::hash(&pw).map(|h| (h, pw)))
        .await
        .map_err(|e| AppError::Internal(e.into()))??;
    let mut tx = state.db.begin().await?;
    match users::create(&mut *tx, &username, &hash.0, role).await {
        Ok(id) => {
            audit::record(
                &mut *tx,
                &ctx,
                Entry::new("user.create")
                    .params(params)
                    .result(json!({ "user_id": id })),
            )
            .await?;
            tx.commit().await?;
            let msg = if generated {
                format!(
                    "User {} created with the {role} role. Their password, shown only now: {}",
                    username.as_str(),
                    hash.1
                )
            } else {
                format!("User {} created with the {role} role.", username.as_str())
            };
            flash::ok(&session, msg).await;
            Ok(Redirect::to(BACK))
        }
        Err(UserError::Db(e)) => Err(e.into()),
        Err(e) => {
            drop(tx);
            refuse(&state, &session, &ctx, "user.create", params, e.to_string()).await
        }
    }
}

#[derive(Deserialize)]
pub struct RoleForm {
    #[serde(default)]
    role: String,
}

async fn load(state: &AppState, id: i64) -> AppResult<User> {
    users::find(&state.db, id).await?.ok_or(AppError::NotFound)
}

/// `POST /admin/users/{id}/role`
pub async fn change_role(
    State(state): State<AppState>,
    me: CurrentUser,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
    Form(form): Form<RoleForm>,
) -> AppResult<Redirect> {
    let target = load(&state, id).await?;
    let params = json!({ "user_id": id, "username": target.username, "old_role": target.role, "new_role": form.role });
    let Some(role) = Role::parse(&form.role) else {
        return refuse(
            &state,
            &session,
            &ctx,
            "user.role.change",
            params,
            "Choose a role.".into(),
        )
        .await;
    };
    let mut tx = state.db.begin().await?;
    if target.role() == Role::Admin
        && role != Role::Admin
        && users::count_other_active_admins(&mut *tx, id).await? == 0
    {
        drop(tx);
        return refuse(
            &state,
            &session,
            &ctx,
            "user.role.change",
            params,
            format!(
                "{} is the last admin; make someone else admin first.",
                target.username
            ),
        )
        .await;
    }
    users::set_role(&mut *tx, id, role)
        .await
        .map_err(user_err)?;
    audit::record(
        &mut *tx,
        &ctx,
        Entry::new("user.role.change").params(params),
    )
    .await?;
    tx.commit().await?;
    let note = if me.id == id {
        " (your own role: it applies from your next page)"
    } else {
        ""
    };
    flash::ok(
        &session,
        format!("{} now has the {role} role{note}.", target.username),
    )
    .await;
    Ok(Redirect::to(BACK))
}

fn user_err(e: UserError) -> AppError {
    match e {
        UserError::NotFound => AppError::NotFound,
        UserError::Db(e) => e.into(),
        other => AppError::Conflict(other.to_string()),
    }
}

/// `POST /admin/users/{id}/disable`: the user's sessions end at their next request.
pub async fn disable_user(
    State(state): State<AppState>,
    me: CurrentUser,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
) -> AppResult<Redirect> {
    let target = load(&state, id).await?;
    let params = json!({ "user_id": id, "username": target.username });
    if me.id == id {
        return refuse(
            &state,
            &session,
            &ctx,
            "user.disable",
            params,
            "You cannot disable your own account.".into(),
        )
        .await;
    }
    let mut tx = state.db.begin().await?;
    if target.role() == Role::Admin && users::count_other_active_admins(&mut *tx, id).await? == 0 {
        drop(tx);
        return refuse(
            &state,
            &session,
            &ctx,
            "user.disable",
            params,
            format!(
                "{} is the last admin and cannot be disabled.",
                target.username
            ),
        )
        .await;
    }
    users::set_disabled(&mut *tx, id, true)
        .await
        .map_err(user_err)?;
    audit::record(&mut *tx, &ctx, Entry::new("user.disable").params(params)).await?;
    tx.commit().await?;
    flash::ok(
        &session,
        format!("{} is disabled and signed out.", target.username),
    )
    .await;
    Ok(Redirect::to(BACK))
}

/// `POST /admin/users/{id}/enable`
pub async fn enable_user(
    State(state): State<AppState>,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
) -> AppResult<Redirect> {
    let target = load(&state, id).await?;
    let mut tx = state.db.begin().await?;
    users::set_disabled(&mut *tx, id, false)
        .await
        .map_err(user_err)?;
    audit::record(
        &mut *tx,
        &ctx,
        Entry::new("user.enable").params(json!({ "user_id": id, "username": target.username })),
    )
    .await?;
    tx.commit().await?;
    flash::ok(&session, format!("{} can sign in again.", target.username)).await;
    Ok(Redirect::to(BACK))
}

/// `POST /admin/users/{id}/password`: sets a generated password, shown once, and
/// lifts any lockout; the user's existing sessions end.
pub async fn reset_password(
    State(state): State<AppState>,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
) -> AppResult<Redirect> {
    let target = load(&state, id).await?;
    let pw = password::generate();
    let pw2 = pw.clone();
    let hash = tokio::task::spawn_blocking(move || password::hash(&pw2))
        .await
        .map_err(|e| AppError::Internal(e.into()))??;
    let mut tx = state.db.begin().await?;
    users::set_password(&mut *tx, id, &hash)
        .await
        .map_err(user_err)?;
    audit::record(
        &mut *tx,
        &ctx,
        Entry::new("user.password.reset")
            .params(json!({ "user_id": id, "username": target.username })),
    )
    .await?;
    tx.commit().await?;
    flash::ok(
        &session,
        format!("New password for {}, shown only now: {pw}", target.username),
    )
    .await;
    Ok(Redirect::to(BACK))
}

/// One configured target on a user's page: their role there and why.
pub struct TargetRole {
    name: String,
    policy: &'static str,
    role: Role,
    why: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "admin/user.html")]
pub struct UserPage {
    layout: Layout,
    u: User,
    grants: Vec<roles::Grant>,
    per_target: Vec<TargetRole>,
    /// The form's choices: `target:NAME` and `policy:NAME`, with their labels.
    scopes: Vec<(String, String)>,
    grantable: [Role; 3],
    admin_everywhere: bool,
    two_factor_since: Option<chrono::DateTime<chrono::Utc>>,
    recovery_left: usize,
    flash: Option<flash::Flash>,
}

fn user_page(id: i64) -> String {
    format!("/admin/users/{id}")
}

/// `GET /admin/users/{id}`: the user's global role and where it came from, their
/// role on every target and why, the per-target roles (who or which mapping
/// granted each), and their second factor.
pub async fn show_user(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    Path(id): Path<i64>,
) -> AppResult<UserPage> {
    let u = load(&state, id).await?;
    let all = roles::load(&state.db, u.id, u.role()).await?;
    let per_target = state
        .targets
        .all()
        .map(|t| {
            let (role, grant) = all.explain(t.name(), t.policy());
            let why = match grant {
                _ if all.global == Role::Admin => "admin: an admin everywhere".to_string(),
                Some(g) => format!("{} ({})", g.selector, g.granted_by),
                None => "global role".to_string(),
            };
            TargetRole {
                name: t.name().to_string(),
                policy: t.policy().as_str(),
                role,
                why,
            }
        })
        .collect();
    let scopes = state
        .targets
        .all()
        .map(|t| {
            (
                format!("target:{}", t.name()),
                format!("target {} ({})", t.name(), t.policy().as_str()),
            )
        })
        .chain([Policy::Production, Policy::Staging, Policy::Dev].map(|p| {
            (
                format!("policy:{}", p.as_str()),
                format!("every {} target", p.as_str()),
            )
        }))
        .collect();
    let enrolment = totp::enrolment(&state.db, id).await?;
    let recovery_left = totp::unused_recovery_codes(&state.db, id).await?.len();
    Ok(UserPage {
        layout: Layout::load(&state, user, "users").await?,
        admin_everywhere: all.global == Role::Admin,
        grants: all.grants,
        u,
        per_target,
        scopes,
        grantable: roles::GRANTABLE,
        two_factor_since: enrolment.map(|e| e.enrolled_at),
        recovery_left,
        flash: flash::take(&session).await,
    })
}

#[derive(Deserialize)]
pub struct TargetRoleForm {
    /// `target:NAME` or `policy:NAME`.
    #[serde(default)]
    scope: String,
    #[serde(default)]
    role: String,
}

/// Records a refused change on a user's page and shows why there.
async fn refuse_on_page(
    state: &AppState,
    session: &Session,
    ctx: &AuditCtx,
    id: i64,
    kind: &'static str,
    params: serde_json::Value,
    message: String,
) -> AppResult<Redirect> {
    audit::record(
        &state.db,
        ctx,
        Entry::new(kind).params(params).failed(message.clone()),
    )
    .await?;
    flash::error(session, message).await;
    Ok(Redirect::to(&user_page(id)))
}

/// `POST /admin/users/{id}/target-roles`: sets the user's role on one target or on
/// every target of a policy. A lower role than before ends their sessions that had
/// the higher one at their next request.
pub async fn set_target_role(
    State(state): State<AppState>,
    me: CurrentUser,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
    Form(form): Form<TargetRoleForm>,
) -> AppResult<Redirect> {
    let u = load(&state, id).await?;
    let mut params = json!({
        "user_id": id, "username": u.username,
        "scope": form.scope.chars().take(80).collect::<String>(),
        "role": form.role.chars().take(20).collect::<String>(),
    });
    const KIND: &str = "user.target_role.set";
    let selector = match form.scope.split_once(':') {
        Some(("target", name)) => state
            .targets
            .get(name)
            .map(|t| roles::Selector::Target(t.name().to_string())),
        Some(("policy", p)) => roles::Selector::policy_from_str(p).map(roles::Selector::Policy),
        _ => None,
    };
    let Some(selector) = selector else {
        let m = "Choose a configured target or a policy (production, staging, dev).".into();
        return refuse_on_page(&state, &session, &ctx, id, KIND, params, m).await;
    };
    let Some(role) = Role::parse(&form.role).filter(|r| roles::GRANTABLE.contains(r)) else {
        let m = "Choose viewer, operator or approver: admin is a global role only.".into();
        return refuse_on_page(&state, &session, &ctx, id, KIND, params, m).await;
    };
    let mut tx = state.db.begin().await?;
    let old = roles::set(
        &mut *tx,
        id,
        &selector,
        role,
        roles::Source::Admin,
        &format!("set by {}", me.username),
    )
    .await?;
    params["on"] = json!(selector.to_string());
    params["old_role"] = json!(old.map(Role::as_str));
    audit::record(&mut *tx, &ctx, Entry::new(KIND).params(params)).await?;
    tx.commit().await?;
    flash::ok(
        &session,
        format!("{} is now {role} on {selector}.", u.username),
    )
    .await;
    Ok(Redirect::to(&user_page(id)))
}

/// `POST /admin/users/{id}/target-roles/{grant}/remove`: the global role applies
/// there again.
pub async fn remove_target_role(
    State(state): State<AppState>,
    session: Session,
    ctx: AuditCtx,
    Path((id, grant)): Path<(i64, i64)>,
) -> AppResult<Redirect> {
    let u = load(&state, id).await?;
    let mut tx = state.db.begin().await?;
    let Some(g) = roles::remove(&mut *tx, id, grant).await? else {
        drop(tx);
        let params = json!({ "user_id": id, "username": u.username, "grant_id": grant });
        let m = "That per-target role no longer exists.".into();
        return refuse_on_page(
            &state,
            &session,
            &ctx,
            id,
            "user.target_role.remove",
            params,
            m,
        )
        .await;
    };
    audit::record(
        &mut *tx,
        &ctx,
        Entry::new("user.target_role.remove").params(json!({
            "user_id": id, "username": u.username, "on": g.selector.to_string(),
            "role": g.role.as_str(), "granted_by": g.granted_by, "source": g.source.as_str(),
        })),
    )
    .await?;
    tx.commit().await?;
    flash::ok(
        &session,
        format!(
            "{} no longer has a role of their own on {}: the global role ({}) applies there.",
            u.username,
            g.selector,
            u.role()
        ),
    )
    .await;
    Ok(Redirect::to(&user_page(id)))
}

/// `POST /admin/users/{id}/two-factor/reset`: removes the user's authenticator and
/// recovery codes (a lost phone). Where two-factor sign-in is required for their
/// role, they enrol again at their next sign-in.
pub async fn reset_two_factor(
    State(state): State<AppState>,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
) -> AppResult<Redirect> {
    let u = load(&state, id).await?;
    let params = json!({ "user_id": id, "username": u.username });
    let mut tx = state.db.begin().await?;
    if !totp::remove(&mut tx, id).await? {
        drop(tx);
        let m = format!("{} has no second factor to reset.", u.username);
        return refuse_on_page(
            &state,
            &session,
            &ctx,
            id,
            "user.two_factor.reset",
            params,
            m,
        )
        .await;
    }
    audit::record(
        &mut *tx,
        &ctx,
        Entry::new("user.two_factor.reset").params(params),
    )
    .await?;
    tx.commit().await?;
    flash::ok(
        &session,
        format!(
            "Two-factor sign-in of {} is reset: their authenticator and recovery codes no longer work.",
            u.username
        ),
    )
    .await;
    Ok(Redirect::to(&user_page(id)))
}
