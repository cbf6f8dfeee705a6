//! Migration status against the real tools: alembic and Django (PyPI), Knex,
//! Sequelize, TypeORM, Drizzle, dbmate, node-pg-migrate and Graphile Migrate (npm), installed into a cache
//! directory by `.ci/install-migration-tools` (called from here when something is
//! missing). Each test writes a small project whose last migration fails with a
//! SQL error, runs the tool against a throwaway database, asks the tool for its
//! own status, and checks that dbops (the report, the migrations page and the
//! overview) says the same: applied, current (per unit), pending, heads.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use dbops::{
    auth::Role,
    config::MigrationsDir,
    migration_status::{self, Tool, ToolReport},
};
use reqwest::StatusCode;
use sqlx::{Connection, PgConnection};
use tokio::{process::Command, sync::OnceCell};

use crate::helpers::{TestApp, services, spawn_app_with, with_databases};

/// Where the tools are installed: `$DBOPS_IT_TOOLS`, else `~/.cache/dbops-it`.
fn cache_dir() -> PathBuf {
    std::env::var_os("DBOPS_IT_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
                .join(".cache/dbops-it")
        })
}

static INSTALLED: OnceCell<PathBuf> = OnceCell::const_new();

/// The cache directory with every tool installed (installing what is missing;
/// a failed install fails the test: these tests are not skipped).
async fn tools() -> &'static Path {
    INSTALLED
        .get_or_init(|| async {
            let cache = cache_dir();
            let script =
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".ci/install-migration-tools");
            let out = Command::new("bash")
                .arg(&script)
                .arg(&cache)
                .stdin(Stdio::null())
                .output()
                .await
                .expect("bash runs");
            assert!(
                out.status.success(),
                "installing the migration tools failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            cache
        })
        .await
}

/// A project directory of a test, removed at the end.
struct Project(PathBuf);

impl Project {
    fn new(tool: &str) -> Project {
        let dir = std::env::temp_dir().join(format!(
            "dbops-it-{tool}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Project(dir)
    }

    fn write(&self, path: &str, text: &str) {
        let p = self.0.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.0.join(sub)
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a tool; returns whether it succeeded and what it printed (both streams).
async fn run(cmd: &mut Command) -> (bool, String) {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .expect("the tool finished within 3 minutes")
        .expect("the tool starts");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), strip_ansi(&text))
}

/// Tools colour their output when they think a terminal (or CI) wants it,
/// whatever NO_COLOR says; what we compare is the text, so the escapes go.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            // parameters and intermediates, then one final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn pg_url(db: &str, base: &str) -> String {
    format!("{base}/{db}")
}

/// A Python tool run from the project directory with the cached packages.
async fn python(project: &Project, db: &str, args: &[&str]) -> Command {
    let cache = tools().await;
    let base = &services().await.pg_base;
    let mut c = Command::new("python3");
    c.args(args)
        .current_dir(&project.0)
        .env("PYTHONPATH", format!("{}:.", cache.join("py").display()))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env(
            "DBOPS_IT_DB_URL",
            pg_url(db, base).replacen("postgres://", "postgresql+psycopg://", 1),
        )
        .env("DBOPS_IT_DB", db)
        .env("DBOPS_IT_PG_HOSTPORT", base.rsplit('@').next().unwrap())
        .env("DJANGO_SETTINGS_MODULE", "settings");
    c
}

/// An npm tool's binary run from the project directory.
async fn node(project: &Project, db: &str, bin: &str, args: &[&str]) -> Command {
    let cache = tools().await;
    let base = &services().await.pg_base;
    let mut c = Command::new(cache.join("npm/node_modules/.bin").join(bin));
    c.args(args)
        .current_dir(&project.0)
        .env("NODE_PATH", cache.join("npm/node_modules"))
        .env("NO_COLOR", "1")
        .env("FORCE_COLOR", "0")
        .env("DBOPS_IT_PG_URL", pg_url(db, base))
        .env(
            "DATABASE_URL",
            format!("{}?sslmode=disable", pg_url(db, base)),
        );
    c
}

/// Runs the tool's migrate command, which must fail on the last migration.
async fn migrate_fails(cmd: &mut Command) {
    let (ok, out) = run(cmd).await;
    assert!(
        !ok || out.contains("ERROR"),
        "the last migration should fail:\n{out}"
    );
    assert!(
        out.contains("relation \"nope\" does not exist"),
        "the failure is the SQL error:\n{out}"
    );
}

async fn status(cmd: &mut Command) -> String {
    let (ok, out) = run(cmd).await;
    assert!(ok, "the status command failed:\n{out}");
    out
}

/// dbops' report for `tool` with this directory configured.
async fn report(db: &str, tool: &str, dir: PathBuf) -> (ToolReport, MigrationsDir) {
    let base = &services().await.pg_base;
    let mut conn = PgConnection::connect(&pg_url(db, base)).await.unwrap();
    let md = MigrationsDir {
        database: None,
        tool: tool.into(),
        directory: dir,
    };
    let reports = migration_status::inspect_database(&mut conn, std::slice::from_ref(&md))
        .await
        .unwrap();
    let r = reports
        .into_iter()
        .find(|r| r.tool.key() == tool)
        .unwrap_or_else(|| panic!("dbops found no {tool} report"));
    (r, md)
}

fn pending_keys(r: &ToolReport) -> Vec<String> {
    r.drift
        .iter()
        .flat_map(|d| d.pending.iter().map(|m| m.key.clone()))
        .collect()
}

/// A dbops with the target `app` on `db` and this directory configured.
async fn app_for(db: &str, md: &MigrationsDir) -> TestApp {
    let s = services().await;
    spawn_app_with(
        &format!(
            r#"
            [targets]
            connect_timeout_seconds = 2
            [[postgres]]
            name = "app"
            url_env = "APP"
            policy = "production"
            [[postgres.migrations]]
            tool = "{}"
            directory = "{}"
            "#,
            md.tool,
            md.directory.display()
        ),
        &[("APP", format!("{}/{db}", s.pg_base))],
    )
    .await
}

/// The migrations page and the overview's red mark say `flag` (e.g. "Knex: 1 pending").
async fn pages_say(db: &str, md: &MigrationsDir, page_texts: &[&str], overview_flag: &str) {
    let app = app_for(db, md).await;
    let mut viewer = app.logged_in(Role::Viewer).await;
    let page = viewer.get("/targets/app/migrations").await;
    assert_eq!(page.status, StatusCode::OK);
    for t in page_texts {
        assert!(
            page.text.contains(t),
            "the page lacks {t:?}:\n{}",
            page.text
        );
    }
    let overview = viewer.get("/").await;
    let doc = scraper::Html::parse_document(&overview.text);
    let mark: String = doc
        .select(&scraper::Selector::parse("td.migrations .mig-mark").unwrap())
        .flat_map(|e| e.text())
        .collect();
    assert!(
        mark.contains(overview_flag),
        "overview mark {mark:?} lacks {overview_flag:?}"
    );
}

/// Lines of `out` starting with `prefix`, the rest trimmed.
fn lines_after<'a>(out: &'a str, prefix: &str) -> Vec<&'a str> {
    out.lines()
        .filter_map(|l| l.trim_start().strip_prefix(prefix).map(str::trim))
        .collect()
}

