//! Throwaway PostgreSQL clusters for tests and the demo: `initdb` and `pg_ctl` from the
//! local PostgreSQL installation, a free port, a temporary directory, and nothing left
//! behind.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::config::Config;
use crate::error::Error;

/// What to tell a user who has neither a server nor the binaries.
const HOW_TO_GET_ONE: &str = "set DATABASE_URL to a PostgreSQL server \
     (for example postgres://postgres@localhost/postgres), or install PostgreSQL's server \
     binaries so that initdb and pg_ctl are on PATH or under /usr/lib/postgresql/*/bin \
     (Debian and Ubuntu: apt-get install postgresql)";

/// A private PostgreSQL cluster in a temporary directory, listening on 127.0.0.1 on a free
/// port, with trust authentication for the user `postgres`.
///
/// When the process runs as root, the cluster runs as the `postgres` OS user (PostgreSQL
/// refuses to run as root). It is stopped and its directory removed when the value is
/// dropped (which blocks for `pg_ctl stop`: in async code, drop it in `spawn_blocking`),
/// and also, by a small watchdog process, when the owning process dies without
/// dropping it (a test binary's statics are never dropped).
#[derive(Debug)]
pub struct TempCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
    watchdog: Option<Child>,
    running: bool,
}

/// A database for a program that should just work: the one the environment names
/// (`DATABASE_URL`, `PGHOST`, `PGHOSTADDR`), otherwise a fresh [`TempCluster`], returned
/// so that it lives as long as the caller keeps it. Starting a cluster blocks: from async
/// code, call it in `spawn_blocking`. The demo, the benchmark and the examples use it.
pub fn env_or_temp() -> Result<(Config, Option<TempCluster>), Error> {
    if Config::env_names_database() {
        return Ok((Config::from_env()?, None));
    }
    let cluster = TempCluster::start()?;
    Ok((cluster.config(), Some(cluster)))
}

/// Options for a [`TempCluster`].
#[derive(Clone, Debug, Default)]
pub struct TempClusterBuilder {
    settings: Vec<(String, String)>,
    standby_of: Option<u16>,
    files: Vec<(String, Vec<u8>)>,
    hba: Vec<String>,
}

impl TempClusterBuilder {
    /// Sets a server setting (`postgres -c name=value`), such as `fsync` or
    /// `max_connections`.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Writes a file into the data directory before the server starts, readable by the
    /// server only (mode 0600), such as `server.crt` and `server.key` for
    /// `.setting("ssl", "on")`.
    pub fn data_file(mut self, name: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.files.push((name.to_owned(), contents.into()));
        self
    }

    /// Adds a line to `pg_hba.conf` ahead of the default ones (the first line that matches
    /// a connection decides), such as `host all app 127.0.0.1/32 scram-sha-256`.
    pub fn hba(mut self, line: &str) -> Self {
        self.hba.push(line.to_owned());
        self
    }

    /// Makes the cluster a streaming standby of the primary on 127.0.0.1:`port` (such as
    /// another `TempCluster`), copied with `pg_basebackup` instead of made by `initdb`.
    pub fn standby_of(mut self, primary_port: u16) -> Self {
        self.standby_of = Some(primary_port);
        self
    }

