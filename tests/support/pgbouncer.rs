//! A PgBouncer in front of a test cluster, run as the `postgres` OS user when the tests run
//! as root (PgBouncer refuses root). Needs the `pgbouncer` binary (Debian: `apt-get install
//! pgbouncer`; `.ci/run` installs it).

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct PgBouncer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PgBouncer {
    /// Starts PgBouncer on a free port, forwarding database `postgres` to 127.0.0.1:`upstream`
    /// in the given pool mode (`session`, `transaction` or `statement`).
    pub fn start(upstream: u16, pool_mode: &str) -> PgBouncer {
        let binary = [
            "/usr/sbin/pgbouncer",
            "/usr/bin/pgbouncer",
            "/usr/local/bin/pgbouncer",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("pgbouncer is not installed (Debian: apt-get install pgbouncer)");
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let path = dir.path();
        std::fs::write(path.join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            path.join("pgbouncer.ini"),
            format!(
                "[databases]\n\
                 postgres = host=127.0.0.1 port={upstream} dbname=postgres\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {dir}/users.txt\n\
                 pool_mode = {pool_mode}\n\
                 ignore_startup_parameters = extra_float_digits,options\n\
                 logfile = {dir}/pgbouncer.log\n\
                 pidfile = {dir}/pgbouncer.pid\n",
                dir = path.display()
            ),
        )
        .unwrap();
        let mut command = Command::new(binary);
        command
            .arg(path.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if std::fs::metadata(path).unwrap().uid() == 0 {
            let id = |flag: &str| -> u32 {
                let out = Command::new("id")
                    .args([flag, "postgres"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
            };
            let (uid, gid) = (id("-u"), id("-g"));
            for entry in std::fs::read_dir(path).unwrap() {
                std::os::unix::fs::chown(entry.unwrap().path(), Some(uid), Some(gid)).unwrap();
            }
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
            command.uid(uid).gid(gid);
        }
        let mut child = command.spawn().expect("start pgbouncer");
        // Wait until it accepts connections.
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return PgBouncer {
                    child,
                    port,
                    _dir: dir,
                };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        let log = std::fs::read_to_string(path.join("pgbouncer.log")).unwrap_or_default();
        panic!("pgbouncer did not start: {log}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
