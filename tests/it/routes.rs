//! Every route in the router, tried anonymously and as each role.

use dbops::{
    auth::{Access, Role, guard::OBJECT_ROUTES},
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
        .replace("{grant}", "999999")
        .replace("{step}", "1")
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

/// One object of each kind a route can act on (backup, restore, job, approval
/// request, incident, maintenance window), on `target`, by its route prefix.
async fn objects_on(
    app: &crate::helpers::TestApp,
    target: &str,
    requester: i64,
) -> Vec<(&'static str, i64)> {
    let method = if target == "cache" {
        "redis_rdb"
    } else {
        "pg_dump"
    };
    let backup: i64 = sqlx::query_scalar(
        "INSERT INTO backups (target, method, format, status, trigger, storage, finished_at, error)
         VALUES ($1, $2, 'custom', 'failed', 'person', 'local', now(), 'made by the test') RETURNING id",
    )
    .bind(target)
    .bind(method)
    .fetch_one(&app.db)
    .await
    .unwrap();
    let restore: i64 = sqlx::query_scalar(
        "INSERT INTO restores (backup_id, target, source_target, database, mode, status, finished_at)
         VALUES ($1, $2, $2, 'restored', 'new_database', 'failed', now()) RETURNING id",
    )
    .bind(backup)
    .bind(target)
    .fetch_one(&app.db)
    .await
    .unwrap();
    let job: i64 = sqlx::query_scalar(
        "INSERT INTO jobs (kind, target, status, finished_at) VALUES ('backup', $1, 'failed', now()) RETURNING id",
    )
    .bind(target)
    .fetch_one(&app.db)
    .await
    .unwrap();
    let approval: i64 = sqlx::query_scalar(
        "INSERT INTO approval_requests (kind, target, params, params_hash, summary, reason, requested_by,
                requested_by_name, state, expires_at)
         VALUES ('pg.backend.cancel', $1, '{}', '\\x00', 'made by the test', 'test', $2, 'requester',
                 'pending', now() + interval '1 hour') RETURNING id",
    )
    .bind(target)
    .bind(requester)
    .fetch_one(&app.db)
    .await
    .unwrap();
    let incident: i64 = sqlx::query_scalar(
        "INSERT INTO incidents (target, approval_id, action, summary, error)
         VALUES ($1, $2, 'pg.backend.cancel', 'made by the test', 'failed') RETURNING id",
    )
    .bind(target)
    .bind(approval)
    .fetch_one(&app.db)
    .await
    .unwrap();
    let window: i64 = sqlx::query_scalar(
        "INSERT INTO maintenance_windows (template, title, target, targets, planned_start, planned_minutes,
                owner_name, state)
         VALUES ('marketplace', 'made by the test', $1, ARRAY[$1], now(), 60, 'requester', 'closed') RETURNING id",
    )
    .bind(target)
    .fetch_one(&app.db)
    .await
    .unwrap();
    vec![
        ("/backups/{id}", backup),
        ("/restores/{id}", restore),
        ("/jobs/{id}", job),
        ("/approvals/{id}", approval),
        ("/incidents/{id}", incident),
        ("/windows/{id}", window),
    ]
}

/// Gives `username` a role on a target (`target:NAME`) or policy (`policy:NAME`)
/// through the admin's page, as an admin would.
pub async fn grant(
    admin: &mut crate::helpers::Browser,
    db: &sqlx::PgPool,
    username: &str,
    scope: &str,
    role: Role,
) {
    let id: i64 = sqlx::query_scalar("SELECT id FROM users WHERE username = $1")
        .bind(username)
        .fetch_one(db)
        .await
        .unwrap();
    admin.get(&format!("/admin/users/{id}")).await;
    let r = admin
        .post(
            &format!("/admin/users/{id}/target-roles"),
            &[("scope", scope), ("role", role.as_str())],
        )
        .await;
    assert_eq!(r.location(), Some(format!("/admin/users/{id}").as_str()));
    let page = admin.get(&format!("/admin/users/{id}")).await;
    assert!(page.text.contains("is now"), "{}", page.text);
}

/// A test user: name, global role, grants (`target:NAME` or `policy:NAME`, role),
/// and the role that makes on pg and on cache.
type Person = (
    &'static str,
    Role,
    &'static [(&'static str, Role)],
    Role,
    Role,
);

