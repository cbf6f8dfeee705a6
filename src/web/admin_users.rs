//! Admin pages for users: list, create, change role, disable/enable, reset
//! password. Each change is written to the operations log in the same transaction.

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
        CurrentUser, Role, password,
        users::{self, User, UserError, Username},
    },
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
