//! Fault injection with `TcpProxy`, against a local echo server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use leaseholder_testkit::{LinkState, TcpProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

/// Bound on waiting for something that should happen promptly.
const PATIENCE: Duration = Duration::from_secs(10);

/// How long a read must stay pending to count as hanging. Only ever used
/// to assert that something does *not* happen, so it cannot flake.
const HANG: Duration = Duration::from_millis(200);

/// A TCP echo server, stopped on drop.
struct EchoServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl EchoServer {
    async fn start() -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                connections.spawn(async move {
                    let (mut read, mut write) = stream.split();
                    if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                        let _ = write.shutdown().await;
                    }
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start() -> (EchoServer, TcpProxy) {
    let echo = EchoServer::start().await;
    let proxy = TcpProxy::start(echo.addr).await.unwrap();
    (echo, proxy)
}

async fn connect(proxy: &TcpProxy) -> TcpStream {
    timeout(PATIENCE, TcpStream::connect(proxy.addr()))
        .await
        .unwrap()
        .unwrap()
}

async fn wait_connections(proxy: &TcpProxy, n: usize) {
    timeout(PATIENCE, proxy.wait_connections(n))
        .await
        .unwrap_or_else(|_| panic!("{} connections, expected {n}", proxy.connections()));
}

/// Sends `message` and checks it comes back.
async fn round_trip(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).await.unwrap();
    let mut echoed = vec![0; message.len()];
    timeout(PATIENCE, stream.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed, message);
}

/// Asserts that the peer has closed `stream`: reading returns end-of-file
/// or an error (a reset) rather than data.
async fn assert_closed(stream: &mut TcpStream) {
    let mut buf = [0; 64];
    match timeout(PATIENCE, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("read {n} bytes from a connection that should be closed"),
        Err(_) => panic!("connection still open after {PATIENCE:?}"),
    }
}

/// Asserts that a read on `stream` stays pending for a while.
async fn assert_hangs(stream: &mut TcpStream) {
    let mut buf = [0; 64];
    let read = timeout(HANG, stream.read(&mut buf)).await;
    assert!(read.is_err(), "read should have hung, got {read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_bytes_while_up() {
    let (echo, proxy) = start().await;
    assert_eq!(proxy.state(), LinkState::Up);
    assert_eq!(proxy.upstream(), echo.addr);
    assert_eq!(proxy.url_port(), proxy.addr().port());
    assert!(proxy.addr().ip().is_loopback());

    let mut client = connect(&proxy).await;
    round_trip(&mut client, b"hello").await;
    round_trip(&mut client, b"again").await;
    assert_eq!(proxy.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_open_connections() {
    let (_echo, proxy) = start().await;
    assert_eq!(proxy.connections(), 0);

    let mut first = connect(&proxy).await;
    let mut second = connect(&proxy).await;
    round_trip(&mut first, b"one").await;
    round_trip(&mut second, b"two").await;
    wait_connections(&proxy, 2).await;

    drop(first);
    wait_connections(&proxy, 1).await;
    round_trip(&mut second, b"still there").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_half_close() {
    let (_echo, proxy) = start().await;
    let mut client = connect(&proxy).await;
    client.write_all(b"last words").await.unwrap();
    client.shutdown().await.unwrap();

    let mut echoed = Vec::new();
    timeout(PATIENCE, client.read_to_end(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed, b"last words");
    wait_connections(&proxy, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_closes_open_connections_and_new_ones() {
    let (_echo, proxy) = start().await;
    let mut client = connect(&proxy).await;
    round_trip(&mut client, b"before").await;

    proxy.cut();
    assert_eq!(proxy.state(), LinkState::Cut);
    assert_closed(&mut client).await;
    wait_connections(&proxy, 0).await;

    // New connections are accepted, then closed without an echo. The write
    // may or may not fail, depending on when the close is seen.
    let mut late = connect(&proxy).await;
    let _ = late.write_all(b"anyone?").await;
    assert_closed(&mut late).await;
    assert_eq!(proxy.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_after_cut_lets_new_connections_through() {
    let (_echo, proxy) = start().await;
    let mut client = connect(&proxy).await;
    proxy.cut();
    assert_closed(&mut client).await;

    proxy.restore();
    assert_eq!(proxy.state(), LinkState::Up);
    let mut client = connect(&proxy).await;
    round_trip(&mut client, b"back").await;
    // The cut connection may still be winding down.
    wait_connections(&proxy, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_holds_bytes_until_restore() {
    let (_echo, proxy) = start().await;
    let mut client = connect(&proxy).await;
    round_trip(&mut client, b"before").await;

    proxy.blackhole();
    assert_eq!(proxy.state(), LinkState::Blackholed);
    client.write_all(b"into the void").await.unwrap();
    assert_hangs(&mut client).await;
    // The connection is kept open.
    assert_eq!(proxy.connections(), 1);

    proxy.restore();
    let mut echoed = [0; 13];
    timeout(PATIENCE, client.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"into the void");
    round_trip(&mut client, b"after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_holds_new_connections_until_restore() {
    let (_echo, proxy) = start().await;
    proxy.blackhole();

    let mut client = connect(&proxy).await;
    client.write_all(b"hello?").await.unwrap();
    assert_hangs(&mut client).await;
    assert_eq!(proxy.connections(), 1);

    proxy.restore();
    let mut echoed = [0; 6];
    timeout(PATIENCE, client.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"hello?");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_closes_blackholed_connections() {
    let (_echo, proxy) = start().await;
    let mut client = connect(&proxy).await;
    round_trip(&mut client, b"before").await;
    proxy.blackhole();
    client.write_all(b"held").await.unwrap();

    proxy.cut();
    assert_closed(&mut client).await;
    wait_connections(&proxy, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_keeps_bytes_in_order() {
    const DELAY: Duration = Duration::from_millis(50);
    let (_echo, proxy) = start().await;
    let mut client = connect(&proxy).await;
    round_trip(&mut client, b"warm up").await;

    proxy.set_delay(DELAY);
    assert_eq!(proxy.delay(), DELAY);
    let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let started = Instant::now();
    let (mut read, mut write) = client.split();
    let writer = async {
        // Many small writes, so the data crosses the proxy in many chunks.
        for piece in sent.chunks(997) {
            write.write_all(piece).await?;
        }
        io::Result::Ok(())
    };
    let mut received = vec![0; sent.len()];
    let (written, echoed) = timeout(PATIENCE, async {
        tokio::join!(writer, read.read_exact(&mut received))
    })
    .await
    .unwrap();
    written.unwrap();
    echoed.unwrap();
    // Delayed once each way; no upper bound, which could flake.
    assert!(started.elapsed() >= DELAY * 2);
    assert!(received == sent, "echoed bytes differ from the ones sent");

    proxy.set_delay(Duration::ZERO);
    round_trip(&mut client, b"no delay").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_proxy_closes_connections() {
    let (_echo, proxy) = start().await;
    let mut first = connect(&proxy).await;
    let mut second = connect(&proxy).await;
    round_trip(&mut first, b"one").await;
    proxy.blackhole();
    second.write_all(b"held").await.unwrap();

    drop(proxy);
    assert_closed(&mut first).await;
    assert_closed(&mut second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_closes_the_connection() {
    // Grab a port, then free it, so nothing listens there.
    let upstream = {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        listener.local_addr().unwrap()
    };
    let proxy = TcpProxy::start(upstream).await.unwrap();
    let mut client = connect(&proxy).await;
    assert_closed(&mut client).await;
    wait_connections(&proxy, 0).await;
}
