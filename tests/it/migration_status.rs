//! Migration status against the real PostgreSQL: every tool's bookkeeping table,
//! created with realistic rows (failed, dirty and locked ones too) in throwaway
//! databases, is found with the right order, current version and problems; pending
//! migrations and checksum drift are computed for sqlx, Prisma, Flyway and Drizzle
//! directories (tests/fixtures/migrations/); a database with no tool says so, one
//! that does not exist gets a sentence; the pages render for a viewer with names
//! escaped; the overview shows the tool, the version and a red mark.
//!
//! Every database a test creates is dropped at the end, pass or fail.

use std::path::PathBuf;

use dbops::{
    auth::Role,
    config::MigrationsDir,
    migration_status::{self, RowState, Tool, ToolReport, disk},
};
use reqwest::StatusCode;
use sha2::{Digest, Sha256, Sha384};
use sqlx::{Connection, PgConnection};

use crate::helpers::{TestApp, new_db_name, services, spawn_app_with, with_databases};

fn fixtures(tool: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/migrations")
        .join(tool)
}

fn fixture_text(path: &str) -> String {
    std::fs::read_to_string(fixtures("").join(path)).unwrap()
}

async fn connect(db: &str) -> PgConnection {
    let base = &services().await.pg_base;
    PgConnection::connect(&format!("{base}/{db}"))
        .await
        .unwrap()
}

/// A dbops with one PostgreSQL target `app` on database `db`, the extra TOML
/// lines inside its `[[postgres]]` table.
async fn app_for(db: &str, extra: &str) -> TestApp {
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
            {extra}
            [[redis]]
            name = "cache"
            url_env = "REDIS"
            policy = "dev"
            "#
        ),
        &[
            ("APP", format!("{}/{db}", s.pg_base)),
            ("REDIS", s.redis_url.clone()),
        ],
    )
    .await
}

/// Every tool's table with realistic rows, in several schemas.
const EVERY_TOOL: &str = r#"
-- sqlx (execution_time in nanoseconds)
CREATE TABLE _sqlx_migrations (version bigint PRIMARY KEY, description text NOT NULL,
  installed_on timestamptz NOT NULL DEFAULT now(), success boolean NOT NULL,
  checksum bytea NOT NULL, execution_time bigint NOT NULL);
INSERT INTO _sqlx_migrations VALUES
  (20240101000000, 'create users', '2024-01-01 10:00:00+00', true, '\x0102', 12500000),
  (20240102000000, 'add orders', '2024-01-02 10:00:00+00', true, '\x0304', 2000000000),
  (20240103000000, 'broken', '2024-01-03 10:00:00+00', false, '\x0506', 1000);

-- Prisma
CREATE TABLE _prisma_migrations (id varchar(36) PRIMARY KEY, checksum varchar(64) NOT NULL,
  finished_at timestamptz, migration_name varchar(255) NOT NULL, logs text,
  rolled_back_at timestamptz, started_at timestamptz NOT NULL DEFAULT now(),
  applied_steps_count integer NOT NULL DEFAULT 0);
INSERT INTO _prisma_migrations VALUES
  ('a', repeat('a', 64), '2024-01-01 10:00:01+00', '20240101000000_init', NULL, NULL, '2024-01-01 10:00:00+00', 1),
  ('b', repeat('b', 64), NULL, '20240201000000_add_orders', 'failed once', '2024-02-01 11:00:00+00', '2024-02-01 10:00:00+00', 0),
  ('c', repeat('b', 64), '2024-02-02 10:00:02+00', '20240201000000_add_orders', NULL, NULL, '2024-02-02 10:00:00+00', 1),
  ('d', repeat('d', 64), NULL, '20240301000000_bad', E'Database error code: 42P07\nERROR: relation "Order" already exists', NULL, '2024-03-01 10:00:00+00', 0);

-- Drizzle (its own schema; created_at = the journal's milliseconds)
CREATE SCHEMA drizzle;
CREATE TABLE drizzle.__drizzle_migrations (id serial PRIMARY KEY, hash text NOT NULL, created_at bigint);
INSERT INTO drizzle.__drizzle_migrations (hash, created_at) VALUES
  ('h0', 1700000000000), ('h1', 1700000100000);

-- Flyway
CREATE TABLE flyway_schema_history (installed_rank int PRIMARY KEY, version varchar(50),
  description varchar(200) NOT NULL, type varchar(20) NOT NULL, script varchar(1000) NOT NULL,
  checksum int, installed_by varchar(100) NOT NULL, installed_on timestamp NOT NULL DEFAULT now(),
  execution_time int NOT NULL, success boolean NOT NULL);
INSERT INTO flyway_schema_history VALUES
  (1, '1', 'init', 'SQL', 'V1__init.sql', 1234, 'app', '2024-01-01 10:00:00', 35, true),
  (2, '1.1', 'add brand', 'SQL', 'V1_1__add_brand.sql', -42, 'app', '2024-01-02 10:00:00', 12, true),
  (3, '2', 'bad', 'SQL', 'V2__bad.sql', 99, 'app', '2024-01-03 10:00:00', 3, false);

-- Liquibase (one failed change set, a lock left held)
CREATE TABLE databasechangelog (id varchar(255) NOT NULL, author varchar(255) NOT NULL,
  filename varchar(255) NOT NULL, dateexecuted timestamp NOT NULL, orderexecuted int NOT NULL,
  exectype varchar(10) NOT NULL, md5sum varchar(35), description varchar(255), comments varchar(255),
  tag varchar(255), liquibase varchar(20), contexts varchar(255), labels varchar(255), deployment_id varchar(10));
INSERT INTO databasechangelog VALUES
  ('create-cars', 'bob', 'db/changelog.xml', '2024-01-01 10:00:00', 1, 'EXECUTED', '9:aaaa', 'createTable tableName=cars', '', NULL, '4.25.0', NULL, NULL, '1'),
  ('add-brand', 'bob', 'db/changelog.xml', '2024-01-02 10:00:00', 2, 'EXECUTED', '9:bbbb', 'addColumn', '', 'v1.1', '4.25.0', NULL, NULL, '2'),
  ('bad-index', 'alice', 'db/changelog.xml', '2024-01-03 10:00:00', 3, 'FAILED', '9:cccc', 'createIndex', '', NULL, '4.25.0', NULL, NULL, '3');
CREATE TABLE databasechangeloglock (id int PRIMARY KEY, locked boolean NOT NULL, lockgranted timestamp, lockedby varchar(255));
INSERT INTO databasechangeloglock VALUES (1, true, '2024-01-03 10:00:00', 'ci-runner (10.0.0.5)');

-- golang-migrate (dirty)
CREATE SCHEMA gomig;
CREATE TABLE gomig.schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL);
INSERT INTO gomig.schema_migrations VALUES (20240105120000, true);

-- Rails
CREATE SCHEMA rails_app;
CREATE TABLE rails_app.schema_migrations (version varchar PRIMARY KEY);
INSERT INTO rails_app.schema_migrations VALUES ('20240215000000'), ('20240101000000');
CREATE TABLE rails_app.ar_internal_metadata (key varchar PRIMARY KEY, value varchar, created_at timestamp NOT NULL, updated_at timestamp NOT NULL);
INSERT INTO rails_app.ar_internal_metadata VALUES ('environment', 'production', now(), now());

-- dbmate
CREATE SCHEMA dbmate_app;
CREATE TABLE dbmate_app.schema_migrations (version varchar(128) PRIMARY KEY);
INSERT INTO dbmate_app.schema_migrations VALUES ('20240301000000'), ('20240101000000');

-- a schema_migrations of another tool (Ecto-like)
CREATE SCHEMA ecto_app;
CREATE TABLE ecto_app.schema_migrations (version bigint PRIMARY KEY, inserted_at timestamp);
INSERT INTO ecto_app.schema_migrations VALUES (20240101000000, now());

