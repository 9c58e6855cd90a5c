//! A counting HTTP reverse proxy in front of the S3 server: origin egress measured at the origin.
//!
//! Every request is forwarded (method, path, query, end-to-end headers, body) to the
//! upstream server over a fresh TCP connection, and the answer comes back the same way. As
//! in any HTTP proxy, hop-by-hop headers (`Connection` and the headers it names,
//! `Keep-Alive`, `Transfer-Encoding`, ...) are not passed on (RFC 9110, section 7.6.1): each
//! hop frames its own messages and keeps its own connections. So a node keeps its
//! connection to the origin open between requests, as it does with a real S3 endpoint,
//! although the upstream (moto) closes every one of its own. On the way the proxy counts
//! requests, and the response body bytes of `GET` requests whose path contains `/chunks/`
//! (the origin's chunk keys): what the origin sent out in chunks.
//!
//! Each node gets its own listener with its own [`ProxyCounters`], so the report can say
//! which node (and so which DC) pulled bytes from the origin without trusting the node's
//! own accounting.
//!
//! An outage ([`Proxy::set_outage`]) makes the origin unreachable as the nodes see it: new
//! connections are closed as soon as they are accepted, and a request on a connection the
//! node already has is dropped without an answer (the connection closes), so the node's S3
//! client sees transport errors, retries within its bounds, and gives up. Nothing reaches
//! the upstream meanwhile; each refused connection or request is counted.
//!
//! Non-goals: connection reuse towards the upstream, and changing anything in flight.
//! Invariant: a counted byte is a byte that was read from the upstream's answer.

use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONNECTION, HeaderMap, HeaderName, TE, TRANSFER_ENCODING, UPGRADE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The path part that marks a chunk key of the origin's layout (`PREFIX/chunks/<id>`).
const CHUNK_PATH_MARKER: &str = "/chunks/";

/// Hop-by-hop headers without a constant in `http` (RFC 9110, section 7.6.1).
const HOP_BY_HOP: [&str; 2] = ["keep-alive", "proxy-connection"];

/// Removes the headers that concern one hop only, which a proxy must not pass on:
/// `Connection`, the headers it names, and those RFC 9110 (section 7.6.1) lists.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [CONNECTION, TE, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// What one listener saw.
#[derive(Debug, Default)]
pub struct ProxyCounters {
    requests: AtomicU64,
    chunk_gets: AtomicU64,
    chunk_get_bytes: AtomicU64,
    puts: AtomicU64,
    upstream_errors: AtomicU64,
    refused: AtomicU64,
    /// Whether the origin is "down" (see [`Proxy::set_outage`]).
    outage: AtomicBool,
}

/// A reading of [`ProxyCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProxyFigures {
    /// Requests of any kind.
    pub requests: u64,
    /// `GET` requests of chunk keys.
    pub chunk_gets: u64,
    /// Response body bytes of those requests: the origin's chunk egress.
    pub chunk_get_bytes: u64,
    /// `PUT` requests.
    pub puts: u64,
    /// Requests the upstream could not answer (answered 502 by the proxy).
    pub upstream_errors: u64,
    /// Connections and requests closed unanswered during an origin outage.
    pub refused: u64,
}

impl ProxyFigures {
    /// Adds another reading.
    pub fn add(&mut self, other: ProxyFigures) {
        self.requests += other.requests;
        self.chunk_gets += other.chunk_gets;
        self.chunk_get_bytes += other.chunk_get_bytes;
        self.puts += other.puts;
        self.upstream_errors += other.upstream_errors;
        self.refused += other.refused;
    }
}

impl ProxyCounters {
    /// The counts so far.
    pub fn read(&self) -> ProxyFigures {
        ProxyFigures {
            requests: self.requests.load(Ordering::Relaxed),
            chunk_gets: self.chunk_gets.load(Ordering::Relaxed),
            chunk_get_bytes: self.chunk_get_bytes.load(Ordering::Relaxed),
            puts: self.puts.load(Ordering::Relaxed),
            upstream_errors: self.upstream_errors.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// A listening proxy.
#[derive(Debug)]
pub struct Proxy {
    address: SocketAddr,
    counters: Arc<ProxyCounters>,
}

impl Proxy {
    /// Binds a free port of `bind` and serves until `shutdown`, forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr, bind: Ipv4Addr, shutdown: CancellationToken) -> std::io::Result<Self> {
        let listener = TcpListener::bind((bind, 0)).await?;
        let address = listener.local_addr()?;
        let counters = Arc::new(ProxyCounters::default());
        tokio::spawn(accept_loop(listener, upstream, counters.clone(), shutdown));
        Ok(Self { address, counters })
    }

    /// The endpoint URL to give a client.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The counts so far.
    pub fn figures(&self) -> ProxyFigures {
        self.counters.read()
    }

    /// Starts (`true`) or ends (`false`) an outage of the origin behind this proxy.
    pub fn set_outage(&self, outage: bool) {
        self.counters.outage.store(outage, Ordering::SeqCst);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    counters: Arc<ProxyCounters>,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of descriptors or a reset before accept: the client retries.
                Err(_) => continue,
            },
        };
        if counters.outage.load(Ordering::SeqCst) {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let counters = counters.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| forward(request, upstream, counters.clone()));
            let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                () = shutdown.cancelled() => {}
                // A client that hangs up mid-answer is its own business.
                _ = connection => {}
            }
        });
    }
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// A request dropped unanswered because the origin is in an outage; returning it from the
/// service makes hyper close the connection.
#[derive(Debug, thiserror::Error)]
#[error("the origin is in an outage (testnet)")]
struct Outage;

