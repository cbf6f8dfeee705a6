//! Every route in the router, tried anonymously and as each role.

use dbops::{
    auth::{Access, Role},
    web,
};
use reqwest::{Method, StatusCode};

use crate::helpers::{Browser, Resp, spawn_app};

fn concrete(path: &str) -> String {
    path.replace("{id}", "999999")
        .replace("{*path}", "app.css")
        .replace("{target}", "pg")
        .replace("{kind}", "pg.backend.cancel")
        .replace("{report}", "health")
        .replace("{command}", "analyze")
        .replace("{provider}", "nope")
}

/// Metrics without `[metrics]` configured: no such page, for anyone.
fn assert_metrics_refused(path: &str, r: &Resp) {
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
    assert!(!r.text.contains("dbops_"), "{path} showed metrics");
}

async fn call(b: &mut Browser, method: &Method, path: &str) -> Resp {
    if *method == Method::GET {
        b.get(path).await
    } else {
        b.post(path, &[]).await
    }
}

fn denied(r: &Resp) -> bool {
    matches!(r.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
        || r.location().is_some_and(|l| l.starts_with("/login?next="))
}

#[tokio::test]
async fn every_route_allows_exactly_the_roles_it_declares_and_logs_each_denial() {
    let app = spawn_app().await;
    // /logout last: it ends the session the other calls use.
    let mut routes = web::routes();
    routes.sort_by_key(|r| r.path == "/logout");
    assert!(routes.len() >= 15, "the route table looks incomplete");

    let mut expected_denials = 0;
    // Anonymous.
    let mut anon = app.browser();
    for r in &routes {
        let resp = call(&mut anon, &r.method, &concrete(r.path)).await;
        match r.access {
            Access::Public => assert!(
                !denied(&resp),
                "{} {} should be public, got {}",
                r.method,
                r.path,
                resp.status
            ),
            Access::Metrics => assert_metrics_refused(r.path, &resp),
            Access::AtLeast(_) | Access::Token(_) => {
                assert!(
                    denied(&resp),
                    "{} {} let an anonymous user in ({})",
                    r.method,
                    r.path,
                    resp.status
                );
                expected_denials += 1;
            }
        }
    }
    // Each role.
    for role in Role::ALL {
        let mut b = app.logged_in(role).await;
        for r in &routes {
            let resp = call(&mut b, &r.method, &concrete(r.path)).await;
            match r.access {
                Access::Public => {
                    assert!(!denied(&resp), "{} {} denied to {role}", r.method, r.path)
                }
                // A session is no metrics token.
                Access::Metrics => assert_metrics_refused(r.path, &resp),
                Access::AtLeast(need) if role >= need => assert!(
                    !denied(&resp),
                    "{} {} denied to {role} ({}): {}",
                    r.method,
                    r.path,
                    resp.status,
                    resp.text.chars().take(300).collect::<String>()
                ),
                // A session is no API token.
                Access::Token(_) => {
                    assert_eq!(
                        resp.status,
                        StatusCode::UNAUTHORIZED,
                        "{} {} took a session for a token",
                        r.method,
                        r.path
                    );
                    expected_denials += 1;
                }
                Access::AtLeast(need) => {
                    assert_eq!(
                        resp.status,
                        StatusCode::FORBIDDEN,
                        "{} {} allowed {role} (needs {need})",
                        r.method,
                        r.path
                    );
                    assert!(
                        resp.text.contains(need.as_str()),
                        "the page says which role is needed"
                    );
                    expected_denials += 1;
                }
            }
        }
    }
    assert_eq!(
        app.count_ops("auth.denied", Some("denied")).await,
        expected_denials
    );
    let logged_roles: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT DISTINCT actor_role FROM operations WHERE kind = 'auth.denied' ORDER BY 1",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(
        logged_roles,
        vec![
            Some("approver".into()),
            Some("operator".into()),
            Some("viewer".into()),
            None
        ]
    );
}

