//! What survives a restart: credentials, device, filter and the sync token, in one JSON file
//! written atomically (temp file + fsync + rename), readable only by its owner.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, UserId};

const FILE: &str = "signalling-state.json";

/// The persisted state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    pub homeserver_url: String,
    pub user_id: Option<UserId>,
    pub device_id: Option<DeviceId>,
    pub access_token: Option<String>,
    pub filter_id: Option<String>,
    /// The filter definition `filter_id` was created from (re-created when it changes).
    pub filter_json: Option<String>,
    pub next_batch: Option<String>,
}

/// The state file in `state_dir`.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Creates `dir` if needed.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// The stored state; `Ok(None)` when there is none; a file that does not parse is an error
    /// of kind `Other`.
    pub fn load(&self) -> std::io::Result<Option<Persisted>> {
        let text = match std::fs::read_to_string(self.path()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(std::io::Error::other)
    }

    /// Like [`Self::load`], but a file that does not parse is moved to `*.corrupt` and treated as
    /// absent (a bad state file must not keep the focus from starting).
    pub fn load_lenient(&self) -> std::io::Result<Option<Persisted>> {
        match self.load() {
            Ok(p) => Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::Other => {
                tracing::warn!(path = %self.path().display(), error = %e, "state file unreadable; starting fresh");
                std::fs::rename(self.path(), self.dir.join(format!("{FILE}.corrupt")))?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes atomically: a reader (or a crash) sees the old or the new file, never a mix.
    pub fn save(&self, state: &Persisted) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
        {
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.path())?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weir-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn round_trip_and_atomic_replace() {
        let dir = tempdir("rt");
        let s = Store::open(&dir).unwrap();
        assert_eq!(s.load().unwrap(), None);
        let mut p = Persisted {
            homeserver_url: "http://hs".into(),
            user_id: Some("@sfu:hs".try_into().unwrap()),
            device_id: Some("DEV".into()),
            access_token: Some("tok".into()),
            ..Default::default()
        };
        s.save(&p).unwrap();
        assert_eq!(s.load().unwrap(), Some(p.clone()));
        p.next_batch = Some("s1".into());
        s.save(&p).unwrap();
        assert_eq!(s.load().unwrap().unwrap().next_batch.as_deref(), Some("s1"));
        assert!(!dir.join(format!("{FILE}.tmp")).exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(s.path()).unwrap().permissions().mode();
            assert_eq!(
                mode & 0o077,
                0,
                "token file must not be group/world readable"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_file_is_moved_aside() {
        let dir = tempdir("corrupt");
        let s = Store::open(&dir).unwrap();
        std::fs::write(s.path(), b"{half a file").unwrap();
        assert!(s.load().is_err());
        assert_eq!(s.load_lenient().unwrap(), None);
        assert!(dir.join(format!("{FILE}.corrupt")).exists());
        assert_eq!(s.load().unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
