//! Admins manage users in the UI; every change is logged.

use dbops::auth::Role;
use reqwest::StatusCode;

use crate::helpers::spawn_app;

async fn user_id(app: &crate::helpers::TestApp, name: &str) -> i64 {
    sqlx::query_scalar("SELECT id FROM users WHERE username = $1")
        .bind(name)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_admin_creates_a_user_who_can_then_log_in_with_the_shown_password() {
    let app = spawn_app().await;
    let mut admin = app.logged_in(Role::Admin).await;
    admin.get("/admin/users").await;
    let r = admin
        .post(
            "/admin/users",
            &[
                ("username", "newbie"),
                ("role", "operator"),
                ("password", ""),
            ],
        )
        .await;
    assert_eq!(r.location(), Some("/admin/users"));
    let page = admin.get("/admin/users").await;
    assert!(
        page.text
            .contains("User newbie created with the operator role")
    );
    let pw = page
        .text
        .split("shown only now: ")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .trim()
        .to_string();
    assert!(
        !admin.get("/admin/users").await.text.contains(&pw),
        "the password is shown once"
    );
    let mut b = app.browser();
    assert_eq!(b.login("newbie", &pw).await.status, StatusCode::SEE_OTHER);
    assert_eq!(app.count_ops("user.create", Some("succeeded")).await, 1);
    let params: serde_json::Value =
        sqlx::query_scalar("SELECT params FROM operations WHERE kind = 'user.create'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(!params.to_string().contains(&pw), "no password in the log");
}

#[tokio::test]
async fn bad_user_input_gets_a_message_and_a_failed_operation() {
    let app = spawn_app().await;
    let mut admin = app.logged_in(Role::Admin).await;
    admin.get("/admin/users").await;
    for (form, msg) in [
        (
            vec![("username", "<b>x</b>"), ("role", "viewer")],
            "may contain only",
        ),
        (
            vec![("username", "ok"), ("role", "superuser")],
            "Choose a role",
        ),
        (
            vec![
                ("username", "ok"),
                ("role", "viewer"),
                ("password", "short"),
            ],
            "at least 12",
        ),
    ] {
        admin.post("/admin/users", &form).await;
        let page = admin.get("/admin/users").await;
        assert!(page.text.contains(msg), "expected “{msg}”");
        assert!(!page.text.contains("<b>x</b>"));
    }
    admin
        .post("/admin/users", &[("username", "twin"), ("role", "viewer")])
        .await;
    admin
        .post("/admin/users", &[("username", "TWIN"), ("role", "viewer")])
        .await;
    assert!(
        admin
            .get("/admin/users")
            .await
            .text
            .contains("already exists")
    );
    assert_eq!(app.count_ops("user.create", Some("failed")).await, 4);
}

#[tokio::test]
async fn roles_change_users_are_disabled_and_the_last_admin_is_protected() {
    let app = spawn_app().await;
    let mut admin = app.logged_in(Role::Admin).await;
    let me: i64 = sqlx::query_scalar("SELECT id FROM users WHERE role = 'admin'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let pw = app.create_user("worker", Role::Viewer).await;
    let worker = user_id(&app, "worker").await;
    admin.get("/admin/users").await;

    admin
        .post(
            &format!("/admin/users/{worker}/role"),
            &[("role", "approver")],
        )
        .await;
    let role: String = sqlx::query_scalar("SELECT role FROM users WHERE id = $1")
        .bind(worker)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(role, "approver");

    let mut w = app.browser();
    w.login("worker", &pw).await;
    assert_eq!(w.get("/").await.status, StatusCode::OK);
    admin
        .post(&format!("/admin/users/{worker}/disable"), &[])
        .await;
    assert_eq!(
        w.get("/").await.status,
        StatusCode::SEE_OTHER,
        "disabling signs the user out"
    );
    admin
        .post(&format!("/admin/users/{worker}/enable"), &[])
        .await;
    assert_eq!(w.login("worker", &pw).await.status, StatusCode::SEE_OTHER);

    admin
        .post(&format!("/admin/users/{me}/role"), &[("role", "viewer")])
        .await;
    assert!(admin.get("/admin/users").await.text.contains("last admin"));
    admin.post(&format!("/admin/users/{me}/disable"), &[]).await;
    assert!(
        admin
            .get("/admin/users")
            .await
            .text
            .contains("cannot disable your own account")
    );
    let role: String = sqlx::query_scalar("SELECT role FROM users WHERE id = $1")
        .bind(me)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(role, "admin");

    for kind in ["user.role.change", "user.disable", "user.enable"] {
        assert!(
            app.count_ops(kind, Some("succeeded")).await >= 1,
            "{kind} logged"
        );
    }
    assert_eq!(app.count_ops("user.role.change", Some("failed")).await, 1);
}