const BROKEN: &str = "ALTER TABLE nope ADD x int";

#[tokio::test]
async fn alembic_heads_branches_and_pending_agree_with_alembic() {
    tools().await;
    with_databases(1, |dbs| async move {
        let db = &dbs[0];
        let p = Project::new("alembic");
        p.write("alembic.ini", "[alembic]\nscript_location = .\n");
        p.write("script.py.mako", "");
        p.write(
            "env.py",
            r#"import os
from alembic import context
from sqlalchemy import create_engine
url = os.environ["DBOPS_IT_DB_URL"]
if context.is_offline_mode():
    context.configure(url=url, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    with create_engine(url).connect() as connection:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
"#,
        );
        let rev = |file: &str, rev: &str, down: &str, labels: &str, sql: &str| {
            p.write(
                &format!("versions/{file}.py"),
                &format!(
                    "\"\"\"{file}\"\"\"\nfrom alembic import op\n\nrevision: str = \"{rev}\"\ndown_revision = {down}\nbranch_labels = {labels}\ndepends_on = None\n\n\ndef upgrade() -> None:\n    op.execute(\"{sql}\")\n\n\ndef downgrade() -> None:\n    pass\n"
                ),
            )
        };
        rev("0001_create_users", "0001", "None", "None", "CREATE TABLE users (id int)");
        rev("0002_add_email", "0002", "\"0001\"", "None", "ALTER TABLE users ADD email text");
        rev("0002r_reports", "0002r", "\"0001\"", "('reports',)", "CREATE TABLE reports (id int)");
        rev("0003_broken", "0003", "\"0002\"", "None", BROKEN);
        let alembic = |args: &'static [&'static str]| {
            let mut a = vec!["-m", "alembic", "-c", "alembic.ini"];
            a.extend_from_slice(args);
            a
        };
        migrate_fails(&mut python(&p, db, &alembic(&["upgrade", "heads"])).await).await;

        let current_out = status(&mut python(&p, db, &alembic(&["current"])).await).await;
        let current: Vec<&str> = current_out
            .lines()
            .filter(|l| !l.starts_with("INFO") && !l.trim().is_empty())
            .collect();
        assert_eq!(current, ["0002"], "alembic says the current revision is 0002, not a head");
        let heads_out = status(&mut python(&p, db, &alembic(&["heads"])).await).await;
        let mut heads: Vec<&str> = heads_out
            .lines()
            .filter(|l| l.ends_with("(head)"))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        heads.sort();
        assert_eq!(heads, ["0002r", "0003"]);
        // What `alembic upgrade heads` would run now.
        let sql = status(&mut python(&p, db, &alembic(&["upgrade", "0002:heads", "--sql"])).await).await;
        let mut would_run: Vec<String> = lines_after(&sql, "-- Running upgrade ")
            .iter()
            .map(|l| l.rsplit(" -> ").next().unwrap().to_string())
            .collect();
        would_run.sort();
        assert_eq!(would_run, ["0002r", "0003"]);

        let (r, md) = report(db, "alembic", p.path("")).await;
        assert_eq!(r.current.as_deref(), Some("0002"), "no (head): 0002 is not a head");
        assert_eq!(r.applied.len(), 1);
        let mut pending = pending_keys(&r);
        pending.sort();
        assert_eq!(pending, would_run);
        let mut unit_names: Vec<&str> = r.units.iter().map(|u| u.name.as_str()).collect();
        unit_names.sort();
        assert_eq!(unit_names, ["head 0002r (reports)", "head 0003"]);
        let main = r.units.iter().find(|u| u.name == "head 0003").unwrap();
        assert_eq!(main.current.as_deref(), Some("0002"));
        assert_eq!(main.at_head, Some(false));
        assert_eq!(main.pending, 1);
        assert!(r.flags().contains(&"head 0003: 1 pending".to_string()), "{:?}", r.flags());
        pages_say(db, &md, &["head 0003: 1 pending", "not at head"], "Alembic head 0003: 1 pending").await;

        // Fixed and applied: both heads current, labelled as heads, nothing pending.
        rev("0003_broken", "0003", "\"0002\"", "None", "ALTER TABLE users ADD name text");
        let (ok, out) = run(&mut python(&p, db, &alembic(&["upgrade", "heads"])).await).await;
        assert!(ok, "{out}");
        let current_out = status(&mut python(&p, db, &alembic(&["current"])).await).await;
        let mut current: Vec<&str> = current_out
            .lines()
            .filter(|l| l.contains("(head)"))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        current.sort();
        assert_eq!(current, ["0002r", "0003"]);
        let (r, _) = report(db, "alembic", p.path("versions")).await;
        assert_eq!(r.current.as_deref(), Some("0002r (head), 0003 (head)"));
        assert!(pending_keys(&r).is_empty());
        assert!(r.units.iter().all(|u| u.at_head == Some(true)));
        assert!(!r.is_red(), "{:?}", r.flags());
    })
    .await;
}

