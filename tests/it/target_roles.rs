//! Per-target roles: set on the user's page (CSRF, logged), effective at the next
//! request (a drop ends the sessions that had the higher role), checked by the
//! approval rules on the request's target; and the admin's reset of a user's
//! second factor.

use std::collections::BTreeMap;

use dbops::{
    approvals::{self, Decision},
    audit::AuditCtx,
    auth::{Role, totp},
};
use reqwest::StatusCode;

use crate::{
    approvals::sleeper,
    helpers::{Browser, TestApp, services, spawn_app, spawn_app_with},
    routes::grant,
};

async fn user_id(app: &TestApp, name: &str) -> i64 {
    sqlx::query_scalar("SELECT id FROM users WHERE username = $1")
        .bind(name)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

/// The newest operations row of `kind`: (outcome, params as text, error).
async fn last_op(app: &TestApp, kind: &str) -> (String, String, Option<String>) {
    sqlx::query_as(
        "SELECT outcome, params::text, error FROM operations WHERE kind = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(kind)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

fn signed_out(r: &crate::helpers::Resp) -> bool {
    r.status == StatusCode::SEE_OTHER && r.location().is_some_and(|l| l.starts_with("/login"))
}

async fn signed_in(app: &TestApp, name: &str, pw: &str) -> Browser {
    let mut b = app.browser();
    assert_eq!(b.login(name, pw).await.status, StatusCode::SEE_OTHER);
    b
}

#[tokio::test]
async fn an_admin_sets_per_target_roles_on_the_users_page_and_a_drop_ends_the_users_sessions() {
    // pg: production, cache: dev.
    let app = spawn_app().await;
    let mut admin = app.logged_in(Role::Admin).await;
    let pw = app.create_user("erin", Role::Operator).await;
    let erin = user_id(&app, "erin").await;
    let mut b = signed_in(&app, "erin", &pw).await;
    assert_eq!(b.get("/targets/pg/reports").await.status, StatusCode::OK);

    let page = admin.get(&format!("/admin/users/{erin}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text.contains("No per-target roles"), "{}", page.text);
    assert!(
        page.text.contains(
            r#"<tr data-target="pg"><td>pg</td><td>production</td><td class="role">operator</td><td>global role</td></tr>"#
        ),
        "{}",
        page.text
    );

    // Without the CSRF token: refused, nothing granted.
    let r = admin
        .post_with_token(
            &format!("/admin/users/{erin}/target-roles"),
            &[("scope", "policy:production"), ("role", "viewer")],
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let grants: i64 = sqlx::query_scalar("SELECT count(*) FROM user_target_roles")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(grants, 0);

    // Bad input: a message on the page and a failed row, nothing granted.
    for (scope, role, says) in [
        (
            "target:nope",
            "viewer",
            "Choose a configured target or a policy",
        ),
        (
            "policy:qa",
            "viewer",
            "Choose a configured target or a policy",
        ),
        ("target:pg", "admin", "admin is a global role only"),
    ] {
        let r = admin
            .post(
                &format!("/admin/users/{erin}/target-roles"),
                &[("scope", scope), ("role", role)],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        let page = admin.get(&format!("/admin/users/{erin}")).await;
        assert!(page.text.contains(says), "{scope} {role}: {}", page.text);
        let (outcome, _, error) = last_op(&app, "user.target_role.set").await;
        assert_eq!(outcome, "failed");
        assert!(error.unwrap_or_default().contains(says));
    }
    assert_eq!(
        app.count_ops("user.target_role.set", Some("failed")).await,
        3
    );

    // Viewer on every production target.
    grant(
        &mut admin,
        &app.db,
        "erin",
        "policy:production",
        Role::Viewer,
    )
    .await;
    let page = admin.get(&format!("/admin/users/{erin}")).await;
    assert!(
        page.text.contains(
            r#"<tr data-target="pg"><td>pg</td><td>production</td><td class="role">viewer</td>"#
        ),
        "{}",
        page.text
    );
    assert!(
        page.text
            .contains(r#"<tr data-grant="policy = production">"#)
    );
    let (outcome, params, _) = last_op(&app, "user.target_role.set").await;
    assert_eq!(outcome, "succeeded");
    assert!(
        params.contains(r#""on": "policy = production""#),
        "{params}"
    );
    assert!(params.contains(r#""old_role": null"#), "{params}");
    assert!(params.contains(r#""role": "viewer""#), "{params}");

    // Erin's session had operator on pg: it ends at the next request.
    assert!(signed_out(&b.get("/").await), "the session ended");
    let mut b = signed_in(&app, "erin", &pw).await;
    let r = b.get("/targets/pg/reports").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        r.text.contains("operator role or higher on pg"),
        "{}",
        r.text
    );
    // Still an operator on the dev target.
    assert_eq!(
        b.get("/targets/cache/redis/slowlog").await.status,
        StatusCode::OK
    );

    // Removed: the global role applies again; a raise keeps the session.
    let gid: i64 = sqlx::query_scalar("SELECT id FROM user_target_roles WHERE user_id = $1")
        .bind(erin)
        .fetch_one(&app.db)
        .await
        .unwrap();
    let r = admin
        .post(
            &format!("/admin/users/{erin}/target-roles/{gid}/remove"),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let page = admin.get(&format!("/admin/users/{erin}")).await;
    assert!(
        page.text
            .contains("the global role (operator) applies there"),
        "{}",
        page.text
    );
    let (outcome, params, _) = last_op(&app, "user.target_role.remove").await;
    assert_eq!(outcome, "succeeded");
    assert!(
        params.contains(r#""on": "policy = production""#),
        "{params}"
    );
    assert_eq!(b.get("/targets/pg/reports").await.status, StatusCode::OK);

    // A drop of the global role through the users list ends sessions too.
    admin
        .post(&format!("/admin/users/{erin}/role"), &[("role", "viewer")])
        .await;
    assert!(signed_out(&b.get("/").await));
}

/// A dbops with two production targets, `pg` and `pg2`, on the test PostgreSQL.
async fn two_production_targets() -> TestApp {
    let s = services().await;
    spawn_app_with(
        r#"
        [targets]
        connect_timeout_seconds = 2
        [[postgres]]
        name = "pg"
        url_env = "PG"
        policy = "production"
        [[postgres]]
        name = "pg2"
        url_env = "PG"
        policy = "production"
        "#,
        &[("PG", format!("{}/postgres", s.pg_base))],
    )
    .await
}

#[tokio::test]
async fn restoring_into_another_target_needs_the_operator_role_there() {
    let app = two_production_targets().await;
    let pw = app.create_user("hank", Role::Operator).await;
    let mut admin = app.logged_in(Role::Admin).await;
    grant(&mut admin, &app.db, "hank", "target:pg", Role::Viewer).await;
    let backup: i64 = sqlx::query_scalar(
        "INSERT INTO backups (target, method, format, status, trigger, storage, finished_at, error)
         VALUES ('pg2', 'pg_dump', 'custom', 'failed', 'person', 'local', now(), 'made by the test') RETURNING id",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    let mut b = signed_in(&app, "hank", &pw).await;
    b.get(&format!("/backups/{backup}/restore")).await;
    let r = b
        .post(
            &format!("/backups/{backup}/restore"),
            &[("database", "copy"), ("target", "pg")],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        r.text
            .contains("Restoring into pg needs the operator role or higher on pg"),
        "{}",
        r.text
    );
    let (outcome, _, error) = last_op(&app, "auth.denied").await;
    assert_eq!(
        (outcome.as_str(), error.as_deref()),
        ("denied", Some("role too low on pg"))
    );
    // Into pg2, where hank is an operator, the restore's own checks answer (the
    // backup failed, so there is nothing to restore).
    let denials = app.count_ops("auth.denied", None).await;
    let r = b
        .post(
            &format!("/backups/{backup}/restore"),
            &[("database", "copy"), ("target", "pg2")],
        )
        .await;
    assert_ne!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    assert_eq!(app.count_ops("auth.denied", None).await, denials);
}

#[tokio::test]
async fn an_approver_on_one_target_cannot_approve_on_another_where_they_are_only_an_operator() {
    let app = two_production_targets().await;
    let state = app.state();
    let ctx = AuditCtx::system();
    let requester = app.current_user("requester", Role::Operator).await;
    let pw = app.create_user("dana", Role::Approver).await;
    let mut admin = app.logged_in(Role::Admin).await;
    grant(&mut admin, &app.db, "dana", "target:pg", Role::Operator).await;

    let sleeping = sleeper().await;
    let form = BTreeMap::from([
        ("pid".to_string(), sleeping.pid.to_string()),
        ("backend_start".to_string(), sleeping.backend_start.clone()),
    ]);
    let on_pg = approvals::request(
        &state,
        &ctx,
        &requester,
        "pg",
        "pg.backend.cancel",
        &form,
        "stuck report",
    )
    .await
    .unwrap();
    let on_pg2 = approvals::request(
        &state,
        &ctx,
        &requester,
        "pg2",
        "pg.backend.cancel",
        &form,
        "stuck report",
    )
    .await
    .unwrap();
    assert_eq!(
        (on_pg.state.as_str(), on_pg2.state.as_str()),
        ("pending", "pending")
    );

    let mut dana = signed_in(&app, "dana", &pw).await;
    // Operator on pg: may look at the request, no approve button.
    let page = dana.get(&format!("/approvals/{}", on_pg.id)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        !page
            .text
            .contains(&format!("/approvals/{}/approve", on_pg.id))
    );
    // Approving anyway: refused with a page that says why, and logged.
    let r = dana
        .post(
            &format!("/approvals/{}/approve", on_pg.id),
            &[("comment", "ok")],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        r.text.contains("This needs the approver role or higher on pg; you are signed in as dana with the operator role on pg."),
        "{}",
        r.text
    );
    let (outcome, params, error) = last_op(&app, "auth.denied").await;
    assert_eq!(outcome, "denied");
    assert!(
        params.contains(&format!("/approvals/{}/approve", on_pg.id)),
        "{params}"
    );
    assert_eq!(error.as_deref(), Some("role too low on pg"));
    let (actor, role, target): (String, String, String) = sqlx::query_as(
        "SELECT actor_name, actor_role, target FROM operations WHERE kind = 'auth.denied' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        (actor.as_str(), role.as_str(), target.as_str()),
        ("dana", "operator", "pg")
    );
    assert_eq!(crate::helpers::state_of(&app, on_pg.id).await, "pending");

    // The approval rules check the target too, whoever calls them: dana's global
    // role is approver, yet not on pg.
    let dana_user = dbops::auth::CurrentUser {
        id: user_id(&app, "dana").await,
        username: "dana".into(),
        role: Role::Approver,
        csrf_token: String::new(),
    };
    let err = approvals::decide(&state, &ctx, &dana_user, on_pg.id, Decision::Approve, "ok")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("Only approvers on pg can decide this request; you are an operator there."),
        "{err}"
    );
    let refused: (String, Option<String>) = sqlx::query_as(
        "SELECT outcome, error FROM operations WHERE kind = 'approval.approved' AND approval_id = $1",
    )
    .bind(on_pg.id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(refused.0, "denied");

    // On pg2 dana is an approver (the global role): the approval goes through.
    let r = dana
        .post(
            &format!("/approvals/{}/approve", on_pg2.id),
            &[("comment", "ok")],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    assert_eq!(crate::helpers::state_of(&app, on_pg2.id).await, "approved");

    // And never their own request, on any target.
    let own = approvals::request(
        &state,
        &ctx,
        &dana_user,
        "pg2",
        "pg.backend.cancel",
        &form,
        "mine",
    )
    .await
    .unwrap();
    let err = approvals::decide(&state, &ctx, &dana_user, own.id, Decision::Approve, "")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("your own request"), "{err}");
    sleeping.stop().await;
}

#[tokio::test]
async fn an_approvers_list_and_count_show_only_the_targets_they_may_see() {
    let app = spawn_app().await;
    let requester = app.current_user("requester", Role::Operator).await;
    // Two pending requests, one per target, rows written as the approvals module
    // writes them (the list only reads them).
    for t in ["pg", "cache"] {
        sqlx::query(
            "INSERT INTO approval_requests (kind, target, params, params_hash, summary, reason, requested_by,
                    requested_by_name, state, expires_at)
             VALUES ('pg.backend.cancel', $1, '{}', '\\x00', $2, 'test', $3, 'requester', 'pending',
                     now() + interval '1 hour')",
        )
        .bind(t)
        .bind(format!("request on {t}"))
        .bind(requester.id)
        .execute(&app.db)
        .await
        .unwrap();
    }
    let pw = app.create_user("gus", Role::Approver).await;
    let mut admin = app.logged_in(Role::Admin).await;
    grant(&mut admin, &app.db, "gus", "target:pg", Role::Viewer).await;
    let mut gus = signed_in(&app, "gus", &pw).await;
    let list = gus.get("/approvals").await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(list.text.contains("request on cache"), "{}", list.text);
    assert!(
        !list.text.contains("request on pg"),
        "a viewer on pg does not see its requests"
    );
    // The count of requests waiting for gus counts the cache's only, on every page
    // (also on a page of pg, where gus is a viewer).
    let waiting = r#"<span class="count" title="requests waiting for you">1</span>"#;
    assert!(list.text.contains(waiting), "{}", list.text);
    let pg_page = gus.get("/targets/pg/backups").await;
    assert_eq!(pg_page.status, StatusCode::OK);
    assert!(pg_page.text.contains(waiting), "{}", pg_page.text);
}

#[tokio::test]
async fn an_admin_resets_a_users_second_factor_with_the_csrf_token_and_it_is_logged() {
    let app = spawn_app().await;
    let pw = app.create_user("frank", Role::Viewer).await;
    let frank = user_id(&app, "frank").await;
    let secret = totp::new_secret();
    let step = totp::step_of(chrono::Utc::now().timestamp() as u64);
    totp::enrol(&app.db, frank, &secret, step).await.unwrap();
    let mut admin = app.logged_in(Role::Admin).await;
    let page = admin.get(&format!("/admin/users/{frank}")).await;
    assert!(page.text.contains("Enrolled since"), "{}", page.text);
    // With a second factor, the password alone does not sign frank in.
    let mut b = app.browser();
    let r = b.login("frank", &pw).await;
    assert_eq!(r.location(), Some("/login/two-factor"));

    let r = admin
        .post_with_token(&format!("/admin/users/{frank}/two-factor/reset"), &[], None)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(totp::enrolment(&app.db, frank).await.unwrap().is_some());

    let r = admin
        .post(&format!("/admin/users/{frank}/two-factor/reset"), &[])
        .await;
    assert_eq!(r.location(), Some(format!("/admin/users/{frank}").as_str()));
    let page = admin.get(&format!("/admin/users/{frank}")).await;
    assert!(
        page.text.contains("Two-factor sign-in of frank is reset"),
        "{}",
        page.text
    );
    assert!(page.text.contains("Not enrolled."));
    assert!(totp::enrolment(&app.db, frank).await.unwrap().is_none());
    let (outcome, params, _) = last_op(&app, "user.two_factor.reset").await;
    assert_eq!(outcome, "succeeded");
    assert!(params.contains(r#""username": "frank""#), "{params}");

    // Nothing left to reset: said so and logged.
    admin
        .post(&format!("/admin/users/{frank}/two-factor/reset"), &[])
        .await;
    let page = admin.get(&format!("/admin/users/{frank}")).await;
    assert!(page.text.contains("frank has no second factor to reset."));
    assert_eq!(last_op(&app, "user.two_factor.reset").await.0, "failed");

    // The password alone signs frank in now.
    let mut b = app.browser();
    let r = b.login("frank", &pw).await;
    assert_eq!(r.location(), Some("/"));
}
