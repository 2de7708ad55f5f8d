//! The harness: a real server, one TCP proxy per candidate slot, candidate
//! processes campaigning for one key through their proxies, and a seeded
//! schedule of faults. It records everything for [`check`].

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use leaseholder_testkit::{
    ChildGuard, EtcdCluster, NatsCluster, NatsServer, PostgresServer, RedisOptions, RedisServer,
    TcpProxy,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::candidate::now_us;
use super::check::{self, Event, Fault, FaultKind, Instance, Micros, Record, Report};
use super::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Store {
    Nats,
    Postgres,
    /// One SQLite file shared by the candidate processes: no server and no
    /// link, so the faults are kills, pauses and stalls of the file (another
    /// process holding its write lock) in place of server restarts.
    Sqlite,
    /// One redis-server with its append-only file fsynced on every write:
    /// a restart keeps the leases. It can also lose its data on purpose
    /// ([`FaultKind::Wipe`]), which the backend's epoch marker covers.
    Redis,
    /// A 3-member etcd cluster, each candidate given every member's
    /// endpoint (through proxies of its own). Besides the faults of the
    /// other stores: one member killed and restarted later
    /// ([`FaultKind::MemberKill`]), paused ([`FaultKind::MemberPause`]) or
    /// cut off from its peers ([`FaultKind::MemberCut`]), never more than
    /// one at a time, so the cluster keeps its quorum; and
    /// as its restart, a quorum loss: two members killed, then started
    /// again one after the other.
    Etcd,
    /// A peer group (`leaseholder-raft`): no server, the candidate
    /// processes are the members of a Raft group over TCP, each with its
    /// fsynced log in a data directory kept across its restarts. Every
    /// link between two members runs through a proxy of its own, so a
    /// link fault cuts (or blackholes) one member off from the others
    /// both ways; a kill or pause of a candidate is one of a member; the
    /// restart is a quorum loss: every member but one killed, and started
    /// again on its directory after the stall.
    Raft,
}

/// The members of the etcd cluster.
const ETCD_MEMBERS: usize = 3;

/// The key prefix of the etcd candidates (in their `etcd://…/chaos` URL).
const ETCD_PREFIX: &str = "chaos";

#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) duration: Duration,
    pub(crate) seed: u64,
    pub(crate) candidates: usize,
    pub(crate) store: Store,
    pub(crate) ttl: Duration,
    pub(crate) write_delay: Duration,
    /// Candidates keep registry entries with priorities 0, 5 and 10 by
    /// slot (and a minimum term of one ttl), so preemptions and hold-offs
    /// happen among the faults.
    pub(crate) priorities: bool,
    /// How many keys every candidate campaigns for at once, each checked
    /// on its own.
    pub(crate) keys: usize,
    /// The clock rate of each slot's candidates (missing slots: 1.0), see
    /// `LEASEHOLDER_CLOCK_RATE` in `candidate.rs`.
    pub(crate) clock_rates: Vec<f64>,
    /// NATS only: 3 runs a 3-node cluster with the lease bucket replicated
    /// on every node (R3), and injects member faults as for etcd, and
    /// one more: a member cut off from its peers while its clients still
    /// reach it ([`FaultKind::MemberCut`]).
    pub(crate) cluster: usize,
    /// Where to write the report (JSON and SVG timelines), if anywhere.
    pub(crate) report: Option<std::path::PathBuf>,
}

impl Options {
    fn clock_rate(&self, slot: usize) -> f64 {
        self.clock_rates.get(slot).copied().unwrap_or(1.0)
    }
}

enum Server {
    Nats(NatsServer),
    /// A 3-node NATS cluster, the lease bucket's stream replicated on all
    /// three (R3), each candidate given every node's address (through
    /// proxies of its own).
    NatsCluster(NatsCluster),
    Postgres(PostgresServer),
    Redis(RedisServer),
    Etcd(EtcdCluster),
    Sqlite {
        _dir: leaseholder_testkit::TempDir,
        path: std::path::PathBuf,
    },
    /// The peer group's layout: the candidates start the members.
    Raft {
        _dir: leaseholder_testkit::TempDir,
        /// Member `i + 1` (slot `i`) keeps its log in `m<i + 1>` here.
        dir: std::path::PathBuf,
        /// Each member's listen port.
        listen: Vec<u16>,
        /// `links[i][j]`: the proxy through which member `i + 1` dials
        /// member `j + 1` (none from a member to itself).
        links: Vec<Vec<Option<TcpProxy>>>,
    },
}

impl Server {
    async fn start(
        store: Store,
        cluster: usize,
        ttl: Duration,
        candidates: usize,
    ) -> anyhow::Result<Server> {
        if store == Store::Raft {
            return Server::raft(candidates).await;
        }
        let server = if store == Store::Nats && cluster > 1 {
            let c = NatsCluster::start(cluster).await.context(
                "starting a 3-node cluster of nats-server 2.11+ (install it with scripts/setup)",
            )?;
            create_replicated_bucket(&c, "leases").await?;
            let server = Server::NatsCluster(c);
            server.wait_healthy().await?;
            server
        } else {
            Server::start_only(store).await?
        };
        server.prepare(ttl).await?;
        Ok(server)
    }

    /// Creates the bucket or table the candidates use, on a throwaway
    /// backend. A candidate whose own setup creates it waits one ttl
    /// before its first acquire (the object may replace one deleted under
    /// a running leader); the run is not about that wait.
    ///
    /// Redis has no object to create, but an epoch marker: setup writes it
    /// on a fresh server, and no acquire succeeds until it is one ttl old
    /// (the server cannot tell a fresh store from one that lost its data).
    /// The run starts once it is, so the wait is not counted in it.
    ///
    /// etcd has nothing to create either, but the first acquire on a
    /// cluster writes its epoch marker, and none succeeds for a ttl after:
    /// a throwaway key is campaigned for until it leads.
    async fn prepare(&self, ttl: Duration) -> anyhow::Result<()> {
        let backend = match self {
            // The group forms when its members start; their setup waits
            // until it is a ttl old.
            Server::Raft { .. } => return Ok(()),
            Server::Etcd(cluster) => {
                let backend = leaseholder::EtcdBackend::builder()
                    .endpoints(cluster.endpoints())
                    .prefix(ETCD_PREFIX)
                    .build()?;
                crate::etcd_epoch::settle(backend, ttl, Duration::from_secs(30))
                    .await
                    .context("waiting out the new etcd cluster's epoch marker")?;
                return Ok(());
            }
            Server::Nats(s) => {
                leaseholder::Backend::nats(async_nats::connect(s.url()).await?, "leases")
            }
            Server::NatsCluster(c) => leaseholder::Backend::nats(
                async_nats::connect(nats_addrs(&c.urls())?).await?,
                "leases",
            ),
            Server::Postgres(s) => leaseholder::Backend::postgres(
                leaseholder::PostgresBackend::builder()
                    .url(s.url())
                    .pool_size(2)
                    .build()?,
            ),
            Server::Redis(s) => leaseholder::Backend::redis(
                leaseholder::RedisBackend::builder().url(s.url()).build()?,
            ),
            Server::Sqlite { path, .. } => leaseholder::Backend::sqlite(
                leaseholder::SqliteBackend::builder().path(path).build()?,
            ),
        };
        let prepared = backend
            .setup()
            .await
            .context("creating the bucket or table")?;
        if matches!(self, Server::Redis(_)) && prepared == leaseholder::Prepared::Created {
            tokio::time::sleep(ttl).await;
        }
        Ok(())
    }

