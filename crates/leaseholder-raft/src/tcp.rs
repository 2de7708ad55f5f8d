//! The built-in TCP transport: one connection per peer, many requests in
//! flight on it, each frame `len (u32, BE) | request id (u64, BE) | bytes`.
//!
//! A call that finds no connection dials one (bounded by its timeout); a
//! connection that fails ends every call waiting on it with an error, and
//! the next call dials again. The listening side hands each request to
//! [`PeerGroup::receive`] in a task of its own and writes the reply with the
//! request's id, so a slow request (a forwarded write waiting for its
//! commit) never holds up a heartbeat.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::net::{CallFuture, Transport, TransportError};
use crate::{NodeId, PeerGroup};

/// The largest frame either side accepts by default: 64 MiB (a snapshot
/// of a large table travels in one frame).
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Bytes>>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One connection to a peer.
struct Conn {
    out: mpsc::UnboundedSender<(u64, Bytes)>,
    pending: Pending,
    next: AtomicU64,
}

/// The built-in [`Transport`] over TCP. Give the same
/// `Arc<TcpTransport>` to [`PeerGroupBuilder::transport`] and to
/// [`serve`](Self::serve) (or use [`PeerGroupBuilder::tcp`], which does
/// both).
///
/// [`PeerGroupBuilder::transport`]: crate::PeerGroupBuilder::transport
/// [`PeerGroupBuilder::tcp`]: crate::PeerGroupBuilder::tcp
pub struct TcpTransport {
    conns: Mutex<HashMap<NodeId, Arc<Conn>>>,
    /// Members dialed at another address than the group's (see
    /// [`route`](TcpTransport::route)).
    routes: Mutex<HashMap<NodeId, String>>,
    max_frame: usize,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("connections", &lock(&self.conns).len())
            .field("routes", &*lock(&self.routes))
            .field("max_frame", &self.max_frame)
            .finish()
    }
}

impl TcpTransport {
    /// A transport with no connections yet, accepting frames up to
    /// [`DEFAULT_MAX_FRAME`].
    pub fn new() -> Arc<TcpTransport> {
        TcpTransport::with_max_frame(DEFAULT_MAX_FRAME)
    }

    /// A transport accepting frames up to `max_frame` bytes.
    pub fn with_max_frame(max_frame: usize) -> Arc<TcpTransport> {
        Arc::new(TcpTransport {
            conns: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            max_frame,
        })
    }

    /// Dials member `to` at `addr` from now on, instead of the address the
    /// group knows it by: a link of this member's own (through a proxy, a
    /// tunnel, a test's cuttable link), while the others still dial `to`
    /// at its group address. The open connection to `to`, if any, is
    /// closed, so the next call dials `addr`.
    ///
    /// ```
    /// use leaseholder_raft::TcpTransport;
    ///
    /// let tcp = TcpTransport::new();
    /// tcp.route(2, "127.0.0.1:17002");
    /// assert_eq!(tcp.route_of(2).as_deref(), Some("127.0.0.1:17002"));
    /// tcp.unroute(2);
    /// assert_eq!(tcp.route_of(2), None);
    /// ```
    pub fn route(&self, to: NodeId, addr: impl Into<String>) {
        lock(&self.routes).insert(to, addr.into());
        lock(&self.conns).remove(&to);
    }

    /// Dials member `to` at its group address again (closing the open
    /// connection to it).
    pub fn unroute(&self, to: NodeId) {
        if lock(&self.routes).remove(&to).is_some() {
            lock(&self.conns).remove(&to);
        }
    }

    /// The address member `to` is dialed at instead of its group address,
    /// if [`route`](Self::route) set one.
    pub fn route_of(&self, to: NodeId) -> Option<String> {
        lock(&self.routes).get(&to).cloned()
    }