#[tokio::test]
async fn anonymous_pages_redirect_to_login_and_come_back_after_it() {
    let app = spawn_app().await;
    let pw = app.create_user("carol", Role::Viewer).await;
    let mut b = app.browser();
    let r = b.get("/operations?kind=auth.").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(
        r.location(),
        Some("/login?next=%2Foperations%3Fkind%3Dauth.")
    );
    let page = b.get(r.location().unwrap()).await;
    assert!(
        page.text
            .contains("name=\"next\" value=\"/operations?kind=auth.\"")
    );
    let r = b
        .post(
            "/login",
            &[
                ("username", "carol"),
                ("password", &pw),
                ("next", "/operations?kind=auth."),
            ],
        )
        .await;
    assert_eq!(r.location(), Some("/operations?kind=auth."));
}

#[tokio::test]
async fn login_never_redirects_to_another_site() {
    let app = spawn_app().await;
    let pw = app.create_user("dave", Role::Viewer).await;
    for evil in [
        "//evil.example/x",
        "https://evil.example",
        "/\\evil.example",
    ] {
        let mut b = app.browser();
        b.get("/login").await;
        let r = b
            .post(
                "/login",
                &[("username", "dave"), ("password", &pw), ("next", evil)],
            )
            .await;
        assert_eq!(r.location(), Some("/"), "followed {evil}");
    }
}

#[tokio::test]
async fn every_response_carries_security_headers_and_a_request_id() {
    let app = spawn_app().await;
    let mut b = app.browser();
    for path in ["/login", "/", "/nope", "/static/app.css", "/healthz"] {
        let r = b.get(path).await;
        let h = &r.headers;
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{path}: {csp}"
        );
        assert!(csp.contains("frame-ancestors 'none'"));
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["referrer-policy"], "no-referrer");
        assert!(!h["x-request-id"].is_empty(), "{path} has no request id");
    }
    let r = b.get("/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let id = r.headers["x-request-id"].to_str().unwrap();
    assert!(r.text.contains(id), "the error page shows the request id");
}

#[tokio::test]
async fn static_files_are_embedded_and_htmx_is_vendored() {
    let app = spawn_app().await;
    let mut b = app.browser();
    let r = b.get("/static/vendor/htmx-2.0.11.min.js").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.text.contains("htmx"));
    let login = b.get("/login").await;
    assert!(
        !login.text.contains("https://"),
        "pages load nothing from other sites"
    );
}

#[tokio::test]
async fn a_clients_x_request_id_is_never_taken_as_dbops_own() {
    let app = spawn_app().await;
    let b = app.logged_in(Role::Viewer).await;
    let spoofed = "3f2b1c4e-0000-4000-8000-000000000001";
    let r = b
        .client
        .get(format!("{}/operations/export.csv", b.base))
        .header("x-request-id", spoofed)
        .header("x-request-id", "a-second-one")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let ids: Vec<_> = r.headers().get_all("x-request-id").iter().collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let answered = ids[0].to_str().unwrap().to_string();
    assert_ne!(answered, spoofed);
    assert!(uuid::Uuid::parse_str(&answered).is_ok(), "{answered}");
    let logged: Option<String> =
        sqlx::query_scalar("SELECT request_id FROM operations WHERE kind = 'operations.export'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(
        logged.as_deref(),
        Some(answered.as_str()),
        "the log has dbops' id"
    );
    let anywhere: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM operations WHERE request_id = $1 OR params::text LIKE '%' || $1 || '%'",
    )
    .bind(spoofed)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(anywhere, 0, "the client's id is in no operations row");
    // Kept apart in the request's log lines, labelled as the client's.
    assert!(
        crate::helpers::captured_logs().contains(&format!("client_request_id={spoofed}")),
        "the request's log lines name the client's id"
    );
}

#[test]
fn only_short_plain_client_request_ids_are_kept() {
    use dbops::app::parse_client_request_id as parse;
    assert_eq!(parse(" abc-123.x_y:z ").unwrap().0, "abc-123.x_y:z");
    for bad in ["", "a b", "<script>", "é", &"x".repeat(65), "id\nforged"] {
        assert!(parse(bad).is_none(), "{bad:?}");
    }
}