#[tokio::test]
async fn django_versions_and_pending_per_app_agree_with_showmigrations() {
    tools().await;
    with_databases(1, |dbs| async move {
        let db = &dbs[0];
        let p = Project::new("django");
        p.write(
            "settings.py",
            r#"import os
SECRET_KEY = "test"
INSTALLED_APPS = ["django.contrib.contenttypes", "shop", "blog"]
HOST, PORT = os.environ["DBOPS_IT_PG_HOSTPORT"].rsplit(":", 1)
DATABASES = {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": os.environ["DBOPS_IT_DB"],
             "USER": "postgres", "HOST": HOST, "PORT": PORT}}
USE_TZ = True
"#,
        );
        for f in ["shop/__init__.py", "blog/__init__.py", "shop/migrations/__init__.py", "blog/migrations/__init__.py"] {
            p.write(f, "");
        }
        let mig = |app: &str, name: &str, deps: &str, sql: &str| {
            p.write(
                &format!("{app}/migrations/{name}.py"),
                &format!(
                    "from django.db import migrations\n\n\nclass Migration(migrations.Migration):\n    dependencies = [\n        {deps}\n    ]\n\n    operations = [migrations.RunSQL(\"{sql}\")]\n"
                ),
            )
        };
        mig("shop", "0001_initial", "", "CREATE TABLE shop_product (id int)");
        mig("shop", "0002_product_price", "('shop', '0001_initial'),", "ALTER TABLE shop_product ADD price int");
        mig("blog", "0001_initial", "(\"contenttypes\", \"0002_remove_content_type_name\"),", "CREATE TABLE blog_post (id int)");
        mig("blog", "0002_post_title", "('blog', '0001_initial'),", "ALTER TABLE blog_post ADD title text");
        mig("blog", "0003_broken", "('blog', '0002_post_title'),\n        ('shop', '0002_product_price'),", BROKEN);
        migrate_fails(&mut python(&p, db, &["-m", "django", "migrate"]).await).await;
        let out = status(&mut python(&p, db, &["-m", "django", "showmigrations"]).await).await;

        // showmigrations: an app name, then " [X] name" / " [ ] name" lines.
        let mut told: Vec<(String, Vec<String>, Vec<String>)> = vec![];
        for line in out.lines() {
            if !line.starts_with(' ') {
                told.push((line.trim().to_string(), vec![], vec![]));
            } else if let Some(n) = line.trim().strip_prefix("[X] ") {
                told.last_mut().unwrap().1.push(n.to_string());
            } else if let Some(n) = line.trim().strip_prefix("[ ] ") {
                told.last_mut().unwrap().2.push(n.to_string());
            }
        }
        assert_eq!(told.len(), 3, "{out}");
        let (r, md) = report(db, "django", p.path("")).await;
        let applied: usize = told.iter().map(|t| t.1.len()).sum();
        assert_eq!(r.applied.len(), applied);
        for (app, done, pending) in &told {
            let u = r
                .units
                .iter()
                .find(|u| &u.name == app)
                .unwrap_or_else(|| panic!("no unit {app}: {:?}", r.units));
            assert_eq!(u.current.as_ref(), done.last(), "{app}");
            assert_eq!(u.pending, pending.len(), "{app}");
        }
        let blog = r.units.iter().find(|u| u.name == "blog").unwrap();
        assert_eq!(blog.pending, 1);
        assert_eq!(pending_keys(&r), ["blog.0003_broken"]);
        assert_eq!(r.flags(), ["blog: 1 pending"]);
        assert!(r.notes.iter().any(|n| n.contains("contenttypes")), "{:?}", r.notes);
        pages_say(db, &md, &["blog: 1 pending", "0002_post_title", "0002_product_price"], "Django blog: 1 pending").await;
        let app = app_for(db, &md).await;
        let overview = app.logged_in(Role::Viewer).await.get("/").await;
        assert!(overview.text.contains("Django blog 0002_post_title"), "{}", overview.text);
    })
    .await;
}

