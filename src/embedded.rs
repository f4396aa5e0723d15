//! The embedded PostgreSQL: a private cluster in the data directory, run from the machine's
//! own PostgreSQL binaries, reachable only through a Unix socket.
//!
//! Several leadledger processes may share one data directory (`serve` plus a `keys create`,
//! say). They coordinate through two lock files:
//! - `pg.lock` (exclusive) is held while a process checks, starts or stops the cluster, so
//!   two processes never start it twice and nobody joins while it is being stopped;
//! - `pg.users` (shared) is held by every process that uses the cluster. A process leaving
//!   stops the cluster only if it can then take `pg.users` exclusively: it was the last user.
//!
//! A cluster left running by a process that was killed (SIGKILL) has no users: the next
//! process adopts it, and stops it when it leaves.
//!
//! A process using the cluster also keeps it running ([`EmbeddedPostgres::supervise`]): if
//! PostgreSQL dies under it (killed, crashed, stopped behind its back), the process starts
//! it again, so the service recovers by itself once PostgreSQL's crash recovery is done.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::unistd::{Uid, User};
use sha2::{Digest, Sha256};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

/// The database the service uses inside the embedded cluster.
pub const DATABASE_NAME: &str = "leadledger";
/// The cluster's superuser, made by `initdb`.
pub const SUPERUSER: &str = "leadledger";
const PORT: u16 = 5432;
/// Unix socket paths are limited to about 107 bytes (`sun_path`); keep a margin.
const MAX_SOCKET_PATH: usize = 100;
/// How often a supervising process checks that PostgreSQL is still running.
const SUPERVISE_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "no PostgreSQL server binaries found (looked at `pg_config --bindir`, /usr/lib/postgresql/*/bin and PATH). \
         Install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`) or set DATABASE_URL to a server of your own"
    )]
    BinariesNotFound,
    #[error(
        "PostgreSQL refuses to run as root and there is no `{0}` system user to run it as. \
         Create one (`useradd --system {0}`), set LEADLEDGER_PG_USER to another unprivileged user, \
         run leadledger as an unprivileged user, or set DATABASE_URL"
    )]
    NoUnprivilegedUser(String),
    #[error(
        "the `{user}` user that runs the embedded PostgreSQL cannot reach {dir}: every directory above it needs \
         execute permission for that user. Choose a LEADLEDGER_DATA_DIR it can reach (e.g. under /var/lib or /srv), \
         or set DATABASE_URL"
    )]
    DataDirUnreachable { user: String, dir: PathBuf },
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("embedded PostgreSQL I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("embedded PostgreSQL did not accept connections: {0}")]
    Connect(#[from] sqlx::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EmbeddedError + '_ {
    move |source| EmbeddedError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Tuning for the cluster; tests trade durability for speed.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// `fsync` and `synchronous_commit`: off only for throw-away test clusters.
    pub durable: bool,
    pub max_connections: u32,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            durable: true,
            max_connections: 200,
        }
    }
}

/// A handle on the embedded cluster held by this process. Call [`EmbeddedPostgres::stop`]
/// when done; dropping it without stopping leaves the cluster running for the next process.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    root: PathBuf,
    pg_dir: PathBuf,
    socket_dir: PathBuf,
    bindir: PathBuf,
    run_as: Option<User>,
    users_lock: Option<File>,
    options: EmbeddedOptions,
    /// The task that restarts PostgreSQL if it dies; cancelled when this handle goes.
    supervisor: Option<(DropGuard, JoinHandle<()>)>,
}

impl EmbeddedPostgres {
    /// Starts (or joins, or adopts) the cluster in `<root>/pg`.
    pub async fn start(root: &Path, options: &EmbeddedOptions) -> Result<Self, EmbeddedError> {
        let bindir = find_bindir().await?;
        let run_as = unprivileged_user()?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(io_err(root))?;
        let root = fs::canonicalize(root).map_err(io_err(root))?;
        if run_as.is_some() {
            // The PostgreSQL user must be able to traverse the data dir, not list or read it.
            fs::set_permissions(&root, fs::Permissions::from_mode(0o711)).map_err(io_err(&root))?;
        }
        let pg_dir = root.join("pg");
        let socket_dir = socket_dir_for(&root);
        let mut this = Self {
            root: root.clone(),
            pg_dir,
            socket_dir,
            bindir,
            run_as,
            users_lock: None,
            options: options.clone(),
            supervisor: None,
        };

        let startup = this.startup_lock().await?;
        let users = open_lock_file(&root.join("pg.users"))?;
        let users = tokio::task::spawn_blocking(move || users.lock_shared().map(|()| users))
            .await
            .expect("lock task panicked")
            .map_err(io_err(&root))?;
        this.users_lock = Some(users);
        let result = this.ensure_running(options).await;
        drop(startup);
        result?;
        this.ensure_database().await?;
        Ok(this)
    }

