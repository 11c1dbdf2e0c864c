//! Where the client finds its server and token: flags, `NSML_*` environment, and the credentials `nsml login`
//! stores in `$NSML_CONFIG_DIR/credentials.json` (default `~/.nsml/credentials.json`, mode 0600).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow};
use serde::{Deserialize, Serialize};

/// The server used when nothing else names one.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7100";

/// What `nsml login` stores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub server: String,
    pub username: String,
    pub token: String,
}

/// The file `nsml login` writes, in its directory.
#[derive(Debug, Clone)]
pub struct CredentialStore {
    dir: PathBuf,
}

impl CredentialStore {
    /// Returns the store in `$NSML_CONFIG_DIR`, else `$HOME/.nsml`.
    pub fn from_env() -> Result<Self> {
        if let Some(dir) = std::env::var_os("NSML_CONFIG_DIR").filter(|d| !d.is_empty()) {
            return Ok(Self::in_dir(dir.into()));
        }
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .ok_or_else(|| {
                anyhow!("neither NSML_CONFIG_DIR nor HOME is set; cannot find the credentials")
            })?;
        Ok(Self::in_dir(PathBuf::from(home).join(".nsml")))
    }

    /// Returns the store in `dir`.
    pub fn in_dir(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// Returns the directory the store keeps its files in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns the path of `credentials.json`.
    pub fn path(&self) -> PathBuf {
        self.dir.join("credentials.json")
    }

    /// Reads the stored credentials; `None` when nobody logged in.
    pub fn load(&self) -> Result<Option<Credentials>> {
        let path = self.path();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let credentials = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is damaged; delete it and run `nsml login` again",
                path.display()
            )
        })?;
        Ok(Some(credentials))
    }

    /// Stores the credentials, readable by the owner only, replacing the file atomically.
    pub fn save(&self, credentials: &Credentials) -> Result<PathBuf> {
        create_private_dir(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let path = self.path();
        let temp = self.dir.join(".credentials.json.tmp");
        let mut json = serde_json::to_string_pretty(credentials)?;
        json.push('\n');
        let _ = fs::remove_file(&temp);
        let mut file =
            private_file(&temp).with_context(|| format!("cannot write {}", temp.display()))?;
        file.write_all(json.as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write {}", temp.display()))?;
        fs::rename(&temp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// Deletes the stored credentials; returns whether there were any.
    pub fn remove(&self) -> Result<bool> {
        let path = self.path();
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot delete {}", path.display())),
        }
    }
}

#[cfg(unix)]
pub(crate) fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
pub(crate) fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)
}

#[cfg(unix)]
fn private_file(path: &std::path::Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn private_file(path: &std::path::Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

/// The server and token a command uses.
#[derive(Debug, Clone)]
pub struct Target {
    pub server: String,
    pub token: Option<String>,
}

/// Reads a non-empty environment variable.
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Resolves the server (`--server`, else `NSML_SERVER`, else the stored login's, else [`DEFAULT_SERVER`]) and
/// the token (`NSML_TOKEN`, else the stored one).
pub fn resolve(
    server_flag: Option<String>,
    env_server: Option<String>,
    env_token: Option<String>,
    stored: Option<&Credentials>,
) -> Target {
    let server = server_flag
        .filter(|s| !s.trim().is_empty())
        .or(env_server)
        .or_else(|| stored.map(|c| c.server.clone()))
        .unwrap_or_else(|| DEFAULT_SERVER.to_string());
    let token = env_token.or_else(|| stored.map(|c| c.token.clone()));
    Target {
        server: normalize_server(&server),
        token,
    }
}

/// Adds `http://` to a bare `host:port`, and drops a trailing slash.
pub fn normalize_server(server: &str) -> String {
    let server = server.trim().trim_end_matches('/');
    if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_addresses_get_a_scheme() {
        assert_eq!(normalize_server("127.0.0.1:7100"), "http://127.0.0.1:7100");
        assert_eq!(normalize_server("http://h:1/"), "http://h:1");
        assert_eq!(
            normalize_server("https://nsml.example"),
            "https://nsml.example"
        );
    }

    fn stored() -> Credentials {
        Credentials {
            server: "http://stored:1".into(),
            username: "alice".into(),
            token: "stored-token".into(),
        }
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_login() {
        let s = Some(stored());
        let t = resolve(
            Some("flag:2".into()),
            Some("http://env:3".into()),
            None,
            s.as_ref(),
        );
        assert_eq!(t.server, "http://flag:2");
        assert_eq!(t.token.as_deref(), Some("stored-token"));
        let t = resolve(
            None,
            Some("http://env:3".into()),
            Some("env-token".into()),
            s.as_ref(),
        );
        assert_eq!(t.server, "http://env:3");
        assert_eq!(t.token.as_deref(), Some("env-token"));
        let t = resolve(None, None, None, s.as_ref());
        assert_eq!(t.server, "http://stored:1");
        let t = resolve(None, None, None, None);
        assert_eq!(t.server, DEFAULT_SERVER);
        assert_eq!(t.token, None);
    }

    #[test]
    fn credentials_are_stored_for_the_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::in_dir(dir.path().join("nested"));
        assert_eq!(store.load().unwrap(), None);
        let path = store.save(&stored()).unwrap();
        assert_eq!(store.load().unwrap(), Some(stored()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let mut other = stored();
        other.token = "t2".into();
        store.save(&other).unwrap();
        assert_eq!(store.load().unwrap(), Some(other));
        assert!(store.remove().unwrap());
        assert!(!store.remove().unwrap());
        assert_eq!(store.load().unwrap(), None);
    }
}