#[tokio::test]
async fn knex_pending_agrees_with_migrate_status() {
    tools().await;
    with_databases(1, |dbs| async move {
        let db = &dbs[0];
        let p = Project::new("knex");
        p.write(
            "knexfile.js",
            "module.exports = { client: 'pg', connection: process.env.DBOPS_IT_PG_URL, migrations: { directory: './migrations' } };\n",
        );
        for (name, sql) in [
            ("20240101000000_create_users", "CREATE TABLE users (id int)"),
            ("20240102000000_add_email", "ALTER TABLE users ADD email text"),
            ("20240103000000_broken", BROKEN),
        ] {
            p.write(
                &format!("migrations/{name}.js"),
                &format!("exports.up = (knex) => knex.raw(\"{sql}\");\nexports.down = () => {{}};\n"),
            );
        }
        // One batch per migration, as deploys do, the last one failing.
        for _ in 0..2 {
            let (ok, out) = run(&mut node(&p, db, "knex", &["migrate:up"]).await).await;
            assert!(ok, "{out}");
        }
        migrate_fails(&mut node(&p, db, "knex", &["migrate:latest"]).await).await;
        let out = status(&mut node(&p, db, "knex", &["migrate:list"]).await).await;
        // "Found 2 Completed Migration file/files." then names; then the pending ones.
        let (done, pending) = out.split_once("Pending").expect("knex lists pending");
        let names = |s: &str| -> Vec<String> {
            s.lines().map(str::trim).filter(|l| l.ends_with(".js")).map(str::to_string).collect()
        };
        let (done, pending) = (names(done), names(pending));
        assert_eq!((done.len(), pending.len()), (2, 1), "{out}");

        let (r, md) = report(db, "knex", p.path("migrations")).await;
        assert_eq!(r.applied.iter().map(|a| a.version.clone()).collect::<Vec<_>>(), done);
        assert_eq!(r.current.as_ref(), done.last());
        assert_eq!(pending_keys(&r), pending);
        assert_eq!(r.flags(), ["1 pending"]);
        pages_say(db, &md, &["1 pending (there, not applied)", "20240103000000_broken.js"], "Knex: 1 pending").await;
    })
    .await;
}

#[tokio::test]
async fn sequelize_pending_agrees_with_db_migrate_status() {
    tools().await;
    with_databases(1, |dbs| async move {
        let db = &dbs[0];
        let p = Project::new("sequelize");
        p.write(
            ".sequelizerc",
            "const path = require('path');\nmodule.exports = { config: path.resolve('config.js'), 'migrations-path': path.resolve('migrations') };\n",
        );
        p.write(
            "config.js",
            "module.exports = { development: { url: process.env.DBOPS_IT_PG_URL, dialect: 'postgres', logging: false } };\n",
        );
        for (name, sql) in [
            ("20240101000000-create-users", "CREATE TABLE users (id int)"),
            ("20240102000000-add-email", "ALTER TABLE users ADD email text"),
            ("20240103000000-broken", BROKEN),
        ] {
            p.write(
                &format!("migrations/{name}.js"),
                &format!("module.exports = {{ up: (qi) => qi.sequelize.query(\"{sql}\"), down: async () => {{}} }};\n"),
            );
        }
        migrate_fails(&mut node(&p, db, "sequelize-cli", &["db:migrate"]).await).await;
        let out = status(&mut node(&p, db, "sequelize-cli", &["db:migrate:status"]).await).await;
        let done: Vec<String> = lines_after(&out, "up ").iter().map(|s| s.to_string()).collect();
        let pending: Vec<String> = lines_after(&out, "down ").iter().map(|s| s.to_string()).collect();
        assert_eq!((done.len(), pending.len()), (2, 1), "{out}");

        let (r, md) = report(db, "sequelize", p.path("migrations")).await;
        assert_eq!(r.applied.iter().map(|a| a.version.clone()).collect::<Vec<_>>(), done);
        assert_eq!(r.current.as_ref(), done.last());
        assert_eq!(pending_keys(&r), pending);
        pages_say(db, &md, &["1 pending (there, not applied)", "20240103000000-broken.js"], "Sequelize: 1 pending").await;
    })
    .await;
}

