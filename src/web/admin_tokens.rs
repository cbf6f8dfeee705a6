//! Admin page for API tokens: create (the secret is shown once), list, revoke.

use askama::Template;
use askama_web::WebTemplate;
use axum::{
    Form,
    extract::{Path, State},
    response::Redirect,
};
use serde_json::json;
use tower_sessions::Session;

use super::{Layout, flash};
use crate::{
    app::AppState,
    audit::{self, AuditCtx, Entry},
    auth::{
        CurrentUser,
        tokens::{self, SCOPES, Token},
    },
    error::AppResult,
};

#[derive(Template, WebTemplate)]
#[template(path = "admin/tokens.html")]
pub struct TokensPage {
    layout: Layout,
    tokens: Vec<Token>,
    scopes: [&'static str; 4],
    targets: Vec<String>,
    flash: Option<flash::Flash>,
}

/// `GET /admin/tokens`
pub async fn list_tokens(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
) -> AppResult<TokensPage> {
    Ok(TokensPage {
        tokens: tokens::list(&state.db).await?,
        scopes: SCOPES,
        targets: state.targets.all().map(|t| t.name().to_string()).collect(),
        flash: flash::take(&session).await,
        layout: Layout::load(&state, user, "tokens").await?,
    })
}

const BACK: &str = "/admin/tokens";

/// `POST /admin/tokens`: fields `name`, `scope` (repeated), `target` (repeated; none = all).
pub async fn create_token(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    ctx: AuditCtx,
    Form(form): Form<Vec<(String, String)>>,
) -> AppResult<Redirect> {
    let name = form
        .iter()
        .find(|(k, _)| k == "name")
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let scopes: Vec<String> = form
        .iter()
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v.clone())
        .collect();
    let targets: Vec<String> = form
        .iter()
        .filter(|(k, _)| k == "target")
        .map(|(_, v)| v.clone())
        .collect();
    let params = json!({ "name": name, "scopes": scopes, "targets": targets });
    let problem = if name.is_empty() || name.len() > 64 {
        Some(
            "Give the token a name of 1 to 64 characters (what uses it, e.g. “deploy pipeline”)."
                .to_string(),
        )
    } else if scopes.is_empty() || scopes.iter().any(|s| !SCOPES.contains(&s.as_str())) {
        Some("Choose at least one scope.".to_string())
    } else {
        targets
            .iter()
            .find(|t| state.targets.get(t).is_none())
            .map(|t| format!("There is no target called {t}."))
    };
    if let Some(msg) = problem {
        audit::record(
            &state.db,
            &ctx,
            Entry::new("token.create")
                .params(params)
                .failed(msg.clone()),
        )
        .await?;
        flash::error(&session, msg).await;
        return Ok(Redirect::to(BACK));
    }
    let mut tx = state.db.begin().await?;
    let limited = (!targets.is_empty()).then_some(targets.as_slice());
    let (id, secret) =
        tokens::create(&mut *tx, &name, &scopes, limited, (user.id, &user.username)).await?;
    audit::record(
        &mut *tx,
        &ctx,
        Entry::new("token.create")
            .params(params)
            .result(json!({ "token_id": id })),
    )
    .await?;
    tx.commit().await?;
    flash::ok(
        &session,
        format!("Token “{name}” created. Copy it now, it is shown only once: {secret}"),
    )
    .await;
    Ok(Redirect::to(BACK))
}

/// `POST /admin/tokens/{id}/revoke`
pub async fn revoke_token(
    State(state): State<AppState>,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
) -> AppResult<Redirect> {
    let mut tx = state.db.begin().await?;
    let done = tokens::revoke(&mut *tx, id).await?;
    let entry = Entry::new("token.revoke").params(json!({ "token_id": id }));
    if done {
        audit::record(&mut *tx, &ctx, entry).await?;
        tx.commit().await?;
        flash::ok(&session, "Revoked: the token no longer works.").await;
    } else {
        drop(tx);
        audit::record(&state.db, &ctx, entry.failed("no such active token")).await?;
        flash::error(&session, "There is no such active token.").await;
    }
    Ok(Redirect::to(BACK))
}