    /// The peer group of `members` members, each link through its proxy.
    /// Nothing runs yet: each candidate process starts its member.
    async fn raft(members: usize) -> anyhow::Result<Server> {
        let dir = leaseholder_testkit::TempDir::new("leaseholder-chaos-raft")?;
        let listen = (0..members)
            .map(|_| leaseholder_testkit::free_port())
            .collect::<Result<Vec<u16>, _>>()?;
        let mut links = Vec::with_capacity(members);
        for i in 0..members {
            let mut row = Vec::with_capacity(members);
            for (j, port) in listen.iter().enumerate() {
                row.push(if i == j {
                    None
                } else {
                    Some(
                        TcpProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], *port)))
                            .await?,
                    )
                });
            }
            links.push(row);
        }
        Ok(Server::Raft {
            dir: dir.path().to_owned(),
            _dir: dir,
            listen,
            links,
        })
    }

    /// How the candidate in `slot` is a member of the peer group: its
    /// store argument and environment (see `candidate.rs`).
    fn raft_member(&self, slot: usize) -> Option<(String, Vec<(&'static str, String)>)> {
        let Server::Raft {
            dir, listen, links, ..
        } = self
        else {
            return None;
        };
        let peers: Vec<String> = listen
            .iter()
            .enumerate()
            .map(|(j, port)| format!("{}=127.0.0.1:{port}", j + 1))
            .collect();
        let routes: Vec<String> = links
            .get(slot)
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(j, p)| p.as_ref().map(|p| format!("{}={}", j + 1, p.addr())))
            .collect();
        Some((
            format!("raft:{}", dir.join(format!("m{}", slot + 1)).display()),
            vec![
                (super::candidate::RAFT_ID, (slot + 1).to_string()),
                (super::candidate::RAFT_PEERS, peers.join(",")),
                (super::candidate::RAFT_ROUTES, routes.join(",")),
            ],
        ))
    }

    /// The proxies a link fault on `slot` acts on: its own (one per server
    /// address), or in a peer group every link into and out of its member.
    fn link_proxies<'a>(&'a self, proxies: &'a [Vec<TcpProxy>], slot: usize) -> Vec<&'a TcpProxy> {
        match self {
            Server::Raft { links, .. } => links
                .iter()
                .enumerate()
                .flat_map(|(i, row)| {
                    row.iter()
                        .enumerate()
                        .filter_map(move |(j, p)| p.as_ref().filter(|_| i == slot || j == slot))
                })
                .collect(),
            _ => proxies.get(slot).into_iter().flatten().collect(),
        }
    }

    async fn start_only(store: Store) -> anyhow::Result<Server> {
        Ok(match store {
            Store::Nats => Server::Nats(
                NatsServer::start()
                    .await
                    .context("starting nats-server 2.11+ (install it with scripts/setup)")?,
            ),
            Store::Postgres => {
                let server = PostgresServer::start()
                    .await
                    .context("starting PostgreSQL 15+ (install it with scripts/setup)")?;
                // The lease table exists before the first candidate starts
                // (a candidate whose setup creates it waits one ttl).
                leaseholder::Backend::postgres(
                    leaseholder::PostgresBackend::builder()
                        .url(server.url())
                        .build()?,
                )
                .setup()
                .await
                .context("creating the lease table")?;
                Server::Postgres(server)
            }
            Store::Redis => Server::Redis(
                RedisServer::start_with(RedisOptions::new().persistence(true))
                    .await
                    .context("starting redis-server 7+ (install it with scripts/setup)")?,
            ),
            Store::Etcd => Server::Etcd(EtcdCluster::start(ETCD_MEMBERS).await.context(
                "starting a 3-member etcd 3.4+ cluster (install it with scripts/setup)",
            )?),
            Store::Raft => anyhow::bail!("a peer group has no server to start"),
            Store::Sqlite => {
                let dir = leaseholder_testkit::TempDir::new("leaseholder-chaos")?;
                let path = dir.path().join("leases.db");
                Server::Sqlite { _dir: dir, path }
            }
        })
    }

    /// The server's addresses (one per etcd member), for the candidates'
    /// proxies; none for a store with no link.
    fn addrs(&self) -> Vec<std::net::SocketAddr> {
        match self {
            Server::Nats(s) => vec![s.addr()],
            Server::NatsCluster(c) => c.nodes().iter().map(NatsServer::addr).collect(),
            Server::Postgres(s) => vec![s.addr()],
            Server::Redis(s) => vec![s.addr()],
            Server::Etcd(c) => c.members().iter().map(|m| m.addr()).collect(),
            Server::Sqlite { .. } | Server::Raft { .. } => Vec::new(),
        }
    }

    /// How a candidate reaches the store: through the proxies on `ports`
    /// (one per address of [`addrs`](Self::addrs)), or directly where
    /// there is no link.
    fn url_via(&self, ports: &[u16]) -> anyhow::Result<String> {
        Ok(match (self, ports) {
            (Server::Sqlite { path, .. }, _) => format!("sqlite:{}", path.display()),
            (Server::Nats(_), [port]) => format!("nats://127.0.0.1:{port}"),
            (Server::NatsCluster(_), ports) if !ports.is_empty() => {
                let urls: Vec<String> = ports
                    .iter()
                    .map(|p| format!("nats://127.0.0.1:{p}"))
                    .collect();
                urls.join(",")
            }
            (Server::Postgres(_), [port]) => {
                format!("postgres://postgres@127.0.0.1:{port}/postgres")
            }
            (Server::Redis(_), [port]) => format!("redis://127.0.0.1:{port}"),
            (Server::Etcd(_), ports) if !ports.is_empty() => {
                let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
                format!("etcd://{}/{ETCD_PREFIX}", hosts.join(","))
            }
            _ => anyhow::bail!("no proxy for a store with a link"),
        })
    }

    fn describe(&self) -> String {
        match self {
            Server::Nats(s) => format!("nats-server {}", s.version()),
            Server::NatsCluster(c) => format!(
                "nats-server {}, a {}-node cluster, the lease bucket replicated on every node",
                c.node(0).version(),
                c.len()
            ),
            Server::Postgres(s) => format!("PostgreSQL {}", s.version()),
            Server::Redis(s) => format!(
                "redis-server {} (append-only file, fsync always)",
                s.version()
            ),
            Server::Etcd(c) => format!(
                "etcd {}, a {}-member cluster",
                c.member(0).version(),
                c.len()
            ),
            Server::Sqlite { path, .. } => format!("SQLite file {}", path.display()),
            Server::Raft { listen, .. } => format!(
                "a peer group of {} members (leaseholder-raft over TCP, fsynced logs), one in each candidate process, every link through a proxy",
                listen.len()
            ),
        }
    }

    /// Restarts the server (Redis: `SIGKILL`, then the same port and
    /// append-only file); for SQLite, stalls the file for `stall`
    /// instead: another connection holds its write lock meanwhile. `false`
    /// if the stall could not start (a candidate paused in the middle of a
    /// write holds the lock, or SQLite refused to wait for it).
    ///
    /// etcd: a quorum loss instead, every member but `rng_survivor` killed,
    /// kept down for `stall`, and started again.
    async fn restart(&mut self, stall: Duration, rng_survivor: usize) -> anyhow::Result<bool> {
        match self {
            Server::Nats(s) => s.restart().await?,
            Server::Postgres(s) => s.restart().await?,
            Server::Redis(s) => s.restart().await?,
            Server::Etcd(_) | Server::NatsCluster(_) => {
                // The quorum loss: two members down for `stall`, then
                // started again one after the other (the first one back
                // restores the quorum with the survivor).
                let survivor = rng_survivor;
                let down: Vec<usize> = (0..self.members()).filter(|&i| i != survivor).collect();
                for &i in &down {
                    self.member_kill(i).await?;
                }
                tokio::time::sleep(stall).await;
                for &i in &down {
                    self.member_restart(i).await?;
                }
                self.wait_healthy().await?;
            }
            Server::Raft { .. } => {
                anyhow::bail!(
                    "a peer group's quorum loss is the harness's (its members are the candidates)"
                )
            }
            Server::Sqlite { path, .. } => {
                let db = rusqlite::Connection::open(&*path)?;
                db.busy_timeout(Duration::from_millis(100))?;
                // SQLite may answer "busy" without waiting (a lock held by a
                // frozen process, a checkpoint): try for a while, then skip.
                let until = Instant::now() + Duration::from_secs(10);
                loop {
                    match db.execute_batch("BEGIN EXCLUSIVE") {
                        Ok(()) => break,
                        Err(_) if Instant::now() < until => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(_) => return Ok(false),
                    }
                }
                tokio::time::sleep(stall).await;
                db.execute_batch("ROLLBACK")?;
            }
        }
        Ok(true)
    }

    fn has_link(&self) -> bool {
        matches!(self, Server::Raft { .. }) || !self.addrs().is_empty()
    }

    /// The members of a clustered store (etcd, a NATS cluster), else 0.
    fn members(&self) -> usize {
        match self {
            Server::Etcd(c) => c.len(),
            Server::NatsCluster(c) => c.len(),
            _ => 0,
        }
    }

    /// `SIGKILL`s member `i`; its ports and data are kept.
    async fn member_kill(&mut self, i: usize) -> anyhow::Result<()> {
        match self {
            Server::Etcd(c) => c.kill(i).await?,
            Server::NatsCluster(c) => c.kill(i).await?,
            _ => anyhow::bail!("this store has no members"),
        }
        Ok(())
    }

    /// Starts member `i` again on its ports and data.
    async fn member_restart(&mut self, i: usize) -> anyhow::Result<()> {
        match self {
            Server::Etcd(c) => c.member_mut(i).restart().await?,
            Server::NatsCluster(c) => c.restart(i).await?,
            _ => anyhow::bail!("this store has no members"),
        }
        Ok(())
    }

    /// `SIGSTOP`s member `i` (`resume` false) or `SIGCONT`s it.
    fn member_signal(&self, i: usize, resume: bool) -> anyhow::Result<()> {
        match (self, resume) {
            (Server::Etcd(c), false) => c.member(i).pause()?,
            (Server::Etcd(c), true) => c.member(i).resume()?,
            (Server::NatsCluster(c), false) => c.node(i).pause()?,
            (Server::NatsCluster(c), true) => c.node(i).resume()?,
            _ => anyhow::bail!("this store has no members"),
        }
        Ok(())
    }

    /// Whether one member can be cut off from its peers alone
    /// ([`FaultKind::MemberCut`]): a NATS cluster, whose routes run
    /// through a proxy per link, and etcd, whose members' peer ports sit
    /// behind fronts that know who dialed.
    fn can_partition(&self) -> bool {
        matches!(self, Server::NatsCluster(_) | Server::Etcd(_))
    }

    /// Cuts member `i`'s routes to its peers (`cut` true) or heals them;
    /// its clients still reach it.
    fn member_cut(&self, i: usize, cut: bool) -> anyhow::Result<()> {
        match (self, cut) {
            (Server::NatsCluster(c), true) => c.isolate(i),
            (Server::NatsCluster(c), false) => c.heal(i),
            (Server::Etcd(c), true) => c.isolate(i)?,
            (Server::Etcd(c), false) => c.heal(i),
            _ => anyhow::bail!("this store cannot cut one member off"),
        }
        Ok(())
    }

    /// Waits until every member is back in the cluster: etcd's health
    /// check; for NATS, until the lease stream has a leader and every
    /// replica is current.
    async fn wait_healthy(&self) -> anyhow::Result<()> {
        match self {
            Server::Etcd(c) => c.wait_healthy().await?,
            Server::NatsCluster(c) => {
                let until = Instant::now() + Duration::from_secs(60);
                loop {
                    match nats_stream_health(c).await {
                        Ok((Some(_), true)) => break,
                        _ if Instant::now() > until => {
                            anyhow::bail!("the R3 lease stream did not recover within 60 s")
                        }
                        _ => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// `true` if every member is back in the cluster now (one check, at
    /// most about 300 ms).
    async fn healthy_now(&self) -> bool {
        match self {
            Server::NatsCluster(c) => matches!(nats_stream_health(c).await, Ok((Some(_), true))),
            Server::Etcd(c) => matches!(
                tokio::time::timeout(Duration::from_millis(300), c.wait_healthy()).await,
                Ok(Ok(_))
            ),
            _ => true,
        }
    }

    /// The member that leads: etcd's Raft leader, the lease stream's
    /// leader on NATS; `None` if the members do not agree on one.
    async fn leader_member(&self) -> Option<usize> {
        match self {
            Server::Etcd(c) => c.leader_index().await.ok(),
            Server::NatsCluster(c) => {
                let (leader, _) = nats_stream_health(c).await.ok()?;
                let leader = leader?;
                c.nodes().iter().position(|n| n.name() == leader)
            }
            _ => None,
        }
    }

    /// Whether [`wipe`](Self::wipe) can make this server lose its data.
    fn can_lose_data(&self) -> bool {
        matches!(self, Server::Redis(_))
    }

    /// Loses every key: `FLUSHALL` on the running server if `restart` is
    /// false, else a restart without persistence (`SIGKILL`, the
    /// append-only files deleted, started again on the same port). Either
    /// way the leases and the epoch marker are gone while their holders
    /// still lead.
    async fn wipe(&mut self, restart: bool) -> anyhow::Result<()> {
        let Server::Redis(s) = self else {
            anyhow::bail!("this store cannot lose its data");
        };
        if restart {
            s.kill().await?;
            let aof = s.dir().join("appendonlydir");
            match std::fs::remove_dir_all(&aof) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).context(format!("deleting {}", aof.display()));
                }
                _ => {}
            }
            s.restart().await?;
        } else {
            let reply = tokio::time::timeout(Duration::from_secs(10), s.cli(&["FLUSHALL"]))
                .await
                .context("FLUSHALL timed out")??;
            anyhow::ensure!(reply == "OK", "FLUSHALL answered {reply:?}");
        }
        Ok(())
    }
}

enum Msg {
    Line(usize, String),
    Eof(usize),
}

/// A candidate process and what the harness knows of it.
struct Proc {
    guard: ChildGuard,
    /// Open fault (index into the record's faults) while it is paused.
    paused: Option<usize>,
    /// The harness killed or stopped it on purpose.
    expected_exit: bool,
    gone: bool,
    /// The token of its open work interval on each key it leads.
    leading: BTreeMap<usize, u64>,
}

/// Something to undo or do later.
enum Later {
    Resume {
        inst: usize,
    },
    Restore {
        slot: usize,
        fault: usize,
    },
    Respawn {
        slot: usize,
    },
    /// Start a killed etcd member again, or wake a paused one.
    MemberBack {
        member: usize,
        fault: usize,
    },
    /// Check whether the cluster is whole again after a member came back
    /// (the member fault stays open until it is; other faults go on).
    MemberHealthy {
        member: usize,
        fault: usize,
        started: Instant,
        restarted: bool,
    },
}

struct Harness {
    opts: Options,
    rng: Rng,
    server: Server,
    /// Each slot's proxies, one per server address (an etcd candidate has
    /// one to each member); a link fault acts on all of a slot's.
    proxies: Vec<Vec<TcpProxy>>,
    /// The instance in each slot.
    slots: Vec<Option<usize>>,
    /// Open link fault (index into faults) of each slot.
    link_fault: Vec<Option<usize>>,
    /// The open member fault (index into faults), if a member is down or
    /// paused: at most one at a time, so the cluster keeps its quorum.
    member_fault: Option<usize>,
    /// A cluster fault (member kill or pause, quorum loss) drawn while a
    /// member fault was open: injected at the first fault time after that
    /// one heals, so that the cluster's kinds are not undercounted.
    member_next: Option<FaultKind>,
    procs: Vec<Proc>,
    record: Record,
    tx: mpsc::UnboundedSender<Msg>,
    rx: mpsc::UnboundedReceiver<Msg>,
    later: Vec<(Instant, Later)>,
    t0: Micros,
    /// Candidates that exited without the harness asking them to.
    unexpected_exits: Vec<String>,
    self_exe: std::path::PathBuf,
    /// From when a fault kind not injected yet is preferred (half-way).
    coverage_from: Instant,
}

/// The prefix of the keys the candidates campaign for (`chaos-0`, …).
const KEY: &str = "chaos";

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

impl Harness {
    fn log(&self, what: &str) {
        let t = now_us().saturating_sub(self.t0) as f64 / 1e6;
        println!("[{t:8.3}s] {what}");
    }

    fn spawn(&mut self, slot: usize) -> anyhow::Result<usize> {
        let inst = self.procs.len();
        let ports: Vec<u16> = self
            .proxies
            .get(slot)
            .map(|ps| ps.iter().map(TcpProxy::url_port).collect())
            .unwrap_or_default();
        let (url, env) = match self.server.raft_member(slot) {
            Some(member) => member,
            None => (self.server.url_via(&ports)?, Vec::new()),
        };
        let mut cmd = tokio::process::Command::new(&self.self_exe);
        cmd.envs(env);
        cmd.args([
            "candidate".to_owned(),
            url,
            KEY.to_owned(),
            self.opts.keys.to_string(),
            self.opts.ttl.as_millis().to_string(),
            self.opts.write_delay.as_millis().to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        if self.opts.priorities {
            cmd.env("LEASEHOLDER_PRIORITY", ((slot % 3) * 5).to_string());
        }
        let clock_rate = self.opts.clock_rate(slot);
        if (clock_rate - 1.0).abs() > f64::EPSILON {
            cmd.env(super::candidate::CLOCK_RATE, clock_rate.to_string());
        }
        let mut guard = ChildGuard::spawn(&mut cmd)?;
        let stdout = guard
            .child_mut()
            .stdout
            .take()
            .context("the candidate's stdout")?;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(Msg::Line(inst, line));
            }
            let _ = tx.send(Msg::Eof(inst));
        });
        self.procs.push(Proc {
            guard,
            paused: None,
            expected_exit: false,
            gone: false,
            leading: BTreeMap::new(),
        });
        self.record.instances.push(Instance {
            slot,
            died: None,
            clock_rate,
        });
        if let Some(s) = self.slots.get_mut(slot) {
            *s = Some(inst);
        }
        Ok(inst)
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Line(inst, line) => {
                let parsed = check::parse_line(&line);
                let Some((at, key, event)) =
                    parsed.filter(|(_, key, _)| key.is_none_or(|k| k < self.record.events.len()))
                else {
                    self.log(&format!("c{inst}: unexpected line {line:?}"));
                    return;
                };
                // READY and EXIT belong to no key; the checker needs
                // neither.
                let Some(key) = key else {
                    return;
                };
                match &event {
                    Event::Start(token) => {
                        if let Some(p) = self.procs.get_mut(inst) {
                            p.leading.insert(key, *token);
                        }
                        // With many keys, the log names only key 0's leaders.
                        if key == 0 {
                            let slot = self.record.instances.get(inst).map_or(0, |i| i.slot);
                            self.log(&format!("c{inst} (slot {slot}) leads k0, token {token}"));
                        }
                    }
                    Event::Stop(token) | Event::Drop(token) => {
                        if let Some(p) = self.procs.get_mut(inst)
                            && p.leading.get(&key) == Some(token)
                        {
                            p.leading.remove(&key);
                        }
                    }
                    _ => {}
                }
                if let Some(events) = self.record.events.get_mut(key) {
                    events.push((inst, at, event));
                }
            }
            Msg::Eof(inst) => {
                let Some(p) = self.procs.get_mut(inst) else {
                    return;
                };
                if p.expected_exit || p.gone {
                    return;
                }
                // It exited on its own: note when, and replace it.
                p.gone = true;
                p.leading.clear();
                let status = p.guard.try_wait().ok().flatten();
                if let Some(i) = self.record.instances.get_mut(inst) {
                    i.died = Some(now_us());
                }
                let what = format!("c{inst} exited on its own ({status:?})");
                self.log(&what);
                self.unexpected_exits.push(what);
                let slot = self.record.instances.get(inst).map_or(0, |i| i.slot);
                self.later
                    .push((Instant::now() + self.opts.ttl / 2, Later::Respawn { slot }));
            }
        }
    }

    /// Drains the lines read so far.
    fn drain(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            self.handle(msg);
        }
    }

    fn live(&self) -> Vec<usize> {
        self.slots
            .iter()
            .flatten()
            .copied()
            .filter(|&i| self.procs.get(i).is_some_and(|p| !p.gone))
            .collect()
    }

    /// The live candidate leading `key`, if one does.
    fn leader(&self, key: usize) -> Option<usize> {
        self.live().into_iter().find(|&i| {
            self.procs
                .get(i)
                .is_some_and(|p| p.leading.contains_key(&key))
        })
    }

    /// The keys no live candidate leads.
    fn leaderless(&self) -> Vec<usize> {
        (0..self.opts.keys)
            .filter(|&k| self.leader(k).is_none())
            .collect()
    }

    /// The leader of a key drawn at random, most of the time, else any of
    /// `eligible`.
    fn pick(&mut self, eligible: &[usize]) -> Option<usize> {
        if eligible.is_empty() {
            return None;
        }
        // Drawn every time, so the schedule of one key stays as it was.
        let key = if self.opts.keys > 1 {
            self.rng.below(self.opts.keys as u64) as usize
        } else {
            0
        };
        if let Some(l) = self.leader(key)
            && eligible.contains(&l)
            && self.rng.below(10) < 7
        {
            return Some(l);
        }
        eligible
            .get(self.rng.below(eligible.len() as u64) as usize)
            .copied()
    }

    fn fault_length(&mut self) -> Duration {
        // From a quarter of a ttl (mostly harmless) to 2.5 ttl (the lease
        // lapses).
        self.opts.ttl.mul_f64(0.25 + 2.25 * self.rng.unit())
    }

    fn role(&self, inst: usize) -> &'static str {
        let p = self.procs.get(inst);
        match (
            p.is_some_and(|p| !p.leading.is_empty()),
            p.is_some_and(|p| p.paused.is_some()),
        ) {
            (true, false) => "the leader",
            (true, true) => "a paused leader",
            (false, false) => "a follower",
            (false, true) => "a paused follower",
        }
    }

    /// The fault kinds this store can be given.
    fn kinds(&self) -> Vec<FaultKind> {
        FaultKind::ALL
            .into_iter()
            .filter(|k| match k {
                FaultKind::Cut | FaultKind::Blackhole => self.server.has_link(),
                FaultKind::Wipe => self.server.can_lose_data(),
                FaultKind::MemberKill | FaultKind::MemberPause => self.server.members() > 1,
                FaultKind::MemberCut => self.server.can_partition(),
                FaultKind::Kill | FaultKind::Pause | FaultKind::Restart => true,
            })
            .collect()
    }

    async fn inject(&mut self) -> anyhow::Result<()> {
        self.drain();
        let roll = self.rng.below(100);
        let drawn = if self.server.members() > 1 {
            // A cluster: nearly half of the faults are its members' (a quorum
            // loss is its restart), the rest the candidates' and links'.
            match roll {
                0..14 => FaultKind::Kill,
                14..28 => FaultKind::Pause,
                28..41 => FaultKind::Cut,
                41..54 => FaultKind::Blackhole,
                54..66 => FaultKind::MemberKill,
                66..76 => FaultKind::MemberPause,
                76..87 if self.server.can_partition() => FaultKind::MemberCut,
                76..87 => FaultKind::MemberPause,
                _ => FaultKind::Restart,
            }
        } else {
            match roll {
                0..18 => FaultKind::Kill,
                18..38 => FaultKind::Pause,
                38..56 if self.server.has_link() => FaultKind::Cut,
                56..72 if self.server.has_link() => FaultKind::Blackhole,
                // No link to cut: kills and pauses instead.
                38..56 => FaultKind::Kill,
                56..72 => FaultKind::Pause,
                // A store that can lose its data shares the restarts' part
                // (each at least a seventh of the draws: every kind is
                // injected 100 times in the long run).
                72..86 if self.server.can_lose_data() => FaultKind::Wipe,
                // A peer group's restart is a quorum loss: half as often
                // as a server's restart, the rest member kills.
                72..86 if matches!(self.server, Server::Raft { .. }) => FaultKind::Kill,
                _ => FaultKind::Restart,
            }
        };
        // Every kind the store has is injected at least once: from half-way
        // through the run, a kind not injected yet is taken in place of the
        // one drawn (a minute has about 30 faults, so a kind drawn one time
        // in thirteen would be missing from one run in ten).
        let missing = (Instant::now() >= self.coverage_from)
            .then(|| {
                self.kinds()
                    .into_iter()
                    .find(|&k| !self.record.faults.iter().any(|f| f.kind == k))
            })
            .flatten();
        let cluster_kind = |k: FaultKind| {
            matches!(
                k,
                FaultKind::MemberKill
                    | FaultKind::MemberPause
                    | FaultKind::MemberCut
                    | FaultKind::Restart
            ) && self.server.members() > 1
        };
        let deferred = if self.member_fault.is_none() {
            self.member_next.take()
        } else {
            None
        };
        let kind = deferred.or(missing).unwrap_or(drawn);
        if self.member_fault.is_some() && cluster_kind(kind) {
            // One member fault at a time (the cluster keeps its quorum):
            // this one waits until the open one heals.
            if self.member_next.is_none() {
                self.member_next = Some(kind);
                self.log(&format!(
                    "fault deferred: {} until the open member fault heals",
                    kind.name()
                ));
            } else {
                self.log(&format!(
                    "fault skipped: {} while a member fault is open and another waits",
                    kind.name()
                ));
            }
            return Ok(());
        }
        match kind {
            FaultKind::Kill | FaultKind::Pause => {
                let eligible: Vec<usize> = self
                    .live()
                    .into_iter()
                    .filter(|&i| self.procs.get(i).is_some_and(|p| p.paused.is_none()))
                    .collect();
                let Some(inst) = self.pick(&eligible) else {
                    return Ok(());
                };
                let role = self.role(inst);
                let slot = self.record.instances.get(inst).map_or(0, |i| i.slot);
                if kind == FaultKind::Kill {
                    let from = now_us();
                    let died = self.kill_inst(inst).await?;
                    self.record.faults.push(Fault {
                        kind,
                        target: inst,
                        from,
                        to: died,
                    });
                    let respawn = self.opts.ttl.mul_f64(self.rng.unit());
                    self.log(&format!(
                        "fault: kill c{inst} ({role}); a new candidate in slot {slot} in {}",
                        secs(respawn)
                    ));
                    self.later
                        .push((Instant::now() + respawn, Later::Respawn { slot }));
                } else {
                    let Some(p) = self.procs.get_mut(inst) else {
                        return Ok(());
                    };
                    p.guard.pause()?;
                    let from = now_us();
                    p.paused = Some(self.record.faults.len());
                    self.record.faults.push(Fault {
                        kind,
                        target: inst,
                        from,
                        to: Micros::MAX,
                    });
                    let length = self.fault_length();
                    self.log(&format!(
                        "fault: pause c{inst} ({role}) for {}",
                        secs(length)
                    ));
                    self.later
                        .push((Instant::now() + length, Later::Resume { inst }));
                }
            }
            FaultKind::Cut | FaultKind::Blackhole => {
                let eligible: Vec<usize> = self
                    .live()
                    .into_iter()
                    .filter(|&i| {
                        self.record
                            .instances
                            .get(i)
                            .and_then(|x| self.link_fault.get(x.slot))
                            .is_some_and(Option::is_none)
                    })
                    .collect();
                let Some(inst) = self.pick(&eligible) else {
                    return Ok(());
                };
                let role = self.role(inst);
                let slot = self.record.instances.get(inst).map_or(0, |i| i.slot);
                let proxies = self.server.link_proxies(&self.proxies, slot);
                if proxies.is_empty() {
                    return Ok(());
                }
                for proxy in proxies {
                    if kind == FaultKind::Cut {
                        proxy.cut();
                    } else {
                        proxy.blackhole();
                    }
                }
                let fault = self.record.faults.len();
                self.record.faults.push(Fault {
                    kind,
                    target: slot,
                    from: now_us(),
                    to: Micros::MAX,
                });
                if let Some(f) = self.link_fault.get_mut(slot) {
                    *f = Some(fault);
                }
                let length = self.fault_length();
                self.log(&format!(
                    "fault: {} the link of c{inst} ({role}) for {}",
                    kind.name(),
                    secs(length)
                ));
                self.later
                    .push((Instant::now() + length, Later::Restore { slot, fault }));
            }
            FaultKind::Restart if matches!(self.server, Server::Raft { .. }) => {
                let stall = self.fault_length() / 2;
                self.quorum_loss(stall).await?;
            }
            FaultKind::Restart => {
                let stall = self.fault_length() / 2;
                let members = self.server.members();
                // Drawn for a cluster only: the other stores' schedules
                // stay what their seeds gave before.
                let survivor = if members > 1 {
                    self.rng.below(members as u64) as usize
                } else {
                    0
                };
                if members > 1 {
                    if self.member_fault.is_some() {
                        self.log("fault skipped: quorum loss while a member fault is open");
                        return Ok(());
                    }
                    self.log(&format!(
                        "fault: quorum loss, every member but m{survivor} killed for {}, then started again",
                        secs(stall)
                    ));
                } else if self.server.has_link() {
                    self.log("fault: restart the server");
                } else {
                    self.log(&format!(
                        "fault: stall the file for {} (another process holds its write lock)",
                        secs(stall)
                    ));
                }
                let from = now_us();
                let started = Instant::now();
                if !self.server.restart(stall, survivor).await? {
                    self.log("fault skipped: the file stayed busy");
                    return Ok(());
                }
                self.record.faults.push(Fault {
                    kind,
                    target: 0,
                    from,
                    to: now_us(),
                });
                self.log(&format!(
                    "server back after {:.0} ms",
                    started.elapsed().as_secs_f64() * 1000.0
                ));
            }
            FaultKind::MemberKill | FaultKind::MemberPause | FaultKind::MemberCut => {
                if self.member_fault.is_some() {
                    // One member at a time: the cluster keeps its quorum.
                    self.log(&format!(
                        "fault skipped: {} while a member fault is open",
                        kind.name()
                    ));
                    return Ok(());
                }
                let members = self.server.members() as u64;
                // The Raft leader half of the time (its loss moves every
                // lease to a new leader, which extends them), else any.
                // Both drawn every time, so the schedule does not depend on
                // whether the members could name their leader.
                let (coin, any) = (self.rng.below(2), self.rng.below(members) as usize);
                let leader = self.server.leader_member().await;
                let member = match leader {
                    Some(l) if coin == 0 => l,
                    _ => any,
                };
                let role = if leader == Some(member) {
                    "the Raft leader"
                } else {
                    "a Raft follower"
                };
                let length = self.fault_length();
                match kind {
                    FaultKind::MemberKill => self.server.member_kill(member).await?,
                    FaultKind::MemberCut => self.server.member_cut(member, true)?,
                    _ => self.server.member_signal(member, false)?,
                }
                let fault = self.record.faults.len();
                self.record.faults.push(Fault {
                    kind,
                    target: member,
                    from: now_us(),
                    to: Micros::MAX,
                });
                self.member_fault = Some(fault);
                self.log(&format!(
                    "fault: {} m{member} ({role}) for {}",
                    match kind {
                        FaultKind::MemberKill => "SIGKILL",
                        FaultKind::MemberCut => "cut the routes of",
                        _ => "SIGSTOP",
                    },
                    secs(length)
                ));
                self.later
                    .push((Instant::now() + length, Later::MemberBack { member, fault }));
            }
            FaultKind::Wipe => {
                let restart = self.rng.below(2) == 0;
                self.log(if restart {
                    "fault: restart the server without its data (append-only files deleted)"
                } else {
                    "fault: FLUSHALL (the server loses every key)"
                });
                let from = now_us();
                let started = Instant::now();
                self.server.wipe(restart).await?;
                self.record.faults.push(Fault {
                    kind,
                    target: 0,
                    from,
                    to: now_us(),
                });
                self.log(&format!(
                    "data gone after {:.0} ms: no acquire succeeds for a ttl (the epoch marker)",
                    started.elapsed().as_secs_f64() * 1000.0
                ));
            }
        }
        Ok(())
    }

    /// `SIGKILL`s candidate `inst` and notes its death (the caller records
    /// the fault and when its slot gets a new candidate).
    async fn kill_inst(&mut self, inst: usize) -> anyhow::Result<Micros> {
        if let Some(p) = self.procs.get_mut(inst) {
            p.expected_exit = true;
            p.guard.kill().await?;
            p.gone = true;
            p.leading.clear();
        }
        let died = now_us();
        if let Some(i) = self.record.instances.get_mut(inst) {
            i.died = Some(died);
        }
        Ok(died)
    }

    /// A peer group's quorum loss: every member but one drawn at random
    /// killed (its candidate with it), each started again on its data
    /// directory after `stall`. A member paused, or already down and
    /// waiting for its restart, is left as it is.
    async fn quorum_loss(&mut self, stall: Duration) -> anyhow::Result<()> {
        let members = self.opts.candidates;
        let survivor = self.rng.below(members as u64) as usize;
        let from = now_us();
        let mut killed = Vec::new();
        for slot in (0..members).filter(|&s| s != survivor) {
            let Some(inst) = self.slots.get(slot).copied().flatten() else {
                continue;
            };
            let up = self
                .procs
                .get(inst)
                .is_some_and(|p| !p.gone && p.paused.is_none());
            if !up {
                continue;
            }
            self.kill_inst(inst).await?;
            killed.push(slot);
            self.later
                .push((Instant::now() + stall, Later::Respawn { slot }));
        }
        if killed.is_empty() {
            self.log("fault skipped: quorum loss with every other member down or paused already");
            return Ok(());
        }
        self.record.faults.push(Fault {
            kind: FaultKind::Restart,
            target: survivor,
            from,
            to: from + u64::try_from(stall.as_micros()).unwrap_or(u64::MAX),
        });
        self.log(&format!(
            "fault: quorum loss, members of slots {killed:?} killed (slot {survivor} survives), started again in {}",
            secs(stall)
        ));
        Ok(())
    }

    fn resume(&mut self, inst: usize) -> anyhow::Result<()> {
        let Some(p) = self.procs.get_mut(inst) else {
            return Ok(());
        };
        let Some(fault) = p.paused.take() else {
            return Ok(());
        };
        let to = now_us();
        p.guard.resume()?;
        if let Some(f) = self.record.faults.get_mut(fault) {
            f.to = to;
        }
        self.log(&format!("resume c{inst}"));
        Ok(())
    }

    fn restore(&mut self, slot: usize, fault: usize) {
        if let Some(f) = self.record.faults.get_mut(fault) {
            f.to = now_us();
        }
        for p in self.server.link_proxies(&self.proxies, slot) {
            p.restore();
        }
        if let Some(f) = self.link_fault.get_mut(slot) {
            *f = None;
        }
        self.log(&format!("restore the link of slot {slot}"));
    }

    async fn do_later(&mut self, what: Later) -> anyhow::Result<()> {
        match what {
            Later::Resume { inst } => self.resume(inst)?,
            Later::Restore { slot, fault } => self.restore(slot, fault),
            Later::Respawn { slot } => {
                let inst = self.spawn(slot)?;
                self.log(&format!("c{inst} starts in slot {slot}"));
            }
            Later::MemberBack { member, fault } => self.member_back(member, fault).await?,
            Later::MemberHealthy {
                member,
                fault,
                started,
                restarted,
            } => {
                self.member_healthy(member, fault, started, restarted, false)
                    .await?
            }
        }
        Ok(())
    }

    /// Ends a member fault: a killed member is started again (on its
    /// ports and data), a paused one woken; then waits until the whole
    /// cluster is healthy (checked from the loop, other faults going on)
    /// before another member fault may begin.
    async fn member_back(&mut self, member: usize, fault: usize) -> anyhow::Result<()> {
        let kind = self.record.faults.get(fault).map(|f| f.kind);
        let started = Instant::now();
        let to = now_us();
        let restarted = kind == Some(FaultKind::MemberKill);
        match kind {
            Some(FaultKind::MemberKill) => self.server.member_restart(member).await?,
            Some(FaultKind::MemberCut) => self.server.member_cut(member, false)?,
            _ => self.server.member_signal(member, true)?,
        }
        if let Some(f) = self.record.faults.get_mut(fault) {
            f.to = to;
        }
        // The cluster heals while the other faults go on; the next member
        // fault waits until it is whole.
        self.later.push((
            Instant::now(),
            Later::MemberHealthy {
                member,
                fault,
                started,
                restarted,
            },
        ));
        Ok(())
    }

    /// One health check after a member came back: closes the member fault
    /// once the cluster is whole, else checks again in 100 ms (for at most
    /// 60 s; `wait` makes it wait here instead, when the run heals).
    async fn member_healthy(
        &mut self,
        member: usize,
        fault: usize,
        started: Instant,
        restarted: bool,
        wait: bool,
    ) -> anyhow::Result<()> {
        if wait {
            self.server.wait_healthy().await?;
        } else if !self.server.healthy_now().await {
            if started.elapsed() > Duration::from_secs(60) {
                anyhow::bail!("the cluster did not recover within 60 s of m{member} coming back");
            }
            self.later.push((
                Instant::now() + Duration::from_millis(100),
                Later::MemberHealthy {
                    member,
                    fault,
                    started,
                    restarted,
                },
            ));
            return Ok(());
        }
        let back = match self.record.faults.get(fault).map(|f| f.kind) {
            _ if restarted => "restarted",
            Some(FaultKind::MemberCut) => "healed",
            _ => "resumed",
        };
        self.member_fault = None;
        self.log(&format!(
            "m{member} {back} and the cluster healthy after {:.0} ms",
            started.elapsed().as_secs_f64() * 1000.0
        ));
        Ok(())
    }

    /// Runs what is due by `now`.
    async fn run_due(&mut self, now: Instant) -> anyhow::Result<()> {
        while let Some(i) = self.later.iter().position(|(at, _)| *at <= now) {
            let (_, what) = self.later.swap_remove(i);
            self.do_later(what).await?;
        }
        Ok(())
    }

    /// Waits for lines until `until`.
    async fn pump_until(&mut self, until: Instant) {
        loop {
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => return,
                },
                () = tokio::time::sleep_until(until) => return,
            }
        }
    }
}