#[tokio::test]
async fn typeorm_pending_agrees_with_migration_show() {
    tools().await;
    with_databases(1, |dbs| async move {
        let db = &dbs[0];
        let p = Project::new("typeorm");
        p.write(
            "datasource.js",
            "const { DataSource } = require('typeorm');\nmodule.exports = new DataSource({ type: 'postgres', url: process.env.DBOPS_IT_PG_URL, migrations: [__dirname + '/migrations/*.js'], migrationsTransactionMode: 'each' });\n",
        );
        for (ts, class, sql) in [
            ("1700000000000", "CreateUsers", "CREATE TABLE users (id int)"),
            ("1700000100000", "AddEmail", "ALTER TABLE users ADD email text"),
            ("1700000200000", "Broken", BROKEN),
        ] {
            p.write(
                &format!("migrations/{ts}-{class}.js"),
                &format!(
                    "module.exports = class {class}{ts} {{\n    async up(queryRunner) {{ await queryRunner.query(\"{sql}\"); }}\n    async down() {{}}\n}};\n"
                ),
            );
        }
        migrate_fails(&mut node(&p, db, "typeorm", &["migration:run", "-d", "datasource.js"]).await).await;
        // migration:show exits 1 when something is pending; its lines are what count.
        let (_, out) = run(&mut node(&p, db, "typeorm", &["migration:show", "-d", "datasource.js"]).await).await;
        let done: Vec<String> = lines_after(&out, "[X] ")
            .iter()
            .map(|l| l.split(' ').next_back().unwrap().to_string())
            .collect();
        let pending: Vec<String> = lines_after(&out, "[ ] ").iter().map(|s| s.to_string()).collect();
        assert_eq!((done.len(), pending.len()), (2, 1), "{out}");

        let (r, md) = report(db, "typeorm", p.path("migrations")).await;
        assert_eq!(r.applied.iter().map(|a| a.name.clone()).collect::<Vec<_>>(), done);
        assert_eq!(pending_keys(&r), pending);
        pages_say(db, &md, &["1 pending (there, not applied)", "Broken1700000200000"], "TypeORM: 1 pending").await;
    })
    .await;
}

#[tokio::test]
async fn dbmate_pending_agrees_with_dbmate_status() {
    tools().await;
    with_databases(1, |dbs| async move {
        let db = &dbs[0];
        let p = Project::new("dbmate");
        for (name, sql) in [
            ("20240101000000_create_users", "CREATE TABLE users (id int)"),
            (
                "20240102000000_add_email",
                "ALTER TABLE users ADD email text",
            ),
            ("20240103000000_broken", BROKEN),
        ] {
            p.write(
                &format!("db/migrations/{name}.sql"),
                &format!("-- migrate:up\n{sql};\n\n-- migrate:down\n"),
            );
        }
        migrate_fails(&mut node(&p, db, "dbmate", &["--no-dump-schema", "up"]).await).await;
        let out = status(&mut node(&p, db, "dbmate", &["status"]).await).await;
        let version = |f: &&str| f.split('_').next().unwrap().to_string();
        let done: Vec<String> = lines_after(&out, "[X] ").iter().map(version).collect();
        let pending: Vec<String> = lines_after(&out, "[ ] ").iter().map(version).collect();
        assert!(
            out.contains("Applied: 2") && out.contains("Pending: 1"),
            "{out}"
        );

        let (r, md) = report(db, "dbmate", p.path("db/migrations")).await;
        assert_eq!(
            r.applied
                .iter()
                .map(|a| a.version.clone())
                .collect::<Vec<_>>(),
            done
        );
        assert_eq!(r.current.as_ref(), done.last());
        assert_eq!(pending_keys(&r), pending);
        pages_say(
            db,
            &md,
            &[
                "1 pending (there, not applied)",
                "20240103000000_broken.sql",
            ],
            "dbmate: 1 pending",
        )
        .await;
    })
    .await;
}

#[tokio::test]
async fn node_pg_migrate_is_recognised_and_its_pending_agrees_with_a_dry_run() {
    tools().await;
    with_databases(1, |dbs| async move {
        let db = &dbs[0];
        let p = Project::new("node-pg-migrate");
        for (name, sql) in [
            ("1700000000000_create-users", "CREATE TABLE users (id int)"),
            (
                "1700000100000_add-email",
                "ALTER TABLE users ADD email text",
            ),
            ("1700000200000_broken", BROKEN),
        ] {
            p.write(
                &format!("migrations/{name}.js"),
                &format!(
                    "exports.up = (pgm) => {{ pgm.sql(\"{sql}\"); }};\nexports.down = false;\n"
                ),
            );
        }
        migrate_fails(
            &mut node(
                &p,
                db,
                "node-pg-migrate",
                &["up", "--no-single-transaction"],
            )
            .await,
        )
        .await;
        // node-pg-migrate has no status command: a dry run lists what `up` would run.
        let out = status(&mut node(&p, db, "node-pg-migrate", &["up", "--dry-run"]).await).await;
        let pending: Vec<String> = lines_after(&out, "> - ")
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(pending, ["1700000200000_broken"], "{out}");

        let (r, md) = report(db, "node-pg-migrate", p.path("migrations")).await;
        assert_eq!(r.tool, Tool::NodePgMigrate);
        assert_eq!(r.location(), "public.pgmigrations");
        assert_eq!(
            r.applied
                .iter()
                .map(|a| a.version.as_str())
                .collect::<Vec<_>>(),
            ["1700000000000_create-users", "1700000100000_add-email"]
        );
        assert_eq!(r.current.as_deref(), Some("1700000100000_add-email"));
        assert_eq!(pending_keys(&r), pending);
        pages_say(
            db,
            &md,
            &["node-pg-migrate", "1 pending (there, not applied)"],
            "node-pg-migrate: 1 pending",
        )
        .await;
    })
    .await;
}

