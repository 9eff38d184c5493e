//! The link frame: what travels on a link's byte stream.
//!
//! ```text
//! offset size
//!  0      4   magic "FTVL"
//!  4      2   frame format version (u16 LE)
//!  6      2   flags (u16 LE): bit 0 = payload is LZ4-compressed (size-prefixed)
//!  8      8   sender session (u64 LE; random per CoServer process)
//! 16      8   sequence number (u64 LE; 0 = this link only, never de-duplicated)
//! 24      4   payload length (u32 LE)
//! 28      n   payload (a bincode-encoded protocol message)
//! 28+n    4   CRC32C of bytes 0..28+n
//! 32+n   32   HMAC-SHA256 under the pair's pre-shared key of bytes 0..32+n
//! ```
//! The CRC catches corruption cheaply; the MAC authenticates the sender. A frame that
//! fails either is dropped and counted by the caller.

use std::io::{ErrorKind, Read};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FTVL";
/// The frame format this build speaks.
pub const FRAME_VERSION: u16 = 1;
/// Header length.
pub const HEADER_LEN: usize = 28;
/// CRC and MAC after the payload.
pub const TRAILER_LEN: usize = 4 + 32;
/// Largest payload accepted (a checkpoint of a busy epoch, or a sync chunk).
pub const MAX_PAYLOAD: usize = 256 << 20;
/// Flag: the payload is LZ4-compressed with its decompressed size prepended.
pub const FLAG_LZ4: u16 = 1;
/// Payloads at least this long are compressed.
const COMPRESS_FROM: usize = 256;

type HmacSha256 = Hmac<Sha256>;

/// Errors of reading a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended or failed between frames.
    #[error("link read: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended, failed or stalled in the middle of a frame.
    #[error("truncated frame: the stream ended after {got} bytes of it")]
    Truncated {
        /// Bytes of the frame received.
        got: usize,
    },
    /// The stream does not carry frames (or lost its framing).
    #[error("not a frame (bad magic)")]
    BadMagic,
    /// The peer writes another frame format.
    #[error("frame format version {found}; this ftvm speaks version {FRAME_VERSION}")]
    Version {
        /// The version found.
        found: u16,
    },
    /// The length field is beyond [`MAX_PAYLOAD`].
    #[error("frame of {0} bytes exceeds the limit")]
    TooLong(usize),
    /// A compressed payload that does not decompress within the limit.
    #[error("bad compressed payload: {0}")]
    Compression(String),
    /// The CRC does not match: the frame was corrupted.
    #[error("CRC mismatch (corrupt frame)")]
    Crc,
    /// The MAC does not match: wrong key or a forged frame.
    #[error("authentication failed (bad MAC)")]
    Auth,
}

/// Reads a frame header: the stream ending before its first byte is the end of the
/// stream ([`FrameError::Io`]); ending after it, a truncated frame.
fn read_header(r: &mut impl Read, header: &mut [u8]) -> Result<(), FrameError> {
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Err(std::io::Error::from(ErrorKind::UnexpectedEof).into()),
            Ok(0) => return Err(FrameError::Truncated { got }),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if got == 0 => return Err(e.into()),
            Err(_) => return Err(FrameError::Truncated { got }),
        }
    }
    Ok(())
}

/// A received, verified frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The sender's session.
    pub session: u64,
    /// Sequence number (0: this link only).
    pub seq: u64,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Encodes and checks frames under one key.
#[derive(Clone)]
pub struct Codec {
    mac: HmacSha256,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Codec { .. }")
    }
}

impl Codec {
    /// A codec keyed with the pair's pre-shared key.
    pub fn new(key: &[u8]) -> Self {
        // HMAC accepts keys of any length; new_from_slice cannot fail for it.
        let mac = HmacSha256::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        Self { mac }
    }

