//! Single sign-on with OpenID Connect: the `[[oidc]]` providers, the
//! authorization-code flow with PKCE, `state` and `nonce`, the ID token's checks,
//! and turning a verified identity into a dbops user whose role comes from a claim.
//!
//! - Discovery documents and key sets are fetched on first use and kept for an
//!   hour; an ID token signed with a key id that the cached set does not have
//!   fetches them again once (the provider rotated its keys).
//! - [`Providers::begin`] makes the provider's URL and the [`Pending`] sign-in that
//!   the session keeps; [`Providers::finish`] takes it back (once: a second use of the
//!   same callback finds nothing), exchanges the code with the PKCE verifier and
//!   checks the ID token (signature with the provider's keys, `iss`, `aud`, `exp`,
//!   `nonce`, the `none` algorithm refused) with the `openidconnect` crate.
//! - [`sign_in`] maps the role claim to a role, creates the user on first sign-in,
//!   updates the role at every sign-in, refuses disabled users, and logs all of it.
//!
//! Over 600 lines: the OpenID Connect flow (configuration, discovery, PKCE, state
//! and nonce, token checks, claim-to-role mapping) is security code reviewed as one
//! unit; about 85 lines are tests.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use base64::Engine as _;
use openidconnect::{
    AccessTokenHash, AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce,
    OAuth2TokenResponse, PkceCodeChallenge, PkceCodeVerifier,
    ProviderMetadataWithLogout as CoreProviderMetadata, RedirectUrl, Scope, TokenResponse,
    core::{CoreAuthenticationFlow, CoreClient},
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use super::{
    Role,
    roles::{self, Selector},
    users,
};
use crate::audit::{self, Actor, AuditCtx, Entry};

/// How long a discovery document and key set are used before they are fetched again.
const METADATA_TTL: Duration = Duration::from_secs(3600);
/// How long a sign-in at the provider may take.
const PENDING_TTL_SECONDS: i64 = 600;

// ---------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------

/// One `[[oidc]]` section as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOidc {
    name: String,
    display_name: Option<String>,
    issuer: String,
    client_id: String,
    /// Refused: the secret never goes in the file itself.
    client_secret: Option<toml::Value>,
    client_secret_env: Option<String>,
    client_secret_file: Option<PathBuf>,
    #[serde(default)]
    scopes: Vec<String>,
    username_claim: Option<String>,
    role_claim: Option<String>,
    /// Claim value → role.
    #[serde(default)]
    roles: BTreeMap<String, String>,
    default_role: Option<String>,
    /// `[[oidc.target_roles]]`: claim value → role on one target or policy.
    #[serde(default)]
    target_roles: Vec<RawTargetRole>,
}

/// One `[[oidc.target_roles]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTargetRole {
    claim_value: String,
    target: Option<String>,
    policy: Option<String>,
    role: String,
}

/// A claim value that gives a role on one target, or on every target of a policy
/// (`[[oidc.target_roles]]`), over the global role the user has.
#[derive(Debug, Clone)]
pub struct TargetRoleMapping {
    pub claim_value: String,
    pub selector: Selector,
    pub role: Role,
}

/// One validated `[[oidc]]` provider.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    /// Short name, used in URLs (`/login/oidc/<name>`) and the operations log.
    pub name: String,
    /// What the "Sign in with …" button says.
    pub display_name: String,
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    /// Always starts with `openid`.
    pub scopes: Vec<String>,
    /// The claim that becomes the dbops username (default `preferred_username`).
    pub username_claim: String,
    /// The claim holding groups or roles (a dotted path such as
    /// `realm_access.roles` reaches into objects).
    pub role_claim: String,
    /// Claim values and the role each grants; the highest granted role wins.
    pub roles: Vec<(String, Role)>,
    /// The role of someone no value maps; `None`: they are refused.
    pub default_role: Option<Role>,
    /// Per-target roles from claim values; for one target or policy the highest
    /// mapped role wins. Set again at every sign-in.
    pub target_roles: Vec<TargetRoleMapping>,
}