    /// Creates and starts the cluster. Blocking: `initdb` takes a second or two.
    pub fn start(self) -> Result<TempCluster, Error> {
        let bin = find_bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("updatepipe-pg-")
            .tempdir()
            .map_err(|e| Error::Cluster(format!("cannot create a temporary directory: {e}")))?;
        let run_as = if running_as_root(dir.path()) {
            let ids = postgres_user_ids()?;
            std::os::unix::fs::chown(dir.path(), Some(ids.0), Some(ids.1)).map_err(|e| {
                Error::Cluster(format!("cannot hand the directory to postgres: {e}"))
            })?;
            Some(ids)
        } else {
            None
        };
        let mut cluster = TempCluster {
            dir,
            bin,
            port: 0,
            run_as,
            watchdog: None,
            running: false,
        };
        let data = cluster.data_dir();
        match self.standby_of {
            None => cluster.run(
                "initdb",
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-U".as_ref(),
                    "postgres".as_ref(),
                    "--auth=trust".as_ref(),
                    "--no-sync".as_ref(),
                    "-E".as_ref(),
                    "UTF8".as_ref(),
                    "--locale=C".as_ref(),
                ],
            )?,
            Some(port) => {
                let port = port.to_string();
                let pg_basebackup = pg_basebackup(&cluster.bin);
                cluster.run(
                    &pg_basebackup,
                    &[
                        "-h".as_ref(),
                        "127.0.0.1".as_ref(),
                        "-p".as_ref(),
                        port.as_ref(),
                        "-U".as_ref(),
                        "postgres".as_ref(),
                        "-D".as_ref(),
                        data.as_os_str(),
                        // Write standby.signal and the connection to the primary.
                        "-R".as_ref(),
                        "-X".as_ref(),
                        "stream".as_ref(),
                        "--no-sync".as_ref(),
                        // Not the default spread checkpoint, paced over minutes (about
                        // ten seconds on an idle new cluster): a throwaway standby wants
                        // its copy now.
                        "--checkpoint=fast".as_ref(),
                    ],
                )?;
                // `-R` writes every option its own libpq knows; the server's walreceiver
                // may load an older libpq that refuses some (`sslsni` for 13's,
                // `sslnegotiation` for anything before 17's) and then never streams. Only
                // what the connection needs, set last so that it wins.
                append(
                    &data.join("postgresql.auto.conf"),
                    &format!("primary_conninfo = 'host=127.0.0.1 port={port} user=postgres'\n"),
                )?;
            }
        }
        let mut conf = String::from("listen_addresses = '127.0.0.1'\nmax_connections = 200\n");
        conf.push_str(&format!(
            "unix_socket_directories = '{}'\n",
            cluster.dir.path().display()
        ));
        for (name, value) in &self.settings {
            conf.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        append(&data.join("postgresql.conf"), &conf)?;
        for (name, contents) in &self.files {
            cluster.write_private(&data.join(name), contents)?;
        }
        if !self.hba.is_empty() {
            let path = data.join("pg_hba.conf");
            let rest = std::fs::read(&path)
                .map_err(|e| Error::Cluster(format!("cannot read {}: {e}", path.display())))?;
            let mut hba = self.hba.join("\n").into_bytes();
            hba.push(b'\n');
            hba.extend(rest);
            cluster.write_private(&path, &hba)?;
        }
        cluster.watchdog = Some(cluster.spawn_watchdog()?);
        cluster.start_server()?;
        Ok(cluster)
    }
}

impl TempCluster {
    /// Starts a cluster with default settings. Blocking.
    pub fn start() -> Result<Self, Error> {
        TempCluster::builder().start()
    }

    /// Options for a cluster.
    pub fn builder() -> TempClusterBuilder {
        TempClusterBuilder::default()
    }

