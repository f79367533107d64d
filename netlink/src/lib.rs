//! A blocking NETLINK_ROUTE socket with request/answer matching: the one piece the shim's pod
//! network setup (host side, inside the pod netns) and the agent's guest network RPCs share.
//! Messages are built and parsed with `netlink-packet-route`; [`read`] takes the fields both
//! sides use out of them, [`text`] parses and formats addresses as Kata's agent API carries them.

#![deny(missing_docs)]

pub mod read;
pub mod text;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
pub use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST};
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::LinkMessage;
use netlink_packet_route::neighbour::NeighbourMessage;
use netlink_packet_route::route::RouteMessage;
pub use netlink_packet_route::RouteNetlinkMessage;

/// A blocking NETLINK_ROUTE socket, in the network namespace of the thread that opened it.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    /// Opens and binds the socket.
    pub fn open() -> io::Result<Netlink> {
        use nix::sys::socket::{bind, socket, AddressFamily as Af, NetlinkAddr, SockFlag, SockProtocol, SockType};
        let fd = socket(Af::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute)?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        Ok(Netlink { fd, seq: 0 })
    }

    /// Sends `msg` with `flags` (plus REQUEST, and ACK unless it is a dump) and returns the
    /// messages answered, until the dump's DONE or the ACK. A kernel error becomes its errno.
    pub fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
        use nix::sys::socket::{recv, send, MsgFlags};
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        self.seq = self.seq.wrapping_add(1);
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        req.header.sequence_number = self.seq;
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        send(self.fd.as_raw_fd(), &buf, MsgFlags::empty())?;
        let mut out = Vec::new();
        let mut rbuf = vec![0u8; 64 * 1024];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut rbuf, MsgFlags::empty())?;
            let mut off = 0;
            while off + 16 <= n {
                let len = u32::from_ne_bytes([rbuf[off], rbuf[off + 1], rbuf[off + 2], rbuf[off + 3]]) as usize;
                if len < 16 || off + len > n {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
                }
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rbuf[off..off + len])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("netlink reply: {e}")))?;
                off += (len + 3) & !3;
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => match e.code {
                        Some(code) => return Err(io::Error::from_raw_os_error(-code.get())),
                        None if !dump => return Ok(out),
                        None => {}
                    },
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }
}

/// Dumps of one kind of object: a `Get*` request with `NLM_F_DUMP`, keeping the answers of
/// the matching `New*` kind.
macro_rules! dump {
    ($(#[$doc:meta])* $name:ident, $get:ident, $new:ident, $ty:ty) => {
        $(#[$doc])*
        pub fn $name(&mut self) -> io::Result<Vec<$ty>> {
            let all = self.request(RouteNetlinkMessage::$get(<$ty>::default()), NLM_F_DUMP)?;
            Ok(all.into_iter().filter_map(|m| if let RouteNetlinkMessage::$new(x) = m { Some(x) } else { None }).collect())
        }
    };
}

impl Netlink {
    dump!(
        /// Every link (`ip link`).
        links, GetLink, NewLink, LinkMessage
    );
    dump!(
        /// Every address (`ip addr`).
        addresses, GetAddress, NewAddress, AddressMessage
    );
    dump!(
        /// Every route of every table (`ip route show table all`).
        routes, GetRoute, NewRoute, RouteMessage
    );
    dump!(
        /// Every neighbour entry (`ip neigh`).
        neighbours, GetNeighbour, NewNeighbour, NeighbourMessage
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dumps of this network namespace: `lo` is there with 127.0.0.1/8 and its local route.
    #[test]
    fn dumps_links_addresses_and_routes() {
        let mut nl = Netlink::open().unwrap();
        let links = nl.links().unwrap();
        let lo = links.iter().find(|l| read::link(l).name == "lo").expect("lo is listed");
        let addrs = nl.addresses().unwrap();
        let lo_addrs: Vec<_> =
            addrs.iter().filter(|a| a.header.index == lo.header.index).filter_map(read::address).collect();
        assert!(lo_addrs.contains(&("127.0.0.1".parse().unwrap(), 8)), "{lo_addrs:?}");
        let routes = nl.routes().unwrap();
        assert!(routes.iter().any(|r| read::route(r).oif == Some(lo.header.index)), "a route via lo (local table)");
        nl.neighbours().unwrap();
    }
}