-- Django
CREATE TABLE django_migrations (id serial PRIMARY KEY, app varchar(255) NOT NULL,
  name varchar(255) NOT NULL, applied timestamptz NOT NULL);
INSERT INTO django_migrations (app, name, applied) VALUES
  ('contenttypes', '0001_initial', '2024-01-01 10:00:00+00'),
  ('auth', '0001_initial', '2024-01-01 10:00:01+00'),
  ('shop', '0002_order', '2024-01-05 10:00:00+00');

-- Alembic
CREATE TABLE alembic_version (version_num varchar(32) NOT NULL PRIMARY KEY);
INSERT INTO alembic_version VALUES ('ae1027a6acf');

-- Knex (lock left held)
CREATE TABLE knex_migrations (id serial PRIMARY KEY, name varchar(255), batch integer, migration_time timestamptz);
INSERT INTO knex_migrations (name, batch, migration_time) VALUES
  ('20240101_create_users.js', 1, '2024-01-01 10:00:00+00'),
  ('20240201_add_orders.js', 2, '2024-02-01 10:00:00+00');
CREATE TABLE knex_migrations_lock ("index" serial PRIMARY KEY, is_locked integer);
INSERT INTO knex_migrations_lock (is_locked) VALUES (1);

-- Sequelize
CREATE TABLE "SequelizeMeta" (name varchar(255) PRIMARY KEY);
INSERT INTO "SequelizeMeta" VALUES ('20240102-add-index.js'), ('20240101-create-user.js');

-- goose (version 0 is goose's own first row; 3 was migrated down)
CREATE TABLE goose_db_version (id serial PRIMARY KEY, version_id bigint NOT NULL,
  is_applied boolean NOT NULL, tstamp timestamp DEFAULT now());
INSERT INTO goose_db_version (version_id, is_applied, tstamp) VALUES
  (0, true, '2024-01-01 09:00:00'), (1, true, '2024-01-01 10:00:00'),
  (2, true, '2024-01-02 10:00:00'), (3, true, '2024-01-03 10:00:00'), (3, false, '2024-01-04 10:00:00');

-- Diesel
CREATE TABLE __diesel_schema_migrations (version varchar(50) PRIMARY KEY, run_on timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP);
INSERT INTO __diesel_schema_migrations VALUES ('20240101120000', '2024-01-01 12:00:00'), ('00000000000000', '2024-01-01 11:00:00');

-- refinery (applied_on is RFC 3339 text)
CREATE TABLE refinery_schema_history (version int4 PRIMARY KEY, name varchar(255), applied_on varchar(255), checksum varchar(255));
INSERT INTO refinery_schema_history VALUES
  (1, 'initial', '2024-01-01T10:00:00.123456789+00:00', '10393948394'),
  (2, 'add_cars', '2024-01-02T10:00:00+00:00', '29384729384');

-- TypeORM, and a Laravel "migrations" table that is not TypeORM's
CREATE SCHEMA typeorm_app;
CREATE TABLE typeorm_app.migrations (id serial PRIMARY KEY, "timestamp" bigint NOT NULL, name varchar NOT NULL);
INSERT INTO typeorm_app.migrations ("timestamp", name) VALUES
  (1700000000000, 'Init1700000000000'), (1700000500000, 'AddPosts1700000500000');
CREATE TABLE public.migrations (id serial PRIMARY KEY, migration varchar(255) NOT NULL, batch int NOT NULL);
INSERT INTO public.migrations (migration, batch) VALUES ('2014_10_12_000000_create_users_table', 1);

-- node-pg-migrate
CREATE TABLE pgmigrations (id serial PRIMARY KEY, name varchar(255) NOT NULL, run_on timestamp NOT NULL);
INSERT INTO pgmigrations (name, run_on) VALUES
  ('1700000000000_init', '2024-01-01 10:00:00'), ('1700000100000_add-posts', '2024-01-02 10:00:00');

-- Atlas (its identifier row; the second revision failed part-way)
CREATE SCHEMA atlas_schema_revisions;
CREATE TABLE atlas_schema_revisions.atlas_schema_revisions (version varchar PRIMARY KEY,
  description varchar NOT NULL, type bigint NOT NULL DEFAULT 2, applied bigint NOT NULL DEFAULT 0,
  total bigint NOT NULL DEFAULT 0, executed_at timestamptz NOT NULL, execution_time bigint NOT NULL,
  error text, error_stmt text, hash varchar NOT NULL, partial_hashes jsonb, operator_version varchar NOT NULL);
INSERT INTO atlas_schema_revisions.atlas_schema_revisions VALUES
  ('.atlas_cloud_identifier', 'x', 0, 0, 0, '2024-01-01 09:00:00+00', 0, NULL, NULL, '', NULL, 'Atlas CLI v0.30.0'),
  ('20240101000000', 'init', 2, 1, 1, '2024-01-01 10:00:00+00', 5000000, NULL, NULL, 'aGFzaDE=', NULL, 'Atlas CLI v0.30.0'),
  ('20240102000000', 'add_posts', 2, 1, 2, '2024-01-02 10:00:00+00', 2000000,
   'pq: relation "nope" does not exist', 'ALTER TABLE nope ADD x int;', 'aGFzaDI=', NULL, 'Atlas CLI v0.30.0');

-- Sqitch (a deploy of "widgets" failed and was reverted)
CREATE SCHEMA sqitch;
CREATE TABLE sqitch.changes (change_id text PRIMARY KEY, script_hash text, change text NOT NULL,
  project text NOT NULL, note text NOT NULL DEFAULT '', committed_at timestamptz NOT NULL,
  committer_name text NOT NULL, committer_email text NOT NULL, planned_at timestamptz NOT NULL,
  planner_name text NOT NULL, planner_email text NOT NULL);
INSERT INTO sqitch.changes VALUES ('c1', 'b5d4a1', 'users', 'flipr', 'Creates users',
  '2024-01-01 10:00:00+00', 'Marge', 'marge@example.com', '2024-01-01 09:00:00+00', 'Marge', 'marge@example.com');
CREATE TABLE sqitch.events (event text NOT NULL, change_id text NOT NULL, change text NOT NULL,
  project text NOT NULL, note text NOT NULL DEFAULT '', requires text[] NOT NULL DEFAULT '{}',
  conflicts text[] NOT NULL DEFAULT '{}', tags text[] NOT NULL DEFAULT '{}', committed_at timestamptz NOT NULL,
  committer_name text NOT NULL DEFAULT 'Marge', committer_email text NOT NULL DEFAULT 'marge@example.com',
  planned_at timestamptz NOT NULL DEFAULT now(), planner_name text NOT NULL DEFAULT 'Marge',
  planner_email text NOT NULL DEFAULT 'marge@example.com');
INSERT INTO sqitch.events (event, change_id, change, project, committed_at) VALUES
  ('deploy', 'c1', 'users', 'flipr', '2024-01-01 10:00:00+00'),
  ('fail', 'c2', 'widgets', 'flipr', '2024-01-02 10:00:00+00');

-- Graphile Migrate
CREATE SCHEMA graphile_migrate;
CREATE TABLE graphile_migrate.migrations (hash text PRIMARY KEY, previous_hash text, filename text NOT NULL,
  date timestamptz NOT NULL DEFAULT now());
INSERT INTO graphile_migrate.migrations VALUES
  ('sha1:aa', NULL, '000001.sql', '2024-01-01 10:00:00+00'),
  ('sha1:bb', 'sha1:aa', '000002.sql', '2024-01-02 10:00:00+00');
"#;

fn find<'a>(reports: &'a [ToolReport], tool: Tool, schema: &str) -> &'a ToolReport {
    reports
        .iter()
        .find(|r| r.tool == tool && r.schema == schema)
        .unwrap_or_else(|| panic!("{tool:?} in {schema} not found"))
}