    /// Connection options for the service's database in this cluster.
    pub fn connect_options(&self) -> PgConnectOptions {
        self.connect_options_for(DATABASE_NAME)
    }

    /// Connection options for any database in this cluster.
    pub fn connect_options_for(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .socket(&self.socket_dir)
            .port(PORT)
            .username(SUPERUSER)
            .database(database)
            .application_name("leadledger")
    }

    /// A URL for the service's database, usable by `psql` and sqlx alike.
    pub fn url(&self) -> String {
        url_for(&self.socket_dir, DATABASE_NAME)
    }

    /// A URL for any database in this cluster.
    pub fn url_for_database(&self, database: &str) -> String {
        url_for(&self.socket_dir, database)
    }

    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    pub fn data_dir(&self) -> &Path {
        &self.root
    }

    /// Keeps the cluster running while this handle lives: a background task checks it
    /// twice a second and, when PostgreSQL has died, starts it again (under the start-up
    /// lock, so several processes on one data directory start it once). Meanwhile the
    /// service answers 503; once PostgreSQL is back, the pool reconnects by itself.
    pub fn supervise(&mut self) {
        if self.supervisor.is_some() {
            return;
        }
        let cancel = CancellationToken::new();
        let watcher = Self {
            root: self.root.clone(),
            pg_dir: self.pg_dir.clone(),
            socket_dir: self.socket_dir.clone(),
            bindir: self.bindir.clone(),
            run_as: self.run_as.clone(),
            users_lock: None,
            options: self.options.clone(),
            supervisor: None,
        };
        let task = tokio::spawn(watcher.keep_running(cancel.clone()));
        self.supervisor = Some((cancel.drop_guard(), task));
    }

