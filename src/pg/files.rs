//! The files libpq reads besides the connection string: the connection service file
//! (`pg_service.conf`) and the password file (`.pgpass`), read as libpq reads them, each
//! bounded in size.

use std::path::{Path, PathBuf};

use crate::error::Error;

/// Where settings come from besides the connection string: the environment, and with it
/// the password and service files it names.
pub(crate) struct Env<'a> {
    var: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Env<'a> {
    pub(crate) fn new(var: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Env { var }
    }

    pub(crate) fn var(&self, name: &str) -> Option<String> {
        (self.var)(name).filter(|v| !v.is_empty())
    }

    pub(crate) fn home(&self, file: &str) -> Option<PathBuf> {
        self.var("HOME").map(|home| Path::new(&home).join(file))
    }
}

/// The most a password or service file may hold; past it the file is refused.
const MAX_FILE: u64 = 1 << 20;

/// The settings of the service `name`: from the user's service file (`PGSERVICEFILE`, else
/// `~/.pg_service.conf`) when it defines the service, else from the system's
/// (`PGSYSCONFDIR/pg_service.conf`, else `/etc/postgresql-common/pg_service.conf`).
pub(crate) fn service_settings(name: &str, env: &Env<'_>) -> Result<Vec<(String, String)>, Error> {
    let user = env
        .var("PGSERVICEFILE")
        .map(PathBuf::from)
        .or_else(|| env.home(".pg_service.conf"));
    let system = Path::new(
        &env.var("PGSYSCONFDIR")
            .unwrap_or_else(|| "/etc/postgresql-common".into()),
    )
    .join("pg_service.conf");
    for path in user.into_iter().chain([system]) {
        let Some(text) = read_bounded(&path)? else {
            continue;
        };
        if let Some(settings) = find_service(&text, name, &path)? {
            return Ok(settings);
        }
    }
    Err(Error::Config(format!(
        "definition of service {name:?} not found (looked in PGSERVICEFILE or \
         ~/.pg_service.conf, then PGSYSCONFDIR/pg_service.conf)"
    )))
}

/// The settings of section `[name]` of a service file, `None` when it has none.
fn find_service(
    text: &str,
    name: &str,
    path: &Path,
) -> Result<Option<Vec<(String, String)>>, Error> {
    let mut found: Option<Vec<(String, String)>> = None;
    let mut inside = false;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[') {
            if found.is_some() {
                break;
            }
            inside = section.strip_suffix(']') == Some(name);
            if inside {
                found = Some(Vec::new());
            }
            continue;
        }
        if !inside {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(Error::Config(format!(
                "syntax error in service file {}, line {}",
                path.display(),
                n + 1
            )));
        };
        let key = key.trim();
        if key == "service" {
            return Err(Error::Config(format!(
                "nested service specifications are not supported (service file {}, line {})",
                path.display(),
                n + 1
            )));
        }
        if let Some(settings) = found.as_mut() {
            settings.push((key.to_owned(), value.trim().to_owned()));
        }
    }
    Ok(found)
}

/// A file's text, or `None` when it does not exist; refused when over [`MAX_FILE`], or
/// when it is not a regular file.
fn read_bounded(path: &Path) -> Result<Option<String>, Error> {
    let Some(bytes) = read_regular(path, MAX_FILE).map_err(Error::Config)? else {
        return Ok(None);
    };
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| Error::Config(format!("{} is not UTF-8 text", path.display())))
}

/// A regular file's bytes (after symbolic links), at most `max` of them; `None` when it
/// does not exist. Anything else is refused with a message naming the path: a directory,
/// a FIFO (which would block the reader until a writer comes: the file is opened without
/// waiting, and checked before it is read), a device such as `/dev/zero`, a file larger
/// than `max` (no more than `max + 1` bytes are read).
pub(crate) fn read_regular(path: &Path, max: u64) -> Result<Option<Vec<u8>>, String> {
    use std::io::Read;
    let shown = path.display();
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = match options.open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {shown}: {e}")),
    };
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a FIFO, a socket or a device?)"
        };
        return Err(format!(
            "{shown} is {what}: give the path of a regular file"
        ));
    }
    if meta.len() > max {
        return Err(format!("{shown} is larger than {max} bytes"));
    }
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if bytes.len() as u64 > max {
        return Err(format!("{shown} is larger than {max} bytes"));
    }
    Ok(Some(bytes))
}

/// A password file's entries: `host:port:database:user:password` lines, each of the first
/// four a value or `*`, with `\` escaping `:` and `\`.
pub(crate) struct PassFile {
    entries: Vec<[String; 5]>,
}

impl std::fmt::Debug for PassFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the passwords.
        write!(f, "PassFile({} entries)", self.entries.len())
    }
}

impl PassFile {
    /// The file's entries; `None`, as libpq, when it does not exist, is not a plain file,
    /// cannot be read, or (with a warning) when its group or others may read it.
    pub(crate) fn read(path: &Path) -> Option<PassFile> {
        let meta = std::fs::metadata(path).ok()?;
        if !meta.is_file() {
            return None;
        }
        // (read_bounded checks again on the file it opens: a path swapped meanwhile for a
        // FIFO is refused, not waited on.)
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    target: "updatepipe",
                    "password file {} has group or world access; permissions should be \
                     u=rw (0600) or less; ignoring it",
                    path.display()
                );
                return None;
            }
        }
        match read_bounded(path) {
            Ok(Some(text)) => Some(PassFile::parse(&text)),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(target: "updatepipe", "{e}; ignoring the password file");
                None
            }
        }
    }

    fn parse(text: &str) -> PassFile {
        let mut entries = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let mut fields: Vec<String> = vec![String::new()];
            let mut chars = line.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(next) = chars.next() {
                            fields.last_mut().expect("one field").push(next);
                        }
                    }
                    ':' if fields.len() < 5 => fields.push(String::new()),
                    c => fields.last_mut().expect("one field").push(c),
                }
            }
            if let Ok(entry) = <[String; 5]>::try_from(fields) {
                entries.push(entry);
            }
        }
        PassFile { entries }
    }

    /// The password of the first entry that matches (`*` matching anything).
    pub(crate) fn password(&self, host: &str, port: u16, dbname: &str, user: &str) -> Option<&str> {
        let port = port.to_string();
        self.entries
            .iter()
            .find(|[h, p, d, u, _]| {
                [(h, host), (p, port.as_str()), (d, dbname), (u, user)]
                    .iter()
                    .all(|(field, value)| field.as_str() == "*" || field == value)
            })
            .map(|entry| entry[4].as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_file_lines_match_as_libpq_matches_them() {
        let file = PassFile::parse(
            "# comment\n\
             db1:5432:mail:u:first\n\
             db\\:x:*:*:u:esc\\:aped\\\\\n\
             *:*:*:u:pass:with:colons\n\
             short:line\n",
        );
        assert_eq!(file.password("db1", 5432, "mail", "u"), Some("first"));
        assert_eq!(
            file.password("db1", 5433, "mail", "u"),
            Some("pass:with:colons")
        );
        assert_eq!(file.password("db:x", 1, "any", "u"), Some("esc:aped\\"));
        assert_eq!(file.password("db1", 5432, "mail", "v"), None);
        assert!(!format!("{file:?}").contains("first"));
    }
}