fn versions(r: &ToolReport) -> Vec<&str> {
    r.applied.iter().map(|a| a.version.as_str()).collect()
}

#[tokio::test]
async fn every_tools_table_is_found_with_its_order_current_version_and_problems() {
    with_databases(1, |dbs| async move {
        let db = &dbs[0];
        let mut conn = connect(db).await;
        sqlx::raw_sql(EVERY_TOOL).execute(&mut conn).await.unwrap();
        let reports = migration_status::inspect_database(&mut conn, &[])
            .await
            .unwrap();
        assert_eq!(reports.len(), 22, "one report per tool table: {reports:#?}");

        let r = find(&reports, Tool::Sqlx, "public");
        assert_eq!(
            versions(r),
            ["20240101000000", "20240102000000", "20240103000000"]
        );
        assert_eq!(r.current.as_deref(), Some("20240102000000"));
        assert_eq!(r.applied[2].state, RowState::Failed);
        assert_eq!(r.applied[0].checksum.as_deref(), Some("0102"));
        assert_eq!(r.applied[0].duration(), "12 ms");
        assert_eq!(r.applied[1].duration(), "2.0 s");
        assert_eq!(r.flags(), ["failed"]);
        assert!(r.problems[0].contains("20240103000000"));

        let r = find(&reports, Tool::Prisma, "public");
        assert_eq!(
            versions(r),
            [
                "20240101000000_init",
                "20240201000000_add_orders",
                "20240201000000_add_orders",
                "20240301000000_bad"
            ]
        );
        assert_eq!(r.applied[1].state, RowState::RolledBack);
        assert_eq!(r.applied[3].state, RowState::Failed);
        assert!(
            r.applied[3]
                .logs
                .as_deref()
                .unwrap()
                .contains("already exists")
        );
        assert_eq!(r.current.as_deref(), Some("20240201000000_add_orders"));
        assert_eq!(r.flags(), ["failed"]);
        assert_eq!(
            r.problems.len(),
            1,
            "a rolled-back row is resolved, not a problem"
        );

        let r = find(&reports, Tool::Drizzle, "drizzle");
        assert_eq!(versions(r), ["1700000000000", "1700000100000"]);
        assert_eq!(r.current.as_deref(), Some("1700000100000"));
        assert_eq!(r.applied[1].checksum.as_deref(), Some("h1"));
        assert!(r.applied[0].applied_at.is_some());
        assert!(r.flags().is_empty());

        let r = find(&reports, Tool::Flyway, "public");
        assert_eq!(versions(r), ["1", "1.1", "2"]);
        assert_eq!(r.current.as_deref(), Some("1.1"));
        assert_eq!(r.applied[0].duration(), "35 ms");
        assert_eq!(r.flags(), ["failed"]);

        let r = find(&reports, Tool::Liquibase, "public");
        assert_eq!(versions(r), ["create-cars", "add-brand", "bad-index"]);
        assert_eq!(r.current.as_deref(), Some("add-brand"));
        assert_eq!(r.applied[2].state, RowState::Failed);
        assert_eq!(r.flags(), ["failed", "locked"]);
        assert!(
            r.problems
                .iter()
                .any(|p| p.contains("ci-runner (10.0.0.5)"))
        );

        let r = find(&reports, Tool::GolangMigrate, "gomig");
        assert_eq!(r.current.as_deref(), Some("20240105120000"));
        assert_eq!(r.applied[0].state, RowState::Dirty);
        assert_eq!(r.flags(), ["dirty"]);

        let r = find(&reports, Tool::Rails, "rails_app");
        assert_eq!(versions(r), ["20240101000000", "20240215000000"]);
        assert_eq!(r.current.as_deref(), Some("20240215000000"));
        assert!(r.notes.iter().any(|n| n.contains("production")));
        assert!(r.flags().is_empty());

        let r = find(&reports, Tool::Dbmate, "dbmate_app");
        assert_eq!(versions(r), ["20240101000000", "20240301000000"]);
        assert_eq!(r.current.as_deref(), Some("20240301000000"));

        let r = find(&reports, Tool::Unknown, "ecto_app");
        assert_eq!(r.current.as_deref(), Some("20240101000000"));

        let r = find(&reports, Tool::Django, "public");
        assert_eq!(versions(r), ["contenttypes", "auth", "shop"]);
        // Django versions each app on its own: no single "current version".
        assert_eq!(r.current, None);
        assert_eq!(
            r.units.iter().map(|u| u.describe()).collect::<Vec<_>>(),
            [
                "auth 0001_initial",
                "contenttypes 0001_initial",
                "shop 0002_order"
            ]
        );

        let r = find(&reports, Tool::Alembic, "public");
        assert_eq!(r.current.as_deref(), Some("ae1027a6acf"));
        assert!(
            r.applied.iter().all(|a| a.note.is_empty()),
            "without its versions directory nobody knows whether it is a head"
        );

        let r = find(&reports, Tool::Knex, "public");
        assert_eq!(
            versions(r),
            ["20240101_create_users.js", "20240201_add_orders.js"]
        );
        assert_eq!(r.current.as_deref(), Some("20240201_add_orders.js"));
        assert_eq!(r.applied[1].note, "batch 2");
        assert_eq!(r.flags(), ["locked"]);

        let r = find(&reports, Tool::Sequelize, "public");
        assert_eq!(
            versions(r),
            ["20240101-create-user.js", "20240102-add-index.js"]
        );
        assert_eq!(r.current.as_deref(), Some("20240102-add-index.js"));

        let r = find(&reports, Tool::Goose, "public");
        assert_eq!(versions(r), ["1", "2", "3", "3"]);
        assert_eq!(r.applied[3].state, RowState::Down);
        assert_eq!(r.current.as_deref(), Some("2"));
        assert!(r.flags().is_empty());

        let r = find(&reports, Tool::Diesel, "public");
        assert_eq!(versions(r), ["00000000000000", "20240101120000"]);
        assert_eq!(r.current.as_deref(), Some("20240101120000"));

        let r = find(&reports, Tool::Refinery, "public");
        assert_eq!(versions(r), ["1", "2"]);
        assert_eq!(r.current.as_deref(), Some("2"));
        assert_eq!(r.applied[0].name, "initial");
        assert_eq!(r.applied[0].when(), "2024-01-01 10:00:00 UTC");

        let r = find(&reports, Tool::TypeOrm, "typeorm_app");
        assert_eq!(versions(r), ["1700000000000", "1700000500000"]);
        assert_eq!(r.applied[1].name, "AddPosts1700000500000");
        assert!(
            !reports
                .iter()
                .any(|r| r.tool == Tool::TypeOrm && r.schema == "public"),
            "Laravel's migrations table is not TypeORM's"
        );
        let r = find(&reports, Tool::Unknown, "public");
        assert_eq!(r.tool.label(), "unrecognised, looks like migrations");
        assert_eq!(versions(r), ["2014_10_12_000000_create_users_table"]);

        let r = find(&reports, Tool::NodePgMigrate, "public");
        assert_eq!(
            versions(r),
            ["1700000000000_init", "1700000100000_add-posts"]
        );
        assert_eq!(r.current.as_deref(), Some("1700000100000_add-posts"));

        let r = find(&reports, Tool::Atlas, "atlas_schema_revisions");
        assert_eq!(
            versions(r),
            ["20240101000000", "20240102000000"],
            "the identifier row is Atlas' own"
        );
        assert_eq!(r.current.as_deref(), Some("20240101000000"));
        assert_eq!(r.applied[1].state, RowState::Failed);
        assert_eq!(r.applied[1].note, "1 of 2 statements applied");
        assert!(
            r.applied[1]
                .logs
                .as_deref()
                .unwrap()
                .contains("ALTER TABLE nope")
        );
        assert_eq!(r.applied[0].duration(), "5 ms");
        assert_eq!(r.flags(), ["failed"]);

        let r = find(&reports, Tool::Sqitch, "sqitch");
        assert_eq!(versions(r), ["users", "widgets"]);
        assert_eq!(r.current.as_deref(), Some("users"));
        assert_eq!(r.applied[1].state, RowState::Failed);
        assert!(r.problems[0].contains("widgets"), "{:?}", r.problems);
        assert_eq!(r.flags(), ["failed"]);

        let r = find(&reports, Tool::GraphileMigrate, "graphile_migrate");
        assert_eq!(versions(r), ["000001.sql", "000002.sql"]);
        assert_eq!(r.applied[1].checksum.as_deref(), Some("sha1:bb"));
        assert!(r.flags().is_empty());

        // The same, as a viewer sees it.
        let app = app_for(db, "").await;
        let mut viewer = app.logged_in(Role::Viewer).await;
        let page = viewer.get("/targets/app/migrations").await;
        assert_eq!(page.status, StatusCode::OK);
        let doc = scraper::Html::parse_document(&page.text);
        let sel = scraper::Selector::parse("article.mig-tool").unwrap();
        assert_eq!(doc.select(&sel).count(), 22);
        for label in [
            "sqlx",
            "Prisma",
            "Drizzle",
            "Flyway",
            "Liquibase",
            "golang-migrate",
            "Rails",
            "dbmate",
            "Django",
            "Alembic",
            "Knex",
            "Sequelize",
            "goose",
            "Diesel",
            "refinery",
            "TypeORM",
            "node-pg-migrate",
            "Atlas",
            "Sqitch",
            "Graphile Migrate",
            "unrecognised, looks like migrations",
        ] {
            assert!(
                page.text
                    .contains(&format!("<strong class=\"mig-name\">{label}</strong>")),
                "{label} is not on the page"
            );
        }
        let logs: String = doc
            .select(&scraper::Selector::parse("details.mig-logs pre").unwrap())
            .flat_map(|e| e.text())
            .collect();
        assert!(logs.contains("relation \"Order\" already exists"), "{logs}");
        assert!(page.text.contains("locked"));
        assert!(page.text.contains("dirty"));
        assert!(
            !page.text.contains("Back up now"),
            "viewers cannot start backups"
        );
        assert!(page.text.contains("href=\"/targets/app/backups\""));

        let mut operator = app.logged_in(Role::Operator).await;
        let page = operator.get("/targets/app/migrations").await;
        assert!(page.text.contains("Back up now"));

        // The overview: tools, versions, and the red mark.
        let overview = viewer.get("/").await;
        // Three tools by name, those with problems first, then a count.
        assert!(
            overview.text.contains("golang-migrate 20240105120000"),
            "{}",
            overview.text
        );
        assert!(overview.text.contains("and 19 more"));
        assert!(
            overview.text.contains("Knex: locked"),
            "flags name the tool"
        );
        assert!(overview.text.contains("mig-mark"));
        assert!(overview.text.contains("dirty"));
    })
    .await;
}

