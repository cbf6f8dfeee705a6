//! `spawn_app()` and a small cookie-keeping HTTP client that behaves like a browser
//! (follows no redirects, so tests can see them).

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, OnceLock},
};

use dbops::{
    app::Application,
    auth::{CurrentUser, Role, password, users},
    config::Config,
    devcluster::{PgCluster, RedisServer},
};
use reqwest::{StatusCode, cookie::CookieStore, header::HeaderMap};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::OnceCell;

/// Where the servers the tests use are.
pub struct Services {
    /// `postgres://postgres@host:port` without a database.
    pub pg_base: String,
    pub redis_url: String,
}

struct Owned {
    _pg: Option<PgCluster>,
    _redis: Option<RedisServer>,
}

static SERVICES: OnceCell<Services> = OnceCell::const_new();
static OWNED: OnceLock<Mutex<Owned>> = OnceLock::new();

async fn pg_answers(base: &str) -> bool {
    tokio::time::timeout(
        std::time::Duration::from_secs(3),
        PgConnection::connect(&format!("{base}/postgres")),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

async fn redis_answers(url: &str) -> bool {
    let Ok(u) = url::Url::parse(url) else {
        return false;
    };
    let addr = format!(
        "{}:{}",
        u.host_str().unwrap_or("127.0.0.1"),
        u.port().unwrap_or(6379)
    );
    matches!(
        tokio::time::timeout(
            std::time::Duration::from_secs(2),
            tokio::net::TcpStream::connect(addr)
        )
        .await,
        Ok(Ok(_))
    )
}

/// The PostgreSQL and Redis to test against: `DBOPS_TEST_PG` / `DBOPS_TEST_REDIS`,
/// else the machine's on their standard ports, else throwaway ones.
pub async fn services() -> &'static Services {
    SERVICES
        .get_or_init(|| async {
            init_log_capture();
            let mut pg_base = std::env::var("DBOPS_TEST_PG")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
            let mut redis_url = std::env::var("DBOPS_TEST_REDIS")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
            let mut owned = Owned {
                _pg: None,
                _redis: None,
            };
            let need_pg = !pg_answers(&pg_base).await;
            let need_redis = !redis_answers(&redis_url).await;
            if need_pg || need_redis {
                dbops::devcluster::ensure_binaries().expect("PostgreSQL and Redis binaries");
                let dir = std::env::temp_dir().join(format!("dbops-it-{}", std::process::id()));
                std::fs::create_dir_all(&dir).unwrap();
                if need_pg {
                    eprintln!("no PostgreSQL at {pg_base}: starting a throwaway one");
                    let pg = PgCluster::start(&dir).await.expect("throwaway PostgreSQL");
                    pg_base = format!("postgres://postgres@127.0.0.1:{}", pg.port());
                    owned._pg = Some(pg);
                }
                if need_redis {
                    eprintln!("no Redis at {redis_url}: starting a throwaway one");
                    let r = RedisServer::start(&dir).await.expect("throwaway Redis");
                    redis_url = r.url();
                    owned._redis = Some(r);
                }
            }
            let started_some = owned._pg.is_some() || owned._redis.is_some();
            let _ = OWNED.set(Mutex::new(owned));
            if started_some {
                // Statics are never dropped: stop the throwaway servers when the
                // test process exits.
                extern "C" fn stop_owned() {
                    if let Some(m) = OWNED.get()
                        && let Ok(mut o) = m.lock()
                    {
                        drop(o._redis.take());
                        drop(o._pg.take());
                    }
                }
                // SAFETY: registering a plain extern "C" function with no captured state.
                unsafe { libc::atexit(stop_owned) };
            }
            drop_stale_databases(&pg_base).await;
            remove_stale_temp_dirs();
            Services { pg_base, redis_url }
        })
        .await
}

/// Removes the temporary directories of earlier runs (`dbops-it-*`, older than an
/// hour): backup stores and scratch space of tests.
fn remove_stale_temp_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < hour_ago);
        if old && e.file_name().to_string_lossy().starts_with("dbops-it-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Removes test databases left by earlier runs (older than an hour).
async fn drop_stale_databases(pg_base: &str) {
    let Ok(pool) = PgPool::connect(&format!("{pg_base}/postgres")).await else {
        return;
    };
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT d.datname FROM pg_database d
         WHERE d.datname LIKE 'dbops\\_it\\_%'
           AND (pg_stat_file('base/' || d.oid || '/PG_VERSION', true)).modification < now() - interval '1 hour'",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_default();
    for n in names {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{n}\" WITH (FORCE)"))
            .execute(&pool)
            .await;
    }
    // Roles tests made (owners and runtime roles of console databases) once
    // they own no database any more.
    let roles: Vec<String> = sqlx::query_scalar(
        "SELECT rolname FROM pg_roles r WHERE rolname LIKE 'dbops\\_it\\_%'
           AND NOT EXISTS (SELECT 1 FROM pg_database d WHERE d.datdba = r.oid)",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_default();
    for r in roles {
        let _ = sqlx::query(&format!("DROP ROLE IF EXISTS \"{r}\""))
            .execute(&pool)
            .await;
    }
}

