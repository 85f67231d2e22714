//! The kernel's list of open connections (netlink `sock_diag`), used to seed
//! the connection table at start: connections that predate enforcement (the
//! operator's SSH session, a running download) are not cut.

use anyhow::{Context as _, bail};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, TCP_SYN_SENT},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

pub use crate::model::Connection;

/// Every established or closing TCP connection and every connected UDP
/// socket in the caller's network namespace, IPv4 and IPv6.
pub fn connections() -> anyhow::Result<Vec<Connection>> {
    let tcp_states = StateFlags::ESTABLISHED
        | StateFlags::SYN_SENT
        | StateFlags::FIN_WAIT1
        | StateFlags::FIN_WAIT2
        | StateFlags::CLOSE_WAIT
        | StateFlags::LAST_ACK
        | StateFlags::CLOSING;
    let mut all = Vec::new();
    for family in [AF_INET, AF_INET6] {
        all.extend(dump(family, IPPROTO_TCP, tcp_states.clone())?);
        all.extend(dump(family, IPPROTO_UDP, StateFlags::ESTABLISHED)?);
    }
    Ok(all)
}

/// Whether a TCP socket listens on `port` (any address, IPv4 or IPv6).
pub fn listening_tcp(port: u16) -> anyhow::Result<bool> {
    for family in [AF_INET, AF_INET6] {
        let mut found = false;
        dump_with(family, IPPROTO_TCP, StateFlags::LISTEN, |r| {
            found |= r.header.socket_id.source_port == port;
        })?;
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The uid owning the TCP socket at `remote` that is connected to `local`
/// (the other end of one of this host's connections, when that end is on
/// this host too: e.g. a loopback server's accepted socket, whose owner is
/// the listener's). `None`: no such socket here.
pub fn peer_uid(
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
) -> anyhow::Result<Option<u32>> {
    let family = if remote.is_ipv4() { AF_INET } else { AF_INET6 };
    let mut uid = None;
    dump_with(family, IPPROTO_TCP, StateFlags::ESTABLISHED, |r| {
        let id = &r.header.socket_id;
        if id.source_address == remote.ip()
            && id.source_port == remote.port()
            && id.destination_address == local.ip()
            && id.destination_port == local.port()
        {
            uid = Some(r.header.uid);
        }
    })?;
    Ok(uid)
}

fn dump(family: u8, protocol: u8, states: StateFlags) -> anyhow::Result<Vec<Connection>> {
    let mut found = Vec::new();
    dump_with(family, protocol, states, |r| {
        let id = &r.header.socket_id;
        // Unconnected UDP sockets have no remote end to admit.
        if !id.destination_address.is_unspecified() && id.destination_port != 0 {
            found.push(Connection {
                proto: protocol,
                local: id.source_address,
                local_port: id.source_port,
                remote: id.destination_address,
                remote_port: id.destination_port,
                tcp_syn_sent: protocol == IPPROTO_TCP && r.header.state == TCP_SYN_SENT,
            });
        }
    })?;
    Ok(found)
}

/// Dumps the sockets of one family and protocol in `states`, handing each
/// to `each`.
fn dump_with(
    family: u8,
    protocol: u8,
    states: StateFlags,
    mut each: impl FnMut(&InetResponse),
) -> anyhow::Result<()> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;

    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket
        .send(&buf, 0)
        .context("sending the sock_diag request")?;

    let mut rx = vec![0u8; 1 << 16];
    loop {
        let size = socket
            .recv(&mut &mut rx[..], 0)
            .context("reading sock_diag")?;
        let mut offset = 0;
        while offset < size {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(
                rx.get(offset..size).unwrap_or_default(),
            )
            .context("parsing a sock_diag reply")?;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => each(&r),
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => bail!("sock_diag dump failed: {e:?}"),
                _ => {}
            }
            let len = msg.header.length as usize;
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}
