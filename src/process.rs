//! The one way dbops starts another program: with a clean environment.
//!
//! dbops' own environment holds secrets: the variables named by a target's
//! `url_env` (URLs with passwords), `DATABASE_URL`, S3 keys, webhook URLs. A child
//! inheriting them would expose them to anyone who may read `/proc/PID/environ`
//! (the same user, root) and to whatever the child runs in turn. So every
//! `pg_dump`, `pg_restore`, `psql`, `redis-cli`, `tar`, and the throwaway servers'
//! `initdb`/`pg_ctl`/`redis-server` is built by [`tool_command`] (or
//! [`tool_command_sync`]): the environment is cleared and only [`ALLOWED`] is passed
//! on from dbops'. The caller then sets what the tool needs for its connection
//! explicitly: `PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSFILE` (a 0600
//! file with the password), `PGAPPNAME`, `PGCONNECT_TIMEOUT`, `PGSSLMODE` and the
//! `PGSSL*` files named in the target's URL for the PostgreSQL tools (see
//! `pg_tools::Tool`), `REDISCLI_AUTH` for `redis-cli`. Documented for
//! operators in docs/OPERATIONS.md, "Child processes".

use std::ffi::OsStr;

/// The variables passed on from dbops' environment to every program it runs, when
/// set: where programs are found (`PATH`), the home directory (`HOME`: libpq's
/// `~/.postgresql/root.crt`), locale (`LANG`, `LANGUAGE`, and every `LC_*`), time
/// zone (`TZ`), the temporary directory (`TMPDIR`), and where OpenSSL finds trusted
/// certificates (`SSL_CERT_FILE`, `SSL_CERT_DIR`: paths, needed by `redis-cli
/// --tls` and libpq where the system's CA store is not the default one). Nothing
/// else: no `PG*` variable of dbops' own (the tool gets the ones dbops sets for the
/// target), no `REDISCLI_AUTH`, no target URLs, no `DATABASE_URL`, no cloud keys.
pub const ALLOWED: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// Whether a variable of dbops' environment is passed on to the programs it runs.
pub fn is_allowed(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    ALLOWED.contains(&name) || (name.starts_with("LC_") && name.len() > 3)
}

/// The allowed part of dbops' environment, read once per command.
fn allowed_env() -> impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)> {
    std::env::vars_os().filter(|(k, _)| is_allowed(k))
}

/// A command for `program` whose environment holds only [`ALLOWED`] (from dbops'
/// environment); the caller adds the variables the tool needs.
pub fn tool_command(program: impl AsRef<OsStr>) -> tokio::process::Command {
    tokio::process::Command::from(tool_command_sync(program))
}

/// [`tool_command`] for the places that wait synchronously (a `Drop`, a version
/// probe).
pub fn tool_command_sync(program: impl AsRef<OsStr>) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    cmd.env_clear().envs(allowed_env());
    cmd
}

/// Makes the child receive SIGTERM when the dbops thread that started it ends
/// (dbops killed with SIGKILL included), for long-lived children that must not
/// outlive it: a `pg_receivewal` left running would keep its replication slot
/// busy, and the replica taking over could not stream. Start such children from
/// an async task (a runtime worker thread lives as long as the process).
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Also passes on these variables of dbops' environment, when set: for the few
/// programs that need more than [`ALLOWED`] and hold no secret of a target (the
/// HTTP proxy settings of `apt-get` installing the throwaway servers' packages).
pub fn inherit(cmd: &mut std::process::Command, names: &[&str]) {
    for name in names {
        if let Some(v) = std::env::var_os(name) {
            cmd.env(name, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Whether `code` builds a `std`/`tokio` `Command` (not, say, a Redis
    /// `CustomCommand`).
    fn builds_a_command(code: &str) -> bool {
        ["Command::new(", "Command::from("].iter().any(|pat| {
            code.match_indices(pat).any(|(i, _)| {
                !code[..i]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_')
            })
        })
    }

    #[test]
    fn only_the_allowlist_and_locale_pass() {
        for ok in ["PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR"] {
            assert!(is_allowed(OsStr::new(ok)), "{ok}");
        }
        for no in [
            "DATABASE_URL",
            "PGPASSWORD",
            "PGSERVICE",
            "REDISCLI_AUTH",
            "AWS_SECRET_ACCESS_KEY",
            "DBOPS_WEBHOOK_URL",
            "LC_",
            "path",
        ] {
            assert!(!is_allowed(OsStr::new(no)), "{no}");
        }
    }

    /// `env` run through the helper prints nothing outside the allowlist, whatever
    /// this test process's environment holds.
    #[test]
    fn a_child_sees_only_allowed_variables_and_the_ones_set_for_it() {
        let out = tool_command_sync("env")
            .env("PGAPPNAME", "dbops")
            .output()
            .expect("env runs");
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .collect();
        assert!(names.contains(&"PATH"), "{names:?}");
        assert!(names.contains(&"PGAPPNAME"), "{names:?}");
        for n in names {
            assert!(
                n == "PGAPPNAME" || is_allowed(OsStr::new(n)),
                "{n} leaked into the child's environment"
            );
        }
    }

    /// Every program dbops starts goes through this module: no other file builds a
    /// `Command` itself.
    #[test]
    fn no_module_builds_a_command_but_this_one() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut stack = vec![src.clone()];
        let mut offenders = vec![];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                if p.extension().is_none_or(|x| x != "rs") || p == src.join("process.rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&p).unwrap();
                for (i, line) in text.lines().enumerate() {
                    let code = line.split("//").next().unwrap_or("");
                    if builds_a_command(code) {
                        offenders.push(format!("{}:{}", p.display(), i + 1));
                    }
                }
            }
        }
        assert!(
            offenders.is_empty(),
            "build commands with crate::process::tool_command: {offenders:?}"
        );
    }
}
