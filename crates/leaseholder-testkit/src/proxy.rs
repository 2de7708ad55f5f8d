//! A TCP proxy that can delay, cut, blackhole and restore a link.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::Error;

/// How much is read from a socket at once.
const CHUNK_SIZE: usize = 16 * 1024;

/// How many chunks per direction may be read but not yet written (because
/// they are delayed or the link is blackholed) before the proxy stops
/// reading and lets TCP flow control push back on the sender.
const CHUNKS_IN_FLIGHT: usize = 16;

/// How long to back off after `accept` fails (for example when out of file
/// descriptors), so the accept loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// The state of the link simulated by a [`TcpProxy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkState {
    /// Bytes are forwarded (after the configured delay, if any).
    Up,
    /// Every connection is closed, and new ones are closed as soon as they
    /// are accepted.
    Cut,
    /// Connections stay open but no byte is forwarded, in either direction;
    /// new connections are held open without reaching the upstream.
    Blackholed,
}

/// What every connection task follows: the link state and the delay.
#[derive(Debug, Clone, Copy)]
struct Link {
    state: LinkState,
    delay: Duration,
}

/// A TCP proxy on a free `127.0.0.1` port, forwarding to an upstream
/// address, for injecting network faults in tests.
///
/// Point the client under test at [`addr`](Self::addr) instead of the real
/// server, then change the link with [`cut`](Self::cut),
/// [`blackhole`](Self::blackhole), [`set_delay`](Self::set_delay) and
/// [`restore`](Self::restore). Changes take effect at once: connection
/// tasks watch the link state, so none of them has to wait for its next
/// read to notice.
///
/// Dropping the proxy closes its listener and every connection: the accept
/// task is aborted, and it owns the connection tasks, which are aborted
/// with it. The watch channel that carries the link state closes at the
/// same time, which also makes each connection task return.
///
/// The proxy must be started, used and dropped within a Tokio runtime
/// with the time and I/O drivers enabled.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    link: watch::Sender<Link>,
    connections: Arc<watch::Sender<usize>>,
    accept_task: JoinHandle<()>,
}

impl TcpProxy {
    /// Starts a proxy listening on a free `127.0.0.1` port and forwarding
    /// to `upstream`, with the link [`Up`](LinkState::Up) and no delay.
    ///
    /// The upstream is connected to once per accepted connection, so it
    /// need not be running yet; a connection whose upstream refuses it is
    /// closed.
    pub async fn start(upstream: SocketAddr) -> Result<Self, Error> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|e| Error::io("binding a proxy to 127.0.0.1:0", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("reading the address of a proxy listener", e))?;
        let (link, link_rx) = watch::channel(Link {
            state: LinkState::Up,
            delay: Duration::ZERO,
        });
        let connections = Arc::new(watch::Sender::new(0));
        let accept_task = tokio::spawn(accept_loop(
            listener,
            upstream,
            link_rx,
            Arc::clone(&connections),
        ));
        tracing::debug!(%addr, %upstream, "proxy started");
        Ok(Self {
            addr,
            upstream,
            link,
            connections,
            accept_task,
        })
    }

    /// The address the proxy listens on; clients connect here.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port the proxy listens on, to put in a connection URL such as
    /// `nats://127.0.0.1:{port}`.
    pub fn url_port(&self) -> u16 {
        self.addr.port()
    }

    /// The address the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// The current state of the link.
    pub fn state(&self) -> LinkState {
        self.link.borrow().state
    }

    /// The latency currently added to every chunk of data.
    pub fn delay(&self) -> Duration {
        self.link.borrow().delay
    }

    /// Cuts the link: every open connection is closed in both directions
    /// (its sockets are closed, so each peer reads end-of-file, or gets a
    /// reset if it had unread data), and until [`restore`](Self::restore)
    /// new connections are accepted and immediately closed, without the
    /// upstream being contacted.
    ///
    /// New connections are accepted-then-closed rather than refused so the
    /// proxy keeps its port. The connections are closed by their tasks as
    /// soon as they are scheduled; use
    /// [`wait_connections(0)`](Self::wait_connections) to wait for it.
    pub fn cut(&self) {
        self.set_state(LinkState::Cut);
    }

    /// Blackholes the link, like a network partition that drops packets:
    /// connections stay open but no byte is forwarded in either direction,
    /// so clients hang until their own timeouts fire. New connections are
    /// accepted and held open without the upstream being contacted.
    ///
    /// Nothing is lost: bytes sent meanwhile are held (in the proxy, then
    /// by TCP flow control) and delivered after [`restore`](Self::restore),
    /// as TCP retransmission would deliver them once a partition heals.
    pub fn blackhole(&self) {
        self.set_state(LinkState::Blackholed);
    }

    /// Brings the link back up: new connections are forwarded again, and
    /// blackholed connections resume forwarding, starting with the bytes
    /// held while they were blackholed. Connections closed by
    /// [`cut`](Self::cut) stay closed. The delay is left as it is.
    pub fn restore(&self) {
        self.set_state(LinkState::Up);
    }

    /// Adds `delay` of latency to every chunk of data read from then on, in
    /// both directions; [`Duration::ZERO`] removes it.
    ///
    /// Each chunk is forwarded `delay` after it was read; chunks keep their
    /// order, and a steady stream is delayed rather than slowed down
    /// (chunks are in flight concurrently, up to a bounded number).
    pub fn set_delay(&self, delay: Duration) {
        self.link.send_if_modified(|link| {
            let changed = link.delay != delay;
            link.delay = delay;
            changed
        });
    }

    /// The number of client connections currently open through the proxy,
    /// including those held while the link is blackholed.
    pub fn connections(&self) -> usize {
        *self.connections.borrow()
    }

    /// Waits until exactly `n` client connections are open through the
    /// proxy. Wrap it in [`tokio::time::timeout`] in tests.
    pub async fn wait_connections(&self, n: usize) {
        let mut connections = self.connections.subscribe();
        // The sender lives in `self`, so this cannot fail with
        // `RecvError` while `self` is borrowed.
        let _ = connections.wait_for(|&open| open == n).await;
    }

    fn set_state(&self, state: LinkState) {
        let changed = self.link.send_if_modified(|link| {
            let changed = link.state != state;
            link.state = state;
            changed
        });
        if changed {
            tracing::debug!(addr = %self.addr, ?state, "proxy link changed");
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// Accepts connections and spawns a task for each; the tasks live in a
/// `JoinSet`, so they are aborted when this future is dropped.
async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    link: watch::Receiver<Link>,
    connections: Arc<watch::Sender<usize>>,
) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    if link.borrow().state == LinkState::Cut {
                        tracing::debug!(%peer, "link is cut, closing new connection");
                        drop(client);
                        continue;
                    }
                    // Counted here rather than in the task, so the count is
                    // up to date as soon as the connection is accepted.
                    let open = OpenConnection::new(Arc::clone(&connections));
                    tasks.spawn(serve(client, upstream, link.clone(), open));
                }
                Err(error) => {
                    tracing::warn!(%error, "proxy failed to accept a connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(error) = joined {
                    tracing::warn!(%error, "proxy connection task failed");
                }
            }
        }
    }
}

