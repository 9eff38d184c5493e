//! Link frames after the handshake, free of I/O: sealing and opening under a
//! connection's keys, and splitting messages into chunks and joining them again.
//!
//! ```text
//! frame  = length u32 LE | body (length bytes)
//! body   = ChaCha20-Poly1305(key of the direction, nonce = frame counter, aad = length)
//!          of the plain frame; with encryption off: plain frame | tag over it
//! plain  = 0 | end                            confirm (the first frame each way)
//!        | 1 | message                        an unsequenced message (hello, heartbeat)
//!        | 2 | flags | seq u64 LE | data      a chunk of sequenced message `seq`
//!                                             flags: 1 first, 2 last, 4 LZ4 (whole message)
//! ```
//! Each direction numbers its frames from 0 (the confirm); the number is the AEAD nonce
//! and is never sent, so a frame dropped, repeated, reordered, reflected or taken from
//! another connection does not open. Messages travel in chunks of at most [`CHUNK`]
//! bytes, so a heartbeat never waits behind more than one chunk.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, Tag};

use super::handshake::End;

/// Largest piece of a message in one frame.
pub const CHUNK: usize = 256 << 10;
/// Largest frame body accepted once the peer has authenticated.
pub const MAX_BODY: usize = CHUNK + 64;
/// Length of a confirm frame's body (plain 2 bytes + tag).
pub const CONFIRM_BODY: usize = 2 + TAG_LEN;
/// Largest message, encoded (a checkpoint of a very busy epoch).
pub const MAX_MESSAGE: usize = 1 << 30;
/// Poly1305 tag length.
pub const TAG_LEN: usize = 16;

const KIND_CONFIRM: u8 = 0;
const KIND_CONTROL: u8 = 1;
const KIND_CHUNK: u8 = 2;
const CHUNK_FIRST: u8 = 1;
const CHUNK_LAST: u8 = 2;
const CHUNK_LZ4: u8 = 4;
const CHUNK_HEADER: usize = 1 + 1 + 8;

/// Errors of a received frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length field is out of bounds for this point of the connection.
    #[error("frame of {len} bytes where at most {max} are accepted")]
    TooLong {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame does not open under the connection's key.
    #[error("frame failed authentication")]
    Auth,
    /// An authentic frame that makes no sense (a peer bug, never a stranger).
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// A compressed message that does not decompress within the limit.
    #[error("bad compressed message: {0}")]
    Compression(String),
}

/// What a frame carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plain {
    /// The handshake's proof of key.
    Confirm(End),
    /// An unsequenced message (encoded).
    Control(Vec<u8>),
    /// A piece of a sequenced message.
    Chunk {
        /// The message's sequence number.
        seq: u64,
        /// The first piece.
        first: bool,
        /// The last piece.
        last: bool,
        /// The whole message is LZ4-compressed (size-prepended).
        lz4: bool,
        /// The bytes.
        data: Vec<u8>,
    },
}

impl Plain {
    fn encode(&self) -> Vec<u8> {
        match self {
            Plain::Confirm(end) => vec![KIND_CONFIRM, matches!(end, End::Listener) as u8],
            Plain::Control(m) => [&[KIND_CONTROL][..], m].concat(),
            Plain::Chunk {
                seq,
                first,
                last,
                lz4,
                data,
            } => {
                let bit = |on: bool, b: u8| if on { b } else { 0 };
                let flags =
                    bit(*first, CHUNK_FIRST) | bit(*last, CHUNK_LAST) | bit(*lz4, CHUNK_LZ4);
                let mut v = Vec::with_capacity(CHUNK_HEADER + data.len());
                v.push(KIND_CHUNK);
                v.push(flags);
                v.extend_from_slice(&seq.to_le_bytes());
                v.extend_from_slice(data);
                v
            }
        }
    }

    fn decode(mut b: Vec<u8>) -> Result<Self, FrameError> {
        match b.first() {
            Some(&KIND_CONFIRM) if b.len() == 2 => Ok(Plain::Confirm(if b[1] == 1 {
                End::Listener
            } else {
                End::Dialer
            })),
            Some(&KIND_CONTROL) => {
                b.remove(0);
                Ok(Plain::Control(b))
            }
            Some(&KIND_CHUNK) if b.len() >= CHUNK_HEADER => {
                let flags = b[1];
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&b[2..10]);
                Ok(Plain::Chunk {
                    seq: u64::from_le_bytes(seq),
                    first: flags & CHUNK_FIRST != 0,
                    last: flags & CHUNK_LAST != 0,
                    lz4: flags & CHUNK_LZ4 != 0,
                    data: b.split_off(CHUNK_HEADER),
                })
            }
            _ => Err(FrameError::Malformed("unknown frame kind")),
        }
    }
}

fn nonce(counter: u64) -> chacha20poly1305::Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&counter.to_le_bytes());
    n.into()
}

