//! Logging in: password check, lockout after repeated failures, and the
//! operations-log rows for every attempt.

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;

use super::{password, totp, users};
use crate::{
    audit::{self, Actor, AuditCtx, Entry},
    config::LockoutSettings,
};

/// How a login attempt ended.
#[derive(Debug)]
pub enum LoginResult {
    Ok(users::User),
    /// Wrong username or password (the page does not say which).
    Wrong,
    Locked(DateTime<Utc>),
    Disabled,
    /// The password was right, but an admin limited password sign-in to admins
    /// (everyone else signs in through a provider).
    PasswordSignInOff,
    /// The password was right; the account has a second factor to ask for
    /// ([`second_factor`]). Not signed in yet; failures not cleared yet.
    SecondFactor(users::User),
    /// Signed in, but `[sign_in] require_two_factor` asks this admin or approver
    /// to enrol a second factor before anything else.
    MustEnrol(users::User),
}

/// Checks a username and password; counts failures and locks the account after
/// `max_failures`. Every attempt, failure and lockout is written to the log.
///
/// A name without an account gets the same answers: its password is checked
/// against a dummy hash (the same argon2 work), its failures are counted
/// ([`users::record_unknown_failure`]) and it locks after as many, so neither the
/// answer, nor its timing, nor the lockout tells which usernames exist. A
/// disabled account counts failures too, even for its right password.
pub async fn attempt(
    db: &PgPool,
    lockout: &LockoutSettings,
    require_two_factor: bool,
    ctx: &AuditCtx,
    username: &str,
    password_text: &str,
) -> anyhow::Result<LoginResult> {
    let username = username.trim();
    let user = users::find_by_username(db, username).await?;
    let hash = user
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(|| password::dummy_hash().to_string());
    let pw = password_text.to_string();
    // argon2 is deliberately slow: keep it off the async workers.
    let matches = tokio::task::spawn_blocking(move || password::verify(&pw, &hash)).await?;

    let params = json!({ "username": username });
    let Some(user) = user else {
        return unknown_name(db, lockout, ctx, username).await;
    };
    let ctx = AuditCtx {
        actor: Actor {
            id: Some(user.id),
            name: Some(user.username.clone()),
            role: Some(user.role()),
        },
        meta: ctx.meta.clone(),
    };
    if let Some(until) = user.locked_until.filter(|t| *t > Utc::now()) {
        audit::record(
            db,
            &ctx,
            Entry::new("auth.login.failed")
                .params(params)
                .failed("account locked"),
        )
        .await?;
        return Ok(LoginResult::Locked(until));
    }
    if user.disabled || !matches {
        let (failures, locked) =
            users::record_failed_login(db, user.id, lockout.max_failures, lockout.lock_for).await?;
        audit::record(
            db,
            &ctx,
            Entry::new("auth.login.failed")
                .params(json!({ "username": username, "failures": failures }))
                .failed(if user.disabled {
                    "account disabled"
                } else {
                    "wrong password"
                }),
        )
        .await?;
        if let Some(until) = locked.filter(|t| *t > Utc::now()) {
            if failures as u32 == lockout.max_failures {
                audit::record(
                    db,
                    &ctx,
                    Entry::new("auth.lockout")
                        .params(json!({ "username": username, "failures": failures, "locked_until": until.to_rfc3339() })),
                )
                .await?;
            }
            return Ok(LoginResult::Locked(until));
        }
        return Ok(if user.disabled {
            LoginResult::Disabled
        } else {
            LoginResult::Wrong
        });
    }
    if user.role() != super::Role::Admin
        && users::password_sign_in(db).await? == users::PasswordSignIn::AdminsOnly
    {
        audit::record(
            db,
            &ctx,
            Entry::new("auth.login.failed")
                .params(params)
                .denied("password sign-in is limited to admins"),
        )
        .await?;
        return Ok(LoginResult::PasswordSignInOff);
    }
    if totp::enrolment(db, user.id).await?.is_some() {
        audit::record(db, &ctx, Entry::new("auth.2fa.challenge").params(params)).await?;
        return Ok(LoginResult::SecondFactor(user));
    }
    users::record_login(db, user.id).await?;
    audit::record(db, &ctx, Entry::new("auth.login").params(params)).await?;
    if require_two_factor && user.role() >= super::Role::Approver {
        return Ok(LoginResult::MustEnrol(user));
    }
    Ok(LoginResult::Ok(user))
}

