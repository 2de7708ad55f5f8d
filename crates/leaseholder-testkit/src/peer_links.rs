//! Fronts for the peer ports of a cluster whose members all dial one
//! advertised peer URL per member (etcd), so that one member can be cut off
//! from the others while its clients still reach it.
//!
//! A [`TcpProxy`](crate::TcpProxy) per directed link would need each
//! member to dial each peer at an address of its own, but etcd members
//! learn their peers' URLs from the cluster's membership, the same for
//! everyone. So each member advertises the address of a front instead,
//! which forwards to its real peer port and tells, for every connection it
//! accepts, which member dialed it: the process that owns the other end of
//! the connection (its socket inode in `/proc/net/tcp`, found among the
//! members' open files in `/proc/<pid>/fd`). A connection between an
//! isolated member and any other member is closed, and new ones are closed
//! as soon as they are accepted, in both directions: the isolated member's
//! front refuses its peers, and the others' fronts refuse it. A connection
//! from a process that is not a member (a probe of the testkit, `curl`)
//! always passes.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::Error;

/// The state every front follows: each member's current PID (0 while it
/// is not running) and which members are isolated.
#[derive(Debug)]
pub(crate) struct Partition {
    pids: Mutex<Vec<u32>>,
    isolated: watch::Sender<Vec<bool>>,
}

impl Partition {
    /// Records member `i`'s PID (after a start or a restart).
    pub(crate) fn set_pid(&self, i: usize, pid: u32) {
        let mut pids = self.pids.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = pids.get_mut(i) {
            *slot = pid;
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.pids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The fronts of a cluster's peer ports: one listener per member, bound
/// at once (their ports are the members' advertised peer URLs) and
/// forwarding once [`start`](Self::start) names the real peer ports.
/// Dropping it closes every front and every connection through them.
#[derive(Debug)]
pub(crate) struct PeerLinks {
    partition: Arc<Partition>,
    ports: Vec<u16>,
    listeners: Vec<TcpListener>,
    tasks: Vec<JoinHandle<()>>,
}

impl PeerLinks {
    /// Binds `n` fronts on free `127.0.0.1` ports, none of them in
    /// `taken`.
    pub(crate) async fn bind(n: usize, taken: &[u16]) -> Result<Self, Error> {
        let mut listeners = Vec::with_capacity(n);
        let mut ports = Vec::with_capacity(n);
        while listeners.len() < n {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .await
                .map_err(|e| Error::io("binding an etcd peer front", e))?;
            let port = listener
                .local_addr()
                .map_err(|e| Error::io("reading an etcd peer front's address", e))?
                .port();
            if taken.contains(&port) {
                continue;
            }
            ports.push(port);
            listeners.push(listener);
        }
        Ok(Self {
            partition: Arc::new(Partition {
                pids: Mutex::new(vec![0; n]),
                isolated: watch::channel(vec![false; n]).0,
            }),
            ports,
            listeners,
            tasks: Vec::new(),
        })
    }

    /// The front ports, member by member: each member's advertised peer
    /// port.
    pub(crate) fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// Orders the fronts by their URL, `http://127.0.0.1:PORT`, in string
    /// order (before [`start`](Self::start)): member 0 gets the first.
    pub(crate) fn sort_by_url(&mut self) {
        let mut both: Vec<(u16, TcpListener)> =
            self.ports.drain(..).zip(self.listeners.drain(..)).collect();
        both.sort_by_key(|(port, _)| format!("http://{}:{port}", Ipv4Addr::LOCALHOST));
        (self.ports, self.listeners) = both.into_iter().unzip();
    }

    /// The shared state, for members to record their PIDs in.
    pub(crate) fn partition(&self) -> Arc<Partition> {
        Arc::clone(&self.partition)
    }

    /// Starts forwarding front `i` to `upstream_ports[i]`, the members'
    /// real peer ports.
    pub(crate) fn start(&mut self, upstream_ports: &[u16]) {
        for (to, (listener, &upstream)) in self.listeners.drain(..).zip(upstream_ports).enumerate()
        {
            let partition = Arc::clone(&self.partition);
            let front = self.ports[to];
            self.tasks.push(tokio::spawn(accept_loop(
                listener, to, front, upstream, partition,
            )));
        }
    }

    /// Cuts member `i` off from every other member, both ways, until
    /// [`heal`](Self::heal). Fails if this host has no `/proc/net/tcp` to
    /// tell who dialed a connection.
    pub(crate) fn isolate(&self, i: usize) -> Result<(), Error> {
        std::fs::metadata("/proc/net/tcp")
            .map_err(|e| Error::io("cutting an etcd member off (needs /proc/net/tcp, Linux)", e))?;
        self.set_isolated(i, true);
        Ok(())
    }

    /// Lets member `i` reach the others again; they dial each other on
    /// their own.
    pub(crate) fn heal(&self, i: usize) {
        self.set_isolated(i, false);
    }

    fn set_isolated(&self, i: usize, isolated: bool) {
        self.partition.isolated.send_modify(|all| {
            if let Some(slot) = all.get_mut(i) {
                *slot = isolated;
            }
        });
    }
}

impl Drop for PeerLinks {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    to: usize,
    front: u16,
    upstream: u16,
    partition: Arc<Partition>,
) {
    // The connection tasks belong to this task: aborting it (on drop)
    // closes every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((conn, from)) => {
                    let partition = Arc::clone(&partition);
                    connections.spawn(forward(conn, from, to, front, upstream, partition));
                }
                Err(error) => {
                    tracing::debug!(%error, front, "an etcd peer front failed to accept");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Forwards one connection to member `to`'s real peer port, until either
/// side closes or the link between its dialer and `to` is cut.
async fn forward(
    mut conn: TcpStream,
    peer: SocketAddr,
    to: usize,
    front: u16,
    upstream: u16,
    partition: Arc<Partition>,
) {
    let from = dialer(peer.port(), front, &partition.pids());
    let cut = |isolated: &[bool]| {
        from.is_some_and(|from| {
            from != to
                && (isolated.get(from).copied().unwrap_or(false)
                    || isolated.get(to).copied().unwrap_or(false))
        })
    };
    let mut states = partition.isolated.subscribe();
    if cut(&states.borrow_and_update()) {
        return;
    }
    let Ok(mut up) = TcpStream::connect((Ipv4Addr::LOCALHOST, upstream)).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut conn, &mut up) => {}
        () = async {
            while states.changed().await.is_ok() {
                if cut(&states.borrow_and_update()) {
                    return;
                }
            }
        } => {}
    }
}

/// Which member (by index in `pids`) owns the socket at `127.0.0.1:port`
/// connected to our front at `front`, if any.
fn dialer(port: u16, front: u16, pids: &[u32]) -> Option<usize> {
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = socket_inode(&tcp, port, front)?;
    let link = format!("socket:[{inode}]");
    pids.iter()
        .position(|&pid| pid != 0 && owns(pid, &link).unwrap_or(false))
}

/// The inode of the socket whose local port is `port` and remote port is
/// `front`, from the text of `/proc/net/tcp`.
fn socket_inode(tcp: &str, port: u16, front: u16) -> Option<u64> {
    tcp.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local = hex_port(fields.get(1)?)?;
        let remote = hex_port(fields.get(2)?)?;
        if local == port && remote == front {
            fields.get(9)?.parse().ok()
        } else {
            None
        }
    })
}

