//! Tests of the peer transport: forwarding batches, fallbacks for older peers, heals.

use std::sync::atomic::{AtomicUsize, Ordering};

use tonic::{Request, Response, Status, Streaming};

use super::*;
use crate::consensus::Forwarded;
use crate::fsm::{Command, Request as Write, Response as WriteResult};
use crate::pb::peer::peer_server::{Peer, PeerServer};
use crate::pb::peer::{
    NodeStatusRequest, NodeStatusResponse, ReadIndexRequest, ReadIndexResponse, SnapshotChunk,
};

/// A leader that answers each forwarded Put with its key's number as the revision.
/// `has_batch: false` plays a leader from before ForwardBatch; `short: true` one that
/// answers a batch with one result too few.
#[derive(Default)]
struct FakeLeader {
    has_batch: bool,
    short: bool,
    batch_calls: AtomicUsize,
    single_calls: AtomicUsize,
}

fn answer(w: &Write) -> Forwarded<WriteResult> {
    match &w.command {
        Command::Put { key, .. } => Forwarded::Ok(WriteResult::Put {
            revision: String::from_utf8_lossy(key).parse().unwrap_or(0),
            prev_revision: 0,
        }),
        _ => Forwarded::Failed("unexpected command".into()),
    }
}

fn put(n: u64) -> Write {
    Write::new(
        "",
        Command::Put {
            key: n.to_string().into_bytes(),
            value: b"v".to_vec(),
            expected_revision: None,
        },
    )
}

fn revision<E>(r: &Result<Forwarded<WriteResult>, E>) -> Option<u64> {
    match r {
        Ok(Forwarded::Ok(WriteResult::Put { revision, .. })) => Some(*revision),
        _ => None,
    }
}