    /// The port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for the `postgres` database as user `postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A pipe configuration for the `postgres` database.
    pub fn config(&self) -> Config {
        Config::from_url(&self.url()).expect("the cluster's own URL parses")
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Stops the server: `mode` is `smart`, `fast` or `immediate` (a crash, as far as the
    /// server is concerned). Blocking.
    pub fn stop(&mut self, mode: &str) -> Result<(), Error> {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                mode.as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        )?;
        self.running = false;
        Ok(())
    }

    /// Promotes a standby ([`TempClusterBuilder::standby_of`]) to a primary, and waits until
    /// it accepts writes. Blocking.
    pub fn promote(&mut self) -> Result<(), Error> {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-w".as_ref(),
                "promote".as_ref(),
            ],
        )?;
        Ok(())
    }

    /// Starts the server again after [`stop`](TempCluster::stop), on a new free port unless
    /// the old one is still free. Blocking.
    pub fn restart(&mut self) -> Result<(), Error> {
        if self.running {
            self.stop("fast")?;
        }
        self.start_server()
    }

    fn start_server(&mut self) -> Result<(), Error> {
        // The port is free now; another process could take it before the server binds it,
        // so retry a few times with a new one.
        let mut last = None;
        for _ in 0..5 {
            let port = if self.port != 0 && port_is_free(self.port) {
                self.port
            } else {
                free_port()?
            };
            let data = self.data_dir();
            let log = self.dir.path().join("server.log");
            let options = format!("-p {port}");
            let started = self.run(
                "pg_ctl",
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-l".as_ref(),
                    log.as_os_str(),
                    "-o".as_ref(),
                    options.as_ref(),
                    "-w".as_ref(),
                    "-t".as_ref(),
                    "60".as_ref(),
                    "start".as_ref(),
                ],
            );
            match started {
                Ok(()) => {
                    self.port = port;
                    self.running = true;
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        Err(Error::Cluster(format!(
            "{}; server log ends with: {}",
            last.map(|e| e.to_string()).unwrap_or_default(),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )))
    }

    /// Writes a file only the cluster's OS user can read.
    fn write_private(&self, path: &Path, contents: &[u8]) -> Result<(), Error> {
        use std::os::unix::fs::PermissionsExt;
        let failed =
            |e: std::io::Error| Error::Cluster(format!("cannot write {}: {e}", path.display()));
        std::fs::write(path, contents).map_err(failed)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(failed)?;
        }
        Ok(())
    }

    /// Runs one of the PostgreSQL programs as the cluster's OS user.
    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> Result<(), Error> {
        let mut command = self.command(program);
        command.args(args);
        let output = command
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::Cluster(format!("cannot run {program}: {e}")))?;
        if !output.status.success() {
            return Err(Error::Cluster(format!(
                "{program} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command.current_dir(self.dir.path());
        // Keep the caller's libpq settings away from the private cluster's tools.
        for var in ["PGHOST", "PGPORT", "PGDATA", "PGUSER", "PGDATABASE"] {
            command.env_remove(var);
        }
        if let Some((uid, gid)) = self.run_as {
            // Dropping root: the standard library also clears supplementary groups.
            command.uid(uid).gid(gid);
        }
        command
    }

    /// A process that stops the cluster and removes its directory once this process is
    /// gone, however it ended: in a process group of its own, ignoring the terminal's
    /// signals, so that a Ctrl-C that ends this process (and its group) does not end it.
    fn spawn_watchdog(&self) -> Result<Child, Error> {
        let script = r#"
            trap '' INT HUP TERM QUIT
            while kill -0 "$1" 2>/dev/null || [ -d "/proc/$1" ]; do sleep 1; done
            "$2/pg_ctl" -D "$3/data" -m immediate -w stop >/dev/null 2>&1
            rm -rf "$3"
        "#;
        let mut command = Command::new("sh");
        command.current_dir("/").process_group(0);
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
            .arg("-c")
            .arg(script)
            .arg("updatepipe-watchdog")
            .arg(std::process::id().to_string())
            .arg(&self.bin)
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::Cluster(format!("cannot start the cleanup watchdog: {e}")))
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        if self.running
            && let Err(e) = self.stop("fast")
        {
            tracing::warn!(
                target: "updatepipe::cluster",
                error = %e,
                "cannot stop the throwaway cluster"
            );
            let _ = self.stop("immediate");
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        // The TempDir removes the directory after this.
    }
}

/// Whether this process runs as root, told by the owner of a directory it just created.
fn running_as_root(dir: &Path) -> bool {
    std::fs::metadata(dir)
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// The `postgres` OS user's uid and gid.
fn postgres_user_ids() -> Result<(u32, u32), Error> {
    let id = |flag: &str| -> Result<u32, Error> {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .map_err(|e| Error::Cluster(format!("cannot run id: {e}")))?;
        if !out.status.success() {
            return Err(Error::Cluster(
                "running as root, but there is no `postgres` OS user to run the cluster as \
                 (PostgreSQL refuses to run as root); create one or run as another user"
                    .into(),
            ));
        }
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| Error::Cluster("cannot read the postgres user's id".into()))
    };
    Ok((id("-u")?, id("-g")?))
}

/// The directory holding `initdb` and `pg_ctl`: on `PATH`, or the newest
/// `/usr/lib/postgresql/*/bin`.
fn find_bin_dir() -> Result<PathBuf, Error> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_tools(&dir) {
                // Follow symlinks (Debian's wrappers) to the real directory, where `postgres`
                // lives too.
                let real = std::fs::canonicalize(dir.join("initdb"))
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .filter(|d| has_tools(d))
                    .unwrap_or(dir);
                return Ok(real);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            has_tools(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| Error::Cluster(format!("no PostgreSQL found: {HOW_TO_GET_ONE}")))
}

/// `pg_basebackup` from `bin` or, when `bin` has none (the npm builds of 13 ship only
/// `initdb`, `pg_ctl` and `postgres`), the newest `/usr/lib/postgresql/*/bin/pg_basebackup`:
/// a newer `pg_basebackup` copies an older primary. An absolute path, which
/// `TempCluster::command`'s `bin.join` keeps as it is; `pg_basebackup` itself (and so an
/// error naming it) when there is neither.
fn pg_basebackup(bin: &Path) -> String {
    const NAME: &str = "pg_basebackup";
    if bin.join(NAME).is_file() {
        return NAME.into();
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let path = entry.path().join("bin").join(NAME);
            path.is_file().then_some((version, path))
        })
        .collect();
    found.sort();
    found
        .pop()
        .and_then(|(_, path)| path.to_str().map(String::from))
        .unwrap_or_else(|| NAME.into())
}

fn free_port() -> Result<u16, Error> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Cluster(format!("cannot find a free port: {e}")))
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn append(path: &Path, text: &str) -> Result<(), Error> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| Error::Cluster(format!("cannot write {}: {e}", path.display())))
}
