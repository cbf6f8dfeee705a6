//! The web layer: every route in one table ([`routes`]), each with its access
//! decision, plus the middleware that renders errors, sets security headers and
//! serves the embedded static files. Handlers live in one module per page.
//!
//! Over 600 lines: the route table is one list on purpose: every route with its
//! role is read (and tested) in one place.

pub mod activity;
pub mod admin_tokens;
pub mod admin_users;
pub mod approvals;
pub mod backups;
pub mod chart;
pub mod flash;
/// Formatting for people lives below the web layer (capabilities use it too).
pub use crate::fmt;
pub mod health;
pub mod jobs;
pub mod login;
pub mod migrations;
pub mod operations;
pub mod overview;
pub mod pitr;
pub mod redis;
pub mod reports;
pub mod restores;
pub mod two_factor;
pub mod windows;

use askama::Template;
use axum::{
    Router,
    body::Body,
    extract::{Path, Request},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::{Next, from_fn_with_state},
    response::{IntoResponse, Response},
    routing::{MethodRouter, get, post},
};

use crate::{
    app::{AppState, REQUEST_ID},
    auth::{Access, CurrentUser, Role, guard},
    error::{AppError, ErrorInfo},
};

/// One route: method, path, who may call it, and its handler.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
    pub handler: MethodRouter<AppState>,
}

fn route(
    method: Method,
    path: &'static str,
    access: Access,
    handler: MethodRouter<AppState>,
) -> Route {
    Route {
        method,
        path,
        access,
        handler,
    }
}

