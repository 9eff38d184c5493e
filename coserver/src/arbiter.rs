//! The arbiter: decides which CoServer may run the guest when they cannot hear each
//! other.
//!
//! The shared-storage arbiter is a directory both hosts see. Winning generation `g`
//! means creating the file `gen-<g>` there with O_CREAT|O_EXCL, an atomic test-and-set
//! on local file systems and NFS alike. A node may claim only the generation after the
//! highest it knows of: if the directory already holds a higher one, another node won
//! since, and a stale holder cannot win again. Both nodes of a pair learn the current
//! generation from each other's heartbeats, so when they lose each other they race for
//! the same next generation and exactly one wins. Each node also keeps the highest
//! generation it knew in its state directory, across restarts. The directory is never
//! created by a claim, and a directory holding fewer generations than the node knows is
//! refused: both are what an unmounted share looks like, where each host could otherwise
//! win in a private directory of its own.
//!
//! The `none` arbiter never grants an automatic takeover.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Errors of the arbiter.
#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    /// The shared directory or the node's state cannot be used.
    #[error("arbiter {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The shared directory does not exist: a claim in a local stand-in could let both
    /// hosts win.
    #[error("arbiter directory {0} does not exist or is not a directory (is the shared storage mounted?)")]
    Missing(PathBuf),
    /// The directory holds fewer generations than this node has seen: it is not the
    /// shared directory the pair has been using.
    #[error("arbiter directory {path} holds generation {found} but this node knows generation {known}: wrong directory, or the shared storage is not mounted")]
    Behind {
        /// The directory.
        path: PathBuf,
        /// Highest generation found there.
        found: u64,
        /// Highest generation this node knows.
        known: u64,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArbiterError + '_ {
    move |source| ArbiterError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The outcome of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node holds `generation` now.
    Won {
        /// The generation won.
        generation: u64,
    },
    /// Another node holds `generation`.
    Lost {
        /// The holder's generation.
        generation: u64,
        /// The holder's name, if readable.
        holder: String,
    },
    /// The arbiter never grants automatic takeovers.
    Refused,
}

/// An arbiter.
#[derive(Debug, Clone)]
pub enum Arbiter {
    /// A lock directory on shared storage.
    SharedStorage {
        /// The directory.
        dir: PathBuf,
    },
    /// No automatic takeover.
    None,
}

impl Arbiter {
    /// Tries to win the generation after `known` for `node`.
    pub fn claim(&self, node: &str, known: u64) -> Result<Claim, ArbiterError> {
        let dir = match self {
            Arbiter::None => return Ok(Claim::Refused),
            Arbiter::SharedStorage { dir } => dir,
        };
        Self::check_dir(dir)?;
        let highest = highest_generation(dir)?;
        if highest < known {
            return Err(ArbiterError::Behind {
                path: dir.clone(),
                found: highest,
                known,
            });
        }
        if highest > known {
            return Ok(Claim::Lost {
                generation: highest,
                holder: holder(dir, highest),
            });
        }
        let next = highest + 1;
        let path = dir.join(format!("gen-{next}"));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                f.write_all(node.as_bytes()).map_err(io(&path))?;
                f.sync_all().map_err(io(&path))?;
                // Make the new name durable too.
                if let Ok(d) = std::fs::File::open(dir) {
                    let _ = d.sync_all();
                }
                Ok(Claim::Won { generation: next })
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(Claim::Lost {
                generation: next,
                holder: holder(dir, next),
            }),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Checks that a shared-storage arbiter's directory exists (it is never created: a
    /// missing mount must not turn into a private directory each host can win in).
    pub fn check(&self) -> Result<(), ArbiterError> {
        match self {
            Arbiter::None => Ok(()),
            Arbiter::SharedStorage { dir } => Self::check_dir(dir),
        }
    }

    fn check_dir(dir: &Path) -> Result<(), ArbiterError> {
        if std::fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
            Ok(())
        } else {
            Err(ArbiterError::Missing(dir.to_path_buf()))
        }
    }

    /// A short description for status output.
    pub fn describe(&self) -> String {
        match self {
            Arbiter::None => "none".to_string(),
            Arbiter::SharedStorage { dir } => format!("shared-storage {}", dir.display()),
        }
    }
}