/// The second step of a sign-in with a second factor: a code from the
/// authenticator app (each works once) or an unused recovery code (then spent).
/// A wrong one counts as a failed sign-in towards the lockout, like a wrong
/// password; every outcome is logged.
pub async fn second_factor(
    db: &PgPool,
    lockout: &LockoutSettings,
    ctx: &AuditCtx,
    user_id: i64,
    typed: &str,
) -> anyhow::Result<LoginResult> {
    let Some(user) = users::find(db, user_id).await? else {
        return Ok(LoginResult::Wrong);
    };
    let ctx = AuditCtx {
        actor: Actor {
            id: Some(user.id),
            name: Some(user.username.clone()),
            role: Some(user.role()),
        },
        meta: ctx.meta.clone(),
    };
    let params = json!({ "username": user.username });
    if let Some(until) = user.locked_until.filter(|t| *t > Utc::now()) {
        audit::record(
            db,
            &ctx,
            Entry::new("auth.2fa.failed")
                .params(params)
                .failed("account locked"),
        )
        .await?;
        return Ok(LoginResult::Locked(until));
    }
    if user.disabled {
        audit::record(
            db,
            &ctx,
            Entry::new("auth.2fa.failed")
                .params(params)
                .failed("account disabled"),
        )
        .await?;
        return Ok(LoginResult::Disabled);
    }
    let Some(enrolment) = totp::enrolment(db, user.id).await? else {
        return Ok(LoginResult::Wrong);
    };
    let now = Utc::now().timestamp().max(0) as u64;
    let mut method = None;
    if let Some(step) = totp::check(&enrolment.secret, typed, now, enrolment.last_used_step)
        && totp::use_step(db, user.id, step).await?
    {
        method = Some("totp");
    }
    if method.is_none() {
        let code = totp::normalize_recovery_code(typed);
        if code.len() == 11 && code.as_bytes()[5] == b'-' {
            let unused = totp::unused_recovery_codes(db, user.id).await?;
            let found = tokio::task::spawn_blocking(move || {
                unused
                    .into_iter()
                    .find(|(_, hash)| password::verify(&code, hash))
                    .map(|(id, _)| id)
            })
            .await?;
            if let Some(id) = found
                && totp::use_recovery_code(db, id).await?
            {
                let left = totp::unused_recovery_codes(db, user.id).await?.len();
                audit::record(
                    db,
                    &ctx,
                    Entry::new("auth.2fa.recovery_code_used")
                        .params(json!({ "username": user.username, "codes_left": left })),
                )
                .await?;
                method = Some("recovery_code");
            }
        }
    }
    let Some(method) = method else {
        let (failures, locked) =
            users::record_failed_login(db, user.id, lockout.max_failures, lockout.lock_for).await?;
        audit::record(
            db,
            &ctx,
            Entry::new("auth.2fa.failed")
                .params(json!({ "username": user.username, "failures": failures }))
                .failed("wrong or already used code"),
        )
        .await?;
        if let Some(until) = locked.filter(|t| *t > Utc::now()) {
            if failures as u32 == lockout.max_failures {
                audit::record(
                    db,
                    &ctx,
                    Entry::new("auth.lockout").params(json!({
                        "username": user.username, "failures": failures,
                        "locked_until": until.to_rfc3339(), "second_factor": true,
                    })),
                )
                .await?;
            }
            return Ok(LoginResult::Locked(until));
        }
        return Ok(LoginResult::Wrong);
    };
    users::record_login(db, user.id).await?;
    audit::record(
        db,
        &ctx,
        Entry::new("auth.login")
            .params(json!({ "username": user.username, "second_factor": method })),
    )
    .await?;
    Ok(LoginResult::Ok(user))
}

/// A failed login for a name with no account: counted and locked like an account.
async fn unknown_name(
    db: &PgPool,
    lockout: &LockoutSettings,
    ctx: &AuditCtx,
    username: &str,
) -> anyhow::Result<LoginResult> {
    if let Some(until) = users::unknown_name_lock(db, username).await? {
        audit::record(
            db,
            ctx,
            Entry::new("auth.login.failed")
                .params(json!({ "username": username }))
                .failed("unknown username (locked)"),
        )
        .await?;
        return Ok(LoginResult::Locked(until));
    }
    let (failures, locked) =
        users::record_unknown_failure(db, username, lockout.max_failures, lockout.lock_for).await?;
    // Off the answer's path, so that its cost never tells the two kinds of name apart.
    let pool = db.clone();
    tokio::spawn(async move {
        if let Err(e) = users::prune_unknown_failures(&pool).await {
            tracing::warn!(error = %e, "could not prune failed logins of unknown names");
        }
    });
    audit::record(
        db,
        ctx,
        Entry::new("auth.login.failed")
            .params(json!({ "username": username, "failures": failures }))
            .failed("unknown username"),
    )
    .await?;
    if let Some(until) = locked.filter(|t| *t > Utc::now()) {
        if failures as u32 == lockout.max_failures {
            audit::record(
                db,
                ctx,
                Entry::new("auth.lockout").params(json!({
                    "username": username, "failures": failures,
                    "locked_until": until.to_rfc3339(), "account": false,
                })),
            )
            .await?;
        }
        return Ok(LoginResult::Locked(until));
    }
    Ok(LoginResult::Wrong)
}