/// Every route of dbops. The router is built from this list and nothing else, so
/// no route exists without an access decision, and the route × role test walks
/// exactly what is served.
pub fn routes() -> Vec<Route> {
    use Access::{AtLeast, Public};
    use Method as M;
    use Role::*;
    vec![
        route(M::GET, "/login", Public, get(login::login_page)),
        route(M::POST, "/login", Public, post(login::login)),
        route(M::POST, "/logout", Public, post(login::logout)),
        route(
            M::GET,
            "/login/two-factor",
            Public,
            get(two_factor::second_factor_page),
        ),
        route(
            M::POST,
            "/login/two-factor",
            Public,
            post(two_factor::submit_second_factor),
        ),
        route(
            M::GET,
            "/account/two-factor",
            AtLeast(Viewer),
            get(two_factor::show_two_factor),
        ),
        route(
            M::POST,
            "/account/two-factor",
            AtLeast(Viewer),
            post(two_factor::enrol_two_factor),
        ),
        route(
            M::GET,
            "/login/oidc/{provider}",
            Public,
            get(login::start_sso),
        ),
        route(
            M::GET,
            "/login/oidc/{provider}/callback",
            Public,
            get(login::finish_sso),
        ),
        route(M::GET, "/healthz", Public, get(health::healthz)),
        route(M::GET, "/readyz", Public, get(health::readyz)),
        route(M::GET, "/metrics", Access::Metrics, get(health::metrics)),
        route(M::GET, "/static/{*path}", Public, get(static_file)),
        route(M::GET, "/", AtLeast(Viewer), get(overview::overview)),
        route(
            M::POST,
            "/incidents/{id}/acknowledge",
            AtLeast(Approver),
            post(overview::acknowledge_incident),
        ),
        // Point-in-time recovery (src/web/pitr.rs).
        route(
            M::GET,
            "/targets/{target}/pitr",
            AtLeast(Viewer),
            get(pitr::show_pitr),
        ),
        route(
            M::POST,
            "/targets/{target}/pitr/base-backups",
            AtLeast(Operator),
            post(pitr::take_base_backup),
        ),
        route(
            M::POST,
            "/targets/{target}/pitr/base-backups/{id}/pin",
            AtLeast(Operator),
            post(pitr::pin_base_backup),
        ),
        route(
            M::POST,
            "/targets/{target}/pitr/base-backups/{id}/unpin",
            AtLeast(Operator),
            post(pitr::unpin_base_backup),
        ),
        route(
            M::POST,
            "/targets/{target}/pitr/recoveries",
            AtLeast(Operator),
            post(pitr::start_recovery),
        ),
        route(
            M::GET,
            "/targets/{target}/pitr/recoveries/{id}",
            AtLeast(Viewer),
            get(pitr::show_recovery),
        ),
        route(
            M::GET,
            "/targets/{target}/pitr/recoveries/{id}/progress",
            AtLeast(Viewer),
            get(pitr::recovery_progress),
        ),
        route(
            M::POST,
            "/targets/{target}/pitr/recoveries/{id}/copy",
            AtLeast(Operator),
            post(pitr::copy_recovered),
        ),
        route(
            M::POST,
            "/targets/{target}/pitr/recoveries/{id}/done",
            AtLeast(Operator),
            post(pitr::recovery_done),
        ),
        route(
            M::GET,
            "/targets/{target}/activity",
            AtLeast(Operator),
            get(activity::show_activity),
        ),
        route(
            M::GET,
            "/targets/{target}/activity/live",
            AtLeast(Operator),
            get(activity::live_activity),
        ),
        // Redis tools (src/web/redis.rs).
        route(
            M::GET,
            "/targets/{target}/redis",
            AtLeast(Viewer),
            get(redis::show_redis),
        ),
        route(
            M::POST,
            "/targets/{target}/redis/bgsave",
            AtLeast(Operator),
            post(redis::start_bgsave),
        ),
        route(
            M::GET,
            "/targets/{target}/redis/keys",
            AtLeast(Operator),
            get(redis::browse_keys),
        ),
        route(
            M::GET,
            "/targets/{target}/redis/key",
            AtLeast(Operator),
            get(redis::show_key),
        ),
        route(
            M::GET,
            "/targets/{target}/redis/memory",
            AtLeast(Operator),
            get(redis::show_memory),
        ),
        route(
            M::POST,
            "/targets/{target}/redis/memory",
            AtLeast(Operator),
            post(redis::start_memory),
        ),
        route(
            M::GET,
            "/targets/{target}/redis/delete",
            AtLeast(Operator),
            get(redis::preview_delete),
        ),
        route(
            M::GET,
            "/targets/{target}/redis/slowlog",
            AtLeast(Operator),
            get(redis::show_slowlog),
        ),
        route(
            M::GET,
            "/targets/{target}/redis/clients",
            AtLeast(Operator),
            get(redis::show_clients),
        ),
        route(
            M::GET,
            "/targets/{target}/redis/config",
            AtLeast(Operator),
            get(redis::show_config),
        ),
        // Reports and maintenance of PostgreSQL targets (src/web/reports.rs).
        route(
            M::GET,
            "/targets/{target}/reports",
            AtLeast(Operator),
            get(reports::list_reports),
        ),
        route(
            M::POST,
            "/targets/{target}/reports",
            AtLeast(Operator),
            post(reports::refresh_all_reports),
        ),
        route(
            M::GET,
            "/targets/{target}/reports/{report}",
            AtLeast(Operator),
            get(reports::show_report),
        ),
        route(
            M::GET,
            "/targets/{target}/reports/{report}/export.csv",
            AtLeast(Operator),
            get(reports::export_report),
        ),
        route(
            M::POST,
            "/targets/{target}/reports/{report}/refresh",
            AtLeast(Operator),
            post(reports::refresh_report),
        ),
        route(
            M::POST,
            "/targets/{target}/reports/{report}/exact",
            AtLeast(Operator),
            post(reports::measure_exact),
        ),
        route(
            M::POST,
            "/targets/{target}/maintenance/{command}",
            AtLeast(Operator),
            post(reports::run_maintenance),
        ),
        route(
            M::GET,
            "/operations",
            AtLeast(Viewer),
            get(operations::list_operations),
        ),
        route(
            M::GET,
            "/operations/export.csv",
            AtLeast(Viewer),
            get(operations::export_operations),
        ),
        route(
            M::GET,
            "/operations/{id}",
            AtLeast(Viewer),
            get(operations::show_operation),
        ),
        route(
            M::GET,
            "/approvals",
            AtLeast(Operator),
            get(approvals::list_approvals),
        ),
        route(
            M::GET,
            "/approvals/{id}",
            AtLeast(Operator),
            get(approvals::show_approval),
        ),
        route(
            M::POST,
            "/approvals/{id}/approve",
            AtLeast(Approver),
            post(approvals::approve_request),
        ),
        route(
            M::POST,
            "/approvals/{id}/reject",
            AtLeast(Approver),
            post(approvals::reject_request),
        ),
        route(
            M::POST,
            "/approvals/{id}/review",
            AtLeast(Approver),
            post(approvals::review_request),
        ),
        route(
            M::POST,
            "/approvals/{id}/cancel",
            AtLeast(Operator),
            post(approvals::cancel_request),
        ),
        route(
            M::POST,
            "/approvals/{id}/execute",
            AtLeast(Operator),
            post(approvals::execute_request),
        ),
        route(
            M::GET,
            "/targets/{target}/actions/{kind}",
            AtLeast(Operator),
            get(approvals::new_action_request),
        ),
        route(
            M::POST,
            "/targets/{target}/actions/{kind}",
            AtLeast(Operator),
            post(approvals::create_action_request),
        ),
        route(
            M::GET,
            "/backups",
            AtLeast(Viewer),
            get(backups::list_backups),
        ),
        route(
            M::GET,
            "/backups/{id}",
            AtLeast(Viewer),
            get(backups::show_backup),
        ),
        route(
            M::GET,
            "/backups/{id}/progress",
            AtLeast(Viewer),
            get(backups::backup_progress),
        ),
        route(
            M::POST,
            "/backups/{id}/cancel",
            AtLeast(Operator),
            post(backups::cancel_backup),
        ),
        route(
            M::POST,
            "/backups/{id}/pin",
            AtLeast(Operator),
            post(backups::pin_backup),
        ),
        route(
            M::POST,
            "/backups/{id}/pins/{pin}/release",
            AtLeast(Operator),
            post(backups::release_pin),
        ),
        route(
            M::GET,
            "/backups/{id}/download",
            AtLeast(Operator),
            get(backups::download_backup),
        ),
        route(
            M::GET,
            "/backups/{id}/restore",
            AtLeast(Operator),
            get(restores::new_restore),
        ),
        route(
            M::POST,
            "/backups/{id}/restore",
            AtLeast(Operator),
            post(restores::request_restore),
        ),
        route(M::GET, "/jobs", AtLeast(Viewer), get(jobs::list_jobs)),
        route(M::GET, "/jobs/{id}", AtLeast(Viewer), get(jobs::show_job)),
        route(
            M::GET,
            "/jobs/{id}/progress",
            AtLeast(Viewer),
            get(jobs::job_progress),
        ),
        route(
            M::POST,
            "/jobs/{id}/cancel",
            AtLeast(Operator),
            post(jobs::cancel_job),
        ),
        route(
            M::GET,
            "/backups/{id}/restore-over",
            AtLeast(Operator),
            get(restores::restore_over),
        ),
        route(
            M::GET,
            "/restores/{id}",
            AtLeast(Viewer),
            get(restores::show_restore),
        ),
        route(
            M::GET,
            "/restores/{id}/progress",
            AtLeast(Viewer),
            get(restores::restore_progress),
        ),
        route(
            M::GET,
            "/targets/{target}/backups",
            AtLeast(Viewer),
            get(backups::target_backups),
        ),
        route(
            M::POST,
            "/targets/{target}/backups",
            AtLeast(Operator),
            post(backups::start_backup),
        ),
        route(
            M::GET,
            "/targets/{target}/migrations",
            AtLeast(Viewer),
            get(migrations::show_target_migrations),
        ),
        route(
            M::GET,
            "/migrations/console",
            AtLeast(Viewer),
            get(migrations::show_console_migrations),
        ),
        route(
            M::POST,
            "/api/v1/targets/{target}/backups",
            Access::Token("backup:create"),
            post(backups::api_start_backup),
        ),
        route(
            M::GET,
            "/api/v1/backups/{id}",
            Access::Token("backup:read"),
            get(backups::api_get_backup),
        ),
        route(
            M::POST,
            "/api/v1/targets/{target}/migrations/deploys",
            Access::Token("migrations:deploy"),
            post(migrations::api_report_deploy),
        ),
        // Maintenance windows (src/web/windows.rs).
        route(
            M::GET,
            "/windows",
            AtLeast(Viewer),
            get(windows::list_windows),
        ),
        route(
            M::POST,
            "/windows",
            AtLeast(Operator),
            post(windows::create_window),
        ),
        route(
            M::GET,
            "/windows/{id}",
            AtLeast(Viewer),
            get(windows::show_window),
        ),
        route(
            M::POST,
            "/windows/{id}/open",
            AtLeast(Operator),
            post(windows::open_window),
        ),
        route(
            M::POST,
            "/windows/{id}/steps/{step}/done",
            AtLeast(Operator),
            post(windows::tick_step),
        ),
        route(
            M::POST,
            "/windows/{id}/resume",
            AtLeast(Operator),
            post(windows::resume_window),
        ),
        route(
            M::POST,
            "/windows/{id}/close",
            AtLeast(Operator),
            post(windows::close_window),
        ),
        route(
            M::POST,
            "/windows/{id}/abort",
            AtLeast(Operator),
            post(windows::abort_window),
        ),
        route(
            M::GET,
            "/windows/{id}/report",
            AtLeast(Viewer),
            get(windows::window_report),
        ),
        route(
            M::GET,
            "/windows/{id}/report.csv",
            AtLeast(Viewer),
            get(windows::window_report_csv),
        ),
        route(
            M::POST,
            "/api/v1/windows",
            Access::Token("windows:run"),
            post(windows::api_open_window),
        ),
        route(
            M::GET,
            "/api/v1/windows/{id}",
            Access::Token("windows:run"),
            get(windows::api_get_window),
        ),
        route(
            M::POST,
            "/api/v1/windows/{id}/steps/{step}/done",
            Access::Token("windows:run"),
            post(windows::api_tick_step),
        ),
        route(
            M::POST,
            "/api/v1/windows/{id}/close",
            Access::Token("windows:run"),
            post(windows::api_close_window),
        ),
        route(
            M::GET,
            "/admin/tokens",
            AtLeast(Admin),
            get(admin_tokens::list_tokens),
        ),
        route(
            M::POST,
            "/admin/tokens",
            AtLeast(Admin),
            post(admin_tokens::create_token),
        ),
        route(
            M::POST,
            "/admin/tokens/{id}/revoke",
            AtLeast(Admin),
            post(admin_tokens::revoke_token),
        ),
        route(
            M::GET,
            "/admin/users",
            AtLeast(Admin),
            get(admin_users::list_users),
        ),
        route(
            M::POST,
            "/admin/users",
            AtLeast(Admin),
            post(admin_users::create_user),
        ),
        route(
            M::POST,
            "/admin/settings/password-sign-in",
            AtLeast(Admin),
            post(admin_users::set_password_sign_in),
        ),
        route(
            M::POST,
            "/admin/users/{id}/role",
            AtLeast(Admin),
            post(admin_users::change_role),
        ),
        route(
            M::POST,
            "/admin/users/{id}/disable",
            AtLeast(Admin),
            post(admin_users::disable_user),
        ),
        route(
            M::POST,
            "/admin/users/{id}/enable",
            AtLeast(Admin),
            post(admin_users::enable_user),
        ),
        route(
            M::POST,
            "/admin/users/{id}/password",
            AtLeast(Admin),
            post(admin_users::reset_password),
        ),
        route(
            M::GET,
            "/admin/users/{id}",
            AtLeast(Admin),
            get(admin_users::show_user),
        ),
        route(
            M::POST,
            "/admin/users/{id}/target-roles",
            AtLeast(Admin),
            post(admin_users::set_target_role),
        ),
        route(
            M::POST,
            "/admin/users/{id}/target-roles/{grant}/remove",
            AtLeast(Admin),
            post(admin_users::remove_target_role),
        ),
        route(
            M::POST,
            "/admin/users/{id}/two-factor/reset",
            AtLeast(Admin),
            post(admin_users::reset_two_factor),
        ),
    ]
}

