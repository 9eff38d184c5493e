//! The link handshake, free of I/O: what each end sends first on a new connection, and
//! the keys both derive from it.
//!
//! ```text
//! dialer                                   listener
//!   | -- opening (48 bytes, plaintext) ----> |   both send theirs at once
//!   | <--------- opening (48 bytes) -------- |
//!   |    keys = HKDF-SHA256(psk, salt = dialer opening ‖ listener opening)
//!   | -- confirm (sealed, dialer key) -----> |   listener checks it before it sends
//!   | <--------- confirm (listener key) ---- |   anything sealed
//! ```
//!
//! An opening is `magic "FTVH" | version u16 | flags u16 | link u16 | 6 zero bytes |
//! nonce [32]`. Each connection's keys depend on both ends' fresh nonces, and each
//! direction has its own key, so a frame recorded on another connection, or one written
//! back to the end that sent it, does not open: nothing a peer sends is believed before
//! it has proved it holds the pre-shared key on this very connection.

use chacha20poly1305::aead::KeyInit;
use chacha20poly1305::ChaCha20Poly1305;
use hkdf::Hkdf;
use sha2::Sha256;

/// First bytes of an opening.
pub const MAGIC: [u8; 4] = *b"FTVH";
/// The link protocol this build speaks (openings, frames and messages together).
pub const LINK_VERSION: u16 = 8;
/// Length of an opening.
pub const OPENING_LEN: usize = 48;
/// Opening flag: link traffic is encrypted (else only authenticated).
pub const FLAG_ENCRYPT: u16 = 1;

/// Which end of the TCP connection this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// It connected.
    Dialer,
    /// It accepted.
    Listener,
}

/// What one end announces in its opening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opening {
    /// Link protocol version.
    pub version: u16,
    /// Whether the sender encrypts link traffic.
    pub encrypt: bool,
    /// The link (index in the configuration) the sender believes this connection is.
    pub link: u16,
    /// Fresh random bytes.
    pub nonce: [u8; 32],
}

/// Why an opening (or the pair of them) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Not an ftvm link at all.
    #[error("not an ftvm link opening (bad magic)")]
    BadMagic,
    /// Another link protocol version.
    #[error("peer speaks link protocol version {peer}; this ftvm speaks version {LINK_VERSION}")]
    Version {
        /// The peer's version.
        peer: u16,
    },
    /// The two ends disagree on encryption.
    #[error(
        "peer {peer} link traffic but this node {mine} (security.encrypt must match on both nodes)"
    )]
    Encryption {
        /// What the peer does ("encrypts" / "does not encrypt").
        peer: &'static str,
        /// What this node does.
        mine: &'static str,
    },
    /// The connection arrived on another link than the peer meant.
    #[error("peer dialled this node's link{mine} as its link{peer} (the [[link]] lists differ in order)")]
    WrongLink {
        /// The peer's link index.
        peer: u16,
        /// This node's link index.
        mine: u16,
    },
    /// The peer's confirmation did not open under the derived key: it does not hold the
    /// pre-shared key (or the opening was tampered with, or replayed).
    #[error("peer failed to prove it holds the pre-shared key")]
    Unauthenticated,
}

impl Opening {
    /// A new opening with a fresh nonce from the operating system.
    pub fn new(encrypt: bool, link: u16) -> Self {
        let mut nonce = [0u8; 32];
        fill_random(&mut nonce);
        Self {
            version: LINK_VERSION,
            encrypt,
            link,
            nonce,
        }
    }

    /// Its 48 bytes.
    pub fn encode(&self) -> [u8; OPENING_LEN] {
        let mut b = [0u8; OPENING_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        let flags = if self.encrypt { FLAG_ENCRYPT } else { 0 };
        b[6..8].copy_from_slice(&flags.to_le_bytes());
        b[8..10].copy_from_slice(&self.link.to_le_bytes());
        b[16..48].copy_from_slice(&self.nonce);
        b
    }

    /// Parses an opening; only the magic is checked here (see [`check_peer`]).
    pub fn decode(b: &[u8; OPENING_LEN]) -> Result<Self, HandshakeError> {
        if b[0..4] != MAGIC {
            return Err(HandshakeError::BadMagic);
        }
        let mut nonce = [0u8; 32];
        nonce.copy_from_slice(&b[16..48]);
        Ok(Self {
            version: u16::from_le_bytes([b[4], b[5]]),
            encrypt: u16::from_le_bytes([b[6], b[7]]) & FLAG_ENCRYPT != 0,
            link: u16::from_le_bytes([b[8], b[9]]),
            nonce,
        })
    }
}

/// Whether a peer's opening can be talked to by an end that sent `mine`.
pub fn check_peer(mine: &Opening, peer: &Opening) -> Result<(), HandshakeError> {
    if peer.version != LINK_VERSION {
        return Err(HandshakeError::Version { peer: peer.version });
    }
    let does = |e: bool| if e { "encrypts" } else { "does not encrypt" };
    if peer.encrypt != mine.encrypt {
        return Err(HandshakeError::Encryption {
            peer: does(peer.encrypt),
            mine: does(mine.encrypt),
        });
    }
    if peer.link != mine.link {
        return Err(HandshakeError::WrongLink {
            peer: peer.link,
            mine: mine.link,
        });
    }
    Ok(())
}

/// The two directions' keys of one connection.
pub struct ConnectionKeys {
    /// Seals what this end sends.
    pub send: ChaCha20Poly1305,
    /// Opens what the peer sends.
    pub receive: ChaCha20Poly1305,
    /// Whether payloads are encrypted (always authenticated).
    pub encrypt: bool,
}

impl std::fmt::Debug for ConnectionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionKeys")
            .field("encrypt", &self.encrypt)
            .finish_non_exhaustive()
    }
}