fn sqlx_dir() -> MigrationsDir {
    MigrationsDir {
        database: None,
        tool: "sqlx".into(),
        directory: fixtures("sqlx"),
    }
}

#[tokio::test]
async fn pending_and_drift_are_computed_for_sqlx_and_prisma_directories() {
    with_databases(1, |dbs| async move {
        let db = &dbs[0];
        let mut conn = connect(db).await;
        let sha384 = |p: &str| Sha384::digest(fixture_text(p).as_bytes()).to_vec();
        let sha256 = |p: &str| hex::encode(Sha256::digest(fixture_text(p).as_bytes()));
        sqlx::raw_sql(
            "CREATE TABLE _sqlx_migrations (version bigint PRIMARY KEY, description text NOT NULL,
               installed_on timestamptz NOT NULL DEFAULT now(), success boolean NOT NULL,
               checksum bytea NOT NULL, execution_time bigint NOT NULL);
             CREATE TABLE _prisma_migrations (id varchar(36) PRIMARY KEY, checksum varchar(64) NOT NULL,
               finished_at timestamptz, migration_name varchar(255) NOT NULL, logs text,
               rolled_back_at timestamptz, started_at timestamptz NOT NULL DEFAULT now(),
               applied_steps_count integer NOT NULL DEFAULT 0);",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        // sqlx: 1 applied as on disk; 2 applied from an older file; 99 applied but
        // gone from disk; 3 not applied.
        for (version, desc, sum) in [
            (1i64, "create users", sha384("sqlx/1_create_users.sql")),
            (2, "add email", Sha384::digest(b"ALTER TABLE users ADD COLUMN mail text;\n").to_vec()),
            (99, "hotfix", vec![1, 2, 3]),
        ] {
            sqlx::query("INSERT INTO _sqlx_migrations VALUES ($1, $2, now(), true, $3, 1000)")
                .bind(version)
                .bind(desc)
                .bind(sum)
                .execute(&mut conn)
                .await
                .unwrap();
        }
        // Prisma: init as on disk (its CRLF variant is accepted too); add_orders
        // applied from an edited file; add_index rolled back (so pending);
        // an old migration no longer on disk.
        let init_crlf = hex::encode(Sha256::digest(
            fixture_text("prisma/20240101000000_init/migration.sql")
                .replace('\n', "\r\n")
                .as_bytes(),
        ));
        for (id, name, sum, finished, rolled_back) in [
            ("1", "20231201000000_old", "0".repeat(64), true, false),
            ("2", "20240101000000_init", init_crlf, true, false),
            ("3", "20240201000000_add_orders", "e".repeat(64), true, false),
            ("4", "20240301000000_add_index", sha256("prisma/20240301000000_add_index/migration.sql"), false, true),
        ] {
            sqlx::query(
                "INSERT INTO _prisma_migrations (id, checksum, finished_at, migration_name, rolled_back_at, started_at, applied_steps_count)
                 VALUES ($1, $2, CASE WHEN $3 THEN now() END, $4, CASE WHEN $5 THEN now() END, now(), 1)",
            )
            .bind(id)
            .bind(sum)
            .bind(finished)
            .bind(name)
            .bind(rolled_back)
            .execute(&mut conn)
            .await
            .unwrap();
        }
        let dirs = [
            sqlx_dir(),
            MigrationsDir {
                database: None,
                tool: "prisma".into(),
                directory: fixtures("prisma"),
            },
        ];
        let reports = migration_status::inspect_database(&mut conn, &dirs).await.unwrap();

        let r = find(&reports, Tool::Sqlx, "public");
        let d = &r.drift[0];
        assert_eq!(d.on_disk, 3, "1, 2 (up only) and 3; README.md and the down file are not migrations");
        assert_eq!(d.pending.iter().map(|m| m.key.as_str()).collect::<Vec<_>>(), ["3"]);
        assert_eq!(d.pending[0].name, "add index");
        assert_eq!(d.missing, ["99"]);
        assert_eq!(d.mismatched.len(), 1);
        assert_eq!(d.mismatched[0].key, "2");
        assert_eq!(d.mismatched[0].file, "2_add_email.up.sql");
        assert_eq!(r.flags(), ["1 pending", "drifted"]);

        let r = find(&reports, Tool::Prisma, "public");
        let d = &r.drift[0];
        assert_eq!(d.on_disk, 3);
        assert_eq!(
            d.pending.iter().map(|m| m.key.as_str()).collect::<Vec<_>>(),
            ["20240301000000_add_index"]
        );
        assert_eq!(d.missing, ["20231201000000_old"]);
        assert_eq!(
            d.mismatched.iter().map(|m| m.key.as_str()).collect::<Vec<_>>(),
            ["20240201000000_add_orders"]
        );

        // Once in step, nothing is flagged.
        sqlx::query("UPDATE _sqlx_migrations SET checksum = $1 WHERE version = 2")
            .bind(sha384("sqlx/2_add_email.up.sql"))
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 99")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query("INSERT INTO _sqlx_migrations VALUES (3, 'add index', now(), true, $1, 1000)")
            .bind(sha384("sqlx/3_add_index.sql"))
            .execute(&mut conn)
            .await
            .unwrap();
        let reports = migration_status::inspect_database(&mut conn, &[sqlx_dir()]).await.unwrap();
        let r = find(&reports, Tool::Sqlx, "public");
        assert!(r.drift[0].is_clean(), "{:?}", r.drift[0]);
        assert!(r.flags().is_empty());

        // Through the config and the page.
        let app = app_for(
            db,
            &format!(
                "[[postgres.migrations]]\ntool = \"prisma\"\ndirectory = \"{}\"\n[[postgres.migrations]]\ntool = \"sqlx\"\ndirectory = \"{}\"",
                fixtures("prisma").display(),
                fixtures("sqlx").display()
            ),
        )
        .await;
        let mut viewer = app.logged_in(Role::Viewer).await;
        let page = viewer.get("/targets/app/migrations").await;
        assert_eq!(page.status, StatusCode::OK);
        assert!(page.text.contains("1 pending (there, not applied)"));
        assert!(page.text.contains("20240301000000_add_index"));
        assert!(page.text.contains("1 applied but missing there"));
        assert!(page.text.contains("1 changed since applied"));
        assert!(page.text.contains("In step"), "the sqlx directory is in step now");
        let overview = viewer.get("/").await;
        assert!(overview.text.contains("1 pending"), "{}", overview.text);
        assert!(overview.text.contains("drifted"));
    })
    .await;
}