/// `dbops migrations manifest DIR --tool T`, run as a pipeline runs it.
fn manifest_of(dir: &Path, tool: &str) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dbops"))
        .args(["migrations", "manifest"])
        .arg(dir)
        .args(["--tool", tool])
        .output()
        .expect("dbops runs");
    assert!(
        out.status.success(),
        "the manifest command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the manifest is JSON")
}

/// What the overview's red mark of the only target says ("" when it is green).
async fn overview_mark(viewer: &mut crate::helpers::Browser) -> String {
    let overview = viewer.get("/").await;
    assert_eq!(overview.status, StatusCode::OK);
    let doc = scraper::Html::parse_document(&overview.text);
    doc.select(&scraper::Selector::parse("td.migrations .mig-mark").unwrap())
        .flat_map(|e| e.text())
        .collect()
}

/// The texts of the leftover list on the migrations page.
fn leftovers_on(page: &str) -> Vec<String> {
    let doc = scraper::Html::parse_document(page);
    doc.select(&scraper::Selector::parse(".mig-leftovers li").unwrap())
        .map(|e| e.text().collect::<String>())
        .collect()
}

#[tokio::test]
async fn a_failed_knex_deploy_reported_by_a_pipeline_stays_red_with_its_leftover_table_until_one_succeeds()
 {
    tools().await;
    with_databases(1, |dbs| async move {
        let db = &dbs[0];
        let p = Project::new("knex-deploy");
        p.write(
            "knexfile.js",
            "module.exports = { client: 'pg', connection: process.env.DBOPS_IT_PG_URL, migrations: { directory: './migrations' } };\n",
        );
        for (name, sql) in [
            ("20240101000000_create_users", "CREATE TABLE users (id int)"),
            ("20240102000000_add_email", "ALTER TABLE users ADD email text"),
        ] {
            p.write(
                &format!("migrations/{name}.js"),
                &format!("exports.up = (knex) => knex.raw(\"{sql}\");\nexports.down = () => {{}};\n"),
            );
        }
        let (ok, out) = run(&mut node(&p, db, "knex", &["migrate:latest"]).await).await;
        assert!(ok, "{out}");

        // dbops knows no directory for this target: only what the pipeline reports.
        let s = services().await;
        let app = spawn_app_with(
            r#"
            [targets]
            connect_timeout_seconds = 2
            [[postgres]]
            name = "app"
            url_env = "APP"
            policy = "production"
            "#,
            &[("APP", format!("{}/{db}", s.pg_base))],
        )
        .await;
        let admin = crate::helpers::user(&app, Role::Admin).await;
        let (_, token) = dbops::auth::tokens::create(
            &app.db,
            "ci",
            &["migrations:deploy".to_string()],
            Some(&["app".to_string()]),
            (admin.id, &admin.username),
        )
        .await
        .unwrap();
        let client = reqwest::Client::new();
        let post = |body: serde_json::Value, token: Option<String>| {
            let mut req = client
                .post(app.url("/api/v1/targets/app/migrations/deploys"))
                .json(&body);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            async move {
                let r = req.send().await.unwrap();
                let status = r.status();
                let text = r.text().await.unwrap();
                (status, serde_json::from_str::<serde_json::Value>(&text).unwrap_or_else(|_| text.into()))
            }
        };
        let deploy = |outcome: &str, reference: &str| {
            serde_json::json!({
                "outcome": outcome,
                "reference": reference,
                "manifest": manifest_of(&p.path("migrations"), "knex"),
            })
        };

        // Without a token, with a bad manifest: refused, nothing stored.
        let (status, _) = post(deploy("succeeded", "x"), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let mut bad = deploy("succeeded", "x");
        bad["manifest"]["tool"] = "cobol".into();
        let (status, body) = post(bad, Some(token.clone())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(body["error"].as_str().unwrap_or_default().contains("“cobol” is not one dbops compares"), "{body}");
        assert_eq!(app.count_ops("migrations.deploy", Some("failed")).await, 1);

        // 1. A successful deploy: the baseline.
        let m = manifest_of(&p.path("migrations"), "knex");
        assert_eq!(m["tool"], "knex");
        assert_eq!(m["migrations"].as_array().unwrap().len(), 2);
        assert_eq!(m["migrations"][0]["key"], "20240101000000_create_users.js");
        let (status, body) = post(deploy("succeeded", "commit aaa111"), Some(token.clone())).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert!(body["snapshot"]["relations"].as_u64().unwrap() >= 3, "{body}");
        let mut viewer = app.logged_in(Role::Viewer).await;
        let page = viewer.get("/targets/app/migrations").await;
        assert!(page.text.contains("Last deploy succeeded: commit aaa111"), "{}", page.text);
        assert!(page.text.contains("the manifest reported with deploy #"), "{}", page.text);
        assert!(page.text.contains("In step"), "{}", page.text);
        assert_eq!(overview_mark(&mut viewer).await, "");

        // 2. A non-transactional migration creates a table, then fails.
        p.write(
            "migrations/20240103000000_audit.js",
            "exports.config = { transaction: false };\n\
             exports.up = async (knex) => {\n\
               await knex.raw('CREATE TABLE leftover_audit (id serial PRIMARY KEY, note text)');\n\
               await knex.raw('ALTER TABLE nope ADD x int');\n\
             };\nexports.down = () => {};\n",
        );
        migrate_fails(&mut node(&p, db, "knex", &["migrate:latest"]).await).await;
        let out = self::status(&mut node(&p, db, "knex", &["migrate:list"]).await).await;
        let (_, pending) = out.split_once("Pending").expect("knex lists pending");
        assert!(pending.contains("20240103000000_audit.js"), "{out}");
        let (status, body) = post(
            deploy("failed", "commit bbb222 https://ci.example/pipelines/7"),
            Some(token.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["database"], db.as_str());

        let page = viewer.get("/targets/app/migrations").await;
        assert!(
            page.text.contains("Last deploy failed: commit bbb222 https://ci.example/pipelines/7"),
            "{}",
            page.text
        );
        // What knex itself says is pending, and what it left behind.
        assert!(page.text.contains("1 pending (there, not applied)"), "{}", page.text);
        assert!(page.text.contains("20240103000000_audit.js"), "{}", page.text);
        let left = leftovers_on(&page.text);
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(left[0].starts_with("public.leftover_audit table"), "{left:?}");
        assert!(left[0].contains("leftover_audit_pkey (index)"), "{left:?}");
        assert!(left[0].contains("leftover_audit_id_seq (sequence)"), "{left:?}");
        assert!(page.text.contains("It cannot see changes to objects that existed then"));
        let mark = overview_mark(&mut viewer).await;
        assert!(
            mark.contains("Knex: last deploy failed: commit bbb222 https://ci.example/pipelines/7, "),
            "{mark:?}"
        );
        assert!(mark.contains("Knex: 1 pending"), "{mark:?}");

        // 3. Fixed and deployed again: green, and nothing listed as left over.
        p.write(
            "migrations/20240103000000_audit.js",
            "exports.config = { transaction: false };\n\
             exports.up = (knex) => knex.raw('CREATE TABLE IF NOT EXISTS leftover_audit (id serial PRIMARY KEY, note text)');\n\
             exports.down = () => {};\n",
        );
        let (ok, out) = run(&mut node(&p, db, "knex", &["migrate:latest"]).await).await;
        assert!(ok, "{out}");
        let (status, body) = post(deploy("succeeded", "commit ccc333"), Some(token.clone())).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let page = viewer.get("/targets/app/migrations").await;
        assert!(page.text.contains("Last deploy succeeded: commit ccc333"), "{}", page.text);
        assert!(!page.text.contains("Last deploy failed"), "{}", page.text);
        assert!(leftovers_on(&page.text).is_empty());
        assert!(page.text.contains("In step"), "{}", page.text);
        assert_eq!(overview_mark(&mut viewer).await, "");

        // Every report is in the operations log, by the token.
        assert_eq!(app.count_ops("migrations.deploy", Some("succeeded")).await, 3);
        let by: Vec<String> = sqlx::query_scalar(
            "SELECT actor_name FROM operations WHERE kind = 'migrations.deploy' AND outcome = 'succeeded'",
        )
        .fetch_all(&app.db)
        .await
        .unwrap();
        assert!(by.iter().all(|a| a == "token:ci"), "{by:?}");
        // Append-only.
        let err = sqlx::query("DELETE FROM migration_deploys").execute(&app.db).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{err}");
    })
    .await;
}

/// graphile-migrate with `db` as its database and `shadow` as its shadow database.
async fn graphile(p: &Project, db: &str, shadow: &str, args: &[&str]) -> Command {
    let base = &services().await.pg_base;
    let mut c = node(p, db, "graphile-migrate", args).await;
    c.env("SHADOW_DATABASE_URL", pg_url(shadow, base))
        .env("ROOT_DATABASE_URL", pg_url("postgres", base));
    c
}

#[tokio::test]
async fn graphile_migrate_pending_and_hashes_agree_with_graphile_migrate_status() {
    tools().await;
    with_databases(3, |dbs| async move {
        let (db, dev, shadow) = (&dbs[0], &dbs[1], &dbs[2]);
        let p = Project::new("graphile");
        p.write(".gmrc", "{}\n");
        // Committed on a developer's database, as graphile-migrate is used.
        for (sql, message) in [
            ("CREATE TABLE users (id int);\n", "create users"),
            ("ALTER TABLE users ADD email text;\n", "add email"),
            ("CREATE TABLE conflict (id int);\n", "conflict"),
        ] {
            p.write("migrations/current.sql", sql);
            let (ok, out) =
                run(&mut graphile(&p, dev, shadow, &["commit", "--message", message]).await).await;
            assert!(ok, "{out}");
        }
        // The deployed database already has the table the last one creates: it fails there.
        let base = &services().await.pg_base;
        let mut conn = PgConnection::connect(&pg_url(db, base)).await.unwrap();
        sqlx::query("CREATE TABLE conflict (x int)")
            .execute(&mut conn)
            .await
            .unwrap();
        let (_, out) = run(&mut graphile(&p, db, shadow, &["migrate"]).await).await;
        assert!(
            out.contains("relation \"conflict\" already exists"),
            "{out}"
        );
        // `status` exits 1 when committed migrations are pending, and names them.
        let (_, out) = run(&mut graphile(&p, db, shadow, &["status"]).await).await;
        let pending: Vec<String> = out
            .lines()
            .map(str::trim)
            .filter(|l| l.ends_with(".sql"))
            .map(str::to_string)
            .collect();
        assert_eq!(pending, ["000003.sql"], "{out}");

        let (r, md) = report(db, "graphile-migrate", p.path("migrations")).await;
        assert_eq!(r.tool, Tool::GraphileMigrate);
        assert_eq!(
            r.applied
                .iter()
                .map(|a| a.version.as_str())
                .collect::<Vec<_>>(),
            ["000001.sql", "000002.sql"]
        );
        assert_eq!(pending_keys(&r), pending);
        // The hashes graphile-migrate recorded are the ones in the committed files.
        assert!(r.drift[0].mismatched.is_empty(), "{:?}", r.drift[0]);
        assert!(r.drift[0].missing.is_empty(), "{:?}", r.drift[0]);
        assert_eq!(r.flags(), ["1 pending"]);
        pages_say(
            db,
            &md,
            &[
                "Graphile Migrate",
                "1 pending (there, not applied)",
                "000003-conflict.sql",
            ],
            "Graphile Migrate: 1 pending",
        )
        .await;
    })
    .await;
}

/// A Drizzle project: `drizzle.config.js` and the migrations with their journal
/// (as `drizzle-kit generate` writes them: `<tag>.sql` and `meta/_journal.json`).
fn drizzle_project(p: &Project, migrations: &[(&str, u64, &str)]) {
    p.write(
        "drizzle.config.js",
        "module.exports = { dialect: 'postgresql', out: './drizzle', dbCredentials: { url: process.env.DBOPS_IT_PG_URL } };\n",
    );
    let mut entries = vec![];
    for (i, (tag, when, sql)) in migrations.iter().enumerate() {
        p.write(&format!("drizzle/{tag}.sql"), sql);
        entries.push(serde_json::json!({
            "idx": i, "version": "7", "when": when, "tag": tag, "breakpoints": true
        }));
    }
    p.write(
        "drizzle/meta/_journal.json",
        &serde_json::json!({ "version": "7", "dialect": "postgresql", "entries": entries })
            .to_string(),
    );
}

#[tokio::test]
async fn drizzle_pending_and_hashes_agree_with_drizzle_kit_migrate() {
    tools().await;
    with_databases(1, |dbs| async move {
        let db = &dbs[0];
        let p = Project::new("drizzle");
        let good = [
            ("0000_init", 1_700_000_000_000, "CREATE TABLE users (id int);\n"),
            (
                "0001_email",
                1_700_000_100_000,
                "ALTER TABLE users ADD email text;\n--> statement-breakpoint\nCREATE INDEX users_email ON users (email);\n",
            ),
        ];
        drizzle_project(&p, &good);
        let (ok, out) = run(&mut node(&p, db, "drizzle-kit", &["migrate"]).await).await;
        assert!(ok, "{out}");
        let broken = format!("{BROKEN};\n");
        let mut three = good.to_vec();
        three.push(("0002_broken", 1_700_000_200_000, broken.as_str()));
        drizzle_project(&p, &three);
        // drizzle-kit exits 1 without printing the SQL error (only its spinner).
        let (ok, out) = run(&mut node(&p, db, "drizzle-kit", &["migrate"]).await).await;
        assert!(!ok, "the last migration should fail:\n{out}");

        let (r, md) = report(db, "drizzle", p.path("drizzle")).await;
        assert_eq!(r.tool, Tool::Drizzle);
        assert_eq!(r.applied.len(), 2);
        assert_eq!(pending_keys(&r), ["1700000200000"]);
        // The hashes drizzle-kit recorded are the ones dbops computes from the files.
        assert!(r.drift[0].mismatched.is_empty(), "{:?}", r.drift[0]);
        assert!(r.drift[0].missing.is_empty(), "{:?}", r.drift[0]);
        assert_eq!(r.flags(), ["1 pending"]);
        pages_say(db, &md, &["1 pending (there, not applied)", "0002_broken"], "Drizzle: 1 pending").await;

        // drizzle-kit has no status command; what it runs next is its answer: the
        // fixed migration, and only it, is applied.
        let mut fixed = good.to_vec();
        fixed.push(("0002_broken", 1_700_000_200_000, "CREATE TABLE fixed (id int);\n"));
        drizzle_project(&p, &fixed);
        let (ok, out) = run(&mut node(&p, db, "drizzle-kit", &["migrate"]).await).await;
        assert!(ok, "{out}");
        let base = &services().await.pg_base;
        let mut conn = PgConnection::connect(&pg_url(db, base)).await.unwrap();
        let created: Vec<i64> = sqlx::query_scalar(
            "SELECT created_at FROM drizzle.__drizzle_migrations ORDER BY id",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        assert_eq!(created.len(), 3);
        assert_eq!(created[2].to_string(), pending_keys(&r)[0]);
        let (r, _) = report(db, "drizzle", p.path("drizzle")).await;
        assert!(r.drift[0].is_clean(), "{:?}", r.drift[0]);
    })
    .await;
}
