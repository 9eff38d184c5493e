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
//! A claim is written whole before it exists under its name: the holder's name goes
//! into a temporary file, which is fsynced and then hard-linked to `gen-<g>` (atomic,
//! and failing if the name exists, on local file systems and NFS alike). So a claim
//! file always names its holder, and a node whose claim succeeded but whose answer was
//! lost (an NFS reply, an error after the link) recognises its own claim on retry.
//!
//! The directory identifies itself: `arbiter-id` holds a random identity written once
//! (by `ftvm arbiter init DIR` or by the first claim). Each node keeps the identity it
//! used and the nodes tell each other theirs; a claim in a directory whose identity
//! differs from either is refused: two hosts with directories of their own (a share
//! that is not mounted, a wrong path) can never both win.
//!
//! The `none` arbiter never grants an automatic takeover.

use std::path::{Path, PathBuf};

use crate::durable;

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
    /// The directory's identity is not the one this pair's nodes used.
    #[error("arbiter directory {path} {found} but this pair used arbiter directory {known:016x}: wrong directory, or the shared storage is not mounted")]
    Foreign {
        /// The directory.
        path: PathBuf,
        /// What the directory holds, in words.
        found: String,
        /// The identity a node of the pair used.
        known: u64,
    },
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

/// What a check of the arbiter found (see [`Arbiter::check_held`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// No node holds a generation after the one this node knows (or this node does).
    Unchanged,
    /// Another node won a later generation.
    Taken {
        /// The holder's generation.
        generation: u64,
        /// The holder's name, if readable.
        holder: String,
    },
    /// The arbiter never grants automatic takeovers, so none happened.
    NoTakeovers,
}