#[tokio::test]
async fn flyway_and_drizzle_directories_are_compared_with_the_tools_checksums() {
    with_databases(1, |dbs| async move {
        let mut conn = connect(&dbs[0]).await;
        let crc = |p: &str| disk::flyway_checksum(&fixture_text(p));
        sqlx::raw_sql(
            "CREATE TABLE flyway_schema_history (installed_rank int PRIMARY KEY, version varchar(50),
               description varchar(200) NOT NULL, type varchar(20) NOT NULL, script varchar(1000) NOT NULL,
               checksum int, installed_by varchar(100) NOT NULL, installed_on timestamp NOT NULL DEFAULT now(),
               execution_time int NOT NULL, success boolean NOT NULL);
             CREATE SCHEMA drizzle;
             CREATE TABLE drizzle.__drizzle_migrations (id serial PRIMARY KEY, hash text NOT NULL, created_at bigint);",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        for (rank, version, desc, kind, script, sum) in [
            (0, Some("0"), "<< Flyway Schema Creation >>", "SCHEMA", "\"public\"", None),
            (1, Some("1"), "init", "SQL", "V1__init.sql", Some(crc("flyway/V1__init.sql"))),
            (2, Some("1.1"), "add brand", "SQL", "V1_1__add_brand.sql", Some(crc("flyway/sub/V1_1__add_brand.sql") ^ 1)),
            (3, None, "car views", "SQL", "R__car_views.sql", Some(crc("flyway/R__car_views.sql"))),
        ] {
            sqlx::query(
                "INSERT INTO flyway_schema_history VALUES ($1, $2, $3, $4, $5, $6, 'app', now(), 5, true)",
            )
            .bind(rank)
            .bind(version)
            .bind(desc)
            .bind(kind)
            .bind(script)
            .bind(sum)
            .execute(&mut conn)
            .await
            .unwrap();
        }
        let drizzle_hash = hex::encode(Sha256::digest(fixture_text("drizzle/0000_init_posts.sql").as_bytes()));
        sqlx::query("INSERT INTO drizzle.__drizzle_migrations (hash, created_at) VALUES ($1, 1700000000000)")
            .bind(drizzle_hash)
            .execute(&mut conn)
            .await
            .unwrap();
        let dir = |tool: &str| MigrationsDir {
            database: None,
            tool: tool.into(),
            directory: fixtures(tool),
        };
        let reports = migration_status::inspect_database(&mut conn, &[dir("flyway"), dir("drizzle")])
            .await
            .unwrap();

        let r = find(&reports, Tool::Flyway, "public");
        assert_eq!(r.current.as_deref(), Some("1.1"), "the SCHEMA row is bookkeeping");
        let d = &r.drift[0];
        assert_eq!(d.on_disk, 3);
        assert!(d.pending.is_empty(), "{d:?}");
        assert!(d.missing.is_empty(), "{d:?}");
        assert_eq!(d.mismatched.iter().map(|m| m.key.as_str()).collect::<Vec<_>>(), ["1.1"]);

        let r = find(&reports, Tool::Drizzle, "drizzle");
        let d = &r.drift[0];
        assert!(d.mismatched.is_empty(), "{d:?}");
        assert_eq!(d.pending.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["0001_add_title"]);
        assert_eq!(r.applied[0].name, "0000_init_posts", "names come from the journal");
        assert_eq!(r.current.as_deref(), Some("0000_init_posts"));
    })
    .await;
}

#[tokio::test]
async fn goose_and_golang_migrate_directories_show_what_is_pending() {
    with_databases(1, |dbs| async move {
        let mut conn = connect(&dbs[0]).await;
        sqlx::raw_sql(
            "CREATE TABLE goose_db_version (id serial PRIMARY KEY, version_id bigint NOT NULL,
               is_applied boolean NOT NULL, tstamp timestamp DEFAULT now());
             INSERT INTO goose_db_version (version_id, is_applied) VALUES (0, true), (1, true), (2, true), (3, true), (3, false);
             CREATE SCHEMA gomig;
             CREATE TABLE gomig.schema_migrations (version bigint PRIMARY KEY, dirty boolean NOT NULL);
             INSERT INTO gomig.schema_migrations VALUES (2, true);",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        let dir = |tool: &str| MigrationsDir {
            database: None,
            tool: tool.into(),
            directory: fixtures(tool),
        };
        let reports =
            migration_status::inspect_database(&mut conn, &[dir("goose"), dir("golang-migrate")])
                .await
                .unwrap();
        let r = find(&reports, Tool::Goose, "public");
        let d = &r.drift[0];
        assert_eq!(d.on_disk, 4, "three .sql and one .go; _test.go is not a migration");
        assert_eq!(
            d.pending.iter().map(|m| m.key.as_str()).collect::<Vec<_>>(),
            ["3", "4"],
            "3 was migrated down"
        );
        assert!(d.missing.is_empty());
        assert_eq!(r.flags(), ["2 pending"]);

        // golang-migrate keeps one version: everything numbered up to it is applied.
        let r = find(&reports, Tool::GolangMigrate, "gomig");
        let d = &r.drift[0];
        assert_eq!(d.on_disk, 3);
        assert_eq!(
            d.pending.iter().map(|m| m.key.as_str()).collect::<Vec<_>>(),
            ["3"]
        );
        assert!(d.missing.is_empty(), "{d:?}");
        assert_eq!(r.flags(), ["dirty", "1 pending"]);
    })
    .await;
}

