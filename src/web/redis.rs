//! The Redis tools pages of a Redis target: overview, key browser, one key,
//! memory by prefix, delete by pattern (preview), slow log, clients, settings.
//! Gated changes go through the approval pages (`/targets/{target}/actions/…`);
//! long work through jobs (`/jobs/{id}`).
//!
//! Over 600 lines: the Redis pages (overview, key browser, one key, memory by
//! prefix, clients, slow log) share the target header and the database picker.

use std::{collections::BTreeMap, sync::Arc};

use askama::Template;
use askama_web::WebTemplate;
use axum::{
    Form,
    extract::{Path, Query, State},
    response::{IntoResponse, Redirect, Response},
};
use serde::Deserialize;
use serde_json::json;

use super::{Layout, fmt};
use crate::{
    app::AppState,
    audit::{self, AuditCtx, Entry},
    auth::{CurrentUser, Role},
    config::TargetKind,
    error::{AppError, AppResult},
    jobs::{self, Job},
    redis_tools::{
        actions::{BGSAVE_KIND, DELETE_KIND, MEMORY_KIND},
        admin::{self, ClientRow, Setting, SlowEntry},
        browse::{self, KeyView, Position, ScanPage},
        conn,
        delete::{self, Preview},
        info::{self, Overview},
        keys, memory,
    },
    targets::Target,
};

/// What every Redis page's header and tabs need.
pub struct Head {
    pub target: String,
    pub policy: &'static str,
    pub description: String,
    /// The target's configured notes (empty when none); shown where keys can be
    /// deleted.
    pub notes: String,
    pub tab: &'static str,
    /// Operators and above see the tools; viewers the overview only.
    pub operator: bool,
}

fn redis_target(state: &AppState, name: &str) -> AppResult<Arc<Target>> {
    let target = state.targets.get(name).ok_or(AppError::NotFound)?;
    if target.kind() != TargetKind::Redis {
        return Err(AppError::bad_request(format!(
            "{name} is a PostgreSQL database; the Redis tools work on Redis targets."
        )));
    }
    Ok(target)
}

fn head(target: &Target, tab: &'static str, user: &CurrentUser) -> Head {
    Head {
        target: target.name().to_string(),
        policy: target.policy().as_str(),
        description: target.config.description.clone().unwrap_or_default(),
        notes: target.config.notes.clone().unwrap_or_default(),
        tab,
        operator: user.has(Role::Operator),
    }
}