#[tonic::async_trait]
impl Peer for Arc<FakeLeader> {
    async fn append_entries(&self, _: Request<Blob>) -> Result<Response<Blob>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type AppendStreamStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<Blob, Status>> + Send + 'static>>;
    async fn append_stream(
        &self,
        _: Request<Streaming<Blob>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn vote(&self, _: Request<Blob>) -> Result<Response<Blob>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn pre_vote(&self, _: Request<Blob>) -> Result<Response<Blob>, Status> {
        Err(Status::unimplemented("unknown method PreVote"))
    }
    async fn transfer_leader(&self, _: Request<Blob>) -> Result<Response<Blob>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn install_snapshot(
        &self,
        _: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<Blob>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn forward(&self, req: Request<Blob>) -> Result<Response<Blob>, Status> {
        self.single_calls.fetch_add(1, Ordering::SeqCst);
        let w: Write =
            decode(&req.into_inner().data).map_err(|e| Status::internal(e.to_string()))?;
        let data = encode(&answer(&w)).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(Blob { data }))
    }
    async fn forward_batch(&self, req: Request<Blob>) -> Result<Response<Blob>, Status> {
        if !self.has_batch {
            return Err(Status::unimplemented("unknown method ForwardBatch"));
        }
        self.batch_calls.fetch_add(1, Ordering::SeqCst);
        let ws: Vec<Write> =
            decode(&req.into_inner().data).map_err(|e| Status::internal(e.to_string()))?;
        let mut out: Vec<_> = ws.iter().map(answer).collect();
        if self.short {
            out.pop();
        }
        let data = encode(&out).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(Blob { data }))
    }
    async fn admin(&self, _: Request<Blob>) -> Result<Response<Blob>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn read_index(
        &self,
        _: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn node_status(
        &self,
        _: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

async fn serve(leader: Arc<FakeLeader>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    tokio::spawn(
        super::peer_server()
            .add_service(PeerServer::new(leader))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    addr
}

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn forward_batch_answers_each_write_in_order_in_one_call() {
    let leader = Arc::new(FakeLeader {
        has_batch: true,
        ..Default::default()
    });
    let addr = serve(leader.clone()).await;
    let pool = PeerPool::default();
    let reqs: Vec<Write> = (1..=5).map(put).collect();
    let got = pool
        .forward_batch::<_, Forwarded<WriteResult>>(&addr, T, &reqs)
        .await;
    assert_eq!(
        got.iter().map(revision).collect::<Vec<_>>(),
        (1..=5).map(Some).collect::<Vec<_>>()
    );
    assert_eq!(leader.batch_calls.load(Ordering::SeqCst), 1);
    assert_eq!(leader.single_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn forward_batch_falls_back_to_single_calls_on_an_old_leader() {
    let leader = Arc::new(FakeLeader::default());
    let addr = serve(leader.clone()).await;
    let pool = PeerPool::default();
    let reqs: Vec<Write> = (1..=4).map(put).collect();
    let got = pool
        .forward_batch::<_, Forwarded<WriteResult>>(&addr, T, &reqs)
        .await;
    assert_eq!(
        got.iter().map(revision).collect::<Vec<_>>(),
        (1..=4).map(Some).collect::<Vec<_>>()
    );
    assert_eq!(leader.single_calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn forward_batch_errors_reach_every_write() {
    // A wrong number of answers: no write may take another's answer.
    let leader = Arc::new(FakeLeader {
        has_batch: true,
        short: true,
        ..Default::default()
    });
    let addr = serve(leader).await;
    let pool = PeerPool::default();
    let reqs: Vec<Write> = (1..=3).map(put).collect();
    let got = pool
        .forward_batch::<_, Forwarded<WriteResult>>(&addr, T, &reqs)
        .await;
    assert_eq!(got.len(), 3);
    assert!(
        got.iter().all(|r| matches!(r, Err(NetError::Codec { .. }))),
        "{got:?}"
    );
    // Nobody listening.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let got = pool
        .forward_batch::<_, Forwarded<WriteResult>>(&dead, Duration::from_secs(2), &reqs)
        .await;
    assert_eq!(got.len(), 3);
    assert!(
        got.iter()
            .all(|r| matches!(r, Err(NetError::Unreachable { .. }))),
        "{got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_batcher_coalesces_concurrent_writes_and_answers_each_its_own() {
    let leader = Arc::new(FakeLeader {
        has_batch: true,
        ..Default::default()
    });
    let addr = serve(leader.clone()).await;
    let pool: Arc<dyn crate::consensus::Peers> = Arc::new(PeerPool::default());
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let b = Arc::new(crate::consensus::batch::ForwardBatcher::new(
        metrics.clone(),
    ));
    let mut tasks = Vec::new();
    for n in 1..=200u64 {
        let (b, pool, addr) = (b.clone(), pool.clone(), addr.clone());
        tasks.push(tokio::spawn(async move {
            let r = b.forward(&pool, &addr, put(n), T).await;
            assert_eq!(revision(&r), Some(n), "{r:?}");
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let calls = leader.batch_calls.load(Ordering::SeqCst);
    assert!(
        calls < 200,
        "200 writes took {calls} calls: nothing was batched"
    );
    let text = metrics.render();
    assert!(
        text.contains(&format!("metaraft_forward_batch_size_count {calls}")),
        "every batch is counted: {text}"
    );
}

#[test]
fn snapshot_timeout_grows_with_size_above_the_floor() {
    let floor = Duration::from_secs(600);
    let mb = 1u64 << 20;
    // Small snapshots keep the floor.
    assert_eq!(snapshot_timeout(floor, 100 * mb, 5 * mb), floor);
    // 10 GiB at 5 MB/s: 2048 s + 30 s.
    assert_eq!(
        snapshot_timeout(floor, 10 * 1024 * mb, 5 * mb),
        Duration::from_secs(2048 + 30)
    );
    // A zero rate cannot divide by zero.
    assert!(snapshot_timeout(floor, mb, 0) >= floor);
}

#[test]
fn dir_bytes_sums_file_sizes() {
    let d = tempfile::tempdir().expect("tmp");
    std::fs::write(d.path().join("a"), vec![0u8; 1000]).expect("write");
    std::fs::write(d.path().join("b"), vec![0u8; 24]).expect("write");
    std::fs::create_dir(d.path().join("sub")).expect("mkdir");
    assert_eq!(crate::checkpoint_files::dir_bytes(d.path()), 1024);
    assert_eq!(
        crate::checkpoint_files::dir_bytes(&d.path().join("missing")),
        0
    );
}

/// A TCP relay in front of a server that can stop moving bytes, as a partition that drops
/// packets does (TCP delivers everything after the heal), and counts the connections it relays.
struct Relay {
    addr: String,
    paused: tokio::sync::watch::Sender<bool>,
    conns: Arc<AtomicUsize>,
}

async fn relay(to: String) -> Relay {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let (paused, rx) = tokio::sync::watch::channel(false);
    let conns = Arc::new(AtomicUsize::new(0));
    let count = conns.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let Ok(outbound) = tokio::net::TcpStream::connect(&to).await else {
                continue;
            };
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            tokio::spawn(pipe(ri, wo, rx.clone()));
            tokio::spawn(pipe(ro, wi, rx.clone()));
        }
    });
    Relay {
        addr,
        paused,
        conns,
    }
}

async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut paused: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        let n = tokio::select! {
            r = r.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = paused.wait_for(|p| *p) => continue,
        };
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// What a partition of a few seconds does to a peer connection: every call made meanwhile
/// times out and is cancelled, and at the heal the server receives all of them, opened and
/// reset, at once. That must not close the connection (h2's default limit of 20 did).
#[tokio::test]
async fn a_heal_after_many_cancelled_calls_keeps_the_peer_connection() {
    let leader = Arc::new(FakeLeader::default());
    let relay = relay(serve(leader.clone()).await).await;
    let pool = PeerPool::default();
    let write = put(7);
    let call = |timeout: Duration| {
        pool.call_blob::<_, Forwarded<WriteResult>, _, _>(
            &relay.addr,
            timeout,
            &write,
            |mut c, b| async move { c.forward(b).await },
        )
    };
    assert_eq!(revision(&call(T).await), Some(7));

    relay.paused.send(true).expect("pause");
    let cut = futures::future::join_all((0..300).map(|_| call(Duration::from_millis(100)))).await;
    assert!(
        cut.iter()
            .all(|r| matches!(r, Err(NetError::Unreachable { .. }))),
        "calls during the partition time out"
    );
    relay.paused.send(false).expect("heal");

    for _ in 0..5 {
        let r = call(T).await;
        assert_eq!(revision(&r), Some(7), "a call after the heal: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        relay.conns.load(Ordering::SeqCst),
        1,
        "the heal closed the peer connection"
    );
}

/// A peer from before the PreVote call answers UNIMPLEMENTED: that counts as a grant, as those
/// nodes behaved, so a rolling upgrade can still elect. An unreachable peer is no grant.
#[tokio::test]
async fn pre_vote_to_an_older_peer_grants_and_to_a_dead_one_does_not() {
    use openraft::RaftNetworkV2;
    let addr = serve(Arc::new(FakeLeader::default())).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let mut factory = NetworkFactory {
        self_id: 1,
        pool: Arc::new(PeerPool::default()),
        snapshot_min_bytes_per_sec: 1 << 20,
        lost: Default::default(),
        metrics: Default::default(),
    };
    let vote = Vote::new(3, 1);
    let req = VoteRequest::new(vote, None);
    let option = RPCOption::new(Duration::from_secs(2));
    let node = |a: &str| Node {
        peer_addr: a.to_string(),
        ..Default::default()
    };
    let mut old = factory.new_client(2, &node(&addr)).await;
    let r = old
        .pre_vote(req.clone(), option.clone())
        .await
        .expect("grant");
    assert!(r.vote_granted);
    assert_eq!(r.vote, vote);
    let mut gone = factory.new_client(3, &node(&dead)).await;
    assert!(gone.pre_vote(req, option).await.is_err());
}