/// Counts an open connection for as long as it lives.
struct OpenConnection(Arc<watch::Sender<usize>>);

impl OpenConnection {
    fn new(connections: Arc<watch::Sender<usize>>) -> Self {
        connections.send_modify(|open| *open += 1);
        Self(connections)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.send_modify(|open| *open = open.saturating_sub(1));
    }
}

/// Proxies one client connection until either side closes it, an I/O error
/// occurs, the link is cut, or the proxy is dropped. Returning drops both
/// sockets, which closes the connection in both directions.
async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    link: watch::Receiver<Link>,
    _open: OpenConnection,
) {
    let mut cut = link.clone();
    tokio::select! {
        biased;
        // Errs when the proxy is dropped, which ends the connection too.
        _ = cut.wait_for(|link| link.state == LinkState::Cut) => {
            tracing::debug!(%upstream, "link cut, closing connection");
        }
        result = forward(client, upstream, link) => {
            if let Err(error) = result {
                tracing::debug!(%upstream, %error, "proxied connection failed");
            }
        }
    }
}

/// Connects to the upstream and forwards in both directions until both are
/// closed. Does not deal with [`LinkState::Cut`]: [`serve`] drops this
/// future when the link is cut.
async fn forward(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut link: watch::Receiver<Link>,
) -> io::Result<()> {
    // As in a partition, a connection made while the link is blackholed
    // does not reach the upstream until the link is restored.
    wait_unless_blackholed(&mut link).await?;
    let mut server = TcpStream::connect(upstream).await?;
    // The proxy must not add latency of its own by batching small writes.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_read, client_write) = client.split();
    let (server_read, server_write) = server.split();
    tokio::try_join!(
        pipe(client_read, server_write, link.clone()),
        pipe(server_read, client_write, link),
    )?;
    Ok(())
}

/// A chunk of data read from one side, to be written to the other at
/// `due`. An empty chunk stands for end-of-file.
struct Chunk {
    due: Instant,
    data: Vec<u8>,
}

/// Forwards one direction of a connection, end-of-file included. Reading
/// and writing run concurrently, joined by a bounded channel, so a delay
/// postpones each chunk without holding up the reading of the next ones.
async fn pipe(
    from: impl AsyncRead + Unpin,
    to: impl AsyncWrite + Unpin,
    link: watch::Receiver<Link>,
) -> io::Result<()> {
    let (chunks_tx, chunks_rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    tokio::try_join!(
        read_chunks(from, chunks_tx, link.clone()),
        write_chunks(to, chunks_rx, link),
    )?;
    Ok(())
}

/// Reads chunks until end-of-file, stamping each with the time it is due
/// to be written.
async fn read_chunks(
    mut from: impl AsyncRead + Unpin,
    chunks: mpsc::Sender<Chunk>,
    link: watch::Receiver<Link>,
) -> io::Result<()> {
    let mut buf = vec![0; CHUNK_SIZE];
    loop {
        let n = from.read(&mut buf).await?;
        let due = Instant::now() + link.borrow().delay;
        let chunk = Chunk {
            due,
            data: buf[..n].to_vec(),
        };
        // The writer only goes away after failing, and then `try_join!`
        // drops this future as well; stopping is all there is to do.
        if chunks.send(chunk).await.is_err() || n == 0 {
            return Ok(());
        }
    }
}

/// Writes chunks once they are due and the link is not blackholed, then
/// shuts the write side down at end-of-file.
async fn write_chunks(
    mut to: impl AsyncWrite + Unpin,
    mut chunks: mpsc::Receiver<Chunk>,
    mut link: watch::Receiver<Link>,
) -> io::Result<()> {
    while let Some(Chunk { due, data }) = chunks.recv().await {
        tokio::time::sleep_until(due).await;
        wait_unless_blackholed(&mut link).await?;
        if data.is_empty() {
            return to.shutdown().await;
        }
        to.write_all(&data).await?;
    }
    Ok(())
}

/// Waits while the link is blackholed. Fails if the proxy has been dropped.
async fn wait_unless_blackholed(link: &mut watch::Receiver<Link>) -> io::Result<()> {
    match link
        .wait_for(|link| link.state != LinkState::Blackholed)
        .await
    {
        Ok(_) => Ok(()),
        Err(_) => Err(io::Error::other("the proxy was dropped")),
    }
}