/// Seals the frames one end sends on one connection.
pub struct Sealer {
    key: ChaCha20Poly1305,
    counter: u64,
    encrypt: bool,
}

impl Sealer {
    /// A sealer starting at frame 0.
    pub fn new(key: ChaCha20Poly1305, encrypt: bool) -> Self {
        Self {
            key,
            counter: 0,
            encrypt,
        }
    }

    /// The whole wire frame (length and body) carrying `plain`.
    pub fn seal(&mut self, plain: &Plain) -> Vec<u8> {
        let mut body = plain.encode();
        let len = (body.len() + TAG_LEN) as u32;
        let len_bytes = len.to_le_bytes();
        let n = nonce(self.counter);
        self.counter += 1;
        // Sealing fails only for a message beyond ChaCha20's 256 GiB limit; frames are
        // at most MAX_BODY long.
        let tag = if self.encrypt {
            self.key
                .encrypt_in_place_detached(&n, &len_bytes, &mut body)
        } else {
            // The tag covers the plain frame; the length field is covered with it (it
            // says how many of the bytes the tag covers), so nothing is copied.
            self.key.encrypt_in_place_detached(&n, &body, &mut [])
        }
        .unwrap_or_else(|_| unreachable!("frames are far below the AEAD's limit"));
        let mut frame = Vec::with_capacity(4 + len as usize);
        frame.extend_from_slice(&len_bytes);
        frame.extend_from_slice(&body);
        frame.extend_from_slice(&tag);
        frame
    }
}

/// Opens the frames the peer sends on one connection.
pub struct Opener {
    key: ChaCha20Poly1305,
    counter: u64,
    encrypt: bool,
}

impl Opener {
    /// An opener expecting frame 0 next.
    pub fn new(key: ChaCha20Poly1305, encrypt: bool) -> Self {
        Self {
            key,
            counter: 0,
            encrypt,
        }
    }

    /// Checks a frame's length field before its body is read: at most `max`.
    pub fn check_len(len: u32, max: usize) -> Result<usize, FrameError> {
        let len = len as usize;
        if len > max || len < TAG_LEN {
            return Err(FrameError::TooLong { len, max });
        }
        Ok(len)
    }

    /// Opens the next frame's body (its length field was `len`).
    pub fn open(&mut self, len: u32, mut body: Vec<u8>) -> Result<Plain, FrameError> {
        if body.len() < TAG_LEN {
            return Err(FrameError::Auth);
        }
        let tag_at = body.len() - TAG_LEN;
        let tag = Tag::clone_from_slice(&body[tag_at..]);
        body.truncate(tag_at);
        let len_bytes = len.to_le_bytes();
        let n = nonce(self.counter);
        let ok = if self.encrypt {
            self.key
                .decrypt_in_place_detached(&n, &len_bytes, &mut body, &tag)
        } else {
            self.key.decrypt_in_place_detached(&n, &body, &mut [], &tag)
        };
        ok.map_err(|_| FrameError::Auth)?;
        self.counter += 1;
        Plain::decode(body)
    }
}

/// Splits an encoded message into its chunks.
pub fn chunks(seq: u64, lz4: bool, payload: &[u8]) -> impl Iterator<Item = Plain> + '_ {
    let count = payload.len().div_ceil(CHUNK).max(1);
    (0..count).map(move |i| {
        let start = i * CHUNK;
        let end = (start + CHUNK).min(payload.len());
        Plain::Chunk {
            seq,
            first: i == 0,
            last: i + 1 == count,
            lz4,
            data: payload[start..end].to_vec(),
        }
    })
}

/// The message being received in chunks on one connection.
#[derive(Debug, Default)]
pub struct Reassembly {
    current: Option<(u64, bool, Vec<u8>)>,
}

impl Reassembly {
    /// Takes a chunk; returns the message's sequence number and bytes when it is whole.
    pub fn push(
        &mut self,
        seq: u64,
        first: bool,
        last: bool,
        lz4: bool,
        data: Vec<u8>,
    ) -> Result<Option<(u64, Vec<u8>)>, FrameError> {
        match (&mut self.current, first) {
            (None, true) => self.current = Some((seq, lz4, data)),
            (Some(_), true) => return Err(FrameError::Malformed("message started twice")),
            (None, false) => return Err(FrameError::Malformed("chunk of no message")),
            (Some((s, _, buf)), false) => {
                if *s != seq {
                    return Err(FrameError::Malformed("chunk of another message"));
                }
                buf.extend_from_slice(&data);
            }
        }
        if self
            .current
            .as_ref()
            .is_some_and(|(_, _, b)| b.len() > MAX_MESSAGE)
        {
            return Err(FrameError::TooLong {
                len: MAX_MESSAGE + 1,
                max: MAX_MESSAGE,
            });
        }
        if !last {
            return Ok(None);
        }
        let Some((seq, lz4, buf)) = self.current.take() else {
            return Ok(None);
        };
        if !lz4 {
            return Ok(Some((seq, buf)));
        }
        let size = buf
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| FrameError::Compression("no size".into()))?;
        if size > MAX_MESSAGE {
            return Err(FrameError::TooLong {
                len: size,
                max: MAX_MESSAGE,
            });
        }
        let plain = lz4_flex::decompress_size_prepended(&buf)
            .map_err(|e| FrameError::Compression(e.to_string()))?;
        Ok(Some((seq, plain)))
    }
}