/// What an arbiter directory holds after the generation a node knows.
enum After {
    /// No later generation.
    Nothing,
    /// The next one, won by this node's own claim whose answer it never saw.
    Own(u64),
    /// A later one another node won.
    Other { generation: u64, holder: String },
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
    /// Tries to win the generation after `known` for `node`, in a directory whose
    /// identity is each of `ids` (those the pair's nodes used).
    pub fn claim(&self, node: &str, known: u64, ids: &[u64]) -> Result<Claim, ArbiterError> {
        let dir = match self {
            Arbiter::None => return Ok(Claim::Refused),
            Arbiter::SharedStorage { dir } => dir,
        };
        match self.after(dir, node, known, ids)? {
            After::Nothing => {}
            // This node's own earlier claim whose answer it never saw is still its win.
            After::Own(generation) => {
                sync_dir(dir)?;
                return Ok(Claim::Won { generation });
            }
            After::Other { generation, holder } => return Ok(Claim::Lost { generation, holder }),
        }
        let next = known + 1;
        let path = dir.join(format!("gen-{next}"));
        let tmp = dir.join(format!(".claim-{next}-{:016x}", random_id()));
        let written = durable::create_new(&tmp, node.as_bytes());
        let linked = written.and_then(|()| std::fs::hard_link(&tmp, &path));
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                sync_dir(dir)?;
                Ok(Claim::Won { generation: next })
            }
            // Taken, by the other node or by this one's own attempt whose answer was
            // lost (NFS retransmits a link whose reply it did not see).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let holder = holder(dir, next);
                if holder == node {
                    sync_dir(dir)?;
                    Ok(Claim::Won { generation: next })
                } else {
                    Ok(Claim::Lost {
                        generation: next,
                        holder,
                    })
                }
            }
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Whether another node won a generation after `known` (this node's), without
    /// claiming one: a primary that did not run for about the peer timeout asks this
    /// before it trusts what it received meanwhile. Reads only.
    pub fn check_held(&self, node: &str, known: u64, ids: &[u64]) -> Result<Held, ArbiterError> {
        let dir = match self {
            Arbiter::None => return Ok(Held::NoTakeovers),
            Arbiter::SharedStorage { dir } => dir,
        };
        Ok(match self.after(dir, node, known, ids)? {
            After::Nothing | After::Own(_) => Held::Unchanged,
            After::Other { generation, holder } => Held::Taken { generation, holder },
        })
    }

    /// What `dir` holds after generation `known`, once it is checked to be there, not
    /// behind `known`, and the pair's (`ids`).
    fn after(
        &self,
        dir: &Path,
        node: &str,
        known: u64,
        ids: &[u64],
    ) -> Result<After, ArbiterError> {
        Self::check_dir(dir)?;
        let highest = highest_generation(dir)?;
        if highest < known {
            return Err(ArbiterError::Behind {
                path: dir.to_path_buf(),
                found: highest,
                known,
            });
        }
        self.identify(ids)?;
        if highest == known {
            return Ok(After::Nothing);
        }
        let holder = holder(dir, highest);
        Ok(if highest == known + 1 && holder == node {
            After::Own(highest)
        } else {
            After::Other {
                generation: highest,
                holder,
            }
        })
    }

    /// The directory's identity, checked against `ids` (those the pair's nodes used):
    /// a directory without one gets one now unless a node already used another.
    pub fn identify(&self, ids: &[u64]) -> Result<Option<u64>, ArbiterError> {
        let dir = match self {
            Arbiter::None => return Ok(None),
            Arbiter::SharedStorage { dir } => dir,
        };
        let id = match read_id(dir)? {
            Some(id) => id,
            None => {
                if let Some(&known) = ids.first() {
                    return Err(ArbiterError::Foreign {
                        path: dir.clone(),
                        found: "has no identity".into(),
                        known,
                    });
                }
                init_id(dir)?
            }
        };
        match ids.iter().find(|&&k| k != id) {
            Some(&known) => Err(ArbiterError::Foreign {
                path: dir.clone(),
                found: format!("is arbiter directory {id:016x}"),
                known,
            }),
            None => Ok(Some(id)),
        }
    }

    /// Gives the directory its identity (`ftvm arbiter init`), or returns the one it
    /// has.
    pub fn init(dir: &Path) -> Result<u64, ArbiterError> {
        Self::check_dir(dir)?;
        match read_id(dir)? {
            Some(id) => Ok(id),
            None => init_id(dir),
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

const ID_FILE: &str = "arbiter-id";

fn random_id() -> u64 {
    let mut b = [0u8; 8];
    crate::link::handshake::fill_random(&mut b);
    u64::from_le_bytes(b)
}

fn sync_dir(dir: &Path) -> Result<(), ArbiterError> {
    durable::sync_dir(dir).map_err(io(dir))
}

fn read_id(dir: &Path) -> Result<Option<u64>, ArbiterError> {
    let path = dir.join(ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => u64::from_str_radix(text.trim(), 16).map(Some).map_err(|e| {
            io(&path)(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not an arbiter identity: {e}"),
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path)(e)),
    }
}

/// Writes a new identity whole, then links it into place (the first writer wins).
fn init_id(dir: &Path) -> Result<u64, ArbiterError> {
    let id = random_id();
    let path = dir.join(ID_FILE);
    let tmp = dir.join(format!(".{ID_FILE}-{id:016x}"));
    let linked = durable::create_new(&tmp, format!("{id:016x}\n").as_bytes())
        .and_then(|()| std::fs::hard_link(&tmp, &path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(&path)(e)),
    }
    sync_dir(dir)?;
    read_id(dir)?.ok_or_else(|| {
        io(&path)(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "written but not found",
        ))
    })
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
        durable::replace(&self.path, format!("{g}\n").as_bytes()).map_err(io(&self.path))?;
        self.value = g;
        Ok(())
    }
}

/// The identity of the arbiter directory this node has used, kept in its state
/// directory (`arbiter-id`, the same form as the directory's own file).
#[derive(Debug, Clone)]
pub struct UsedIdentity {
    state_dir: PathBuf,
    value: Option<u64>,
}

impl UsedIdentity {
    /// Loads it from `state_dir` (none if never stored; a damaged file is an error).
    pub fn load(state_dir: &Path) -> Result<Self, ArbiterError> {
        Ok(Self {
            state_dir: state_dir.to_path_buf(),
            value: read_id(state_dir)?,
        })
    }

    /// The identity, if this node has used a directory.
    pub fn get(&self) -> Option<u64> {
        self.value
    }

    /// Keeps `id`, durably.
    pub fn set(&mut self, id: u64) -> Result<(), ArbiterError> {
        let path = self.state_dir.join(ID_FILE);
        durable::replace(&path, format!("{id:016x}\n").as_bytes()).map_err(io(&path))?;
        self.value = Some(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(dir: impl AsRef<Path>) -> Arbiter {
        Arbiter::SharedStorage {
            dir: dir.as_ref().to_path_buf(),
        }
    }

    #[test]
    fn exactly_one_of_two_racing_nodes_wins_and_a_stale_one_never_does() {
        let d = tempfile::tempdir().unwrap();
        let arb = shared(d.path());
        assert_eq!(
            arb.claim("a", 0, &[]).unwrap(),
            Claim::Won { generation: 1 }
        );
        // Both learned generation 1; they race for 2 from two threads.
        let (a, b) = (arb.clone(), arb.clone());
        let ta = std::thread::spawn(move || a.claim("a", 1, &[]).unwrap());
        let tb = std::thread::spawn(move || b.claim("b", 1, &[]).unwrap());
        let results = [ta.join().unwrap(), tb.join().unwrap()];
        let wins = results
            .iter()
            .filter(|c| matches!(c, Claim::Won { generation: 2 }))
            .count();
        assert_eq!(wins, 1, "{results:?}");
        let loser = if results[0] == (Claim::Won { generation: 2 }) {
            "b"
        } else {
            "a"
        };
        // The loser, which only knew generation 1, cannot win again.
        assert!(matches!(
            arb.claim(loser, 1, &[]).unwrap(),
            Claim::Lost { generation: 2, .. }
        ));
        assert!(
            !std::fs::read_dir(d.path()).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')),
            "no temporary file is left behind"
        );
        assert_eq!(Arbiter::None.claim("a", 0, &[]).unwrap(), Claim::Refused);
    }

    #[test]
    fn a_check_sees_another_nodes_later_generation_and_claims_nothing() {
        let d = tempfile::tempdir().unwrap();
        let arb = shared(d.path());
        assert_eq!(
            arb.claim("a", 0, &[]).unwrap(),
            Claim::Won { generation: 1 }
        );
        let entries = || std::fs::read_dir(d.path()).unwrap().count();
        let before = entries();
        assert_eq!(arb.check_held("a", 1, &[]).unwrap(), Held::Unchanged);
        assert_eq!(entries(), before, "a check creates nothing");
        // b takes over: a's check, knowing generation 1, sees it.
        assert_eq!(
            arb.claim("b", 1, &[]).unwrap(),
            Claim::Won { generation: 2 }
        );
        assert_eq!(
            arb.check_held("a", 1, &[]).unwrap(),
            Held::Taken {
                generation: 2,
                holder: "b".into()
            }
        );
        // b's own claim whose answer it did not see yet is no takeover by another.
        assert_eq!(arb.check_held("b", 1, &[]).unwrap(), Held::Unchanged);
        assert!(matches!(
            arb.check_held("a", 3, &[]).unwrap_err(),
            ArbiterError::Behind {
                found: 2,
                known: 3,
                ..
            }
        ));
        assert_eq!(
            Arbiter::None.check_held("a", 0, &[]).unwrap(),
            Held::NoTakeovers
        );
    }

    #[test]
    fn a_missing_directory_or_one_behind_the_known_generation_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let missing = shared(d.path().join("not-mounted"));
        let e = missing.claim("a", 0, &[]).unwrap_err();
        assert!(matches!(e, ArbiterError::Missing(_)), "{e}");
        assert!(e.to_string().contains("not-mounted"), "{e}");
        assert!(missing.check().is_err());
        assert!(!d.path().join("not-mounted").exists(), "never created");
        // An empty directory where generation 3 was known: not the pair's directory.
        let empty = shared(d.path());
        let e = empty.claim("a", 3, &[]).unwrap_err();
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
    fn a_claim_whose_answer_was_lost_is_won_by_its_holder_on_retry_and_by_no_one_else() {
        let d = tempfile::tempdir().unwrap();
        let arb = shared(d.path());
        // Node a's claim of generation 1 reached the directory, but a never saw the
        // answer (an NFS reply lost, an error after the link): it still knows 0.
        assert_eq!(
            arb.claim("a", 0, &[]).unwrap(),
            Claim::Won { generation: 1 }
        );
        assert_eq!(
            std::fs::read_to_string(d.path().join("gen-1")).unwrap(),
            "a",
            "the claim names its holder"
        );
        assert_eq!(
            arb.claim("a", 0, &[]).unwrap(),
            Claim::Won { generation: 1 }
        );
        assert_eq!(
            arb.claim("b", 0, &[]).unwrap(),
            Claim::Lost {
                generation: 1,
                holder: "a".into()
            }
        );
    }

    #[test]
    fn a_directory_of_another_identity_is_refused_and_one_without_is_given_one() {
        let d = tempfile::tempdir().unwrap();
        let (one, two) = (d.path().join("one"), d.path().join("two"));
        std::fs::create_dir(&one).unwrap();
        std::fs::create_dir(&two).unwrap();
        let a1 = shared(&one);
        let a2 = shared(&two);
        let id1 = a1.identify(&[]).unwrap().unwrap();
        assert_eq!(Arbiter::init(&one).unwrap(), id1, "written once");
        let id2 = Arbiter::init(&two).unwrap();
        assert_ne!(id1, id2);
        let e = a2.claim("b", 0, &[id1]).unwrap_err();
        assert!(matches!(e, ArbiterError::Foreign { .. }), "{e}");
        assert!(e.to_string().contains(&format!("{id1:016x}")), "{e}");
        assert!(!two.join("gen-1").exists(), "nothing claimed");
        // A directory without an identity where the pair used one: not the pair's.
        let three = d.path().join("three");
        std::fs::create_dir(&three).unwrap();
        let a3 = shared(&three);
        assert!(matches!(
            a3.claim("a", 0, &[id1]),
            Err(ArbiterError::Foreign { .. })
        ));
        assert!(!three.join("arbiter-id").exists());
        assert_eq!(
            a1.claim("a", 0, &[id1]).unwrap(),
            Claim::Won { generation: 1 }
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