impl RawOidc {
    /// Validates one section; `key` is where it is (`oidc[0]`).
    pub fn validate(
        &self,
        key: &str,
        base_dir: &Path,
        env: &impl Fn(&str) -> Option<String>,
        read_file: impl Fn(&Path, &str) -> Result<String, (String, String)>,
    ) -> Result<OidcConfig, (String, String)> {
        let bad = |k: &str, m: String| (format!("{key}.{k}"), m);
        let name = self.name.trim();
        if name.is_empty()
            || name.len() > 32
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad(
                "name",
                "1-32 letters, digits, - or _ (it is part of the sign-in URL)".into(),
            ));
        }
        match url::Url::parse(&self.issuer) {
            Ok(u) if u.scheme() == "https" => {}
            Ok(u)
                if u.scheme() == "http"
                    && u.host_str()
                        .is_some_and(|h| h == "localhost" || h == "127.0.0.1" || h == "[::1]") => {}
            Ok(_) => {
                return Err(bad(
                    "issuer",
                    "must be an https URL (plain http only for a provider on this machine)".into(),
                ));
            }
            Err(e) => return Err(bad("issuer", format!("not a valid URL ({e})"))),
        }
        if self.client_id.trim().is_empty() {
            return Err(bad("client_id", "is empty".into()));
        }
        if self.client_secret.is_some() {
            return Err(bad(
                "client_secret",
                "client secrets never go in the config file: use client_secret_env or client_secret_file".into(),
            ));
        }
        let client_secret = match (&self.client_secret_env, &self.client_secret_file) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "client_secret_env",
                    "set client_secret_env or client_secret_file, not both".into(),
                ));
            }
            (Some(var), None) => Some(SecretString::from(
                env(var)
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| {
                        bad(
                            "client_secret_env",
                            format!("environment variable {var} is not set"),
                        )
                    })?,
            )),
            (None, Some(f)) => Some(SecretString::from(read_file(
                &base_dir.join(f),
                &format!("{key}.client_secret_file"),
            )?)),
            (None, None) => None,
        };
        let mut scopes: Vec<String> = vec!["openid".into()];
        for s in &self.scopes {
            let s = s.trim();
            if s.is_empty() || s.contains(char::is_whitespace) {
                return Err(bad("scopes", format!("`{s}` is not a scope")));
            }
            if !scopes.iter().any(|x| x == s) {
                scopes.push(s.to_string());
            }
        }
        if self.scopes.is_empty() {
            scopes.extend(["profile".to_string(), "email".to_string()]);
        }
        let mut roles = vec![];
        for (value, role) in &self.roles {
            let r = Role::parse(role).ok_or_else(|| {
                bad(
                    &format!("roles.{value}"),
                    format!("`{role}` is not a role (viewer, operator, approver, admin)"),
                )
            })?;
            roles.push((value.clone(), r));
        }
        let default_role = match &self.default_role {
            None => None,
            Some(r) => Some(Role::parse(r).ok_or_else(|| {
                bad(
                    "default_role",
                    format!("`{r}` is not a role (viewer, operator, approver, admin)"),
                )
            })?),
        };
        let mut target_roles = vec![];
        for (i, t) in self.target_roles.iter().enumerate() {
            let k = format!("target_roles[{i}]");
            if t.claim_value.trim().is_empty() {
                return Err(bad(&k, "claim_value is empty".into()));
            }
            let selector = match (&t.target, &t.policy) {
                (Some(name), None) if !name.trim().is_empty() => {
                    Selector::Target(name.trim().to_string())
                }
                (None, Some(p)) => roles::Selector::policy_from_str(p)
                    .map(Selector::Policy)
                    .ok_or_else(|| {
                        bad(
                            &k,
                            format!("policy `{p}` is not a policy (production, staging, dev)"),
                        )
                    })?,
                _ => {
                    return Err(bad(
                        &k,
                        "set either target (a target's name) or policy (production, staging, dev)"
                            .into(),
                    ));
                }
            };
            let role = Role::parse(&t.role)
                .filter(|r| roles::GRANTABLE.contains(r))
                .ok_or_else(|| {
                    bad(
                        &k,
                        format!(
                            "`{}` is not a per-target role (viewer, operator, approver; admin is global only)",
                            t.role
                        ),
                    )
                })?;
            target_roles.push(TargetRoleMapping {
                claim_value: t.claim_value.clone(),
                selector,
                role,
            });
        }
        if roles.is_empty() && default_role.is_none() && target_roles.is_empty() {
            return Err(bad(
                "roles",
                "map at least one claim value to a role, or set default_role".into(),
            ));
        }
        Ok(OidcConfig {
            name: name.to_string(),
            display_name: self
                .display_name
                .clone()
                .filter(|d| !d.trim().is_empty())
                .unwrap_or_else(|| name.to_string()),
            // Verbatim: it must equal the discovery document's issuer (Authentik's ends in /).
            issuer: self.issuer.trim().to_string(),
            client_id: self.client_id.trim().to_string(),
            client_secret,
            scopes,
            username_claim: self
                .username_claim
                .clone()
                .unwrap_or_else(|| "preferred_username".into()),
            role_claim: self.role_claim.clone().unwrap_or_else(|| "groups".into()),
            roles,
            default_role,
            target_roles,
        })
    }
}