/// Builds the router from [`routes`], wrapping each route in the authorization
/// check for its access.
pub fn router(state: AppState) -> Router {
    let mut router = Router::new();
    for r in routes() {
        let (access, pattern) = (r.access, r.path);
        let handler = r.handler.route_layer(from_fn_with_state(
            state.clone(),
            move |st, session, ctx, req, next| {
                guard::authorize(st, access, pattern, session, ctx, req, next)
            },
        ));
        router = router.route(r.path, handler);
    }
    router
        .fallback(|| async { AppError::NotFound })
        .with_state(state)
}

/// What every full page's layout needs: who is logged in, their CSRF token, and
/// how many requests wait for them.
pub struct Layout {
    pub user: CurrentUser,
    pub active: &'static str,
    /// Pending approval requests this user could decide (0 below approver).
    pub pending: i64,
    /// The console database's newest applied migration (the footer shows it).
    pub schema: i64,
    /// The user's highest role on any target (per-target roles): what the
    /// navigation offers, whatever the role on this page's target.
    pub highest: Role,
    /// Maintenance windows open (or stopped) now: a banner on every page.
    pub live_windows: Vec<crate::windows::Window>,
}

impl Layout {
    pub async fn load(
        state: &AppState,
        user: CurrentUser,
        active: &'static str,
    ) -> Result<Layout, AppError> {
        let pending = crate::approvals::pending_for(state, &user).await?;
        let schema = crate::app::applied_schema_version(&state.db).await?;
        let global = crate::auth::users::find(&state.db, user.id)
            .await?
            .map_or(user.role, |u| u.role());
        let highest = crate::auth::roles::load(&state.db, user.id, global)
            .await?
            .highest()
            .max(user.role);
        let live_windows = crate::windows::live(&state.db).await?;
        Ok(Layout {
            user,
            active,
            pending,
            schema,
            highest,
            live_windows,
        })
    }

