//! Reports and maintenance against the real PostgreSQL, each test in a throwaway
//! database of its own (dropped at the end, pass or fail): a table bloated by
//! deletes (estimate hidden while statistics are stale, shown after ANALYZE,
//! confirmed by pgstattuple); unused, duplicate and invalid indexes and a
//! sequence near its limit, each in its own list only; relations locked
//! exclusively are skipped and said so; destructive maintenance is refused
//! without approval and runs once approved, with hostile names quoted.

use std::{panic::AssertUnwindSafe, time::Duration};

use dbops::{
    auth::Role,
    reports::{self, NoProgress, Report},
};
use futures::FutureExt;
use reqwest::StatusCode;
use sqlx::{Connection, PgConnection};

use crate::helpers::{Browser, TestApp, services, spawn_app_with};

/// A throwaway database, dropped by [`with_db`].
struct Db {
    name: String,
}

impl Db {
    async fn connect(&self) -> PgConnection {
        let base = &services().await.pg_base;
        PgConnection::connect(&format!("{base}/{}", self.name))
            .await
            .expect("a connection to the test database")
    }

    async fn exec(&self, sql: &str) {
        let mut c = self.connect().await;
        sqlx::raw_sql(sql)
            .execute(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        c.close().await.unwrap();
    }
}

/// Creates a database, runs `body` with it and an app whose target `t` (policy as
/// given) points at it, then drops the database whatever happened.
async fn with_db<F, Fut>(policy: &str, body: F)
where
    F: FnOnce(Db, TestApp) -> Fut,
    Fut: Future<Output = ()>,
{
    let base = services().await.pg_base.clone();
    let name = format!(
        "dbops_it_rep_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let mut admin = PgConnection::connect(&format!("{base}/postgres"))
        .await
        .unwrap();
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let app = spawn_app_with(
        &format!(
            r#"
            [targets]
            connect_timeout_seconds = 3
            [reports]
            lock_timeout_ms = 200
            seq_scan_min_rows = 100
            [[postgres]]
            name = "t"
            url_env = "T"
            policy = "{policy}"
            "#
        ),
        &[("T", format!("{base}/{name}"))],
    )
    .await;
    let outcome = AssertUnwindSafe(body(Db { name: name.clone() }, app))
        .catch_unwind()
        .await;
    let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await;
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }
}

/// Waits for a job to end; returns its status, result and error.
async fn wait_job(app: &TestApp, id: i64) -> (String, Option<serde_json::Value>, Option<String>) {
    for _ in 0..600 {
        let row: (String, Option<serde_json::Value>, Option<String>) =
            sqlx::query_as("SELECT status, result, error FROM jobs WHERE id = $1")
                .bind(id)
                .fetch_one(&app.db)
                .await
                .unwrap();
        if !matches!(row.0.as_str(), "queued" | "running") {
            return row;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job {id} did not end");
}

/// Posts a form that starts a job and waits for it; returns the job's id.
async fn post_job(b: &mut Browser, app: &TestApp, path: &str, form: &[(&str, &str)]) -> i64 {
    let r = b.post(path, form).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{path}: {}", r.text);
    let loc = r.location().unwrap().to_string();
    let id: i64 = loc
        .strip_prefix("/jobs/")
        .unwrap_or_else(|| panic!("{path} went to {loc}"))
        .parse()
        .unwrap();
    let (status, _, error) = wait_job(app, id).await;
    assert_eq!(status, "succeeded", "{path}: {error:?}");
    id
}

/// Refreshes a report through its button and waits for it.
async fn refresh(b: &mut Browser, app: &TestApp, report: &str) {
    post_job(b, app, &format!("/targets/t/reports/{report}/refresh"), &[]).await;
}

/// The text of each cell of each row of a section's table.
fn rows(html: &str, section: &str) -> Vec<Vec<String>> {
    let doc = scraper::Html::parse_document(html);
    let sel = scraper::Selector::parse(&format!("section#{section} table tbody tr")).unwrap();
    let td = scraper::Selector::parse("td").unwrap();
    doc.select(&sel)
        .map(|tr| {
            tr.select(&td)
                .map(|c| c.text().collect::<String>().trim().to_string())
                .collect()
        })
        .collect()
}

/// Whether a section lists a row with a cell equal to `name`.
fn lists(html: &str, section: &str, name: &str) -> bool {
    rows(html, section)
        .iter()
        .any(|r| r.iter().any(|c| c == name))
}

async fn exists(c: &mut PgConnection, rel: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_class WHERE relname = $1)")
        .bind(rel)
        .fetch_one(c)
        .await
        .unwrap()
}

/// Waits until the statistics collector shows what `sql` asks (a boolean).
async fn until(db: &Db, sql: &str) {
    for _ in 0..100 {
        let mut c = db.connect().await;
        let ok: bool = sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap();
        c.close().await.unwrap();
        if ok {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("statistics never showed: {sql}");
}

#[tokio::test]
async fn a_bloated_table_is_estimated_only_on_fresh_statistics_and_pgstattuple_agrees() {
    with_db("dev", |db, app| async move {
        db.exec(
            r#"CREATE EXTENSION pgstattuple;
               CREATE TABLE "Bloat ""Me""; x" (id int, pad text) WITH (autovacuum_enabled = false);
               INSERT INTO "Bloat ""Me""; x" SELECT g, repeat('x', 120) FROM generate_series(1, 40000) g;
               CREATE TABLE tidy (id int, pad text) WITH (autovacuum_enabled = false);
               INSERT INTO tidy SELECT g, repeat('y', 120) FROM generate_series(1, 40000) g;"#,
        )
        .await;
        // The inserts are counted first (else they would count as changes made
        // after the ANALYZE), then the statistics are fresh, then 90% is deleted.
        until(
            &db,
            "SELECT count(*) = 2 FROM pg_stat_user_tables WHERE n_mod_since_analyze >= 40000",
        )
        .await;
        db.exec(r#"ANALYZE "Bloat ""Me""; x"; ANALYZE tidy;"#).await;
        db.exec(r#"DELETE FROM "Bloat ""Me""; x" WHERE id % 10 <> 0;"#)
            .await;
        until(
            &db,
            r#"SELECT n_mod_since_analyze >= 36000 FROM pg_stat_user_tables WHERE relname = 'Bloat "Me"; x'"#,
        )
        .await;
        let mut b = app.logged_in(Role::Operator).await;
        refresh(&mut b, &app, "bloat").await;
        let page = b.get("/targets/t/reports/bloat").await;
        assert_eq!(page.status, StatusCode::OK);
        let table = |html: &str, name: &str| {
            rows(html, "tables")
                .into_iter()
                .find(|r| r.get(1).map(String::as_str) == Some(name))
                .unwrap_or_else(|| panic!("{name} is not in the bloat report"))
        };
        // Columns: schema, name, size, bloat, bloat %, statistics, live, dead, changed…
        let stale = table(&page.text, "Bloat \"Me\"; x");
        assert_eq!(stale[5], "stale", "{stale:?}");
        assert_eq!(stale[3], "", "no estimate on stale statistics: {stale:?}");
        assert!(page.text.contains("run ANALYZE"), "the page says what to do");
        let tidy = table(&page.text, "tidy");
        assert_eq!(tidy[5], "fresh");

        // The operator's ANALYZE button, then a fresh report.
        post_job(
            &mut b,
            &app,
            "/targets/t/maintenance/analyze",
            &[("schema", "public"), ("table", "Bloat \"Me\"; x")],
        )
        .await;
        refresh(&mut b, &app, "bloat").await;
        let page = b.get("/targets/t/reports/bloat").await;
        let fresh = table(&page.text, "Bloat \"Me\"; x");
        assert_eq!(fresh[5], "fresh", "{fresh:?}");
        let pct: f64 = fresh[4].trim_end_matches('%').parse().unwrap();
        assert!(pct > 60.0, "90% of the rows are dead: {fresh:?}");
        let tidy = table(&page.text, "tidy");
        let tidy_pct: f64 = tidy[4].trim_end_matches('%').parse().unwrap();
        assert!(tidy_pct < 30.0, "{tidy:?}");

        // Exact figures with pgstattuple.
        let id = post_job(
            &mut b,
            &app,
            "/targets/t/reports/bloat/exact",
            &[("schema", "public"), ("name", "Bloat \"Me\"; x"), ("what", "table")],
        )
        .await;
        let (_, result, _) = wait_job(&app, id).await;
        let exact = result.unwrap()["bloat_pct"].as_f64().unwrap();
        assert!(exact > 60.0, "pgstattuple: {exact}");
        let shown = b.get(&format!("/targets/t/reports/bloat?exact={id}")).await;
        assert!(shown.text.contains("Exact figures for"), "{}", shown.text);
        assert!(shown.text.contains("dead_tuple_percent"));

        assert_eq!(app.count_ops("pg.table.analyze", Some("succeeded")).await, 1);
        assert_eq!(app.count_ops("pg.report.exact", Some("succeeded")).await, 1);
        assert_eq!(app.count_ops("pg.report.bloat", Some("succeeded")).await, 2);
    })
    .await;
}

#[tokio::test]
async fn unused_duplicate_and_invalid_indexes_and_a_sequence_near_its_limit_each_show_in_their_own_list()
 {
    with_db("production", |db, app| async move {
        db.exec(
            r#"CREATE TABLE t (id serial PRIMARY KEY, a int, b int, c int);
               INSERT INTO t (a, b, c) SELECT g % 100, g, g FROM generate_series(1, 2000) g;
               CREATE INDEX "unused idx" ON t (c);
               CREATE INDEX dup_a ON t (a);
               ANALYZE t;
               CREATE TABLE u (x int);
               INSERT INTO u VALUES (1), (1), (2);
               CREATE TABLE s (id serial, note text);
               SELECT setval('s_id_seq', 2000000000);"#,
        )
        .await;
        // dup_a is used (so it is not "unused"), then covered by a unique index.
        db.exec("SET enable_seqscan = off; SELECT count(*) FROM t WHERE a = 5;")
            .await;
        until(
            &db,
            "SELECT coalesce((SELECT idx_scan > 0 FROM pg_stat_user_indexes WHERE indexrelname = 'dup_a'), false)",
        )
        .await;
        db.exec("CREATE UNIQUE INDEX dup_ab ON t (a, b);").await;
        // A failed concurrent build leaves an invalid index.
        let mut c = db.connect().await;
        let failed = sqlx::raw_sql("CREATE UNIQUE INDEX CONCURRENTLY bad_unique ON u (x)")
            .execute(&mut c)
            .await;
        assert!(failed.is_err(), "the build fails on duplicate values");
        c.close().await.unwrap();

        let mut b = app.logged_in(Role::Operator).await;
        refresh(&mut b, &app, "indexes").await;
        refresh(&mut b, &app, "health").await;
        let page = b.get("/targets/t/reports/indexes").await;
        assert_eq!(page.status, StatusCode::OK);
        assert!(page.text.contains("Statistics since"), "the stats age is shown");

        assert!(lists(&page.text, "unused", "unused idx"));
        assert!(!lists(&page.text, "unused", "dup_a"));
        assert!(!lists(&page.text, "unused", "dup_ab"));
        assert!(!lists(&page.text, "unused", "bad_unique"));
        assert!(!lists(&page.text, "unused", "t_pkey"));

        assert!(lists(&page.text, "duplicate", "dup_a"));
        let dup = rows(&page.text, "duplicate");
        assert_eq!(dup.len(), 1, "{dup:?}");
        assert_eq!(dup[0][4], "dup_ab", "covered by: {dup:?}");

        let invalid = rows(&page.text, "invalid");
        assert_eq!(invalid.len(), 1, "{invalid:?}");
        assert_eq!(invalid[0][2], "bad_unique");
        assert_eq!(invalid[0][3], "invalid");

        let health = b.get("/targets/t/reports/health").await;
        assert!(lists(&health.text, "sequences", "s_id_seq"));
        assert!(!lists(&health.text, "sequences", "t_id_seq"));
        for name in ["unused idx", "dup_a", "bad_unique"] {
            assert!(!health.text.contains(name), "{name} is not a health finding");
        }
        let seq = rows(&health.text, "sequences");
        assert_eq!(seq[0][2], "public.s.id");
        assert!(seq[0][6].starts_with("93."), "{seq:?}");
        let bloat_free = b.get("/targets/t/reports/space").await;
        assert!(bloat_free.text.contains("not been computed"));

        // Filter, sort and CSV export.
        let filtered = b.get("/targets/t/reports/indexes?s=unused&q=UNUSED").await;
        assert_eq!(rows(&filtered.text, "unused").len(), 1);
        let none = b.get("/targets/t/reports/indexes?s=unused&q=nothing_like_it").await;
        assert!(rows(&none.text, "unused").is_empty());
        assert!(none.text.contains("Nothing matches"));
        let sorted = b
            .get("/targets/t/reports/indexes?s=unused&sort=name&dir=asc")
            .await;
        assert_eq!(sorted.status, StatusCode::OK);
        let csv = b.get("/targets/t/reports/indexes/export.csv?s=invalid").await;
        assert_eq!(csv.status, StatusCode::OK);
        assert!(csv.text.starts_with("schema,table,name,state"), "{}", csv.text);
        assert!(csv.text.contains("bad_unique"));

        // The index page lists every report and what it found.
        let list = b.get("/targets/t/reports").await;
        assert!(list.text.contains("Unused indexes: 1"), "{}", list.text);
    })
    .await;
}

#[tokio::test]
async fn relations_locked_exclusively_are_skipped_and_the_page_says_so() {
    with_db("dev", |db, app| async move {
        db.exec(
            "CREATE TABLE free_one (id int); INSERT INTO free_one SELECT generate_series(1, 1000);
             CREATE TABLE locked_one (id int); INSERT INTO locked_one SELECT generate_series(1, 1000);",
        )
        .await;
        let mut holder = db.connect().await;
        sqlx::raw_sql("BEGIN; LOCK TABLE locked_one IN ACCESS EXCLUSIVE MODE;")
            .execute(&mut holder)
            .await
            .unwrap();
        let state = app.state();
        let target = state.targets.get("t").unwrap();
        let computed = tokio::time::timeout(
            Duration::from_secs(60),
            reports::jobs::refresh(&state, &target, Report::Space, None, &NoProgress),
        )
        .await
        .expect("the report never waits on the lock")
        .unwrap();
        assert_eq!(computed["skipped"], 1, "{computed}");
        let mut b = app.logged_in(Role::Operator).await;
        let page = b.get("/targets/t/reports/space").await;
        assert!(page.text.contains("1 relation was skipped"), "{}", page.text);
        assert!(page.text.contains("public.locked_one"));
        assert!(page.text.contains("ACCESS EXCLUSIVE"));
        assert!(lists(&page.text, "relations", "free_one"));
        assert!(!lists(&page.text, "relations", "locked_one"));
        assert!(page.text.contains("Database size over time"));
        sqlx::raw_sql("ROLLBACK").execute(&mut holder).await.unwrap();
        holder.close().await.unwrap();

        // Without pg_stat_statements the slow queries page says so.
        refresh(&mut b, &app, "statements").await;
        let slow = b.get("/targets/t/reports/statements").await;
        assert!(slow.text.contains("pg_stat_statements is not installed"), "{}", slow.text);
    })
    .await;
}

/// The space report's rows by label (`schema.name`), without the row estimate.
fn space_rows(c: &reports::Computed) -> std::collections::BTreeMap<String, serde_json::Value> {
    c.sections["relations"]
        .iter()
        .map(|(label, row)| {
            let mut row = row.clone();
            row.as_object_mut().unwrap().remove("est_rows");
            (label.clone(), row)
        })
        .collect()
}

#[tokio::test]
async fn a_report_never_waits_behind_a_queued_access_exclusive_lock_whether_it_reads_files_or_opens_relations()
 {
    with_db("dev", |db, app| async move {
        db.exec(
            "CREATE TABLE free_one (id int); INSERT INTO free_one SELECT generate_series(1, 1000);
             CREATE TABLE queued_one (id int PRIMARY KEY); INSERT INTO queued_one SELECT generate_series(1, 1000);",
        )
        .await;
        // A reader holds queued_one; an ALTER TABLE waits behind it for ACCESS
        // EXCLUSIVE, and any new lock request on queued_one would queue behind that.
        let mut reader = db.connect().await;
        sqlx::raw_sql("BEGIN; SELECT count(*) FROM queued_one;")
            .execute(&mut reader)
            .await
            .unwrap();
        let mut alter = db.connect().await;
        let altering = async {
            sqlx::raw_sql("ALTER TABLE queued_one ADD COLUMN note text")
                .execute(&mut alter)
                .await
                .map(|_| ())
        };
        let checks = async {
            until(
                &db,
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND NOT granted
                                AND relation = 'queued_one'::regclass)",
            )
            .await;
            let state = app.state();
            let target = state.targets.get("t").unwrap();
            for (from_files, connections) in [(true, 2), (false, 2), (false, 1)] {
                let settings = reports::ReportSettings {
                    sizes_from_files: from_files,
                    connections,
                    ..state.config.reports.clone()
                };
                for report in [Report::Space, Report::Indexes] {
                    let started = std::time::Instant::now();
                    let c = tokio::time::timeout(
                        Duration::from_secs(30),
                        reports::compute(&target, report, &settings, Duration::from_secs(3), &NoProgress),
                    )
                    .await
                    .expect("the report never waits in the lock queue")
                    .unwrap();
                    // Skipped before asking for the lock: not even one lock timeout.
                    assert!(
                        started.elapsed() < Duration::from_secs(10),
                        "{report:?} files={from_files}: {:?}",
                        started.elapsed()
                    );
                    if report == Report::Space {
                        let skipped: Vec<_> = c.skipped.iter().map(|s| s.relation.as_str()).collect();
                        assert_eq!(skipped, ["public.queued_one"], "files={from_files}");
                        assert!(c.skipped[0].reason.contains("waiting for an ACCESS EXCLUSIVE"));
                        let rows = space_rows(&c);
                        assert!(rows.contains_key("public.free_one"));
                        assert!(!rows.contains_key("public.queued_one"));
                        assert_eq!(
                            c.facts["measured_from_files"].as_u64().unwrap() > 0,
                            from_files,
                            "{:?}",
                            c.facts
                        );
                    }
                }
            }
            // The queue still stands: nobody was pushed in front of the ALTER.
            let mut c = db.connect().await;
            let still: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND NOT granted
                                AND relation = 'queued_one'::regclass)",
            )
            .fetch_one(&mut c)
            .await
            .unwrap();
            assert!(still);
            c.close().await.unwrap();
            sqlx::raw_sql("ROLLBACK").execute(&mut reader).await.unwrap();
        };
        let (altered, ()) = tokio::join!(altering, checks);
        altered.unwrap();
        alter.close().await.unwrap();
        reader.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn sizes_read_from_files_equal_what_postgresql_reports_and_a_dropped_relation_is_skipped() {
    with_db("dev", |db, app| async move {
        db.exec(
            "CREATE TABLE wide (id serial PRIMARY KEY, v text);
             ALTER TABLE wide ALTER COLUMN v SET STORAGE EXTERNAL;
             INSERT INTO wide (v) SELECT repeat(md5(g::text), 300) FROM generate_series(1, 300) g;
             CREATE INDEX wide_v ON wide (left(v, 10));
             CREATE TABLE plain (a int, b int);
             INSERT INTO plain SELECT g, g FROM generate_series(1, 20000) g;
             DELETE FROM plain WHERE a % 3 = 0;
             CREATE UNLOGGED TABLE scratch (a int PRIMARY KEY);
             INSERT INTO scratch SELECT generate_series(1, 500);
             CREATE MATERIALIZED VIEW mv AS SELECT a FROM plain;
             CREATE TABLE empty_one (a int);",
        )
        .await;
        // A free space map and a visibility map, so every fork is counted.
        db.exec("VACUUM plain").await;
        let state = app.state();
        let target = state.targets.get("t").unwrap();
        let mut computed = Vec::new();
        for from_files in [true, false] {
            let settings = reports::ReportSettings {
                sizes_from_files: from_files,
                ..state.config.reports.clone()
            };
            let c = reports::compute(&target, Report::Space, &settings, Duration::from_secs(3), &NoProgress)
                .await
                .unwrap();
            assert!(c.skipped.is_empty(), "{:?}", c.skipped);
            computed.push(c);
        }
        assert_eq!(computed[0].facts["measured_from_files"], 5);
        assert_eq!(computed[1].facts["measured_from_files"], 0);
        let from_files = space_rows(&computed[0]);
        assert_eq!(from_files, space_rows(&computed[1]));
        // And both are PostgreSQL's own figures.
        let mut c = db.connect().await;
        let (total, indexes, toast): (i64, i64, i64) = sqlx::query_as(
            "SELECT pg_total_relation_size('wide'), pg_indexes_size('wide'),
                    pg_total_relation_size((SELECT reltoastrelid FROM pg_class WHERE oid = 'wide'::regclass))",
        )
        .fetch_one(&mut c)
        .await
        .unwrap();
        let wide = &from_files["public.wide"];
        assert_eq!(wide["total_bytes"], total);
        assert_eq!(wide["index_bytes"], indexes);
        assert_eq!(wide["toast_bytes"], toast);
        assert!(toast > 100_000, "the values went to TOAST: {toast}");
        let database: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
            .fetch_one(&mut c)
            .await
            .unwrap();
        let listed = computed[0].facts["database_bytes"].as_i64().unwrap();
        assert!((listed - database).abs() < 1_000_000, "{listed} vs {database}");

        // A relation dropped after the catalog was read: skipped, not fatal.
        let gone: i64 = sqlx::query_scalar("SELECT 'empty_one'::regclass::oid::int8")
            .fetch_one(&mut c)
            .await
            .unwrap();
        let plain: i64 = sqlx::query_scalar("SELECT 'plain'::regclass::oid::int8")
            .fetch_one(&mut c)
            .await
            .unwrap();
        sqlx::raw_sql("DROP TABLE empty_one").execute(&mut c).await.unwrap();
        let rels = [
            reports::RelRef { oid: gone, owner: None, name: "public.empty_one".into() },
            reports::RelRef { oid: plain, owner: None, name: "public.plain".into() },
        ];
        for ff in [Some(&reports::space::FILES), None] {
            let mut conns = [db.connect().await];
            let mut skipped = Vec::new();
            let m = reports::measure(
                &mut conns,
                ff,
                reports::space::SIZES_SQL,
                &rels,
                10,
                &NoProgress,
                &mut skipped,
            )
            .await
            .unwrap();
            assert_eq!(m.rows.keys().copied().collect::<Vec<_>>(), [plain]);
            assert_eq!(skipped.len(), 1, "{skipped:?}");
            assert_eq!(skipped[0].relation, "public.empty_one");
            assert_eq!(skipped[0].reason, "dropped while the report ran");
        }
        c.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn destructive_maintenance_waits_for_approval_and_quotes_hostile_names() {
    with_db("production", |db, app| async move {
        db.exec(
            r#"CREATE SCHEMA "My Schema";
               CREATE TABLE "My Schema"."We""ird; DROP TABLE x; --" (id int, v text);
               INSERT INTO "My Schema"."We""ird; DROP TABLE x; --" SELECT g, 'v' FROM generate_series(1, 1000) g;
               CREATE INDEX "Idx ""q""; x" ON "My Schema"."We""ird; DROP TABLE x; --" (v);
               CREATE TABLE x (id int);"#,
        )
        .await;
        let table = "We\"ird; DROP TABLE x; --";
        let index = "Idx \"q\"; x";
        let mut op = app.logged_in(Role::Operator).await;
        let mut ap = app.logged_in(Role::Approver).await;

        // Not through the operator button.
        let r = op
            .post(
                "/targets/t/maintenance/vacuum_full",
                &[("schema", "My Schema"), ("table", table)],
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(app.count_ops("pg.maintenance", Some("denied")).await, 1);

        // A request, which shows the exact statement and its lock.
        let r = op
            .post(
                "/targets/t/actions/pg.table.vacuum_full",
                &[("schema", "My Schema"), ("table", table), ("reason", "reclaim space")],
            )
            .await;
        let vf = r.location().expect("a request page").to_string();
        let page = ap.get(&vf).await;
        assert!(page.text.contains("ACCESS EXCLUSIVE"), "{}", page.text);
        assert!(
            page.text.contains("VACUUM FULL &quot;My Schema&quot;.&quot;We&quot;&quot;ird; DROP TABLE x; --&quot;")
                || page.text.contains("VACUUM FULL &#34;My Schema&#34;"),
            "{}",
            page.text
        );
        let r = op
            .post(
                "/targets/t/actions/pg.index.drop",
                &[("schema", "My Schema"), ("index", index), ("reason", "never used")],
            )
            .await;
        let drop = r.location().expect("a request page").to_string();
        // Nothing runs before an approver says yes.
        op.post(&format!("{drop}/execute"), &[]).await;
        assert_eq!(app.count_ops("approval.execute", Some("denied")).await, 1);
        let mut c = db.connect().await;
        assert!(exists(&mut c, "Idx \"q\"; x").await);

        for req in [&vf, &drop] {
            ap.post(&format!("{req}/approve"), &[("comment", "ok")]).await;
            op.get(req).await;
            op.post(&format!("{req}/execute"), &[]).await;
        }
        // Both ran as jobs linked to their approvals.
        for kind in ["pg.table.vacuum_full", "pg.index.drop"] {
            let id: i64 = sqlx::query_scalar("SELECT id FROM jobs WHERE kind = $1")
                .bind(kind)
                .fetch_one(&app.db)
                .await
                .unwrap();
            let (status, result, error) = wait_job(&app, id).await;
            assert_eq!(status, "succeeded", "{kind}: {error:?}");
            assert!(result.unwrap()["statement"].as_str().unwrap().contains("\"My Schema\"."));
            assert_eq!(app.count_ops(kind, Some("succeeded")).await, 1);
        }
        let states: Vec<String> = sqlx::query_scalar(
            "SELECT state FROM approval_requests ORDER BY id",
        )
        .fetch_all(&app.db)
        .await
        .unwrap();
        assert_eq!(states, ["executed", "executed"]);
        assert!(!exists(&mut c, "Idx \"q\"; x").await, "the index is gone");
        assert!(exists(&mut c, "x").await, "nothing but the named relations was touched");
        assert!(exists(&mut c, "We\"ird; DROP TABLE x; --").await);
        c.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn in_a_real_browser_an_operator_reads_a_report_and_opens_a_rows_actions() {
    use fantoccini::Locator;
    with_db("production", |db, app| async move {
        db.exec(
            "CREATE TABLE orders (id serial PRIMARY KEY, customer int, note text);
             INSERT INTO orders (customer, note) SELECT g % 50, 'n' FROM generate_series(1, 500) g;
             CREATE INDEX orders_customer ON orders (customer);",
        )
        .await;
        let state = app.state();
        let target = state.targets.get("t").unwrap();
        reports::jobs::refresh(&state, &target, Report::Indexes, None, &NoProgress)
            .await
            .unwrap();
        let pw = app.create_user("rita", Role::Operator).await;
        let driver = crate::browser::start_driver().await;
        let c = crate::browser::open_browser(&driver, 1280, 1000).await;
        c.goto(&app.url("/login")).await.unwrap();
        c.find(Locator::Css("input[name=username]"))
            .await
            .unwrap()
            .send_keys("rita")
            .await
            .unwrap();
        c.find(Locator::Css("input[name=password]"))
            .await
            .unwrap()
            .send_keys(&pw)
            .await
            .unwrap();
        c.find(Locator::Css("button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        c.wait()
            .for_element(Locator::Css("table.targets"))
            .await
            .unwrap();
        c.find(Locator::LinkText("Reports →"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        c.wait()
            .for_element(Locator::Css("table.reports-list"))
            .await
            .unwrap();
        crate::browser::screenshot(&c, "reports-01-list").await;
        c.goto(&app.url("/targets/t/reports/indexes"))
            .await
            .unwrap();
        let unused = c
            .wait()
            .for_element(Locator::Css("section#unused table"))
            .await
            .unwrap();
        assert!(unused.text().await.unwrap().contains("orders_customer"));
        c.find(Locator::Css(
            "section#unused details.dropdown-actions summary",
        ))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
        let drop = c
            .find(Locator::Css("section#unused a.gated.danger"))
            .await
            .unwrap();
        assert!(drop.is_displayed().await.unwrap());
        crate::browser::screenshot(&c, "reports-02-indexes").await;
        drop.click().await.unwrap();
        let what = c.wait().for_element(Locator::Css("p.what")).await.unwrap();
        let text = what.text().await.unwrap();
        assert!(
            text.starts_with("DROP INDEX CONCURRENTLY \"public\".\"orders_customer\""),
            "{text}"
        );
        crate::browser::screenshot(&c, "reports-03-drop-request").await;
        c.close().await.unwrap();
    })
    .await;
}