/// The outcome of a run.
pub(crate) struct Outcome {
    pub(crate) report: Report,
    pub(crate) faults: BTreeMap<FaultKind, usize>,
    pub(crate) unexpected_exits: Vec<String>,
    pub(crate) liveness: Result<Duration, String>,
    pub(crate) clock_step: Option<String>,
    pub(crate) server: String,
    /// When the run started, for [`check::Term::show`].
    pub(crate) origin: Micros,
    /// Everything recorded, for the report's timelines.
    pub(crate) record: Record,
}

/// The drift margin the candidates get by default for `ttl`, from the
/// library itself.
pub(crate) fn drift_margin(ttl: Duration) -> anyhow::Result<Duration> {
    let store = leaseholder::MemoryStore::new();
    let leader = leaseholder::Leader::builder("probe")
        .backend(leaseholder::Backend::memory(&store))
        .ttl(ttl)
        .build()?;
    Ok(leader.config().drift_margin())
}

pub(crate) async fn run(opts: Options) -> anyhow::Result<Outcome> {
    let server = Server::start(opts.store, opts.cluster, opts.ttl, opts.candidates).await?;
    let describe = server.describe();
    let mut proxies = Vec::with_capacity(opts.candidates);
    let addrs = server.addrs();
    if !addrs.is_empty() {
        for _ in 0..opts.candidates {
            let mut slot = Vec::with_capacity(addrs.len());
            for &addr in &addrs {
                slot.push(TcpProxy::start(addr).await?);
            }
            proxies.push(slot);
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let wall0 = SystemTime::now();
    let mono0 = Instant::now();
    let mut h = Harness {
        rng: Rng::new(opts.seed),
        server,
        proxies,
        slots: vec![None; opts.candidates],
        link_fault: vec![None; opts.candidates],
        member_fault: None,
        member_next: None,
        procs: Vec::new(),
        record: Record {
            ttl: u64::try_from(opts.ttl.as_micros())?,
            drift_margin: u64::try_from(drift_margin(opts.ttl)?.as_micros())?,
            events: vec![Vec::new(); opts.keys],
            ..Record::default()
        },
        tx,
        rx,
        later: Vec::new(),
        t0: 0,
        unexpected_exits: Vec::new(),
        self_exe: std::env::current_exe().context("locating the chaos binary")?,
        coverage_from: Instant::now() + opts.duration / 2,
        opts,
    };
    h.t0 = now_us();
    h.record.origin = h.t0;
    h.log(&format!(
        "{describe}, {} candidates, {} keys each",
        h.opts.candidates, h.opts.keys
    ));
    for slot in 0..h.opts.candidates {
        h.spawn(slot)?;
    }

    // Chaos: a fault every half to one and a half ttl.
    let start = Instant::now();
    let end = start + h.opts.duration;
    let mut next_fault = start + h.opts.ttl.mul_f64(1.0 + h.rng.unit());
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        h.run_due(now).await?;
        if now >= next_fault {
            h.inject().await?;
            // A cluster's faults come twice as often: its member faults
            // hold the cluster for seconds while it heals (one at a time),
            // and the candidates' faults go on meanwhile.
            let spread = if h.server.members() > 1 { 0.5 } else { 1.0 };
            next_fault = Instant::now() + h.opts.ttl.mul_f64((0.5 + h.rng.unit()) * spread);
        }
        let wake = h
            .later
            .iter()
            .map(|(at, _)| *at)
            .chain([next_fault, end])
            .min()
            .unwrap_or(end);
        h.pump_until(wake).await;
    }

    // Heal: undo every fault, replace every dead candidate.
    h.drain();
    h.log("chaos over: healing");
    let pending: Vec<Later> = h.later.drain(..).map(|(_, what)| what).collect();
    for what in pending {
        h.do_later(what).await?;
    }
    // A member that came back just now: wait until the cluster is whole.
    let checks: Vec<Later> = h.later.drain(..).map(|(_, what)| what).collect();
    for what in checks {
        match what {
            Later::MemberHealthy {
                member,
                fault,
                started,
                restarted,
            } => {
                h.member_healthy(member, fault, started, restarted, true)
                    .await?
            }
            other => h.do_later(other).await?,
        }
    }
    let healed = Instant::now();
    // Liveness: a leader within a few ttl of healing (the store may still
    // hold a lapsed leader's lease for one ttl, and clients reconnect with
    // backoff).
    let give_up = healed + h.opts.ttl * 5 + Duration::from_secs(10);
    let liveness = loop {
        h.drain();
        let leaderless = h.leaderless();
        if leaderless.is_empty() {
            break Ok(healed.elapsed());
        }
        if Instant::now() >= give_up {
            break Err(format!(
                "{} of {} keys had no leader {} after healing (the first: k{})",
                leaderless.len(),
                h.opts.keys,
                secs(healed.elapsed()),
                leaderless[0]
            ));
        }
        h.pump_until(Instant::now() + Duration::from_millis(50))
            .await;
    };
    match &liveness {
        Ok(after) => h.log(&format!("a leader {} after healing", secs(*after))),
        Err(e) => h.log(e),
    }
    h.pump_until(Instant::now() + h.opts.ttl).await;

    // Stop: SIGTERM everyone, wait for them to drain and exit.
    for inst in h.live() {
        if let Some(p) = h.procs.get_mut(inst) {
            p.expected_exit = true;
            let _ = p.guard.terminate();
        }
    }
    let stop_deadline = Instant::now() + Duration::from_secs(20);
    for inst in h.live() {
        let Some(p) = h.procs.get_mut(inst) else {
            continue;
        };
        let status = tokio::time::timeout_at(stop_deadline, p.guard.wait()).await;
        if status.is_err() {
            h.unexpected_exits
                .push(format!("c{inst} did not exit within 20 s of SIGTERM"));
            let _ = p.guard.kill().await;
        }
        p.gone = true;
        if let Some(i) = h.record.instances.get_mut(inst) {
            i.died = Some(now_us());
        }
    }
    // Every reader reaches end-of-file now.
    h.pump_until(Instant::now() + Duration::from_millis(500))
        .await;
    h.drain();
    h.record.end = now_us();

    let clock_step = {
        let wall = SystemTime::now()
            .duration_since(wall0)
            .unwrap_or_default()
            .as_secs_f64();
        let mono = mono0.elapsed().as_secs_f64();
        ((wall - mono).abs() > 0.05).then(|| {
            format!("the wall clock moved {wall:.3} s while the monotonic clock moved {mono:.3} s: the stamps may be off")
        })
    };
    let mut faults: BTreeMap<FaultKind, usize> = FaultKind::ALL.iter().map(|&k| (k, 0)).collect();
    for f in &h.record.faults {
        *faults.entry(f.kind).or_default() += 1;
    }
    let report = check::check(&h.record);
    Ok(Outcome {
        report,
        faults,
        unexpected_exits: h.unexpected_exits,
        liveness,
        clock_step,
        server: describe,
        origin: h.record.origin,
        record: h.record,
    })
}

/// `nats://a,nats://b` as the addresses async-nats takes.
pub(crate) fn nats_addrs(urls: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    urls.split(',')
        .map(|u| u.trim().parse().with_context(|| format!("NATS URL {u:?}")))
        .collect()
}

/// The lease bucket's stream: its leader's server name, and whether every
/// replica is current.
async fn nats_stream_health(c: &NatsCluster) -> anyhow::Result<(Option<String>, bool)> {
    let probe = async {
        let client = async_nats::connect(nats_addrs(&c.urls())?).await?;
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream("KV_leases").await?;
        let info = stream.info().await?;
        let cluster = info.cluster.clone();
        anyhow::Ok(match cluster {
            Some(cl) => {
                let current =
                    cl.replicas.len() + 1 == c.len() && cl.replicas.iter().all(|r| r.current);
                (cl.leader, current)
            }
            None => (None, false),
        })
    };
    tokio::time::timeout(Duration::from_secs(3), probe)
        .await
        .context("the stream info timed out")?
}

/// Creates the lease bucket's stream replicated on every node of `c`, as
/// the backend's setup would create it with one replica (setup accepts it
/// as it finds it).
async fn create_replicated_bucket(c: &NatsCluster, bucket: &str) -> anyhow::Result<()> {
    use async_nats::jetstream::stream;
    let client = async_nats::connect(nats_addrs(&c.urls())?).await?;
    let js = async_nats::jetstream::new(client);
    let first_sequence = u64::try_from(
        SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_micros(),
    )?;
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        allow_message_ttl: true,
        subject_delete_marker_ttl: Some(Duration::from_secs(60)),
        num_replicas: c.len(),
        // Tokens keep increasing if the bucket is ever re-created (setup
        // refuses a bucket without this).
        first_sequence: Some(first_sequence),
        ..Default::default()
    };
    // A young cluster can time out placing an R3 stream; creating the same
    // config again is idempotent.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        match js.create_stream(config.clone()).await {
            Ok(_) => break,
            Err(e) if Instant::now() < until => {
                eprintln!("creating the R3 stream: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e).context("creating the R3 lease stream"),
        }
    }
    Ok(())
}