// ---------------------------------------------------------------------------------
// The flow
// ---------------------------------------------------------------------------------

/// Why a sign-in through a provider was refused. The message is shown on the
/// login page and written to the operations log; it never holds a token.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("There is no sign-in provider called {0}.")]
    UnknownProvider(String),
    #[error(
        "The identity provider could not be reached or sent a discovery document dbops cannot use: {0}"
    )]
    Discovery(String),
    #[error(
        "This sign-in was not started in this browser, has expired, or was already used (state mismatch)."
    )]
    State,
    #[error("The identity provider refused the sign-in: {0}")]
    ProviderError(String),
    #[error("The identity provider did not accept the authorization code: {0}")]
    Exchange(String),
    #[error("The identity provider sent no ID token.")]
    NoIdToken,
    #[error("The ID token was refused: {0}")]
    IdToken(String),
    #[error("The ID token has no usable `{0}` claim for the username.")]
    NoUsername(String),
}

/// A sign-in at a provider in progress, kept in the session until the callback.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    pub provider: String,
    state: String,
    nonce: String,
    verifier: String,
    pub next: String,
    started: i64,
}

/// Who the provider says signed in (from a verified ID token).
#[derive(Debug, Clone)]
pub struct Identity {
    pub provider: String,
    pub subject: String,
    pub username: String,
    /// The role claim's values.
    pub role_values: Vec<String>,
}

struct Cached {
    metadata: CoreProviderMetadata,
    fetched: Instant,
}

struct Provider {
    config: OidcConfig,
    cache: tokio::sync::Mutex<Option<Cached>>,
}

/// The configured providers and their cached discovery documents.
pub struct Providers {
    list: Vec<Provider>,
    http: reqwest::Client,
}