async fn forward(
    mut request: Request<Incoming>,
    upstream: SocketAddr,
    counters: Arc<ProxyCounters>,
) -> Result<Response<ProxyBody>, Outage> {
    if counters.outage.load(Ordering::SeqCst) {
        counters.refused.fetch_add(1, Ordering::Relaxed);
        return Err(Outage);
    }
    counters.requests.fetch_add(1, Ordering::Relaxed);
    let is_chunk_get = request.method() == Method::GET && request.uri().path().contains(CHUNK_PATH_MARKER);
    if is_chunk_get {
        counters.chunk_gets.fetch_add(1, Ordering::Relaxed);
    }
    if request.method() == Method::PUT {
        counters.puts.fetch_add(1, Ordering::Relaxed);
    }
    strip_hop_by_hop(request.headers_mut());
    match send_upstream(request, upstream).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let counter = is_chunk_get.then(|| counters.clone());
            Ok(Response::from_parts(parts, CountingBody { inner: body, counters: counter }.boxed()))
        }
        Err(error) => {
            counters.upstream_errors.fetch_add(1, Ordering::Relaxed);
            let body = http_body_util::Full::new(Bytes::from(format!("testnet proxy: upstream failed: {error}\n")))
                .map_err(|never| match never {})
                .boxed();
            let mut response = Response::new(body);
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            Ok(response)
        }
    }
}

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("cannot connect to {address}: {source}")]
    Connect { address: SocketAddr, source: std::io::Error },
    #[error("HTTP exchange with {address} failed: {source}")]
    Http { address: SocketAddr, source: hyper::Error },
}

async fn send_upstream(request: Request<Incoming>, address: SocketAddr) -> Result<Response<Incoming>, UpstreamError> {
    let stream = TcpStream::connect(address).await.map_err(|source| UpstreamError::Connect { address, source })?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| UpstreamError::Http { address, source })?;
    // The connection task ends when the answer's body has been read (or dropped).
    tokio::spawn(connection);
    sender.send_request(request).await.map_err(|source| UpstreamError::Http { address, source })
}

/// A response body that adds its data bytes to a counter as they pass.
struct CountingBody {
    inner: Incoming,
    counters: Option<Arc<ProxyCounters>>,
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(counters)) = (&polled, &self.counters)
            && let Some(data) = frame.data_ref()
        {
            counters.chunk_get_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An upstream that answers every request on a connection of its own, like moto: a
    /// 5-byte body and `Connection: close`, then hangs up. Returns its address and the
    /// request heads it received, lower-cased.
    async fn closing_upstream() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let address = listener.local_addr().unwrap();
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let received = heads.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let received = received.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap_or(0) == 1 {
                        head.push(byte[0]);
                    }
                    received.lock().unwrap().push(String::from_utf8_lossy(&head).to_lowercase());
                    let answer = "HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
                                  X-End: 2\r\nContent-Length: 5\r\n\r\nhello";
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        (address, heads)
    }

    #[tokio::test]
    async fn a_client_keeps_its_connection_though_the_upstream_closes_each_one() {
        // Goal: as with a real S3 endpoint, a node sends request after request on one
        // connection; the upstream's `Connection: close` concerns the proxy's own hop only.
        let shutdown = CancellationToken::new();
        let (upstream, heads) = closing_upstream().await;
        let proxy = Proxy::start(upstream, Ipv4Addr::LOCALHOST, shutdown.clone()).await.unwrap();
        let stream = TcpStream::connect(proxy.address).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        for round in 0..3 {
            sender.ready().await.unwrap_or_else(|error| panic!("request {round}: the connection closed: {error}"));
            // The client's own hop-by-hop headers stay on its hop too.
            let request = Request::get("/bucket/prefix/chunks/abc")
                .header(CONNECTION, "keep-alive, X-Client-Hop")
                .header("x-client-hop", "1")
                .header("x-client-end", "2")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let headers = response.headers().clone();
            assert!(headers.get(CONNECTION).is_none(), "Connection is not passed on: {headers:?}");
            assert!(headers.get("keep-alive").is_none() && headers.get("x-hop").is_none(), "{headers:?}");
            assert_eq!(headers.get("x-end").unwrap(), "2", "end-to-end headers are passed on");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"hello");
        }
        let figures = proxy.figures();
        assert_eq!((figures.requests, figures.chunk_gets, figures.chunk_get_bytes), (3, 3, 15));
        let heads = heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 3, "one upstream connection per request");
        for head in heads {
            assert!(head.contains("x-client-end: 2"), "end-to-end headers reach the upstream: {head}");
            assert!(!head.contains("x-client-hop") && !head.contains("connection:"), "{head}");
        }
        shutdown.cancel();
    }

    #[test]
    fn hop_by_hop_headers_go_and_the_others_stay() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Named"),
            ("x-named", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("content-length", "5"),
            ("etag", "\"x\""),
        ] {
            headers.insert(HeaderName::from_static(name), value.parse().unwrap());
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "etag"]);
    }
}
