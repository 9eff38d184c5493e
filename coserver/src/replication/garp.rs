//! The gratuitous ARP a new primary sends so that switches and neighbours learn where
//! the guest's MAC/IP now lives.

use std::net::Ipv4Addr;

/// A broadcast ARP request for `ip` from `mac` (sender and target IP both `ip`),
/// padded to the Ethernet minimum.
pub fn frame(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    f.resize(60, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announces_the_guest_address() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = frame(mac, Ipv4Addr::new(10, 0, 99, 2));
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[8, 6]);
        assert_eq!(&f[22..28], &mac, "sender MAC");
        assert_eq!(&f[28..32], &[10, 0, 99, 2], "sender IP");
        assert_eq!(&f[38..42], &[10, 0, 99, 2], "target IP");
    }
}
