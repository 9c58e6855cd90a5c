//! Streaming request bodies fed from a channel, and streaming readers of answers.
//!
//! A test drives an upload through [`BodySender`] so it decides exactly when each byte
//! leaves (to pause a put at a known point, or to count bytes sent); the body the client
//! sends is a [`ChannelBody`]. With a known length the client sends `Content-Length`,
//! without one it uses chunked transfer encoding.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::data::{PIECE_BYTES, Pattern, StreamDigest};

/// A request body whose bytes come from a [`BodySender`].
#[derive(Debug)]
pub struct ChannelBody {
    receiver: mpsc::Receiver<Result<Bytes, io::Error>>,
    length: Option<u64>,
}

/// The sending side of a [`ChannelBody`].
#[derive(Debug, Clone)]
pub struct BodySender {
    sender: mpsc::Sender<Result<Bytes, io::Error>>,
}

/// The receiving side went away (the client dropped the body: the exchange ended).
#[derive(Debug)]
pub struct BodyClosed;

impl BodySender {
    /// Sends the next bytes; fails once the body is no longer being read.
    pub async fn send(&self, bytes: Bytes) -> Result<(), BodyClosed> {
        self.sender.send(Ok(bytes)).await.map_err(|_| BodyClosed)
    }

    /// Breaks the body off with an error (the client aborts the upload).
    pub async fn abort(&self) {
        let _ = self.sender.send(Err(io::Error::other("test aborted the body"))).await;
    }
}

/// A channel body; `length` (when known) makes the client send `Content-Length`.
pub fn channel_body(length: Option<u64>) -> (ChannelBody, BodySender) {
    let (sender, receiver) = mpsc::channel(4);
    (ChannelBody { receiver, length }, BodySender { sender })
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.receiver.poll_recv(cx).map(|item| item.map(|result| result.map(Frame::data)))
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(length) => SizeHint::with_exact(length),
            None => SizeHint::default(),
        }
    }
}

/// Options of [`pattern_body`].
#[derive(Debug, Clone, Default)]
pub struct PatternBodyOptions {
    /// Send `Content-Length` (otherwise chunked).
    pub content_length: bool,
    /// Pause once this many bytes are sent, until the gate is opened.
    pub gate: Option<(u64, Arc<tokio::sync::Notify>)>,
    /// Add every byte sent to this counter.
    pub progress: Option<Arc<AtomicU64>>,
}

/// A body of the first `length` bytes of `pattern`, produced by a task that returns the
/// digest of what it sent (or `Err` with the count sent when the body was dropped early).
pub fn pattern_body(
    pattern: Pattern,
    length: u64,
    options: PatternBodyOptions,
) -> (ChannelBody, JoinHandle<Result<StreamDigest, u64>>) {
    let (body, sender) = channel_body(options.content_length.then_some(length));
    let task = tokio::spawn(async move {
        let mut digest = StreamDigest::new();
        let mut offset = 0u64;
        let mut gate = options.gate;
        while offset < length {
            let mut piece = (length - offset).min(PIECE_BYTES as u64);
            if let Some((at, _)) = &gate {
                if offset == *at {
                    let (_, notify) = gate.take().unwrap();
                    notify.notified().await;
                    continue;
                }
                if offset < *at {
                    piece = piece.min(*at - offset);
                }
            }
            let mut buffer = vec![0; piece as usize];
            pattern.fill(offset, &mut buffer);
            digest.update(&buffer);
            if sender.send(Bytes::from(buffer)).await.is_err() {
                return Err(offset);
            }
            offset += piece;
            if let Some(progress) = &options.progress {
                progress.fetch_add(piece, Ordering::SeqCst);
            }
        }
        Ok(digest)
    });
    (body, task)
}

/// A body streaming the file at `path` (with `Content-Length`); the task returns its digest.
pub fn file_body(path: &Path) -> (ChannelBody, JoinHandle<Result<StreamDigest, u64>>) {
    let length = std::fs::metadata(path).unwrap().len();
    let (body, sender) = channel_body(Some(length));
    let path = path.to_path_buf();
    let task = tokio::spawn(async move {
        let mut file = tokio::fs::File::open(&path).await.unwrap();
        let mut digest = StreamDigest::new();
        loop {
            let mut buffer = vec![0; PIECE_BYTES];
            let mut filled = 0;
            while filled < buffer.len() {
                let read = file.read(&mut buffer[filled..]).await.unwrap();
                if read == 0 {
                    break;
                }
                filled += read;
            }
            if filled == 0 {
                return Ok(digest);
            }
            buffer.truncate(filled);
            digest.update(&buffer);
            if sender.send(Bytes::from(buffer)).await.is_err() {
                return Err(digest.length());
            }
        }
    });
    (body, task)
}

/// What a streamed answer held.
#[derive(Debug)]
pub struct ReadBack {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Digest of the body.
    pub digest: StreamDigest,
}

impl ReadBack {
    /// A header as text (panics when absent or not text).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("answer has no {name} header; headers: {:?}", self.headers))
            .to_str()
            .unwrap()
    }
}

/// Reads a whole response body as a stream, hashing it; keeps nothing else.
pub async fn read_streamed(response: http::Response<Incoming>) -> Result<ReadBack, hyper::Error> {
    let status = response.status();
    let headers = response.headers().clone();
    let mut body = response.into_body();
    let mut digest = StreamDigest::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            digest.update(&data);
        }
    }
    Ok(ReadBack { status, headers, digest })
}