impl Providers {
    pub fn new(configs: &[OidcConfig]) -> anyhow::Result<Providers> {
        let http = reqwest::Client::builder()
            // Following redirects would let a provider send dbops elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Providers {
            list: configs
                .iter()
                .map(|c| Provider {
                    config: c.clone(),
                    cache: tokio::sync::Mutex::new(None),
                })
                .collect(),
            http,
        })
    }

    /// Name and display name of each provider, in configuration order.
    pub fn buttons(&self) -> Vec<(String, String)> {
        self.list
            .iter()
            .map(|p| (p.config.name.clone(), p.config.display_name.clone()))
            .collect()
    }

    pub fn config(&self, name: &str) -> Option<&OidcConfig> {
        self.provider(name).ok().map(|p| &p.config)
    }

    fn provider(&self, name: &str) -> Result<&Provider, OidcError> {
        self.list
            .iter()
            .find(|p| p.config.name == name)
            .ok_or_else(|| OidcError::UnknownProvider(name.chars().take(40).collect()))
    }

    /// The provider's metadata (with its key set), from the cache unless it is
    /// older than [`METADATA_TTL`] or `refresh` asks for a new one.
    #[tracing::instrument(skip(self, p), fields(provider = %p.config.name))]
    async fn metadata(
        &self,
        p: &Provider,
        refresh: bool,
    ) -> Result<CoreProviderMetadata, OidcError> {
        let mut cache = p.cache.lock().await;
        if let Some(c) = cache.as_ref()
            && !refresh
            && c.fetched.elapsed() < METADATA_TTL
        {
            return Ok(c.metadata.clone());
        }
        let issuer = IssuerUrl::new(p.config.issuer.clone())
            .map_err(|e| OidcError::Discovery(e.to_string()))?;
        let metadata = CoreProviderMetadata::discover_async(issuer, &self.http)
            .await
            .map_err(|e| OidcError::Discovery(error_chain(&e)))?;
        *cache = Some(Cached {
            metadata: metadata.clone(),
            fetched: Instant::now(),
        });
        Ok(metadata)
    }

    /// Where to send the browser at sign-out to end the session at the provider too
    /// (OpenID Connect RP-initiated logout), when the provider supports it. The
    /// client id identifies dbops; the provider sends the browser back to
    /// `post_logout_url` when that is registered with it.
    pub async fn end_session_url(&self, name: &str, post_logout_url: &str) -> Option<String> {
        let p = self.provider(name).ok()?;
        let metadata = match self.metadata(p, false).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(provider = %name, error = %e, "no sign-out at the provider");
                return None;
            }
        };
        let endpoint = metadata
            .additional_metadata()
            .end_session_endpoint
            .clone()?;
        let mut url = endpoint.url().clone();
        url.query_pairs_mut()
            .append_pair("client_id", &p.config.client_id)
            .append_pair("post_logout_redirect_uri", post_logout_url);
        Some(url.to_string())
    }

    /// Starts a sign-in: the URL to send the browser to and what the session keeps.
    pub async fn begin(
        &self,
        name: &str,
        redirect_url: &str,
        next: String,
    ) -> Result<(String, Pending), OidcError> {
        let p = self.provider(name)?;
        let metadata = self.metadata(p, false).await?;
        let client = CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(p.config.client_id.clone()),
            p.config
                .client_secret
                .as_ref()
                .map(|s| ClientSecret::new(s.expose_secret().to_string())),
        )
        .set_redirect_uri(
            RedirectUrl::new(redirect_url.to_string())
                .map_err(|e| OidcError::Discovery(e.to_string()))?,
        );
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = client.authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        );
        for s in p.config.scopes.iter().filter(|s| *s != "openid") {
            request = request.add_scope(Scope::new(s.clone()));
        }
        let (url, state, nonce) = request.set_pkce_challenge(challenge).url();
        Ok((
            url.to_string(),
            Pending {
                provider: p.config.name.clone(),
                state: state.secret().clone(),
                nonce: nonce.secret().clone(),
                verifier: verifier.secret().clone(),
                next,
                started: chrono::Utc::now().timestamp(),
            },
        ))
    }

    /// Finishes a sign-in at the callback: `pending` is what the session kept (the
    /// caller has already removed it), `state` and `code` what the provider sent.
    #[tracing::instrument(skip_all, fields(provider = %name))]
    pub async fn finish(
        &self,
        name: &str,
        redirect_url: &str,
        pending: Option<Pending>,
        state: Option<&str>,
        code: Option<&str>,
    ) -> Result<Identity, OidcError> {
        let p = self.provider(name)?;
        let pending = pending.ok_or(OidcError::State)?;
        let same = |a: &str, b: &str| Sha256::digest(a.as_bytes()) == Sha256::digest(b.as_bytes());
        if pending.provider != p.config.name
            || !state.is_some_and(|s| same(s, &pending.state))
            || chrono::Utc::now().timestamp() - pending.started > PENDING_TTL_SECONDS
        {
            return Err(OidcError::State);
        }
        let code = code
            .filter(|c| !c.is_empty())
            .ok_or_else(|| OidcError::Exchange("the callback carried no code".into()))?;
        let secret = p
            .config
            .client_secret
            .as_ref()
            .map(|s| ClientSecret::new(s.expose_secret().to_string()));
        let redirect = RedirectUrl::new(redirect_url.to_string())
            .map_err(|e| OidcError::Discovery(e.to_string()))?;
        let metadata = self.metadata(p, false).await?;
        let algs = signing_algs(&metadata);
        let client = CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(p.config.client_id.clone()),
            secret.clone(),
        )
        .set_redirect_uri(redirect.clone());
        let token = client
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .map_err(|e| OidcError::Discovery(e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(pending.verifier.clone()))
            .request_async(&self.http)
            .await
            .map_err(|e| OidcError::Exchange(token_error(&e)))?;
        let id_token = token.id_token().ok_or(OidcError::NoIdToken)?;
        let nonce = Nonce::new(pending.nonce.clone());
        let verified = {
            let verifier = client.id_token_verifier().set_allowed_algs(algs.clone());
            id_token.claims(&verifier, &nonce).cloned()
        };
        let (claims, client) = match verified {
            Ok(c) => (c, client),
            Err(openidconnect::ClaimsVerificationError::SignatureVerification(
                openidconnect::SignatureVerificationError::NoMatchingKey,
            )) => {
                // A key id we have not seen: the provider rotated its keys.
                tracing::info!(provider = %p.config.name, "ID token signed with an unknown key; fetching the key set again");
                let metadata = self.metadata(p, true).await?;
                let algs = signing_algs(&metadata);
                let client = CoreClient::from_provider_metadata(
                    metadata,
                    ClientId::new(p.config.client_id.clone()),
                    secret,
                )
                .set_redirect_uri(redirect);
                let c = id_token
                    .claims(&client.id_token_verifier().set_allowed_algs(algs), &nonce)
                    .map_err(|e| OidcError::IdToken(error_chain(&e)))?
                    .clone();
                (c, client)
            }
            Err(e) => return Err(OidcError::IdToken(error_chain(&e))),
        };
        if let Some(expected) = claims.access_token_hash() {
            let verifier = client.id_token_verifier();
            let alg = id_token
                .signing_alg()
                .map_err(|e| OidcError::IdToken(e.to_string()))?;
            let key = id_token
                .signing_key(&verifier)
                .map_err(|e| OidcError::IdToken(e.to_string()))?;
            let actual = AccessTokenHash::from_token(token.access_token(), alg, key)
                .map_err(|e| OidcError::IdToken(e.to_string()))?;
            if actual != *expected {
                return Err(OidcError::IdToken(
                    "the access token does not match the ID token's at_hash".into(),
                ));
            }
        }
        // The payload whose signature was just checked, for claims the crate does
        // not model (groups, roles, nested role claims).
        let raw = id_token.to_string();
        let payload: Value = raw
            .split('.')
            .nth(1)
            .and_then(|p| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(p)
                    .ok()
            })
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| OidcError::IdToken("the payload is not JSON".into()))?;
        let username = claim(&payload, &p.config.username_claim)
            .and_then(|v| v.as_str().map(str::to_string))
            .and_then(|u| username_from_claim(&u))
            .ok_or_else(|| OidcError::NoUsername(p.config.username_claim.clone()))?;
        let role_values = match claim(&payload, &p.config.role_claim) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => vec![],
        };
        Ok(Identity {
            provider: p.config.name.clone(),
            subject: claims.subject().as_str().to_string(),
            username,
            role_values,
        })
    }
}