/// Compresses a message when that makes it smaller: (LZ4?, bytes).
pub fn compress(payload: Vec<u8>) -> (bool, Vec<u8>) {
    if payload.len() < 256 {
        return (false, payload);
    }
    let c = lz4_flex::compress_prepend_size(&payload);
    if c.len() < payload.len() {
        (true, c)
    } else {
        (false, payload)
    }
}

#[cfg(test)]
mod tests {
    use super::super::handshake::{derive_keys, Opening};
    use super::*;

    fn pair(encrypt: bool) -> (Sealer, Opener) {
        let d = Opening::new(encrypt, 0).encode();
        let l = Opening::new(encrypt, 0).encode();
        let dk = derive_keys(b"0123456789abcdef", End::Dialer, &d, &l, encrypt);
        let lk = derive_keys(b"0123456789abcdef", End::Listener, &d, &l, encrypt);
        (
            Sealer::new(dk.send, encrypt),
            Opener::new(lk.receive, encrypt),
        )
    }

    fn open(o: &mut Opener, frame: &[u8]) -> Result<Plain, FrameError> {
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
        o.open(len, frame[4..].to_vec())
    }

    #[test]
    fn frames_open_once_in_order_and_every_flipped_bit_is_caught() {
        for encrypt in [true, false] {
            let (mut s, mut o) = pair(encrypt);
            let f0 = s.seal(&Plain::Confirm(End::Dialer));
            assert_eq!(f0.len(), 4 + CONFIRM_BODY);
            let f1 = s.seal(&Plain::Control(b"secret heartbeat".to_vec()));
            assert_eq!(
                f1.windows(6).any(|w| w == b"secret"),
                !encrypt,
                "encryption hides the payload"
            );
            for i in 0..f0.len() {
                let mut g = f0.clone();
                g[i] ^= 0x10;
                let (_, mut o2) = pair(encrypt);
                assert!(open(&mut o2, &g).is_err(), "byte {i}");
            }
            assert_eq!(open(&mut o, &f1), Err(FrameError::Auth), "out of order");
            assert_eq!(open(&mut o, &f0), Ok(Plain::Confirm(End::Dialer)));
            assert_eq!(open(&mut o, &f0), Err(FrameError::Auth), "replayed");
            assert_eq!(
                open(&mut o, &f1),
                Ok(Plain::Control(b"secret heartbeat".to_vec()))
            );
        }
    }

    #[test]
    fn messages_split_into_chunks_and_join_again() {
        let payload: Vec<u8> = (0..(CHUNK * 2 + 10)).map(|i| (i * 7 % 251) as u8).collect();
        let parts: Vec<Plain> = chunks(5, false, &payload).collect();
        assert_eq!(parts.len(), 3);
        let mut r = Reassembly::default();
        let mut whole = None;
        for p in parts {
            let Plain::Chunk {
                seq,
                first,
                last,
                lz4,
                data,
            } = p
            else {
                panic!("not a chunk")
            };
            whole = r.push(seq, first, last, lz4, data).unwrap();
        }
        assert_eq!(whole, Some((5, payload)));
        assert_eq!(
            chunks(1, false, &[]).count(),
            1,
            "an empty message is one chunk"
        );
        let (lz4, c) = compress(vec![9u8; 100_000]);
        assert!(lz4 && c.len() < 2000);
        let mut r = Reassembly::default();
        assert_eq!(
            r.push(2, true, true, true, c).unwrap(),
            Some((2, vec![9u8; 100_000]))
        );
        assert!(r.push(3, false, true, false, vec![]).is_err(), "no start");
        r.push(4, true, false, false, vec![1]).unwrap();
        assert!(
            r.push(5, false, true, false, vec![]).is_err(),
            "another message"
        );
        let mut bomb = (u32::MAX).to_le_bytes().to_vec();
        bomb.extend_from_slice(&[0u8; 16]);
        let mut r = Reassembly::default();
        assert!(matches!(
            r.push(6, true, true, true, bomb),
            Err(FrameError::TooLong { .. })
        ));
        assert!(Opener::check_len(u32::MAX, MAX_BODY).is_err());
        assert!(Opener::check_len(3, MAX_BODY).is_err());
    }
}