    async fn keep_running(self, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(SUPERVISE_EVERY) => {},
            }
            if self.is_running() {
                continue;
            }
            // `pg_ctl restart` leaves a moment with no postmaster: look again before acting.
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(SUPERVISE_EVERY) => {},
            }
            if self.is_running() {
                continue;
            }
            let startup = tokio::select! {
                () = cancel.cancelled() => return,
                lock = self.startup_lock() => lock,
            };
            let startup = match startup {
                Ok(lock) => lock,
                Err(e) => {
                    tracing::error!(error = %e, "embedded PostgreSQL is down and cannot be restarted");
                    continue;
                }
            };
            if self.is_running() {
                // Another process on this data directory restarted it first.
                continue;
            }
            tracing::error!("embedded PostgreSQL is not running; starting it again");
            // Its old backends may take a moment to exit after the postmaster died;
            // PostgreSQL refuses to start until they have, and the next round tries again.
            match self.ensure_running(&self.options).await {
                Ok(()) => tracing::info!("embedded PostgreSQL is running again"),
                Err(e) => {
                    tracing::error!(error = %e, "restarting embedded PostgreSQL failed; retrying")
                }
            }
            drop(startup);
        }
    }

    /// Leaves the cluster; stops it if no other process is using it.
    pub async fn stop(mut self) -> Result<(), EmbeddedError> {
        if let Some((guard, task)) = self.supervisor.take() {
            drop(guard);
            let _ = task.await;
        }
        let startup = self.startup_lock().await?;
        let Some(users) = self.users_lock.take() else {
            return Ok(());
        };
        users.unlock().map_err(io_err(&self.root))?;
        let last = users.try_lock().is_ok();
        if last {
            if self.is_running() {
                tracing::info!("stopping embedded PostgreSQL");
                self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"])
                    .await?;
            }
            let _ = users.unlock();
        } else {
            tracing::info!(
                "embedded PostgreSQL left running for the other leadledger processes using it"
            );
        }
        drop(startup);
        Ok(())
    }

    /// Starts a small watcher process that stops the cluster and removes `root` once the
    /// current process has exited, however it exits. For throw-away clusters (tests,
    /// benchmarks), whose owner has no reliable place to stop them.
    pub fn stop_and_remove_when_process_exits(&self) -> Result<(), EmbeddedError> {
        let script = r#"
            while kill -0 "$0" 2>/dev/null; do sleep 0.5; done
            pid=$(head -n 1 "$1/postmaster.pid" 2>/dev/null)
            if [ -n "$pid" ]; then
                kill -INT "$pid" 2>/dev/null
                i=0; while kill -0 "$pid" 2>/dev/null && [ $i -lt 120 ]; do sleep 0.5; i=$((i+1)); done
            fi
            rm -rf "$2" "$3"
        "#;
        std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .arg(std::process::id().to_string())
            .arg(&self.pg_dir)
            .arg(&self.root)
            .arg(&self.socket_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(io_err(&self.root))?;
        Ok(())
    }

    async fn startup_lock(&self) -> Result<File, EmbeddedError> {
        let path = self.root.join("pg.lock");
        let file = open_lock_file(&path)?;
        tokio::task::spawn_blocking(move || file.lock().map(|()| file))
            .await
            .expect("lock task panicked")
            .map_err(io_err(&path))
    }

    /// The server log, inside the cluster directory: the PostgreSQL user must write it.
    fn log_path(&self) -> PathBuf {
        self.pg_dir.join("server.log")
    }

    fn is_running(&self) -> bool {
        let pid_file = match fs::read_to_string(self.pg_dir.join("postmaster.pid")) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
            // Not knowing is not "down": out of descriptors (EMFILE), this process cannot
            // open the file, but PostgreSQL is no less alive. Restarting it on that
            // ground would misreport, and fail for the same reason.
            Err(e) => {
                tracing::warn!(error = %e, "cannot read postmaster.pid; taking PostgreSQL to be running");
                return true;
            }
        };
        let Some(pid) = pid_file
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
        else {
            return false;
        };
        // Signal 0 checks the process exists; EPERM means it exists under another user.
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
            Ok(()) => true,
            Err(nix::errno::Errno::EPERM) => true,
            Err(_) => false,
        }
    }

    async fn ensure_running(&self, options: &EmbeddedOptions) -> Result<(), EmbeddedError> {
        self.prepare_dirs()?;
        if !self.pg_dir.join("PG_VERSION").exists() {
            self.initdb().await?;
        }
        self.write_config(options)?;
        if self.is_running() {
            // Running already: another leadledger process's, or one left by a process that was
            // killed. It may still be starting up; give it time before deciding it is stale.
            for _ in 0..60 {
                if self.ping().await.is_ok() {
                    tracing::info!("using the embedded PostgreSQL already running");
                    return Ok(());
                }
                if !self.is_running() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        tracing::info!("starting embedded PostgreSQL");
        let log = self.log_path();
        self.pg_ctl(&["start", "-w", "-t", "120", "-l", &log.to_string_lossy()])
            .await?;
        self.ping().await
    }

    fn prepare_dirs(&self) -> Result<(), EmbeddedError> {
        let dir = &self.socket_dir;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        self.give_to_run_as(dir)
    }

    fn give_to_run_as(&self, path: &Path) -> Result<(), EmbeddedError> {
        if let Some(user) = &self.run_as {
            nix::unistd::chown(path, Some(user.uid), Some(user.gid))
                .map_err(|e| io_err(path)(e.into()))?;
        }
        Ok(())
    }

    async fn initdb(&self) -> Result<(), EmbeddedError> {
        // Initialise beside the final place and rename, so that an interrupted initdb
        // never leaves a half-made cluster that later runs would take for a real one.
        let staging = self.root.join("pg.initdb");
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(io_err(&staging))?;
        self.give_to_run_as(&staging)?;
        if let Some(user) = &self.run_as {
            let reachable = self
                .command("test")
                .args(["-w", &staging.to_string_lossy()])
                .status()
                .await
                .map(|s| s.success())
                .unwrap_or(false);
            if !reachable {
                let _ = fs::remove_dir_all(&staging);
                return Err(EmbeddedError::DataDirUnreachable {
                    user: user.name.clone(),
                    dir: self.root.clone(),
                });
            }
        }
        tracing::info!(dir = %self.pg_dir.display(), "initialising embedded PostgreSQL cluster");
        let initdb = self.bindir.join("initdb");
        let output = self
            .command(&initdb.to_string_lossy())
            .arg("-D")
            .arg(&staging)
            .args([
                "--username",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=reject",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ])
            .output()
            .await
            .map_err(|e| EmbeddedError::Command {
                what: "initdb".into(),
                detail: e.to_string(),
            })?;
        if !output.status.success() {
            return Err(EmbeddedError::Command {
                what: "initdb".into(),
                detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        let conf = staging.join("postgresql.conf");
        let mut f = OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(io_err(&conf))?;
        writeln!(f, "\ninclude_if_exists = 'leadledger.conf'").map_err(io_err(&conf))?;
        fs::rename(&staging, &self.pg_dir).map_err(io_err(&self.pg_dir))?;
        Ok(())
    }

    /// Settings rewritten at every start, so a moved data directory still works.
    fn write_config(&self, options: &EmbeddedOptions) -> Result<(), EmbeddedError> {
        let socket = self.socket_dir.to_string_lossy().replace('\'', "''");
        let durable = if options.durable { "on" } else { "off" };
        let text = format!(
            "# Written by leadledger at every start; edits are overwritten.\n\
             listen_addresses = ''\n\
             unix_socket_directories = '{socket}'\n\
             unix_socket_permissions = 0700\n\
             port = {PORT}\n\
             max_connections = {max}\n\
             fsync = {durable}\n\
             synchronous_commit = {durable}\n\
             full_page_writes = {durable}\n\
             shared_buffers = 128MB\n\
             log_min_messages = warning\n",
            max = options.max_connections,
        );
        let path = self.pg_dir.join("leadledger.conf");
        fs::write(&path, text).map_err(io_err(&path))?;
        self.give_to_run_as(&path)
    }

    async fn pg_ctl(&self, args: &[&str]) -> Result<(), EmbeddedError> {
        let pg_ctl = self.bindir.join("pg_ctl");
        let output = self
            .command(&pg_ctl.to_string_lossy())
            .arg("-D")
            .arg(&self.pg_dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| EmbeddedError::Command {
                what: format!("pg_ctl {}", args[0]),
                detail: e.to_string(),
            })?;
        if output.status.success() {
            return Ok(());
        }
        let mut detail = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if let Ok(log) = fs::read_to_string(self.log_path()) {
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            detail.push_str(&format!("\nlast lines of {}:\n", self.log_path().display()));
            for line in tail.into_iter().rev() {
                detail.push_str(line);
                detail.push('\n');
            }
        }
        Err(EmbeddedError::Command {
            what: format!("pg_ctl {}", args[0]),
            detail,
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.root)
            .env_remove("PGDATA")
            .env("LC_ALL", "C")
            // Its own process group: a Ctrl-C meant for leadledger must not reach PostgreSQL,
            // which leadledger stops itself after flushing.
            .process_group(0)
            .kill_on_drop(false);
        if let Some(user) = &self.run_as {
            cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        cmd
    }

    async fn ping(&self) -> Result<(), EmbeddedError> {
        let mut conn = self
            .connect_options_for("postgres")
            .connect()
            .await
            .map_err(EmbeddedError::Connect)?;
        sqlx::query("SELECT 1").execute(&mut conn).await?;
        conn.close().await?;
        Ok(())
    }

    async fn ensure_database(&self) -> Result<(), EmbeddedError> {
        let mut conn = self.connect_options_for("postgres").connect().await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(DATABASE_NAME)
                .fetch_one(&mut conn)
                .await?;
        if !exists {
            // Identifiers cannot be bound; this one is a constant.
            let created = sqlx::query("CREATE DATABASE leadledger")
                .execute(&mut conn)
                .await;
            if let Err(e) = created {
                let duplicate = e
                    .as_database_error()
                    .and_then(|d| d.code())
                    .is_some_and(|c| c == "42P04");
                if !duplicate {
                    return Err(e.into());
                }
            }
        }
        conn.close().await?;
        Ok(())
    }
}

fn open_lock_file(path: &Path) -> Result<File, EmbeddedError> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))
}

/// `<root>/run` when the socket path fits in `sun_path`, else a short directory in /tmp
/// named after the data directory, so every process on one data dir finds the same one.
fn socket_dir_for(root: &Path) -> PathBuf {
    let local = root.join("run");
    let socket_len = local
        .join(format!(".s.PGSQL.{PORT}.lock"))
        .as_os_str()
        .len();
    if socket_len <= MAX_SOCKET_PATH {
        return local;
    }
    let digest = Sha256::digest(root.as_os_str().as_encoded_bytes());
    let short: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    std::env::temp_dir().join(format!("leadledger-{short}"))
}

fn url_for(socket_dir: &Path, database: &str) -> String {
    let host: String = socket_dir
        .to_string_lossy()
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("postgres://{SUPERUSER}@localhost:{PORT}/{database}?host={host}")
}

/// The user PostgreSQL runs as: `None` means "as we are"; as root, an unprivileged user.
fn unprivileged_user() -> Result<Option<User>, EmbeddedError> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let name = std::env::var("LEADLEDGER_PG_USER").unwrap_or_else(|_| "postgres".into());
    match User::from_name(&name) {
        Ok(Some(user)) if !user.uid.is_root() => Ok(Some(user)),
        _ => Err(EmbeddedError::NoUnprivilegedUser(name)),
    }
}

/// The directory of the machine's PostgreSQL binaries (the server's, so its client tools
/// such as `pg_dump` match it).
pub async fn server_bindir() -> Result<PathBuf, EmbeddedError> {
    find_bindir().await
}

/// Sets the next transaction id of the stopped cluster in `<root>/pg` to at least `next`
/// (`pg_resetwal -e -x`), run as the user PostgreSQL runs as. Restoring a logical backup
/// needs it: the event feed orders by the writing transaction's id, so a restored log
/// must lie below every transaction the new cluster will run. The value is rounded up to
/// a commit-log segment, where PostgreSQL makes the segment itself when it gets there.
pub async fn advance_transaction_ids(root: &Path, next: u64) -> Result<(), EmbeddedError> {
    const SEGMENT: u64 = 1 << 20;
    let mut next = next.div_ceil(SEGMENT) * SEGMENT;
    if next & 0xFFFF_FFFF == 0 {
        next += SEGMENT;
    }
    let bindir = find_bindir().await?;
    let run_as = unprivileged_user()?;
    let pg_dir = fs::canonicalize(root.join("pg")).map_err(io_err(root))?;
    let mut cmd = Command::new(bindir.join("pg_resetwal"));
    cmd.arg("-e")
        .arg((next >> 32).to_string())
        .arg("-x")
        .arg((next & 0xFFFF_FFFF).to_string())
        .arg("-D")
        .arg(&pg_dir)
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    if let Some(user) = &run_as {
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    let output = cmd.output().await.map_err(|e| EmbeddedError::Command {
        what: "pg_resetwal".into(),
        detail: e.to_string(),
    })?;
    if !output.status.success() {
        return Err(EmbeddedError::Command {
            what: "pg_resetwal".into(),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

async fn find_bindir() -> Result<PathBuf, EmbeddedError> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output().await
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&dir) {
            return Ok(dir);
        }
    }
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(u32, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                Some((v, e.path().join("bin")))
            })
            .filter(|(_, dir)| has_server(dir))
            .collect();
        versions.sort();
        if let Some((_, dir)) = versions.pop() {
            return Ok(dir);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_server(&dir) {
                return Ok(dir);
            }
        }
    }
    Err(EmbeddedError::BinariesNotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shallow_data_dir_keeps_its_socket_inside_it() {
        let dir = socket_dir_for(Path::new("/srv/leadledger"));
        assert_eq!(dir, PathBuf::from("/srv/leadledger/run"));
    }

    #[test]
    fn a_deep_data_dir_gets_a_short_socket_dir_that_is_stable() {
        let deep = PathBuf::from(format!("/srv/{}", "nested/".repeat(20)));
        let a = socket_dir_for(&deep);
        let b = socket_dir_for(&deep);
        assert_eq!(a, b);
        assert!(a.join(".s.PGSQL.5432.lock").as_os_str().len() <= MAX_SOCKET_PATH);
        assert_ne!(
            a,
            socket_dir_for(Path::new(&format!("/srv/{}", "other/".repeat(20))))
        );
    }

    #[test]
    fn the_url_percent_encodes_the_socket_path() {
        let url = url_for(Path::new("/tmp/a b/run"), "leadledger");
        assert_eq!(
            url,
            "postgres://leadledger@localhost:5432/leadledger?host=%2Ftmp%2Fa%20b%2Frun"
        );
        let opts: PgConnectOptions = url.parse().expect("sqlx parses the url");
        assert_eq!(opts.get_socket(), Some(&PathBuf::from("/tmp/a b/run")));
    }
}