/// The signature algorithms an ID token may use: what the provider announces,
/// without `none` and without the shared-secret ones (RS256 if it announces none).
fn signing_algs(
    metadata: &CoreProviderMetadata,
) -> Vec<openidconnect::core::CoreJwsSigningAlgorithm> {
    use openidconnect::core::CoreJwsSigningAlgorithm as A;
    let algs: Vec<A> = metadata
        .id_token_signing_alg_values_supported()
        .iter()
        .filter(|a| !matches!(a, A::None | A::HmacSha256 | A::HmacSha384 | A::HmacSha512))
        .cloned()
        .collect();
    if algs.is_empty() {
        vec![A::RsaSsaPkcs1V15Sha256]
    } else {
        algs
    }
}

/// A claim by dotted path (`realm_access.roles`); a top-level name with dots
/// (`https://example.com/groups`) is tried first.
fn claim<'a>(payload: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(v) = payload.get(path) {
        return Some(v);
    }
    path.split('.').try_fold(payload, |v, k| v.get(k))
}

/// The username a claim value becomes: characters dbops usernames cannot hold are
/// replaced by `_`; at most 64 characters.
fn username_from_claim(s: &str) -> Option<String> {
    let u: String = s
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    users::Username::parse(&u)
        .ok()
        .map(|u| u.as_str().to_string())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s.chars().take(400).collect()
}