    /// This dbops' version, for the footer.
    pub fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    /// The schema this binary carries, when the database's differs from it
    /// (during a rolling upgrade).
    pub fn binary_schema(&self) -> Option<i64> {
        let own = crate::app::schema_version();
        (own != self.schema).then_some(own)
    }

    pub fn is_admin(&self) -> bool {
        self.user.has(Role::Admin)
    }

    /// Whether the user has `role` on some target (for the navigation).
    pub fn anywhere(&self, role: Role) -> bool {
        self.highest >= role
    }
}

/// True for requests htmx made (which get partials and toasts, not whole pages).
pub fn is_htmx(headers: &axum::http::HeaderMap) -> bool {
    headers.contains_key("hx-request") && !headers.contains_key("hx-boosted")
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    status: u16,
    title: &'a str,
    message: &'a str,
    request_id: &'a str,
    logged_in: bool,
}

#[derive(Template)]
#[template(path = "_toast.html")]
struct Toast<'a> {
    kind: &'a str,
    message: &'a str,
    request_id: &'a str,
}

fn default_message(status: StatusCode) -> &'static str {
    match status.as_u16() {
        404 => "There is no such page or item.",
        405 => "That action is not available here.",
        408 | 503 => "dbops is busy or a server it needs is not answering. Try again in a moment.",
        413 => "What you sent is too large.",
        400 | 415 | 422 => "The request was not understood.",
        _ if status.is_server_error() => "Something went wrong on our side.",
        _ => "The request was refused.",
    }
}