/// The port of an `ADDRESS:PORT` field of `/proc/net/tcp` (both hex).
fn hex_port(field: &str) -> Option<u16> {
    u16::from_str_radix(field.rsplit_once(':')?.1, 16).ok()
}

/// Whether process `pid` has `link` (`socket:[inode]`) among its open
/// files.
fn owns(pid: u32, link: &str) -> io::Result<bool> {
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(entry) = entry else { continue };
        if std::fs::read_link(entry.path()).is_ok_and(|target| target.as_os_str() == link) {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{hex_port, socket_inode};

    #[test]
    fn the_socket_of_a_connection_is_found_by_its_ports() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:C350 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2222 1 0000000000000000 20 4 30 10 -1\n\
   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 3333 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(hex_port("0100007F:1F90"), Some(8080));
        // The dialer's end: local 50000, remote 8080.
        assert_eq!(socket_inode(tcp, 50000, 8080), Some(2222));
        // Our own end (local 8080) is not taken for it.
        assert_eq!(socket_inode(tcp, 8080, 50000), Some(3333));
        assert_eq!(socket_inode(tcp, 50001, 8080), None);
        assert_eq!(socket_inode("garbage", 1, 2), None);
    }

    #[tokio::test]
    async fn a_connection_from_this_process_is_traced_to_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front = listener.local_addr().unwrap().port();
        let conn = tokio::net::TcpStream::connect(("127.0.0.1", front))
            .await
            .unwrap();
        let (_accepted, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.port(), conn.local_addr().unwrap().port());
        let me = std::process::id();
        assert_eq!(super::dialer(peer.port(), front, &[1, me]), Some(1));
        assert_eq!(super::dialer(peer.port(), front, &[0]), None);
    }
}