/// Everything logged by the process, so that tests can look for secrets in it.
pub static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_log_capture() {
    let buf = LOGS
        .get_or_init(|| Arc::new(Mutex::new(Vec::new())))
        .clone();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "debug,sqlx=info,hyper=info,h2=info,rustls=info,fantoccini=info",
        ))
        .with_ansi(false)
        .with_writer(move || Capture(buf.clone()))
        .try_init();
}

/// All log output so far.
pub fn captured_logs() -> String {
    LOGS.get()
        .map(|b| String::from_utf8_lossy(&b.lock().unwrap()).into_owned())
        .unwrap_or_default()
}

/// A running dbops on a free port with its own fresh console database.
pub struct TestApp {
    pub addr: SocketAddr,
    pub db: PgPool,
    pub database_url: String,
    state: dbops::app::AppState,
}

/// Builds a config from TOML; `${PG}` in environment values stands for the test
/// PostgreSQL base URL and `${REDIS}` for the test Redis.
pub fn test_config(toml_text: &str, env: &[(&str, String)]) -> Config {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    Config::from_toml(
        toml_text,
        Path::new("test.toml"),
        Path::new("."),
        move |k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()),
    )
    .expect("test config is valid")
}

/// A dbops with the default targets: the test PostgreSQL as `pg` and Redis as
/// `cache`.
pub async fn spawn_app() -> TestApp {
    let s = services().await;
    spawn_app_with(
        r#"
        [targets]
        connect_timeout_seconds = 2
        [[postgres]]
        name = "pg"
        url_env = "PG"
        policy = "production"
        [[redis]]
        name = "cache"
        url_env = "REDIS"
        policy = "dev"
        "#,
        &[
            ("PG", format!("{}/postgres", s.pg_base)),
            ("REDIS", s.redis_url.clone()),
        ],
    )
    .await
}