/// Turns every error response (4xx/5xx) into a readable page — or, for htmx
/// requests, a toast — showing the request id. Responses that are already HTML
/// (a form re-rendered with its message) pass through, and so do the API's JSON
/// errors (a pipeline reads `{"error": …}`, not a page).
pub async fn render_errors(req: Request, next: Next) -> Response {
    let is_api = req.uri().path().starts_with("/api/");
    let request_id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let htmx = is_htmx(req.headers());
    let logged_in = req.extensions().get::<CurrentUser>().is_some()
        || req.headers().get(header::COOKIE).is_some();
    let res = next.run(req).await;
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let is_html = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/html"));
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    let info = res.extensions().get::<ErrorInfo>().cloned();
    if info.is_none() && (is_html || (is_api && is_json)) {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let message = match info {
        Some(i) => i.message,
        None => {
            // A rejection from axum itself (a malformed form, a wrong method): its
            // text is short and says what was wrong.
            let detail = axum::body::to_bytes(body, 4096)
                .await
                .ok()
                .and_then(|b| String::from_utf8(b.to_vec()).ok())
                .filter(|t| {
                    !t.is_empty() && status.is_client_error() && status != StatusCode::NOT_FOUND
                });
            match detail {
                Some(d) => format!("{} ({d})", default_message(status)),
                None => default_message(status).to_string(),
            }
        }
    };
    let html = if htmx {
        parts
            .headers
            .insert("hx-retarget", HeaderValue::from_static("#toasts"));
        parts
            .headers
            .insert("hx-reswap", HeaderValue::from_static("beforeend"));
        if status == StatusCode::UNAUTHORIZED {
            parts
                .headers
                .insert("hx-redirect", HeaderValue::from_static("/login"));
        }
        Toast {
            kind: "error",
            message: &message,
            request_id: &request_id,
        }
        .render()
    } else {
        ErrorPage {
            status: status.as_u16(),
            title: status.canonical_reason().unwrap_or("Error"),
            message: &message,
            request_id: &request_id,
            logged_in,
        }
        .render()
    };
    let html = html.unwrap_or_else(|_| message.clone());
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(html))
}

