//! Wires `Leader::health` to an HTTP readiness endpoint.
//!
//! `GET /ready` answers `200 healthy` while the campaign is healthy and
//! `503 <reason>` when it is not (the store unreachable for longer than the
//! ttl, or work still running past its term's deadline); `GET /leader` says
//! whether this replica leads. Point a Kubernetes `readinessProbe` (or a
//! load balancer's health check) at `/ready`.
//!
//! ```sh
//! PORT=8080 cargo run -p leaseholder-examples --example readiness
//! curl -i localhost:8080/ready
//! ```
//!
//! It campaigns on the in-memory store so that it runs anywhere; swap in
//! `Backend::nats` or `Backend::postgres` for a real service. The HTTP side
//! is a few lines of plain tokio to keep the example dependency-free: with
//! axum or another framework, the handler body is the same two lines.

use std::time::Duration;

use leaseholder::{Backend, Health, Leader, MemoryStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let port: u16 = match std::env::var("PORT") {
        Ok(port) => port.parse()?,
        Err(_) => 8080,
    };
    let store = MemoryStore::new();
    let leader = Leader::builder("readiness-example")
        .backend(Backend::memory(&store))
        .ttl(Duration::from_secs(10))
        .build()?;
    let campaign = leader.clone();
    tokio::spawn(async move { campaign.start(Default::default()).await });

    // Log every change of health as well; a probe only sees snapshots.
    let mut health = leader.health_watch();
    tokio::spawn(async move {
        while health.changed().await.is_ok() {
            println!("health: {:?}", *health.borrow_and_update());
        }
    });

    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    loop {
        let (mut socket, _) = listener.accept().await?;
        let leader = leader.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let Ok(n) = socket.read(&mut request).await else {
                return;
            };
            let path = std::str::from_utf8(&request[..n])
                .ok()
                .and_then(|r| r.split_whitespace().nth(1))
                .unwrap_or("/");
            let (status, body) = match path {
                // The readiness handler: cheap, computed on each call.
                "/ready" => match leader.health() {
                    Health::Healthy => ("200 OK", "healthy".to_owned()),
                    unhealthy => ("503 Service Unavailable", format!("{unhealthy:?}")),
                },
                "/leader" => ("200 OK", format!("{:?}", leader.is_leader())),
                _ => ("404 Not Found", "not found".to_owned()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}