/// A token-endpoint error as a sentence: the provider's error code and
/// description, or the transport's problem.
fn token_error<RE: std::error::Error + 'static, T: openidconnect::ErrorResponse + 'static>(
    e: &openidconnect::RequestTokenError<RE, T>,
) -> String {
    match e {
        openidconnect::RequestTokenError::ServerResponse(r) => {
            serde_json::to_string(r).unwrap_or_else(|_| "an error".into())
        }
        other => error_chain(other),
    }
}

/// The role a provider's claim values map to, and which value granted it.
pub fn map_role(config: &OidcConfig, values: &[String]) -> Option<(Role, String)> {
    let granted = config
        .roles
        .iter()
        .filter(|(v, _)| values.iter().any(|x| x == v))
        .max_by_key(|(_, r)| *r);
    match (granted, config.default_role) {
        (Some((v, r)), _) => Some((
            *r,
            format!("{}: {} contains {v} → {r}", config.name, config.role_claim),
        )),
        (None, Some(r)) => Some((
            r,
            format!(
                "{}: no mapped {} value → default_role {r}",
                config.name, config.role_claim
            ),
        )),
        (None, None) => None,
    }
}

/// The per-target roles a provider's claim values map to
/// (`[[oidc.target_roles]]`): for each target or policy the highest mapped role,
/// and which value granted it.
pub fn map_target_roles(config: &OidcConfig, values: &[String]) -> Vec<(Selector, Role, String)> {
    let mut out: Vec<(Selector, Role, String)> = vec![];
    for m in &config.target_roles {
        if !values.contains(&m.claim_value) {
            continue;
        }
        let why = format!(
            "{}: {} contains {} → {} on {}",
            config.name, config.role_claim, m.claim_value, m.role, m.selector
        );
        match out.iter_mut().find(|(s, _, _)| *s == m.selector) {
            Some(e) if e.1 >= m.role => {}
            Some(e) => {
                e.1 = m.role;
                e.2 = why;
            }
            None => out.push((m.selector.clone(), m.role, why)),
        }
    }
    out
}

/// How a sign-in through a provider ended.
#[derive(Debug)]
pub enum SsoResult {
    Ok(users::User),
    /// Refused, with the sentence shown on the login page (already logged).
    Refused(String),
}