/// Derives the connection's keys from the pre-shared key and both openings, as seen by
/// end `me`. Any change to either opening (a flag, a nonce) gives other keys.
pub fn derive_keys(
    psk: &[u8],
    me: End,
    dialer: &[u8; OPENING_LEN],
    listener: &[u8; OPENING_LEN],
    encrypt: bool,
) -> ConnectionKeys {
    let mut salt = [0u8; 2 * OPENING_LEN];
    salt[..OPENING_LEN].copy_from_slice(dialer);
    salt[OPENING_LEN..].copy_from_slice(listener);
    let hk = Hkdf::<Sha256>::new(Some(&salt), psk);
    let mut okm = [0u8; 64];
    // 64 bytes is far below HKDF-SHA256's limit of 255 * 32: expand cannot fail.
    if hk.expand(b"ftvm link keys v7", &mut okm).is_err() {
        unreachable!("HKDF-SHA256 expands to 64 bytes");
    }
    let dialer_key = ChaCha20Poly1305::new((&okm[..32]).into());
    let listener_key = ChaCha20Poly1305::new((&okm[32..]).into());
    let (send, receive) = match me {
        End::Dialer => (dialer_key, listener_key),
        End::Listener => (listener_key, dialer_key),
    };
    ConnectionKeys {
        send,
        receive,
        encrypt,
    }
}

/// Fills `buf` from the operating system's random source. Without one (which a Linux
/// host always has) the clock and a counter make the bytes unique to this process, so
/// nonces still never repeat.
pub fn fill_random(buf: &mut [u8]) {
    use rand_core::RngCore;
    if rand_core::OsRng.try_fill_bytes(buf).is_ok() {
        return;
    }
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = [
        t.to_le_bytes().as_slice(),
        &n.to_le_bytes(),
        &std::process::id().to_le_bytes(),
    ]
    .concat();
    for (i, b) in buf.iter_mut().enumerate() {
        *b = seed[i % seed.len()] ^ (i as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openings_round_trip_and_mismatches_say_what_differs() {
        let a = Opening::new(true, 1);
        let b = Opening::decode(&a.encode()).unwrap();
        assert_eq!(a, b);
        assert_ne!(Opening::new(true, 1).nonce, a.nonce, "fresh nonces");
        let mut bytes = a.encode();
        bytes[0] = b'X';
        assert_eq!(Opening::decode(&bytes), Err(HandshakeError::BadMagic));
        let old = Opening { version: 2, ..a };
        assert!(check_peer(&a, &old)
            .unwrap_err()
            .to_string()
            .contains("link protocol version 2"));
        let plain = Opening {
            encrypt: false,
            ..a
        };
        let e = check_peer(&a, &plain).unwrap_err().to_string();
        assert!(
            e.contains("does not encrypt") && e.contains("security.encrypt"),
            "{e}"
        );
        let other = Opening { link: 0, ..a };
        assert!(matches!(
            check_peer(&a, &other),
            Err(HandshakeError::WrongLink { peer: 0, mine: 1 })
        ));
        assert_eq!(check_peer(&a, &b), Ok(()));
    }

    #[test]
    fn both_ends_derive_matching_keys_per_direction_and_only_from_the_same_openings() {
        use chacha20poly1305::aead::Aead;
        let psk = b"pair-key-0123456789";
        let d = Opening::new(true, 0).encode();
        let l = Opening::new(true, 0).encode();
        let dk = derive_keys(psk, End::Dialer, &d, &l, true);
        let lk = derive_keys(psk, End::Listener, &d, &l, true);
        let nonce = [0u8; 12];
        let sealed = dk.send.encrypt((&nonce).into(), &b"hello"[..]).unwrap();
        assert_eq!(
            lk.receive.decrypt((&nonce).into(), &sealed[..]).unwrap(),
            b"hello"
        );
        assert!(
            dk.receive.decrypt((&nonce).into(), &sealed[..]).is_err(),
            "a frame written back to its sender does not open"
        );
        let other = derive_keys(
            psk,
            End::Listener,
            &d,
            &Opening::new(true, 0).encode(),
            true,
        );
        assert!(
            other.receive.decrypt((&nonce).into(), &sealed[..]).is_err(),
            "a frame of another connection does not open"
        );
        let wrong = derive_keys(b"another-key-0123456", End::Listener, &d, &l, true);
        assert!(wrong.receive.decrypt((&nonce).into(), &sealed[..]).is_err());
    }
}