/// Routes × roles × targets: users whose role differs per target (an approver on
/// one and an operator or viewer on another, by target name or by policy) try
/// every route that acts on one target, on each target — by its `{target}` or by an
/// object (backup, restore, job, approval request, incident) of that target — and
/// every route about no target. Exactly the calls whose role on THAT target is too
/// low are refused, each with a page naming the target and an `auth.denied` row.
#[tokio::test]
async fn every_route_checks_the_role_on_the_target_it_acts_on() {
    // pg: production (PostgreSQL), cache: dev (Redis).
    let app = spawn_app().await;
    let policies = [("pg", "production"), ("cache", "dev")];
    let mut admin = app.logged_in(Role::Admin).await;
    // (name, global role, grants, role on pg, role on cache)
    let people: [Person; 4] = [
        (
            "mixed-a",
            Role::Viewer,
            &[
                ("target:pg", Role::Approver),
                ("policy:dev", Role::Operator),
            ],
            Role::Approver,
            Role::Operator,
        ),
        (
            "mixed-b",
            Role::Approver,
            &[("policy:production", Role::Viewer)],
            Role::Viewer,
            Role::Approver,
        ),
        (
            "mixed-c",
            Role::Operator,
            &[("target:cache", Role::Viewer)],
            Role::Operator,
            Role::Viewer,
        ),
        // A target grant wins over a policy grant.
        (
            "mixed-d",
            Role::Viewer,
            &[
                ("policy:production", Role::Approver),
                ("target:pg", Role::Operator),
            ],
            Role::Operator,
            Role::Viewer,
        ),
    ];
    let requester = app.current_user("requester", Role::Operator).await;
    let mut objects = vec![];
    for (t, _) in policies {
        objects.push((t, objects_on(&app, t, requester.id).await));
    }
    let routes: Vec<_> = web::routes()
        .into_iter()
        .filter(|r| matches!(r.access, Access::AtLeast(_)) && r.path != "/logout")
        .collect();
    let mut tried_on_target = 0;
    for (name, global, grants, on_pg, on_cache) in people {
        let pw = app.create_user(name, global).await;
        for (scope, role) in grants {
            grant(&mut admin, &app.db, name, scope, *role).await;
        }
        let mut b = app.browser();
        assert_eq!(b.login(name, &pw).await.status, StatusCode::SEE_OTHER);
        let highest = [global, on_pg, on_cache].into_iter().max().unwrap();
        for r in &routes {
            let Access::AtLeast(need) = r.access else {
                unreachable!()
            };
            let object = OBJECT_ROUTES
                .iter()
                .find(|(p, _)| r.path.starts_with(p))
                .map(|(p, _)| *p);
            let scoped = r.path.contains("{target}") || object.is_some();
            let calls: Vec<(Option<&str>, String)> = if scoped {
                policies
                    .iter()
                    .map(|(t, _)| {
                        let mut path = r.path.replace("{target}", t);
                        if let Some(prefix) = object {
                            let id = objects
                                .iter()
                                .find(|(o, _)| o == t)
                                .unwrap()
                                .1
                                .iter()
                                .find(|(p, _)| *p == prefix)
                                .unwrap()
                                .1;
                            path = path.replace("{id}", &id.to_string());
                        }
                        (Some(*t), concrete(&path))
                    })
                    .collect()
            } else {
                vec![(None, concrete(r.path))]
            };
            for (target, path) in calls {
                let role = match target {
                    Some("pg") => on_pg,
                    Some(_) => on_cache,
                    None => highest,
                };
                let before = app.count_ops("auth.denied", Some("denied")).await;
                let resp = call(&mut b, &r.method, &path).await;
                let refused = app.count_ops("auth.denied", Some("denied")).await - before;
                if role >= need {
                    assert_eq!(
                        refused,
                        0,
                        "{} {path} refused {name} ({role} there, needs {need}): {} {}",
                        r.method,
                        resp.status,
                        resp.text.chars().take(300).collect::<String>()
                    );
                } else {
                    assert_eq!(
                        refused, 1,
                        "{} {path} let {name} in ({role} there, needs {need})",
                        r.method
                    );
                    assert_eq!(resp.status, StatusCode::FORBIDDEN, "{} {path}", r.method);
                    if let Some(t) = target {
                        assert!(
                            resp.text
                                .contains(&format!("{} role or higher on {t}", need.as_str())),
                            "the page names the role and the target: {}",
                            resp.text
                        );
                        let logged: Option<String> = sqlx::query_scalar(
                            "SELECT target FROM operations WHERE kind = 'auth.denied' AND actor_name = $1 ORDER BY id DESC LIMIT 1",
                        )
                        .bind(name)
                        .fetch_one(&app.db)
                        .await
                        .unwrap();
                        assert_eq!(logged.as_deref(), Some(t));
                    }
                }
                if target.is_some() {
                    tried_on_target += 1;
                }
            }
        }
        // Still signed in after all of it (no route ended the session).
        assert_eq!(b.get("/").await.status, StatusCode::OK, "{name}");
    }
    assert!(tried_on_target > 150, "only {tried_on_target} target calls");
}