/// A query string from pairs (values URL-encoded).
fn query(pairs: &[(&str, String)]) -> String {
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

fn parse_db(v: Option<&str>) -> AppResult<u8> {
    match v.map(str::trim).unwrap_or("") {
        "" => Ok(0),
        v => v
            .parse::<u8>()
            .ok()
            .filter(|d| *d < 64)
            .ok_or_else(|| AppError::bad_request("“db” must be a database number (0–63).")),
    }
}

/// The databases to offer in the selector.
async fn database_list(target: &Target) -> Vec<u8> {
    match conn::shared(target).await {
        Ok(c) => (0..conn::database_count(&c).await).collect(),
        Err(_) => vec![0],
    }
}

// ----------------------------------------------------------------------------
// Overview

#[derive(Template, WebTemplate)]
#[template(path = "redis/overview.html")]
pub struct OverviewPage {
    layout: Layout,
    head: Head,
    overview: Option<Overview>,
    problem: String,
    last_bgsave: Option<Job>,
}

impl OverviewPage {
    fn count(&self, n: &i64) -> String {
        fmt::count(*n)
    }

    fn ttl(&self, ms: &i64) -> String {
        browse::ttl_text(*ms)
    }
}

/// `GET /targets/{target}/redis`
#[tracing::instrument(skip(state, user))]
pub async fn show_redis(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(target): Path<String>,
) -> AppResult<OverviewPage> {
    let target = redis_target(&state, &target)?;
    let (overview, problem) = match info::overview(&target).await {
        Ok(o) => (Some(o), String::new()),
        Err(e) => (None, e),
    };
    let last_bgsave = jobs::latest(&state.db, BGSAVE_KIND, target.name()).await?;
    Ok(OverviewPage {
        head: head(&target, "overview", &user),
        layout: Layout::load(&state, user, "overview").await?,
        overview,
        problem,
        last_bgsave,
    })
}

/// `POST /targets/{target}/redis/bgsave`: a BGSAVE job.
pub async fn start_bgsave(
    State(state): State<AppState>,
    ctx: AuditCtx,
    Path(target): Path<String>,
) -> AppResult<Redirect> {
    let target = redis_target(&state, &target)?;
    let id = jobs::submit(&state, &ctx, BGSAVE_KIND, target.name(), json!({})).await?;
    Ok(Redirect::to(&format!("/jobs/{id}")))
}

// ----------------------------------------------------------------------------
// Key browser

#[derive(Deserialize, Default)]
pub struct KeysQuery {
    db: Option<String>,
    pattern: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    count: Option<String>,
    at: Option<String>,
}

#[derive(Template, WebTemplate)]
#[template(path = "redis/keys.html")]
pub struct KeysPage {
    layout: Layout,
    head: Head,
    dbs: Vec<u8>,
    db: u8,
    pattern: String,
    kind: String,
    count: u32,
    types: [&'static str; 6],
    page: Option<ScanPage>,
    problem: String,
    first_page: bool,
    next_url: Option<String>,
    first_url: String,
}

impl KeysPage {
    fn key_url(&self, hex: &str) -> String {
        format!(
            "/targets/{}/redis/key?{}",
            self.head.target,
            query(&[("db", self.db.to_string()), ("k", hex.to_string())])
        )
    }

    fn memory_text(&self, m: &Option<i64>) -> String {
        m.map(fmt::bytes).unwrap_or_else(|| "?".into())
    }
}

/// `GET /targets/{target}/redis/keys`
#[tracing::instrument(skip(state, user, q))]
pub async fn browse_keys(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(target): Path<String>,
    Query(q): Query<KeysQuery>,
) -> AppResult<KeysPage> {
    let target = redis_target(&state, &target)?;
    let db = parse_db(q.db.as_deref())?;
    let pattern = q
        .pattern
        .clone()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "*".into());
    keys::check_pattern(&pattern).map_err(AppError::bad_request)?;
    let kind = q
        .kind
        .clone()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if !kind.is_empty() && !browse::TYPES.contains(&kind.as_str()) {
        return Err(AppError::bad_request(format!(
            "“type” must be one of {}.",
            browse::TYPES.join(", ")
        )));
    }
    let count = match q.count.as_deref().map(str::trim).unwrap_or("") {
        "" => browse::DEFAULT_COUNT,
        v => v
            .parse::<u32>()
            .ok()
            .filter(|c| (10..=10_000).contains(c))
            .ok_or_else(|| AppError::bad_request("“count” must be between 10 and 10,000."))?,
    };
    let from = match q.at.as_deref().filter(|a| !a.is_empty()) {
        Some(a) => Position::parse(a).map_err(AppError::bad_request)?,
        None => Position::start(),
    };
    let base = vec![
        ("db", db.to_string()),
        ("pattern", pattern.clone()),
        ("type", kind.clone()),
        ("count", count.to_string()),
    ];
    let first_url = format!("/targets/{}/redis/keys?{}", target.name(), query(&base));
    let result = async {
        let nodes = conn::primaries(&target, db).await?;
        browse::scan_page(
            &nodes,
            &pattern,
            (!kind.is_empty()).then_some(kind.as_str()),
            count,
            &from,
        )
        .await
    }
    .await;
    let (page, problem) = match result {
        Ok(p) => (Some(p), String::new()),
        Err(e) => (None, target.scrub(&e)),
    };
    let next_url = page.as_ref().and_then(|p| p.next.as_ref()).map(|n| {
        let mut pairs = base.clone();
        pairs.push(("at", n.to_param()));
        format!("/targets/{}/redis/keys?{}", target.name(), query(&pairs))
    });
    Ok(KeysPage {
        dbs: database_list(&target).await,
        head: head(&target, "keys", &user),
        layout: Layout::load(&state, user, "overview").await?,
        db,
        pattern,
        kind,
        count,
        types: browse::TYPES,
        page,
        problem,
        first_page: from == Position::start(),
        next_url,
        first_url,
    })
}

#[derive(Deserialize, Default)]
pub struct KeyQuery {
    db: Option<String>,
    k: Option<String>,
    at: Option<String>,
}

#[derive(Template, WebTemplate)]
#[template(path = "redis/key.html")]
pub struct KeyPage {
    layout: Layout,
    head: Head,
    db: u8,
    name: String,
    view: Option<KeyView>,
    problem: String,
    next_url: Option<String>,
    first_url: String,
    delete_url: String,
}

impl KeyPage {
    fn count(&self, n: &i64) -> String {
        fmt::count(*n)
    }

    fn memory(&self, m: &Option<i64>) -> String {
        m.map(fmt::bytes).unwrap_or_else(|| "?".into())
    }
}

/// `GET /targets/{target}/redis/key?db=&k=<hex>&at=`: one key and a bounded part of
/// its value. Each view is logged (`redis.key.view`).
#[tracing::instrument(skip(state, user, ctx, q))]
pub async fn show_key(
    State(state): State<AppState>,
    user: CurrentUser,
    ctx: AuditCtx,
    Path(target): Path<String>,
    Query(q): Query<KeyQuery>,
) -> AppResult<Response> {
    let target = redis_target(&state, &target)?;
    let db = parse_db(q.db.as_deref())?;
    let key = keys::decode(q.k.as_deref().unwrap_or("")).map_err(AppError::bad_request)?;
    let at = q.at.clone().unwrap_or_default();
    if at.len() > 64 {
        return Err(AppError::bad_request(
            "The page position in the address is not valid.",
        ));
    }
    let name = keys::display(&key);
    let result = async {
        let kc = conn::for_keys(&target, db).await?;
        browse::view_key(&kc.client, &key, &at).await
    }
    .await;
    let (view, problem) = match result {
        Ok(v) => (v, String::new()),
        Err(e) => (None, target.scrub(&e)),
    };
    if let Some(v) = &view {
        audit::record(
            &state.db,
            &ctx,
            Entry::new("redis.key.view")
                .target(target.name())
                .params(json!({
                    "db": db,
                    "key": name,
                    "type": v.kind,
                    "page": if at.is_empty() { "first".to_string() } else { at.clone() },
                })),
        )
        .await?;
    }
    let hex = keys::encode(&key);
    let base = vec![("db", db.to_string()), ("k", hex.clone())];
    let first_url = format!("/targets/{}/redis/key?{}", target.name(), query(&base));
    let next_url = view.as_ref().and_then(|v| v.next.as_ref()).map(|n| {
        let mut pairs = base.clone();
        pairs.push(("at", n.clone()));
        format!("/targets/{}/redis/key?{}", target.name(), query(&pairs))
    });
    // Deleting one key is a delete by pattern with the key's name escaped as a glob.
    let delete_url = format!(
        "/targets/{}/redis/delete?{}",
        target.name(),
        query(&[("db", db.to_string()), ("pattern", glob_escape(&key))])
    );
    let status = if view.is_none() && problem.is_empty() {
        axum::http::StatusCode::NOT_FOUND
    } else {
        axum::http::StatusCode::OK
    };
    let page = KeyPage {
        head: head(&target, "keys", &user),
        layout: Layout::load(&state, user, "overview").await?,
        db,
        name,
        view,
        problem,
        next_url,
        first_url,
        delete_url,
    };
    Ok((status, page).into_response())
}

/// A glob that matches exactly this key (`*?[]\` escaped). Non-UTF-8 keys cannot
/// be typed as a pattern; they get the lossy text, which the preview then shows.
fn glob_escape(key: &[u8]) -> String {
    let text = String::from_utf8_lossy(key);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

// ----------------------------------------------------------------------------
// Memory by prefix

#[derive(Deserialize, Default)]
pub struct MemoryQuery {
    job: Option<i64>,
}

/// The kept result of a memory-by-prefix job, as the page reads it.
#[derive(Deserialize, Default, Clone)]
pub struct MemoryReport {
    pub db: u8,
    pub pattern: String,
    pub depth: usize,
    pub separator: String,
    pub sample: Option<u64>,
    pub complete: bool,
    pub keys_scanned: u64,
    pub keys_without_memory: u64,
    pub dbsize: u64,
    pub total_bytes: u64,
    pub nodes: u64,
    pub elapsed_ms: u64,
    pub group_count: u64,
    pub groups: Vec<MemoryGroup>,
    pub other: MemorySum,
    pub biggest: Vec<BigKey>,
    pub ttl: Vec<TtlBucket>,
}

#[derive(Deserialize, Default, Clone)]
pub struct MemoryGroup {
    pub prefix: String,
    pub keys: u64,
    pub bytes: u64,
    pub with_ttl: u64,
}

impl MemoryGroup {
    /// The key browser filtered on this group: its prefix (glob-escaped, then
    /// `*`), or the one key when the group is a key without a separator.
    pub fn browse_url(&self, target: &str, db: &u8) -> String {
        let pattern = match self.prefix.strip_suffix('*') {
            Some(p) => format!("{}*", glob_escape(p.as_bytes())),
            None => glob_escape(self.prefix.as_bytes()),
        };
        let q: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("db", &db.to_string())
            .append_pair("pattern", &pattern)
            .finish();
        format!("/targets/{target}/redis/keys?{q}")
    }
}

#[derive(Deserialize, Default, Clone)]
pub struct MemorySum {
    pub keys: u64,
    pub bytes: u64,
}

#[derive(Deserialize, Default, Clone)]
pub struct BigKey {
    pub key: String,
    pub key_hex: String,
    pub bytes: u64,
    pub ttl_ms: i64,
}

#[derive(Deserialize, Default, Clone)]
pub struct TtlBucket {
    pub bucket: String,
    pub keys: u64,
    pub bytes: u64,
}

impl MemoryReport {
    fn share(&self, bytes: &u64) -> String {
        if self.total_bytes == 0 {
            "–".into()
        } else {
            format!("{:.1}%", *bytes as f64 * 100.0 / self.total_bytes as f64)
        }
    }

    /// Width of a bar for a share of the total, in percent (for the CSS class).
    fn bar(&self, bytes: &u64) -> u64 {
        (*bytes * 20)
            .checked_div(self.total_bytes)
            .map_or(0, |b| b.min(20) * 5)
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "redis/memory.html")]
pub struct MemoryPage {
    layout: Layout,
    head: Head,
    dbs: Vec<u8>,
    job: Option<Job>,
    report: Option<MemoryReport>,
    form: BTreeMap<String, String>,
    error: Option<String>,
}

impl MemoryPage {
    fn field(&self, k: &str, default: &str) -> String {
        self.form
            .get(k)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }

    fn bytes(&self, n: &u64) -> String {
        fmt::bytes(*n as i64)
    }

    fn count(&self, n: &u64) -> String {
        fmt::count(*n as i64)
    }

    fn ttl(&self, ms: &i64) -> String {
        browse::ttl_text(*ms)
    }
}

async fn memory_page(
    state: &AppState,
    user: CurrentUser,
    target: &Target,
    job: Option<Job>,
    form: BTreeMap<String, String>,
    error: Option<String>,
) -> AppResult<MemoryPage> {
    let report = job
        .as_ref()
        .and_then(|j| j.result.as_ref())
        .and_then(|r| serde_json::from_value::<MemoryReport>(r.clone()).ok());
    Ok(MemoryPage {
        dbs: database_list(target).await,
        head: head(target, "memory", &user),
        layout: Layout::load(state, user, "overview").await?,
        job,
        report,
        form,
        error,
    })
}

/// `GET /targets/{target}/redis/memory[?job=N]`: the form and the newest (or the
/// given) report.
pub async fn show_memory(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(target): Path<String>,
    Query(q): Query<MemoryQuery>,
) -> AppResult<MemoryPage> {
    let target = redis_target(&state, &target)?;
    let job = match q.job {
        Some(id) => {
            let j = jobs::find(&state.db, id).await?.ok_or(AppError::NotFound)?;
            if j.kind != MEMORY_KIND || j.target != target.name() {
                return Err(AppError::NotFound);
            }
            Some(j)
        }
        None => jobs::latest(&state.db, MEMORY_KIND, target.name()).await?,
    };
    memory_page(&state, user, &target, job, BTreeMap::new(), None).await
}

/// `POST /targets/{target}/redis/memory`: starts a memory-by-prefix job.
pub async fn start_memory(
    State(state): State<AppState>,
    user: CurrentUser,
    ctx: AuditCtx,
    Path(target): Path<String>,
    Form(form): Form<BTreeMap<String, String>>,
) -> AppResult<Response> {
    let target = redis_target(&state, &target)?;
    match memory::Params::parse(&form) {
        Ok(p) => {
            let id = jobs::submit(&state, &ctx, MEMORY_KIND, target.name(), p.to_json()).await?;
            Ok(Redirect::to(&format!("/jobs/{id}")).into_response())
        }
        Err(msg) => {
            let job = jobs::latest(&state.db, MEMORY_KIND, target.name()).await?;
            let mut form = form;
            form.remove(crate::auth::csrf::FIELD);
            let page = memory_page(&state, user, &target, job, form, Some(msg)).await?;
            Ok((axum::http::StatusCode::BAD_REQUEST, page).into_response())
        }
    }
}

// ----------------------------------------------------------------------------
// Delete by pattern (preview)

#[derive(Deserialize, Default)]
pub struct DeleteQuery {
    db: Option<String>,
    pattern: Option<String>,
}

#[derive(Template, WebTemplate)]
#[template(path = "redis/delete.html")]
pub struct DeletePage {
    layout: Layout,
    head: Head,
    dbs: Vec<u8>,
    db: u8,
    pattern: String,
    preview: Option<Preview>,
    problem: String,
    action_url: Option<String>,
    last: Option<Job>,
}

impl DeletePage {
    fn bytes(&self, n: &u64) -> String {
        fmt::bytes(*n as i64)
    }

    fn count(&self, n: &u64) -> String {
        fmt::count(*n as i64)
    }

    fn opt_bytes(&self, n: &Option<u64>) -> String {
        n.map(|b| fmt::bytes(b as i64))
            .unwrap_or_else(|| "?".into())
    }

    fn key_url(&self, hex: &str) -> String {
        format!(
            "/targets/{}/redis/key?{}",
            self.head.target,
            query(&[("db", self.db.to_string()), ("k", hex.to_string())])
        )
    }
}

/// `GET /targets/{target}/redis/delete[?db=&pattern=]`: with a pattern, scans
/// (within a time budget) and shows what a delete would remove, and the button
/// that asks for it.
#[tracing::instrument(skip(state, user, q))]
pub async fn preview_delete(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(target): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> AppResult<DeletePage> {
    let target = redis_target(&state, &target)?;
    let db = parse_db(q.db.as_deref())?;
    let pattern = q.pattern.clone().unwrap_or_default();
    let (mut preview, mut problem) = (None, String::new());
    if !pattern.is_empty() {
        if keys::matches_everything(&pattern) {
            problem = format!(
                "“{pattern}” matches every key: use Flush database (on the overview) instead, which always needs an approver."
            );
        } else {
            match async {
                let nodes = conn::primaries(&target, db).await?;
                delete::preview(&nodes, &pattern).await
            }
            .await
            {
                Ok(p) => preview = Some(p),
                Err(e) => problem = target.scrub(&e),
            }
        }
    }
    let action_url = preview.as_ref().filter(|p| p.matched > 0).map(|p| {
        let mut pairs = vec![("db", db.to_string()), ("pattern", pattern.clone())];
        if p.complete {
            pairs.push(("expected", p.matched.to_string()));
        }
        format!(
            "/targets/{}/actions/{DELETE_KIND}?{}",
            target.name(),
            query(&pairs)
        )
    });
    Ok(DeletePage {
        dbs: database_list(&target).await,
        last: jobs::latest(&state.db, DELETE_KIND, target.name()).await?,
        head: head(&target, "delete", &user),
        layout: Layout::load(&state, user, "overview").await?,
        db,
        pattern,
        preview,
        problem,
        action_url,
    })
}

// ----------------------------------------------------------------------------
// Slow log, clients, settings

#[derive(Template, WebTemplate)]
#[template(path = "redis/slowlog.html")]
pub struct SlowlogPage {
    layout: Layout,
    head: Head,
    entries: Vec<SlowEntry>,
    problem: String,
}

impl SlowlogPage {
    fn ms(&self, micros: &i64) -> String {
        format!("{:.1} ms", *micros as f64 / 1000.0)
    }
}

/// `GET /targets/{target}/redis/slowlog`
pub async fn show_slowlog(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(target): Path<String>,
) -> AppResult<SlowlogPage> {
    let target = redis_target(&state, &target)?;
    let (entries, problem) = match async {
        let nodes = conn::primaries(&target, 0).await?;
        admin::slowlog(&nodes, 128).await
    }
    .await
    {
        Ok(e) => (e, String::new()),
        Err(e) => (vec![], target.scrub(&e)),
    };
    Ok(SlowlogPage {
        head: head(&target, "slowlog", &user),
        layout: Layout::load(&state, user, "overview").await?,
        entries,
        problem,
    })
}

#[derive(Template, WebTemplate)]
#[template(path = "redis/clients.html")]
pub struct ClientsPage {
    layout: Layout,
    head: Head,
    rows: Vec<ClientRow>,
    problem: String,
}

impl ClientsPage {
    fn kill_url(&self, r: &ClientRow) -> String {
        format!(
            "/targets/{}/actions/redis.client.kill?{}",
            self.head.target,
            query(&[
                ("id", r.id.clone()),
                ("node", r.node.clone()),
                ("addr", r.addr.clone())
            ])
        )
    }
}

/// `GET /targets/{target}/redis/clients`
pub async fn show_clients(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(target): Path<String>,
) -> AppResult<ClientsPage> {
    let target = redis_target(&state, &target)?;
    let (rows, problem) = match async {
        let nodes = conn::primaries(&target, 0).await?;
        admin::clients(&nodes).await
    }
    .await
    {
        Ok(r) => (r, String::new()),
        Err(e) => (vec![], target.scrub(&e)),
    };
    Ok(ClientsPage {
        head: head(&target, "clients", &user),
        layout: Layout::load(&state, user, "overview").await?,
        rows,
        problem,
    })
}

#[derive(Template, WebTemplate)]
#[template(path = "redis/config.html")]
pub struct ConfigPage {
    layout: Layout,
    head: Head,
    settings: Vec<Setting>,
    problem: String,
    policies: [&'static str; 8],
}

/// `GET /targets/{target}/redis/config`
pub async fn show_config(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(target): Path<String>,
) -> AppResult<ConfigPage> {
    let target = redis_target(&state, &target)?;
    let (settings, problem) = match async {
        let nodes = conn::primaries(&target, 0).await?;
        admin::settings(&nodes).await
    }
    .await
    {
        Ok(s) => (s, String::new()),
        Err(e) => (vec![], target.scrub(&e)),
    };
    Ok(ConfigPage {
        head: head(&target, "config", &user),
        layout: Layout::load(&state, user, "overview").await?,
        settings,
        problem,
        policies: admin::POLICIES,
    })
}

#[cfg(test)]
mod tests {
    use super::glob_escape;

    #[test]
    fn a_key_becomes_a_glob_that_matches_only_itself() {
        assert_eq!(glob_escape(b"user:42"), "user:42");
        assert_eq!(glob_escape(b"a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