    /// The whole frame for `payload` (compressed when that pays).
    pub fn encode(&self, session: u64, seq: u64, payload: &[u8]) -> Vec<u8> {
        let compressed;
        let (flags, payload) = if payload.len() >= COMPRESS_FROM {
            compressed = lz4_flex::compress_prepend_size(payload);
            if compressed.len() < payload.len() {
                (FLAG_LZ4, &compressed[..])
            } else {
                (0, payload)
            }
        } else {
            (0, payload)
        };
        let mut f = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
        f.extend_from_slice(&MAGIC);
        f.extend_from_slice(&FRAME_VERSION.to_le_bytes());
        f.extend_from_slice(&flags.to_le_bytes());
        f.extend_from_slice(&session.to_le_bytes());
        f.extend_from_slice(&seq.to_le_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(payload);
        let crc = crc32c::crc32c(&f);
        f.extend_from_slice(&crc.to_le_bytes());
        let mut mac = self.mac.clone();
        mac.update(&f);
        f.extend_from_slice(&mac.finalize().into_bytes());
        f
    }

    /// Reads one frame from `r` and verifies it.
    pub fn read(&self, r: &mut impl Read) -> Result<Frame, FrameError> {
        let mut header = [0u8; HEADER_LEN];
        read_header(r, &mut header)?;
        if header[0..4] != MAGIC {
            return Err(FrameError::BadMagic);
        }
        let version = u16::from_le_bytes([header[4], header[5]]);
        if version != FRAME_VERSION {
            return Err(FrameError::Version { found: version });
        }
        let len = u32::from_le_bytes([header[24], header[25], header[26], header[27]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLong(len));
        }
        let mut rest = vec![0u8; len + TRAILER_LEN];
        r.read_exact(&mut rest)
            .map_err(|_| FrameError::Truncated { got: HEADER_LEN })?;
        let mut whole = Vec::with_capacity(HEADER_LEN + len + 4);
        whole.extend_from_slice(&header);
        whole.extend_from_slice(&rest[..len + 4]);
        let crc = u32::from_le_bytes([rest[len], rest[len + 1], rest[len + 2], rest[len + 3]]);
        if crc32c::crc32c(&whole[..HEADER_LEN + len]) != crc {
            return Err(FrameError::Crc);
        }
        let mut mac = self.mac.clone();
        mac.update(&whole);
        mac.verify_slice(&rest[len + 4..])
            .map_err(|_| FrameError::Auth)?;
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[at..at + 8]);
            u64::from_le_bytes(b)
        };
        rest.truncate(len);
        let flags = u16::from_le_bytes([header[6], header[7]]);
        let payload = if flags & FLAG_LZ4 != 0 {
            let size = rest
                .get(..4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .ok_or_else(|| FrameError::Compression("no size".into()))?;
            if size > MAX_PAYLOAD {
                return Err(FrameError::TooLong(size));
            }
            lz4_flex::decompress_size_prepended(&rest)
                .map_err(|e| FrameError::Compression(e.to_string()))?
        } else {
            rest
        };
        Ok(Frame {
            session: word(8),
            seq: word(16),
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> Codec {
        Codec::new(b"0123456789abcdef")
    }

    #[test]
    fn frames_round_trip() {
        let c = codec();
        let f = c.encode(7, 42, b"hello");
        let got = c.read(&mut &f[..]).unwrap();
        assert_eq!(
            got,
            Frame {
                session: 7,
                seq: 42,
                payload: b"hello".to_vec()
            }
        );
    }

    #[test]
    fn large_payloads_are_compressed_and_restored() {
        let c = codec();
        let payload = vec![7u8; 100_000];
        let f = c.encode(1, 1, &payload);
        assert!(f.len() < 2_000, "{} bytes", f.len());
        assert_eq!(c.read(&mut &f[..]).unwrap().payload, payload);
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let c = codec();
        let f = c.encode(1, 2, b"checkpoint payload");
        for i in 0..f.len() {
            for bit in [0x01u8, 0x80] {
                let mut g = f.clone();
                g[i] ^= bit;
                assert!(c.read(&mut &g[..]).is_err(), "byte {i} bit {bit:#x}");
            }
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let c = codec();
        let f = c.encode(1, 2, b"abc");
        let mut corrupt = f.clone();
        corrupt[HEADER_LEN] ^= 1;
        assert!(matches!(c.read(&mut &corrupt[..]), Err(FrameError::Crc)));
        let other = Codec::new(b"another key of 16+");
        assert!(matches!(other.read(&mut &f[..]), Err(FrameError::Auth)));
        assert!(matches!(
            c.read(&mut &f[..f.len() - 1]),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            c.read(&mut &f[..5]),
            Err(FrameError::Truncated { got: 5 })
        ));
        assert!(matches!(c.read(&mut &f[..0]), Err(FrameError::Io(_))));
        assert!(matches!(
            c.read(&mut &b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"[..]),
            Err(FrameError::BadMagic)
        ));
        let mut v2 = f.clone();
        v2[4] = 2;
        assert!(matches!(
            c.read(&mut &v2[..]),
            Err(FrameError::Version { found: 2 })
        ));
        let mut long = f;
        long[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            c.read(&mut &long[..]),
            Err(FrameError::TooLong(_))
        ));
    }
}