/// A panic in a handler becomes a plain 500 (rendered by [`render_errors`] on the way
/// out is not possible here, as the panic unwound past it); the panic is logged.
pub fn panic_response(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = detail, "a handler panicked");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        "<!doctype html><title>Error · dbops</title><h1>Something went wrong on our side.</h1><p>The error was logged with this request's id (see the X-Request-Id header).</p><p><a href=\"/\">Back to the overview</a></p>",
    )
        .into_response()
}

/// The Content-Security-Policy: no inline script or style, nothing from other origins.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                       connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; \
                       form-action 'self'; frame-ancestors 'none'";

/// Security headers on every response.
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "permissions-policy",
        HeaderValue::from_static("camera=(), microphone=(), geolocation=()"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

/// Counts requests and their latency for `/metrics`.
pub async fn count_requests(req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().as_str().to_string();
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    metrics::counter!("dbops_http_requests_total", "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!("dbops_http_request_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    res
}

#[derive(rust_embed::RustEmbed)]
#[folder = "static/"]
struct Assets;

/// Serves a file embedded from `static/`.
async fn static_file(Path(path): Path<String>) -> Response {
    match Assets::get(&path) {
        Some(file) => {
            let cache = if path.starts_with("vendor/") {
                "public, max-age=31536000, immutable"
            } else {
                "public, max-age=300"
            };
            (
                [
                    (header::CONTENT_TYPE, file.metadata.mimetype().to_string()),
                    (header::CACHE_CONTROL, cache.to_string()),
                ],
                file.data.into_owned(),
            )
                .into_response()
        }
        None => AppError::NotFound.into_response(),
    }
}
