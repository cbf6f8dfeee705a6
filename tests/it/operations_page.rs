//! The operations log page: filters, keyset paging and CSV export.

use dbops::{
    audit::{self, Actor, AuditCtx, Entry, RequestMeta},
    auth::Role,
};
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{TestApp, spawn_app};

async fn history(app: &TestApp) {
    for (who, kind, target, failed) in [
        ("ann", "backup.create", "pg", false),
        ("ann", "backup.create", "pg", true),
        ("ben", "redis.keys.delete", "cache", false),
        ("ben", "backup.create", "cache", false),
        ("cid", "restore.run", "pg", true),
    ] {
        let ctx = AuditCtx {
            actor: Actor {
                id: None,
                name: Some(who.into()),
                role: Some(Role::Operator),
            },
            meta: RequestMeta::default(),
        };
        let e = Entry::new(kind).target(target).params(json!({ "by": who }));
        let e = if failed { e.failed("it broke") } else { e };
        audit::record(&app.db, &ctx, e).await.unwrap();
    }
}

fn ids_on(page: &str) -> Vec<i64> {
    let doc = scraper::Html::parse_document(page);
    let sel = scraper::Selector::parse("table.operations tbody tr td:first-child a").unwrap();
    doc.select(&sel)
        .map(|a| a.text().collect::<String>().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn filters_by_actor_kind_target_outcome_and_time() {
    let app = spawn_app().await;
    history(&app).await;
    let mut b = app.logged_in(Role::Viewer).await;
    let count = |text: &str| ids_on(text).len();
    assert_eq!(count(&b.get("/operations?actor=ann").await.text), 2);
    assert_eq!(
        count(&b.get("/operations?kind=backup.create").await.text),
        3
    );
    assert_eq!(count(&b.get("/operations?kind=backup.").await.text), 3);
    // A kind finds the kinds under it (at a dot), not others that start alike.
    assert_eq!(count(&b.get("/operations?kind=redis.keys").await.text), 1);
    assert_eq!(count(&b.get("/operations?kind=backup").await.text), 3);
    assert_eq!(count(&b.get("/operations?kind=backup.creat").await.text), 0);
    assert_eq!(count(&b.get("/operations?kind=backup.cr*").await.text), 3);
    // Who: the start of a name.
    assert_eq!(count(&b.get("/operations?actor=an").await.text), 2);
    assert_eq!(count(&b.get("/operations?actor=b").await.text), 2);
    assert_eq!(count(&b.get("/operations?actor=annx").await.text), 0);
    assert_eq!(count(&b.get("/operations?target=cache").await.text), 2);
    assert_eq!(count(&b.get("/operations?outcome=failed").await.text), 2);
    assert_eq!(
        count(&b.get("/operations?actor=ann&outcome=failed").await.text),
        1
    );
    assert_eq!(
        count(
            &b.get("/operations?kind=backup.&from=2000-01-01&to=2000-01-02")
                .await
                .text
        ),
        0
    );
    assert_eq!(
        count(&b.get("/operations?kind=backup.&from=2000-01-01").await.text),
        3
    );
    let bad = b.get("/operations?from=last+tuesday").await;
    assert_eq!(bad.status, StatusCode::OK);
    assert!(
        bad.text.contains("“from” must be a date"),
        "a clear message for a bad filter"
    );
}

#[tokio::test]
async fn paging_walks_every_row_exactly_once_newest_first() {
    let app = spawn_app().await;
    let ctx = AuditCtx::system();
    for i in 0..130 {
        audit::record(
            &app.db,
            &ctx,
            Entry::new("test.page").params(json!({ "i": i })),
        )
        .await
        .unwrap();
    }
    let mut b = app.logged_in(Role::Viewer).await;
    let mut seen = vec![];
    let mut url = "/operations?kind=test.page".to_string();
    loop {
        let page = b.get(&url).await;
        let ids = ids_on(&page.text);
        assert!(ids.len() <= 50);
        seen.extend(ids);
        let doc = scraper::Html::parse_document(&page.text);
        let sel = scraper::Selector::parse("nav.pager a").unwrap();
        let older = doc
            .select(&sel)
            .find(|a| a.text().collect::<String>().contains("Older"))
            .and_then(|a| a.value().attr("href").map(str::to_string));
        match older {
            Some(u) => url = u,
            None => break,
        }
    }
    assert_eq!(seen.len(), 130);
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    sorted.dedup();
    assert_eq!(seen, sorted, "each row once, newest first");
}

#[tokio::test]
async fn csv_export_has_the_filtered_rows_quoted_and_is_itself_logged() {
    let app = spawn_app().await;
    history(&app).await;
    audit::record(
        &app.db,
        &AuditCtx::system(),
        Entry::new("test.csv").failed("=cmd|' /C calc'!A0, \"quoted\""),
    )
    .await
    .unwrap();
    // An operator: `test.csv` is no viewer's kind (its error is hidden from viewers).
    let mut b = app.logged_in(Role::Operator).await;
    let r = b.get("/operations/export.csv?kind=backup.create").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    assert!(
        r.headers["content-disposition"]
            .to_str()
            .unwrap()
            .contains("attachment")
    );
    let lines: Vec<&str> = r.text.lines().collect();
    assert!(lines[0].starts_with("id,started_at"));
    assert_eq!(lines.len(), 4, "{}", r.text);
    assert!(lines[1..].iter().all(|l| l.contains("backup.create")));

    let r = b.get("/operations/export.csv?kind=test.csv").await;
    assert!(
        r.text.contains("\"'=cmd|' /C calc'!A0, \"\"quoted\"\"\""),
        "formula defused and quoted: {}",
        r.text
    );
    assert_eq!(
        app.count_ops("operations.export", Some("succeeded")).await,
        2
    );
}

#[tokio::test]
async fn one_operation_shows_its_parameters_and_outcome() {
    let app = spawn_app().await;
    let id = audit::record(
        &app.db,
        &AuditCtx::system(),
        Entry::new("test.show")
            .target("pg")
            .params(json!({ "table": "<script>alert(1)</script>" }))
            .failed("disk full"),
    )
    .await
    .unwrap();
    let mut viewer = app.logged_in(Role::Viewer).await;
    let page = viewer.get(&format!("/operations/{id}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text.contains("test.show") && page.text.contains("failed"));
    assert!(
        !page.text.contains("disk full") && !page.text.contains("alert(1)"),
        "a kind not known to be a viewer's shows viewers no parameters and no error"
    );
    assert!(
        page.text
            .contains("hidden from viewers: needs the operator role")
    );
    let mut b = app.logged_in(Role::Operator).await;
    let page = b.get(&format!("/operations/{id}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text.contains("disk full") && page.text.contains("test.show"));
    assert!(
        !page.text.contains("<script>alert(1)"),
        "parameters are escaped"
    );
    assert!(page.text.contains("alert(1)"), "but shown");
    assert_eq!(
        b.get("/operations/987654321").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        b.get("/operations/abc").await.status,
        StatusCode::BAD_REQUEST
    );
}

/// Waits for a job to end; returns its status.
async fn job_ended(app: &TestApp, id: i64) -> String {
    for _ in 0..600 {
        let status: String = sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
        if !matches!(status.as_str(), "queued" | "running") {
            return status;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("job {id} did not end");
}

#[tokio::test]
async fn a_viewer_sees_no_redis_key_name_anywhere_in_the_log_and_an_operator_does() {
    use fred::prelude::*;
    let app = spawn_app().await;
    let redis = Builder::from_config(
        Config::from_url(&crate::helpers::services().await.redis_url).unwrap(),
    )
    .build()
    .unwrap();
    redis.init().await.unwrap();
    // Key names carry session ids and e-mail addresses.
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let prefix = format!("it:redact{tag}:");
    let key = format!("{prefix}sess:carol@example.com");
    let _: () = redis.set(&key, "v", None, None, false).await.unwrap();

    let mut op = app.logged_in(Role::Operator).await;
    // A key viewed in the key browser (`redis.key.view` names it).
    let r = op
        .get(&format!(
            "/targets/cache/redis/key?k={}",
            hex::encode(key.as_bytes())
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // Memory by prefix: the job's result lists the biggest keys by name.
    op.get("/targets/cache/redis/memory").await;
    let r = op
        .post(
            "/targets/cache/redis/memory",
            &[
                ("db", "0"),
                ("depth", "2"),
                ("pattern", &format!("{prefix}*")),
                ("sample", ""),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let job = r.location().unwrap().to_string();
    let job_id: i64 = job.trim_start_matches("/jobs/").parse().unwrap();
    assert_eq!(job_ended(&app, job_id).await, "succeeded");
    let ops: Vec<(i64, String)> = sqlx::query_as(
        "SELECT id, kind FROM operations WHERE kind IN ('redis.key.view', 'redis.memory_by_prefix') ORDER BY id",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(ops.len(), 2, "{ops:?}");
    let stored: String = sqlx::query_scalar(
        "SELECT string_agg(params::text || coalesce(result::text, ''), ' ') FROM operations",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(
        stored.contains(&key),
        "the log keeps the key name: {stored}"
    );

    let mut pages = vec![
        "/".to_string(),
        "/operations".to_string(),
        "/operations?target=cache".to_string(),
        "/operations/export.csv".to_string(),
        "/operations/export.csv?kind=redis.".to_string(),
        "/jobs".to_string(),
        job.clone(),
    ];
    pages.extend(ops.iter().map(|(id, _)| format!("/operations/{id}")));
    let mut viewer = app.logged_in(Role::Viewer).await;
    for p in &pages {
        let r = viewer.get(p).await;
        assert_eq!(r.status, StatusCode::OK, "{p}");
        assert!(
            !r.text.contains(&prefix) && !r.text.contains("carol@example.com"),
            "{p} shows a viewer a key name: {}",
            r.text
        );
    }
    let page = viewer.get(&format!("/operations/{}", ops[0].0)).await;
    assert!(page.text.contains("redis.key.view") && page.text.contains("succeeded"));
    assert!(page.text.contains("hidden from viewers"), "{}", page.text);
    let csv = viewer.get("/operations/export.csv?kind=redis.").await.text;
    assert!(
        csv.contains("redis.key.view") && csv.contains("[hidden from viewers"),
        "{csv}"
    );

    // An operator may open the key browser and memory pages, and so sees it all.
    let page = op.get(&format!("/operations/{}", ops[0].0)).await;
    assert!(page.text.contains(&key), "{}", page.text);
    let page = op.get(&format!("/operations/{}", ops[1].0)).await;
    assert!(page.text.contains(&prefix), "{}", page.text);
    let csv = op.get("/operations/export.csv?kind=redis.").await.text;
    assert!(csv.contains(&key), "{csv}");
    let _: i64 = redis.del(&key).await.unwrap();
}