fn highest_generation(dir: &Path) -> Result<u64, ArbiterError> {
    let mut highest = 0;
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        if let Some(g) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("gen-"))
            .and_then(|g| g.parse::<u64>().ok())
        {
            highest = highest.max(g);
        }
    }
    Ok(highest)
}

/// The winner's name as its file says; a winner that has created the file but not yet
/// written its name (the race just lost) is "the other node".
fn holder(dir: &Path, generation: u64) -> String {
    match std::fs::read_to_string(dir.join(format!("gen-{generation}"))) {
        Ok(name) if !name.trim().is_empty() => name.trim().to_string(),
        Ok(_) => "the other node".to_string(),
        Err(_) => "?".to_string(),
    }
}

/// The highest generation this node knew, kept in its state directory.
#[derive(Debug, Clone)]
pub struct KnownGeneration {
    path: PathBuf,
    value: u64,
}

impl KnownGeneration {
    /// Loads it from `state_dir` (0 if never stored; a damaged file is an error, not 0,
    /// so a damaged node cannot claim an old generation).
    pub fn load(state_dir: &Path) -> Result<Self, ArbiterError> {
        std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
        let path = state_dir.join("generation");
        let value = match std::fs::read_to_string(&path) {
            Ok(s) => s
                .trim()
                .parse::<u64>()
                .map_err(|e| io(&path)(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(&path)(e)),
        };
        Ok(Self { path, value })
    }

    /// The value.
    pub fn get(&self) -> u64 {
        self.value
    }

    /// Raises it to `g` (no-op if not higher), durably.
    pub fn raise(&mut self, g: u64) -> Result<(), ArbiterError> {
        if g <= self.value {
            return Ok(());
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, format!("{g}\n")).map_err(io(&tmp))?;
        if let Ok(f) = std::fs::File::open(&tmp) {
            let _ = f.sync_all();
        }
        std::fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        self.value = g;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_of_two_racing_nodes_wins_and_a_stale_one_never_does() {
        let d = tempfile::tempdir().unwrap();
        let arb = Arbiter::SharedStorage {
            dir: d.path().to_path_buf(),
        };
        assert_eq!(arb.claim("a", 0).unwrap(), Claim::Won { generation: 1 });
        // Both learned generation 1; they race for 2 from two threads.
        let (a, b) = (arb.clone(), arb.clone());
        let ta = std::thread::spawn(move || a.claim("a", 1).unwrap());
        let tb = std::thread::spawn(move || b.claim("b", 1).unwrap());
        let results = [ta.join().unwrap(), tb.join().unwrap()];
        let wins = results
            .iter()
            .filter(|c| matches!(c, Claim::Won { generation: 2 }))
            .count();
        assert_eq!(wins, 1, "{results:?}");
        // A node that only knew generation 1 cannot win again.
        assert!(matches!(
            arb.claim("a", 1).unwrap(),
            Claim::Lost { generation: 2, .. }
        ));
        assert_eq!(Arbiter::None.claim("a", 0).unwrap(), Claim::Refused);
    }

    #[test]
    fn a_missing_directory_or_one_behind_the_known_generation_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let missing = Arbiter::SharedStorage {
            dir: d.path().join("not-mounted"),
        };
        let e = missing.claim("a", 0).unwrap_err();
        assert!(matches!(e, ArbiterError::Missing(_)), "{e}");
        assert!(e.to_string().contains("not-mounted"), "{e}");
        assert!(missing.check().is_err());
        assert!(!d.path().join("not-mounted").exists(), "never created");
        // An empty directory where generation 3 was known: not the pair's directory.
        let empty = Arbiter::SharedStorage {
            dir: d.path().to_path_buf(),
        };
        let e = empty.claim("a", 3).unwrap_err();
        assert!(
            matches!(
                e,
                ArbiterError::Behind {
                    found: 0,
                    known: 3,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            0,
            "nothing claimed"
        );
    }

    #[test]
    fn the_known_generation_survives_a_restart_and_never_drops() {
        let d = tempfile::tempdir().unwrap();
        let mut k = KnownGeneration::load(d.path()).unwrap();
        assert_eq!(k.get(), 0);
        k.raise(5).unwrap();
        k.raise(3).unwrap();
        assert_eq!(KnownGeneration::load(d.path()).unwrap().get(), 5);
        std::fs::write(d.path().join("generation"), "garbage").unwrap();
        assert!(KnownGeneration::load(d.path()).is_err());
    }
}