#[tokio::test]
async fn a_database_without_any_tool_says_so_and_a_missing_one_gets_a_sentence() {
    with_databases(2, |dbs| async move {
        let missing = new_db_name();
        let app = app_for(
            &dbs[0],
            &format!(
                "databases = [\"{}\", \"{missing}\"]\n[[postgres.migrations]]\ndatabase = \"{}\"\ntool = \"sqlx\"\ndirectory = \"{}\"",
                dbs[1],
                dbs[1],
                fixtures("sqlx").display()
            ),
        )
        .await;
        let mut viewer = app.logged_in(Role::Viewer).await;
        let page = viewer.get("/targets/app/migrations").await;
        assert_eq!(page.status, StatusCode::OK);
        let doc = scraper::Html::parse_document(&page.text);
        let section = |db: &str| {
            let sel = scraper::Selector::parse(&format!("section.mig-db[data-database=\"{db}\"]")).unwrap();
            doc.select(&sel)
                .next()
                .unwrap_or_else(|| panic!("no section for {db}"))
                .text()
                .collect::<String>()
        };
        assert!(section(&dbs[0]).contains("No supported migration tool found"));
        // A configured directory in a database where the tool never ran: all pending.
        let second = section(&dbs[1]);
        assert!(second.contains("No sqlx bookkeeping table was found"), "{second}");
        assert!(second.contains("3 pending"), "{second}");
        let third = section(&missing);
        assert!(third.contains("could not be inspected"), "{third}");
        assert!(third.contains("does not exist"), "{third}");
    })
    .await;
}

#[tokio::test]
async fn migration_names_are_escaped_and_redis_targets_get_a_sentence() {
    with_databases(1, |dbs| async move {
        let mut conn = connect(&dbs[0]).await;
        sqlx::raw_sql(
            r#"CREATE TABLE _sqlx_migrations (version bigint PRIMARY KEY, description text NOT NULL,
                 installed_on timestamptz NOT NULL DEFAULT now(), success boolean NOT NULL,
                 checksum bytea NOT NULL, execution_time bigint NOT NULL);
               INSERT INTO _sqlx_migrations VALUES (1, '<script>alert(1)</script>', now(), true, '\x00', 1);
               CREATE TABLE "SequelizeMeta" (name varchar(255) PRIMARY KEY);
               INSERT INTO "SequelizeMeta" VALUES ('<img src=x onerror=alert(2)>.js');"#,
        )
        .execute(&mut conn)
        .await
        .unwrap();
        let app = app_for(&dbs[0], "").await;
        let mut viewer = app.logged_in(Role::Viewer).await;
        let page = viewer.get("/targets/app/migrations").await;
        assert_eq!(page.status, StatusCode::OK);
        assert!(!page.text.contains("<script>alert"));
        assert!(!page.text.contains("<img src=x"));
        // Shown as text, not markup.
        let doc = scraper::Html::parse_document(&page.text);
        let cells: String = doc
            .select(&scraper::Selector::parse("table.mig-applied td").unwrap())
            .flat_map(|td| td.text())
            .collect();
        assert!(cells.contains("<script>alert(1)</script>"), "{cells}");
        assert!(cells.contains("<img src=x onerror=alert(2)>.js"), "{cells}");
        let overview = viewer.get("/").await;
        assert!(!overview.text.contains("<img src=x"));
        let doc = scraper::Html::parse_document(&overview.text);
        let cell: String = doc
            .select(&scraper::Selector::parse("td.migrations").unwrap())
            .flat_map(|td| td.text())
            .collect();
        assert!(cell.contains("Sequelize <img src=x"), "{cell}");

        let page = viewer.get("/targets/cache/migrations").await;
        assert_eq!(page.status, StatusCode::BAD_REQUEST);
        assert!(page.text.contains("migration status is for PostgreSQL targets"));
        let page = viewer.get("/targets/nope/migrations").await;
        assert_eq!(page.status, StatusCode::NOT_FOUND);
    })
    .await;
}

#[tokio::test]
async fn dbops_own_migrations_are_shown_in_step_with_the_binary() {
    let app = app_for("postgres", "").await;
    let mut viewer = app.logged_in(Role::Viewer).await;
    let page = viewer.get("/migrations/console").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text.contains("embedded in this dbops binary"));
    assert!(page.text.contains("In step"), "{}", page.text);
    assert!(page.text.contains("20261121000001"));
    assert!(
        page.text.contains("underway"),
        "the job queue's table is shown too"
    );
    // An applied migration the binary does not know (a newer dbops ran here).
    sqlx::query(
        "INSERT INTO _sqlx_migrations VALUES (29991231000000, 'from the future', now(), true, '\\x00', 1)",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let page = viewer.get("/migrations/console").await;
    assert!(page.text.contains("1 applied but missing there"));
    assert!(page.text.contains("29991231000000"));
    let overview = viewer.get("/").await;
    assert!(overview.text.contains("href=\"/migrations/console\""));
}