/// Signs in a verified identity: maps its role, creates the user on first
/// sign-in, updates its role, refuses a disabled user. Every outcome is logged.
pub async fn sign_in(
    db: &PgPool,
    config: &OidcConfig,
    ctx: &AuditCtx,
    id: &Identity,
) -> anyhow::Result<SsoResult> {
    let base = json!({
        "username": id.username, "method": "oidc", "provider": id.provider,
        "subject": id.subject, id_role_claim(config): id.role_values,
    });
    let existing = users::find_by_identity(db, &id.provider, &id.subject).await?;
    let actor = |u: &users::User| AuditCtx {
        actor: Actor {
            id: Some(u.id),
            name: Some(u.username.clone()),
            role: Some(u.role()),
        },
        meta: ctx.meta.clone(),
    };
    let base_ref = &base;
    let refuse = |ctx: AuditCtx, reason: String, shown: String| async move {
        audit::record(
            db,
            &ctx,
            Entry::new("auth.login.failed")
                .params(base_ref.clone())
                .failed(reason),
        )
        .await?;
        Ok::<_, anyhow::Error>(SsoResult::Refused(shown))
    };
    if let Some(u) = &existing
        && u.disabled
    {
        return refuse(
            actor(u),
            "account disabled".into(),
            "This account is disabled in dbops. Ask an admin.".into(),
        )
        .await;
    }
    let target_roles = map_target_roles(config, &id.role_values);
    // Someone whose values map only per-target roles is a viewer elsewhere.
    let global = map_role(config, &id.role_values).or_else(|| {
        (!target_roles.is_empty()).then(|| {
            (
                Role::Viewer,
                format!(
                    "{}: only per-target roles mapped → viewer elsewhere",
                    config.name
                ),
            )
        })
    });
    let Some((role, mapping)) = global else {
        let ctx = existing.as_ref().map(actor).unwrap_or_else(|| ctx.clone());
        return refuse(
            ctx,
            format!(
                "no role: none of the {} values is mapped in [[oidc]] {}",
                config.role_claim, config.name
            ),
            "Your account at the identity provider has no group or role that gives access to dbops. Ask an admin.".into(),
        )
        .await;
    };
    let mut tx = db.begin().await?;
    let user = match existing {
        Some(u) => {
            if u.role() != role || u.role_granted_by.as_deref() != Some(mapping.as_str()) {
                users::set_sso_role(&mut *tx, u.id, role, &mapping).await?;
                if u.role() != role {
                    audit::record(
                        &mut *tx,
                        &actor(&u),
                        Entry::new("auth.sso.role_changed").params(json!({
                            "username": u.username, "provider": id.provider,
                            "from": u.role().as_str(), "to": role.as_str(), "mapping": mapping,
                        })),
                    )
                    .await?;
                }
            }
            u.id
        }
        None => {
            if users::find_by_username(&mut *tx, &id.username)
                .await?
                .is_some()
            {
                tx.rollback().await?;
                return refuse(
                    ctx.clone(),
                    format!(
                        "a local account called {} exists and is not linked to this provider",
                        id.username
                    ),
                    format!(
                        "A dbops account called {} exists already and is not linked to this identity provider. Ask an admin.",
                        id.username
                    ),
                )
                .await;
            }
            let uid = users::create_sso(
                &mut *tx,
                &id.username,
                role,
                &id.provider,
                &id.subject,
                &mapping,
            )
            .await?;
            audit::record(
                &mut *tx,
                ctx,
                Entry::new("auth.sso.user_created").params(json!({
                    "username": id.username, "provider": id.provider, "subject": id.subject,
                    "role": role.as_str(), "mapping": mapping,
                })),
            )
            .await?;
            uid
        }
    };
    // The per-target roles the provider maps, set again at every sign-in.
    let changes = roles::replace_from_provider(&mut tx, user, &target_roles).await?;
    users::record_login(&mut *tx, user).await?;
    let user = users::find(&mut *tx, user)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the user just signed in is gone"))?;
    if !changes.is_empty() {
        audit::record(
            &mut *tx,
            &actor(&user),
            Entry::new("auth.sso.target_roles_changed").params(json!({
                "username": user.username, "provider": id.provider, "changes": changes,
            })),
        )
        .await?;
    }
    let mut params = base.clone();
    params["role"] = json!(role.as_str());
    params["mapping"] = json!(mapping);
    params["target_roles"] = json!(
        target_roles
            .iter()
            .map(|(s, r, why)| json!({ "on": s.to_string(), "role": r.as_str(), "mapping": why }))
            .collect::<Vec<_>>()
    );
    audit::record(
        &mut *tx,
        &actor(&user),
        Entry::new("auth.login").params(params),
    )
    .await?;
    tx.commit().await?;
    Ok(SsoResult::Ok(user))
}