/// A dbops with this config (its `database_url` is replaced by a fresh database).
pub async fn spawn_app_with(toml_text: &str, env: &[(&str, String)]) -> TestApp {
    let services = services().await;
    let name = format!("dbops_it_{}", uuid::Uuid::new_v4().simple());
    let database_url = format!("{}/{name}", services.pg_base);
    let mut env = env.to_vec();
    env.push(("DATABASE_URL", database_url.clone()));
    let backups = std::env::temp_dir().join(format!("dbops-it-backups-{name}"));
    let toml_text = if toml_text.contains("[backups]") {
        toml_text.to_string()
    } else {
        format!(
            "{toml_text}\n[backups]\ndirectory = \"{}\"\n",
            backups.display()
        )
    };
    let config = test_config(&toml_text, &env);
    let app = Application::build(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("dbops builds");
    let addr = app.local_addr();
    let db = app.state.db.clone();
    let state = app.state.clone();
    tokio::spawn(app.run_until(std::future::pending()));
    TestApp {
        addr,
        db,
        database_url,
        state,
    }
}

impl TestApp {
    /// The running app's state, for calling capabilities directly.
    pub fn state(&self) -> dbops::app::AppState {
        self.state.clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A new "browser" with its own cookies.
    pub fn browser(&self) -> Browser {
        let jar = Arc::new(reqwest::cookie::Jar::default());
        Browser {
            client: reqwest::Client::builder()
                .cookie_provider(jar.clone())
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            jar,
            base: format!("http://{}", self.addr),
            csrf: None,
        }
    }

    /// Creates a user directly in the database and returns the password.
    pub async fn create_user(&self, username: &str, role: Role) -> String {
        let pw = password::generate();
        let hash = password::hash(&pw).unwrap();
        users::create(
            &self.db,
            &users::Username::parse(username).unwrap(),
            &hash,
            role,
        )
        .await
        .unwrap();
        pw
    }

    /// A new user with this role, as the approvals API takes it (for calling
    /// `approvals::request` / `decide` / `execute` directly).
    pub async fn current_user(&self, username: &str, role: Role) -> CurrentUser {
        self.create_user(username, role).await;
        let id: i64 = sqlx::query_scalar("SELECT id FROM users WHERE username = $1")
            .bind(username)
            .fetch_one(&self.db)
            .await
            .unwrap();
        CurrentUser {
            id,
            username: username.to_string(),
            role,
            csrf_token: String::new(),
        }
    }

    /// A browser logged in as a new user with this role.
    pub async fn logged_in(&self, role: Role) -> Browser {
        let name = format!(
            "{}-{}",
            role.as_str(),
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        );
        let pw = self.create_user(&name, role).await;
        let mut b = self.browser();
        let r = b.login(&name, &pw).await;
        assert_eq!(
            r.status,
            StatusCode::SEE_OTHER,
            "login as {name} failed: {}",
            r.text
        );
        b
    }

    /// How many operations of this kind (and outcome, if given) are logged.
    pub async fn count_ops(&self, kind: &str, outcome: Option<&str>) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM operations WHERE kind = $1 AND ($2::text IS NULL OR outcome = $2)")
            .bind(kind)
            .bind(outcome)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    /// Writes a config file for the `dbops` binary pointing at this app's database.
    pub fn config_file(&self, dir: &Path) -> std::path::PathBuf {
        let p = dir.join("dbops.toml");
        std::fs::write(&p, format!("database_url = \"{}\"\n", self.database_url)).unwrap();
        p
    }
}

/// A response, read whole.
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Resp {
    pub fn location(&self) -> Option<&str> {
        self.headers.get("location").and_then(|v| v.to_str().ok())
    }
}

/// A cookie-keeping client that remembers the last CSRF token it saw on a page.
pub struct Browser {
    pub client: reqwest::Client,
    pub jar: Arc<reqwest::cookie::Jar>,
    pub base: String,
    pub csrf: Option<String>,
}

/// The CSRF token on a page (hidden input or htmx header).
pub fn find_csrf(html: &str) -> Option<String> {
    for marker in ["name=\"csrf_token\" value=\"", "\"X-CSRF-Token\": \""] {
        if let Some(i) = html.find(marker) {
            let rest = &html[i + marker.len()..];
            return rest.find('"').map(|j| rest[..j].to_string());
        }
    }
    None
}

impl Browser {
    async fn read(&mut self, r: reqwest::Response) -> Resp {
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap_or_default();
        if let Some(t) = find_csrf(&text) {
            self.csrf = Some(t);
        }
        Resp {
            status,
            headers,
            text,
        }
    }

    pub async fn get(&mut self, path: &str) -> Resp {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .header("accept", "text/html")
            .send()
            .await
            .unwrap();
        self.read(r).await
    }

    /// Posts a form with the last CSRF token seen (fetching a page first if none).
    pub async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Resp {
        if self.csrf.is_none() {
            self.get("/login").await;
        }
        let token = self.csrf.clone();
        self.post_with_token(path, form, token.as_deref()).await
    }

    /// Posts a form with exactly this CSRF token (or none).
    pub async fn post_with_token(
        &mut self,
        path: &str,
        form: &[(&str, &str)],
        token: Option<&str>,
    ) -> Resp {
        let mut fields: Vec<(&str, &str)> = form.to_vec();
        if let Some(t) = token {
            fields.push(("csrf_token", t));
        }
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .header("accept", "text/html")
            .form(&fields)
            .send()
            .await
            .unwrap();
        self.read(r).await
    }

    /// Logs in; on success, loads the overview so that the CSRF token (renewed at
    /// login) is the current one.
    pub async fn login(&mut self, username: &str, password: &str) -> Resp {
        self.get("/login").await;
        let r = self
            .post("/login", &[("username", username), ("password", password)])
            .await;
        if r.status == StatusCode::SEE_OTHER {
            self.get("/").await;
        }
        r
    }

    /// The session cookie's value, if any.
    pub fn session_id(&self) -> Option<String> {
        let url: reqwest::Url = self.base.parse().unwrap();
        let header = self.jar.cookies(&url)?;
        header
            .to_str()
            .ok()?
            .split("; ")
            .find_map(|c| c.strip_prefix("dbops_session=").map(str::to_string))
    }
}

// ---------------------------------------------------------------------------------
// Faults and hostile input (tests/it/faults.rs, tests/it/hostile.rs).
// ---------------------------------------------------------------------------------

/// A dbops with this config whose console database is `database_url` (created if
/// missing), e.g. on a throwaway cluster a test stops and starts again.
pub async fn spawn_app_on(database_url: &str, toml_text: &str, env: &[(&str, String)]) -> TestApp {
    services().await;
    let mut env = env.to_vec();
    env.push(("DATABASE_URL", database_url.to_string()));
    let config = test_config(toml_text, &env);
    let app = Application::build(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("dbops builds");
    let addr = app.local_addr();
    let db = app.state.db.clone();
    let state = app.state.clone();
    tokio::spawn(app.run_until(std::future::pending()));
    TestApp {
        addr,
        db,
        database_url: database_url.to_string(),
        state,
    }
}

// ---------------------------------------------------------------------------------
// Throwaway databases (tests/it/migration_status.rs, tests/it/migration_tools.rs).
// ---------------------------------------------------------------------------------

/// A name for a throwaway database (dropped by the next run if a test leaves it).
pub fn new_db_name() -> String {
    format!(
        "dbops_it_mig_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Runs `body` with freshly created databases, then drops them whatever happens.
pub async fn with_databases<F, Fut>(count: usize, body: F)
where
    F: FnOnce(Vec<String>) -> Fut,
    Fut: Future<Output = ()>,
{
    use futures::FutureExt;
    let base = &services().await.pg_base;
    let admin = || async {
        PgConnection::connect(&format!("{base}/postgres"))
            .await
            .unwrap()
    };
    let names: Vec<String> = (0..count).map(|_| new_db_name()).collect();
    for n in &names {
        sqlx::query(&format!("CREATE DATABASE \"{n}\""))
            .execute(&mut admin().await)
            .await
            .unwrap();
    }
    let outcome = std::panic::AssertUnwindSafe(body(names.clone()))
        .catch_unwind()
        .await;
    let mut a = admin().await;
    for n in &names {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{n}\" WITH (FORCE)"))
            .execute(&mut a)
            .await;
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

// --- Approvals --------------------------------------------------------------------

/// A new user with `role`, as the approvals API takes it.
pub async fn user(app: &TestApp, role: Role) -> CurrentUser {
    let name = format!(
        "{}-{}",
        role.as_str(),
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    app.create_user(&name, role).await;
    let id: i64 = sqlx::query_scalar("SELECT id FROM users WHERE username = $1")
        .bind(&name)
        .fetch_one(&app.db)
        .await
        .unwrap();
    CurrentUser {
        id,
        username: name,
        role,
        csrf_token: String::new(),
    }
}

/// An approval request's state.
pub async fn state_of(app: &TestApp, id: i64) -> String {
    sqlx::query_scalar("SELECT state FROM approval_requests WHERE id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

/// The operations of an approval request, oldest first, as (kind, outcome).
pub async fn approval_steps(app: &TestApp, id: i64) -> Vec<(String, String)> {
    sqlx::query_as("SELECT kind, outcome FROM operations WHERE approval_id = $1 ORDER BY id")
        .bind(id)
        .fetch_all(&app.db)
        .await
        .unwrap()
}

pub fn pair(kind: &str, outcome: &str) -> (String, String) {
    (kind.to_string(), outcome.to_string())
}