    /// Serves the frames other members send to `listener`, handing them to
    /// `group`. Runs until the group is dropped or the task is aborted.
    pub fn serve(&self, listener: TcpListener, group: &PeerGroup) -> JoinHandle<()> {
        let weak = Arc::downgrade(group.inner());
        let max = self.max_frame;
        tokio::spawn(async move {
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                if weak.upgrade().is_none_or(|inner| inner.is_stopped()) {
                    return;
                }
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_conn(stream, weak.clone(), max));
            }
        })
    }

    async fn connect(&self, to: NodeId, addr: &str) -> io::Result<Arc<Conn>> {
        if let Some(c) = lock(&self.conns).get(&to).filter(|c| !c.out.is_closed()) {
            return Ok(c.clone());
        }
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        let (out, rx) = mpsc::unbounded_channel();
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let conn = Arc::new(Conn {
            out,
            pending: pending.clone(),
            next: AtomicU64::new(0),
        });
        tokio::spawn(write_frames(write, rx));
        tokio::spawn(read_replies(read, pending, self.max_frame));
        let mut conns = lock(&self.conns);
        // Another call may have dialled meanwhile: keep the first.
        if let Some(c) = conns.get(&to).filter(|c| !c.out.is_closed()) {
            return Ok(c.clone());
        }
        conns.insert(to, conn.clone());
        Ok(conn)
    }

    fn forget(&self, to: NodeId, conn: &Arc<Conn>) {
        let mut conns = lock(&self.conns);
        if conns.get(&to).is_some_and(|c| Arc::ptr_eq(c, conn)) {
            conns.remove(&to);
        }
    }
}

impl Transport for TcpTransport {
    fn call(&self, to: NodeId, addr: &str, frame: Bytes, timeout: Duration) -> CallFuture<'_> {
        let addr = self.route_of(to).unwrap_or_else(|| addr.to_owned());
        Box::pin(async move {
            let work = async {
                let conn = self.connect(to, &addr).await.map_err(|e| {
                    TransportError::Unreachable(format!("member {to} at {addr}: {e}"))
                })?;
                let id = conn.next.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = oneshot::channel();
                lock(&conn.pending).insert(id, tx);
                if conn.out.send((id, frame)).is_err() {
                    self.forget(to, &conn);
                    return Err(TransportError::Failed(format!(
                        "the connection to member {to} closed"
                    )));
                }
                let reply = rx.await.map_err(|_| {
                    self.forget(to, &conn);
                    TransportError::Failed(format!("the connection to member {to} broke"))
                });
                lock(&conn.pending).remove(&id);
                reply
            };
            tokio::time::timeout(timeout, work)
                .await
                .map_err(|_| TransportError::Timeout(timeout))?
        })
    }
}

async fn write_frames(mut write: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<(u64, Bytes)>) {
    while let Some((id, frame)) = rx.recv().await {
        if write_frame(&mut write, id, &frame).await.is_err() {
            return;
        }
    }
}

async fn write_frame(write: &mut OwnedWriteHalf, id: u64, frame: &[u8]) -> io::Result<()> {
    let len = u32::try_from(frame.len()).map_err(|_| io::Error::other("a frame over 4 GiB"))?;
    let mut head = [0u8; 12];
    head[..4].copy_from_slice(&len.to_be_bytes());
    head[4..].copy_from_slice(&id.to_be_bytes());
    write.write_all(&head).await?;
    write.write_all(frame).await?;
    Ok(())
}

async fn read_frame(read: &mut OwnedReadHalf, max: usize) -> io::Result<(u64, Bytes)> {
    let len = read.read_u32().await? as usize;
    let id = read.read_u64().await?;
    if len > max {
        return Err(io::Error::other(format!(
            "a frame of {len} bytes, over the limit of {max}"
        )));
    }
    let mut buf = vec![0u8; len];
    read.read_exact(&mut buf).await?;
    Ok((id, Bytes::from(buf)))
}

async fn read_replies(mut read: OwnedReadHalf, pending: Pending, max: usize) {
    while let Ok((id, frame)) = read_frame(&mut read, max).await {
        if let Some(tx) = lock(&pending).remove(&id) {
            let _ = tx.send(frame);
        }
    }
    // The connection ended: every waiting call fails now.
    lock(&pending).clear();
}

async fn serve_conn(stream: TcpStream, group: Weak<crate::group::GroupInner>, max: usize) {
    let (mut read, write) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_frames(write, rx));
    while let Ok((id, frame)) = read_frame(&mut read, max).await {
        // A member that was shut down (its process may go on) closes the
        // connection, so the peer dials again: a member started anew on
        // the same address then gets the traffic.
        let Some(inner) = group.upgrade().filter(|inner| !inner.is_stopped()) else {
            break;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let reply = crate::group::receive(&inner, frame).await;
            let _ = tx.send((id, reply));
        });
    }
    drop(tx);
    let _ = writer.await;
}