fn id_role_claim(config: &OidcConfig) -> String {
    format!("claim:{}", config.role_claim)
}

/// Logs a refused sign-in through a provider (before any identity was known).
pub async fn log_refusal(
    db: &PgPool,
    ctx: &AuditCtx,
    provider: &str,
    error: &OidcError,
) -> anyhow::Result<()> {
    audit::record(
        db,
        ctx,
        Entry::new("auth.login.failed")
            .params(json!({ "method": "oidc", "provider": provider.chars().take(40).collect::<String>() }))
            .failed(error.to_string()),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OidcConfig {
        OidcConfig {
            name: "corp".into(),
            display_name: "Corp".into(),
            issuer: "https://id.example".into(),
            client_id: "dbops".into(),
            client_secret: None,
            scopes: vec!["openid".into()],
            username_claim: "preferred_username".into(),
            role_claim: "groups".into(),
            roles: vec![
                ("ops".into(), Role::Operator),
                ("admins".into(), Role::Admin),
            ],
            default_role: None,
            target_roles: vec![
                TargetRoleMapping {
                    claim_value: "stage-leads".into(),
                    selector: Selector::Target("stage".into()),
                    role: Role::Approver,
                },
                TargetRoleMapping {
                    claim_value: "ops".into(),
                    selector: Selector::Target("stage".into()),
                    role: Role::Operator,
                },
                TargetRoleMapping {
                    claim_value: "ops".into(),
                    selector: Selector::Policy(crate::config::Policy::Production),
                    role: Role::Viewer,
                },
            ],
        }
    }

    #[test]
    fn per_target_mappings_give_the_highest_role_per_target_and_say_why() {
        let c = cfg();
        let m = map_target_roles(&c, &["ops".into(), "stage-leads".into()]);
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m[0].0, Selector::Target("stage".into()));
        assert_eq!(m[0].1, Role::Approver);
        assert!(
            m[0].2.contains("stage-leads → approver on target stage"),
            "{}",
            m[0].2
        );
        assert_eq!(
            m[1],
            (
                Selector::Policy(crate::config::Policy::Production),
                Role::Viewer,
                "corp: groups contains ops → viewer on policy = production".to_string()
            )
        );
        assert!(map_target_roles(&c, &["x".into()]).is_empty());
    }

    #[test]
    fn the_highest_mapped_role_wins_and_unmapped_people_get_nothing() {
        let c = cfg();
        let (r, why) = map_role(&c, &["ops".into(), "admins".into(), "x".into()]).unwrap();
        assert_eq!(r, Role::Admin);
        assert!(why.contains("admins"), "{why}");
        assert_eq!(map_role(&c, &["x".into()]), None);
        let c = OidcConfig {
            default_role: Some(Role::Viewer),
            ..cfg()
        };
        assert_eq!(map_role(&c, &[]).unwrap().0, Role::Viewer);
    }

    #[test]
    fn nested_claims_and_odd_usernames() {
        let v = json!({"realm_access": {"roles": ["a"]}, "https://x/groups": ["b"]});
        assert_eq!(claim(&v, "realm_access.roles"), Some(&json!(["a"])));
        assert_eq!(claim(&v, "https://x/groups"), Some(&json!(["b"])));
        assert_eq!(username_from_claim("Jane Doe").as_deref(), Some("Jane_Doe"));
        assert_eq!(username_from_claim("  "), None);
    }
}