#[tokio::test]
async fn in_a_real_browser_a_viewer_goes_from_the_overview_to_the_migrations_page() {
    use fantoccini::Locator;

    use crate::browser::{open_browser, screenshot, start_driver};
    with_databases(1, |dbs| async move {
        let mut conn = connect(&dbs[0]).await;
        sqlx::raw_sql(EVERY_TOOL).execute(&mut conn).await.unwrap();
        let app = app_for(
            &dbs[0],
            &format!(
                "[[postgres.migrations]]\ntool = \"sqlx\"\ndirectory = \"{}\"",
                fixtures("sqlx").display()
            ),
        )
        .await;
        let pw = app.create_user("vera", Role::Viewer).await;
        let driver = start_driver().await;
        let c = open_browser(&driver, 1366, 1600).await;
        c.goto(&app.url("/login")).await.unwrap();
        for (css, text) in [
            ("input[name=username]", "vera"),
            ("input[name=password]", pw.as_str()),
        ] {
            c.find(Locator::Css(css))
                .await
                .unwrap()
                .send_keys(text)
                .await
                .unwrap();
        }
        c.find(Locator::Css("button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        c.wait()
            .for_element(Locator::Css("td.migrations a"))
            .await
            .unwrap();
        let cell = c
            .find(Locator::Css("td.migrations"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            cell.contains("golang-migrate 20240105120000") && cell.contains("failed"),
            "{cell}"
        );
        screenshot(&c, "migrations-01-overview").await;
        c.find(Locator::Css("td.migrations a"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        c.wait()
            .for_element(Locator::Css("article.mig-tool"))
            .await
            .unwrap();
        let h1 = c
            .find(Locator::Css("main h1"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(h1.starts_with("Migrations of app"), "{h1}");
        let red = c.find_all(Locator::Css("article.mig-red")).await.unwrap();
        assert_eq!(
            red.len(),
            8,
            "sqlx, Prisma, Flyway, Liquibase, golang-migrate, Knex, Atlas, Sqitch"
        );
        screenshot(&c, "migrations-02-target").await;
        c.find(Locator::LinkText("dbops' own schema migrations →"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        c.wait()
            .for_element(Locator::Css("p.mig-ok"))
            .await
            .unwrap();
        screenshot(&c, "migrations-03-console").await;
        let _ = c.close().await;
    })
    .await;
}

#[tokio::test]
async fn a_target_that_does_not_answer_gets_a_sentence_not_an_error_page() {
    let app = spawn_app_with(
        r#"
        [targets]
        connect_timeout_seconds = 1
        [[postgres]]
        name = "down"
        url_env = "DOWN"
        policy = "dev"
        "#,
        &[("DOWN", "postgres://postgres@127.0.0.1:1/app".to_string())],
    )
    .await;
    let mut viewer = app.logged_in(Role::Viewer).await;
    let page = viewer.get("/targets/down/migrations").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.text.contains("could not be inspected"),
        "{}",
        page.text
    );
    assert!(page.text.contains("connection refused"), "{}", page.text);
    let overview = viewer.get("/").await;
    assert_eq!(overview.status, StatusCode::OK);
}

/// A directory of files written by a test, removed at the end.
struct Written(PathBuf);

impl Written {
    fn new(files: &[(&str, &str)]) -> Written {
        let dir = std::env::temp_dir().join(format!("dbops-it-dirs-{}", uuid::Uuid::new_v4()));
        for (path, text) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        Written(dir)
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// refinery's checksum, written out as refinery computes it (SipHash-1-3, zero keys,
/// over name, version as i32, SQL through `Hash`).
fn refinery_sum(name: &str, version: i32, sql: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = siphasher::sip::SipHasher13::new();
    name.hash(&mut h);
    version.hash(&mut h);
    sql.hash(&mut h);
    h.finish().to_string()
}

const GRAPHILE_1: &str = "--! Previous: -\n--! Hash: sha1:aa\n\nCREATE TABLE a (id int);\n";
const GRAPHILE_2: &str = "--! Previous: sha1:aa\n--! Hash: sha1:bb\n--! Message: add posts\n\nCREATE TABLE posts (id int);\n";
const GRAPHILE_3: &str =
    "--! Previous: sha1:bb\n--! Hash: sha1:cc\n\nCREATE TABLE tags (id int);\n";

#[tokio::test]
async fn rails_diesel_refinery_liquibase_sqitch_atlas_and_graphile_directories_show_pending_and_drift()
 {
    let sqitch_users =
        "-- Deploy flipr:users to pg\nBEGIN;\nCREATE TABLE users (id int);\nCOMMIT;\n";
    let refinery_1 = "CREATE TABLE cars (id int);\n";
    let dirs = Written::new(&[
        (
            "rails/20240101000000_create_users.rb",
            "class CreateUsers < ActiveRecord::Migration[7.1]; end\n",
        ),
        (
            "rails/20240215000000_add_email.rb",
            "class AddEmail < ActiveRecord::Migration[7.1]; end\n",
        ),
        (
            "rails/20240301000000_add_orders.rb",
            "class AddOrders < ActiveRecord::Migration[7.1]; end\n",
        ),
        (
            "diesel/00000000000000_diesel_initial_setup/up.sql",
            "SELECT 1;\n",
        ),
        (
            "diesel/2024-01-01-120000_create_users/up.sql",
            "CREATE TABLE users (id int);\n",
        ),
        (
            "diesel/2024-02-01-000000_add_posts/up.sql",
            "CREATE TABLE posts (id int);\n",
        ),
        (
            "diesel/2024-02-01-000000_add_posts/down.sql",
            "DROP TABLE posts;\n",
        ),
        ("diesel/notes/README.md", "not a migration\n"),
        ("refinery/V1__initial.sql", refinery_1),
        (
            "refinery/V2__add_cars.sql",
            "ALTER TABLE cars ADD brand text;\n",
        ),
        (
            "refinery/V3__add_owners.sql",
            "CREATE TABLE owners (id int);\n",
        ),
        (
            "liquibase/changelog.xml",
            "<?xml version=\"1.0\"?>\n<databaseChangeLog>\n  <include file=\"more.yaml\"/>\n  <changeSet id=\"create-cars\" author=\"bob\"><createTable tableName=\"cars\"/></changeSet>\n  <changeSet author=\"bob\" id=\"add-brand\"><addColumn tableName=\"cars\"/></changeSet>\n</databaseChangeLog>\n",
        ),
        (
            "liquibase/more.yaml",
            "databaseChangeLog:\n  - changeSet:\n      id: bad-index\n      author: alice\n      changes:\n        - createIndex:\n            tableName: cars\n",
        ),
        (
            "liquibase/sql/owners.sql",
            "-- liquibase formatted sql\n\n-- changeset carl:add-owners\nCREATE TABLE owners (id int);\n",
        ),
        (
            "liquibase/sql/raw.sql",
            "CREATE TABLE not_a_changelog (id int);\n",
        ),
        (
            "sqitch/sqitch.plan",
            "%syntax-version=1.0.0\n%project=flipr\n\nusers 2024-01-01T09:00:00Z Marge <marge@example.com> # Creates users\n@v1.0 2024-01-01T09:30:00Z Marge <marge@example.com> # Tag v1.0\nwidgets [users] 2024-01-02T09:00:00Z Marge <marge@example.com> # Widgets\nflips [users widgets] 2024-01-03T09:00:00Z Marge <marge@example.com>\n",
        ),
        ("sqitch/deploy/users.sql", sqitch_users),
        (
            "sqitch/deploy/widgets.sql",
            "CREATE TABLE widgets (id int);\n",
        ),
        ("sqitch/deploy/flips.sql", "CREATE TABLE flips (id int);\n"),
        (
            "atlas/20240101000000_init.sql",
            "CREATE TABLE a (id int);\n",
        ),
        (
            "atlas/20240102000000_add_posts.sql",
            "CREATE TABLE posts (id int);\n",
        ),
        (
            "atlas/20240103000000_add_tags.sql",
            "CREATE TABLE tags (id int);\n",
        ),
        (
            "atlas/atlas.sum",
            "h1:dG90YWw=\n20240101000000_init.sql h1:aGFzaDE=\n20240102000000_add_posts.sql h1:Y2hhbmdlZA==\n20240103000000_add_tags.sql h1:aGFzaDM=\n",
        ),
        ("graphile/committed/000001.sql", GRAPHILE_1),
        ("graphile/committed/000002-add-posts.sql", GRAPHILE_2),
        ("graphile/committed/000003.sql", GRAPHILE_3),
        ("graphile/current.sql", "-- work in progress\n"),
    ]);
    with_databases(1, |dbs| async move {
        let mut conn = connect(&dbs[0]).await;
        let users_hash = hex::encode(sha1::Sha1::digest(sqitch_users.as_bytes()));
        sqlx::raw_sql(&format!(
            "CREATE SCHEMA rails_app;
             CREATE TABLE rails_app.schema_migrations (version varchar PRIMARY KEY);
             INSERT INTO rails_app.schema_migrations VALUES ('20240215000000'), ('20240101000000');
             CREATE TABLE rails_app.ar_internal_metadata (key varchar PRIMARY KEY, value varchar, created_at timestamp NOT NULL, updated_at timestamp NOT NULL);
             INSERT INTO rails_app.ar_internal_metadata VALUES ('environment', 'production', now(), now());
             CREATE TABLE __diesel_schema_migrations (version varchar(50) PRIMARY KEY, run_on timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP);
             INSERT INTO __diesel_schema_migrations VALUES ('20240101120000', '2024-01-01 12:00:00'), ('00000000000000', '2024-01-01 11:00:00');
             CREATE TABLE refinery_schema_history (version int4 PRIMARY KEY, name varchar(255), applied_on varchar(255), checksum varchar(255));
             INSERT INTO refinery_schema_history VALUES
               (1, 'initial', '2024-01-01T10:00:00+00:00', '{r1}'),
               (2, 'add_cars', '2024-01-02T10:00:00+00:00', '12345');
             CREATE TABLE databasechangelog (id varchar(255) NOT NULL, author varchar(255) NOT NULL,
               filename varchar(255) NOT NULL, dateexecuted timestamp NOT NULL, orderexecuted int NOT NULL,
               exectype varchar(10) NOT NULL, md5sum varchar(35), description varchar(255), comments varchar(255),
               tag varchar(255), liquibase varchar(20), contexts varchar(255), labels varchar(255), deployment_id varchar(10));
             INSERT INTO databasechangelog VALUES
               ('create-cars', 'bob', 'changelog.xml', '2024-01-01 10:00:00', 1, 'EXECUTED', '9:aaaa', 'createTable', '', NULL, '4.25.0', NULL, NULL, '1'),
               ('add-brand', 'bob', 'changelog.xml', '2024-01-02 10:00:00', 2, 'EXECUTED', '9:bbbb', 'addColumn', '', NULL, '4.25.0', NULL, NULL, '2'),
               ('bad-index', 'alice', 'more.yaml', '2024-01-03 10:00:00', 3, 'EXECUTED', '9:cccc', 'createIndex', '', NULL, '4.25.0', NULL, NULL, '3');
             CREATE SCHEMA sqitch;
             CREATE TABLE sqitch.changes (change_id text PRIMARY KEY, script_hash text, change text NOT NULL,
               project text NOT NULL, note text NOT NULL DEFAULT '', committed_at timestamptz NOT NULL,
               committer_name text NOT NULL, committer_email text NOT NULL, planned_at timestamptz NOT NULL,
               planner_name text NOT NULL, planner_email text NOT NULL);
             INSERT INTO sqitch.changes VALUES
               ('c1', '{users_hash}', 'users', 'flipr', 'Creates users', '2024-01-01 10:00:00+00', 'Marge', 'm@example.com', '2024-01-01 09:00:00+00', 'Marge', 'm@example.com'),
               ('c2', '0000000000000000000000000000000000000000', 'widgets', 'flipr', 'Widgets', '2024-01-02 10:00:00+00', 'Marge', 'm@example.com', '2024-01-02 09:00:00+00', 'Marge', 'm@example.com');
             CREATE TABLE sqitch.events (event text NOT NULL, change_id text NOT NULL, change text NOT NULL,
               project text NOT NULL, note text NOT NULL DEFAULT '', requires text[] NOT NULL DEFAULT '{{}}',
               conflicts text[] NOT NULL DEFAULT '{{}}', tags text[] NOT NULL DEFAULT '{{}}', committed_at timestamptz NOT NULL,
               committer_name text NOT NULL DEFAULT 'Marge', committer_email text NOT NULL DEFAULT 'm@example.com',
               planned_at timestamptz NOT NULL DEFAULT now(), planner_name text NOT NULL DEFAULT 'Marge',
               planner_email text NOT NULL DEFAULT 'm@example.com');
             CREATE SCHEMA atlas_schema_revisions;
             CREATE TABLE atlas_schema_revisions.atlas_schema_revisions (version varchar PRIMARY KEY,
               description varchar NOT NULL, type bigint NOT NULL DEFAULT 2, applied bigint NOT NULL DEFAULT 0,
               total bigint NOT NULL DEFAULT 0, executed_at timestamptz NOT NULL, execution_time bigint NOT NULL,
               error text, error_stmt text, hash varchar NOT NULL, partial_hashes jsonb, operator_version varchar NOT NULL);
             INSERT INTO atlas_schema_revisions.atlas_schema_revisions VALUES
               ('.atlas_cloud_identifier', 'x', 0, 0, 0, '2024-01-01 09:00:00+00', 0, NULL, NULL, '', NULL, 'Atlas CLI v0.30.0'),
               ('20240101000000', 'init', 2, 1, 1, '2024-01-01 10:00:00+00', 5000000, NULL, NULL, 'aGFzaDE=', NULL, 'Atlas CLI v0.30.0'),
               ('20240102000000', 'add_posts', 2, 1, 1, '2024-01-02 10:00:00+00', 2000000, NULL, NULL, 'aGFzaDI=', NULL, 'Atlas CLI v0.30.0');
             CREATE SCHEMA graphile_migrate;
             CREATE TABLE graphile_migrate.migrations (hash text PRIMARY KEY, previous_hash text, filename text NOT NULL,
               date timestamptz NOT NULL DEFAULT now());
             INSERT INTO graphile_migrate.migrations VALUES
               ('sha1:aa', NULL, '000001.sql', '2024-01-01 10:00:00+00'),
               ('sha1:bb', 'sha1:aa', '000002.sql', '2024-01-02 10:00:00+00');",
            r1 = refinery_sum("initial", 1, refinery_1),
        ))
        .execute(&mut conn)
        .await
        .unwrap();
        let root = &dirs.0;
        let dir = |tool: &str, sub: &str| MigrationsDir {
            database: None,
            tool: tool.into(),
            directory: root.join(sub),
        };
        let configured = [
            dir("rails", "rails"),
            dir("diesel", "diesel"),
            dir("refinery", "refinery"),
            dir("liquibase", "liquibase"),
            dir("sqitch", "sqitch"),
            dir("atlas", "atlas"),
            dir("graphile-migrate", "graphile"),
        ];
        let reports = migration_status::inspect_database(&mut conn, &configured)
            .await
            .unwrap();
        let drift = |tool: Tool, schema: &str| {
            let r = find(&reports, tool, schema);
            assert_eq!(r.drift.len(), 1, "{r:?}");
            let d = r.drift[0].clone();
            assert!(d.error.is_none(), "{d:?}");
            (
                d.pending.iter().map(|m| m.key.clone()).collect::<Vec<_>>(),
                d.mismatched.iter().map(|m| m.key.clone()).collect::<Vec<_>>(),
                d.missing.clone(),
                r.flags(),
            )
        };
        let none: Vec<String> = vec![];
        assert_eq!(
            drift(Tool::Rails, "rails_app"),
            (vec!["20240301000000".to_string()], none.clone(), none.clone(), vec!["1 pending".to_string()])
        );
        assert_eq!(
            drift(Tool::Diesel, "public"),
            (vec!["20240201000000".to_string()], none.clone(), none.clone(), vec!["1 pending".to_string()])
        );
        // refinery: version 1's checksum is what refinery wrote; 2's differs.
        assert_eq!(
            drift(Tool::Refinery, "public"),
            (
                vec!["3".to_string()],
                vec!["2".to_string()],
                none.clone(),
                vec!["1 pending".to_string(), "drifted".to_string()]
            )
        );
        // Liquibase: change sets from XML, YAML and formatted SQL; a plain SQL file is no changelog.
        let (pending, ..) = drift(Tool::Liquibase, "public");
        assert_eq!(pending, ["add-owners"]);
        let lq = find(&reports, Tool::Liquibase, "public");
        assert_eq!(lq.drift[0].on_disk, 4);
        // Sqitch: the plan's order; script_hash is the deploy script's SHA-1.
        assert_eq!(
            drift(Tool::Sqitch, "sqitch"),
            (
                vec!["flips".to_string()],
                vec!["widgets".to_string()],
                none.clone(),
                vec!["1 pending".to_string(), "drifted".to_string()]
            )
        );
        // Atlas: hashes from atlas.sum.
        assert_eq!(
            drift(Tool::Atlas, "atlas_schema_revisions"),
            (
                vec!["20240103000000".to_string()],
                vec!["20240102000000".to_string()],
                none.clone(),
                vec!["1 pending".to_string(), "drifted".to_string()]
            )
        );
        assert_eq!(
            drift(Tool::GraphileMigrate, "graphile_migrate"),
            (vec!["000003.sql".to_string()], none.clone(), none.clone(), vec!["1 pending".to_string()])
        );

        // Each directory also makes a manifest a pipeline can post (the same readers).
        for md in &configured {
            let m = migration_status::deploys::Manifest::from_dir(&md.tool, &md.directory).unwrap();
            assert!(m.check().is_ok());
            assert!(!m.migrations.is_empty(), "{}", md.tool);
        }
    })
    .await;
}

#[test]
fn the_manifest_command_prints_json_and_refuses_what_it_cannot_read() {
    let bin = env!("CARGO_BIN_EXE_dbops");
    let out = std::process::Command::new(bin)
        .args(["migrations", "manifest"])
        .arg(fixtures("sqlx"))
        .args(["--tool", "sqlx"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let on_disk = disk::read_dir("sqlx", &fixtures("sqlx")).unwrap();
    assert_eq!(m["tool"], "sqlx");
    assert_eq!(m["migrations"].as_array().unwrap().len(), on_disk.len());
    assert_eq!(m["migrations"][0]["checksum"], on_disk[0].checksum.as_str());

    let out = std::process::Command::new(bin)
        .args(["migrations", "manifest"])
        .arg(fixtures("sqlx"))
        .args(["--tool", "cobol"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dbops cannot read cobol migrations directories"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    let out = std::process::Command::new(bin)
        .args([
            "migrations",
            "manifest",
            "/nonexistent/dir",
            "--tool",
            "knex",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/dir does not exist"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
