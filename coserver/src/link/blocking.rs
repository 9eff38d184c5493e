//! The dialer's side of a link connection over a blocking `std` stream: for tools and
//! tests that speak to a CoServer's link port the way a peer (or a stranger) would.

use std::io::{Read, Write};
use std::net::TcpStream;

use super::frame::{self, FrameError, Opener, Plain, Sealer};
use super::handshake::{self, End, HandshakeError, Opening, OPENING_LEN};

/// Errors of a blocking link connection.
#[derive(Debug, thiserror::Error)]
pub enum BlockingError {
    /// The stream failed.
    #[error("link stream: {0}")]
    Io(#[from] std::io::Error),
    /// The handshake was refused.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// A frame did not open.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// A dialled, authenticated connection to a link's listening end.
pub struct Dialled {
    /// The stream.
    pub stream: TcpStream,
    /// Seals what this end sends.
    pub sealer: Sealer,
    /// Opens what the listener sends.
    pub opener: Opener,
    /// The opening and the confirm frame this end sent, as on the wire.
    pub sent_handshake: Vec<u8>,
}

/// Dials `stream`'s peer as link `link` with key `psk`: openings, confirms.
pub fn dial(
    mut stream: TcpStream,
    psk: &[u8],
    encrypt: bool,
    link: u16,
) -> Result<Dialled, BlockingError> {
    let mine = Opening::new(encrypt, link);
    let mine_bytes = mine.encode();
    stream.write_all(&mine_bytes)?;
    let mut theirs_bytes = [0u8; OPENING_LEN];
    stream.read_exact(&mut theirs_bytes)?;
    let theirs = Opening::decode(&theirs_bytes)?;
    handshake::check_peer(&mine, &theirs)?;
    let keys = handshake::derive_keys(psk, End::Dialer, &mine_bytes, &theirs_bytes, encrypt);
    let mut sealer = Sealer::new(keys.send, encrypt);
    let mut opener = Opener::new(keys.receive, encrypt);
    let confirm = sealer.seal(&Plain::Confirm(End::Dialer));
    stream.write_all(&confirm)?;
    let (len, body) = read_raw(&mut stream, frame::CONFIRM_BODY)?;
    match opener.open(len, body) {
        Ok(Plain::Confirm(End::Listener)) => {}
        _ => return Err(HandshakeError::Unauthenticated.into()),
    }
    Ok(Dialled {
        stream,
        sealer,
        opener,
        sent_handshake: [&mine_bytes[..], &confirm].concat(),
    })
}

/// Reads one frame's length and body as they are on the wire (at most `max` bytes).
pub fn read_raw(stream: &mut impl Read, max: usize) -> Result<(u32, Vec<u8>), BlockingError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    let n = Opener::check_len(len, max)?;
    let mut body = vec![0u8; n];
    stream.read_exact(&mut body)?;
    Ok((len, body))
}

impl Dialled {
    /// Reads and opens the next frame, returning it also as it was on the wire.
    pub fn read(&mut self) -> Result<(Plain, Vec<u8>), BlockingError> {
        let (len, body) = read_raw(&mut self.stream, frame::MAX_BODY)?;
        let wire = [&len.to_le_bytes()[..], &body].concat();
        Ok((self.opener.open(len, body)?, wire))
    }

    /// Seals and writes a frame.
    pub fn write(&mut self, plain: &Plain) -> Result<(), BlockingError> {
        let f = self.sealer.seal(plain);
        self.stream.write_all(&f)?;
        Ok(())
    }
}
