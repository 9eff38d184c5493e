//! The operator API's token: actions from another host than the CoServer's must
//! present it. Created once, readable only by the CoServer's user, in its state
//! directory.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::ControlError;

/// The token's file in the state directory.
pub const TOKEN_FILE: &str = "control-token";

/// The token in `state_dir`, created (random, 32 hex digits, mode 0600) if absent.
pub fn load_or_create_token(state_dir: &Path) -> Result<String, ControlError> {
    let path = state_dir.join(TOKEN_FILE);
    let err = |source| ControlError::Token {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(t) if t.trim().len() >= 16 => return Ok(t.trim().to_string()),
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "shorter than 16 characters; remove it and a new one is made",
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    std::fs::create_dir_all(state_dir).map_err(err)?;
    let mut bytes = [0u8; 16];
    crate::link::handshake::fill_random(&mut bytes);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(err)?;
    writeln!(f, "{token}").map_err(err)?;
    f.sync_all().map_err(err)?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let t = load_or_create_token(dir.path()).unwrap();
        assert_eq!(t.len(), 32);
        let mode = std::fs::metadata(dir.path().join(TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create_token(dir.path()).unwrap(), t);
        std::fs::write(dir.path().join(TOKEN_FILE), "short\n").unwrap();
        let e = load_or_create_token(dir.path()).unwrap_err().to_string();
        assert!(e.contains("control-token") && e.contains("shorter"), "{e}");
    }
}
