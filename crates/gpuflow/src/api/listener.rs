//! The API's connection handling: a header-read timeout, an idle keep-alive timeout and a cap
//! on open connections (`limits.header_read_timeout`, `limits.idle_timeout`,
//! `limits.max_connections`, read at each accept so a reload applies to new connections).
//! A client that trickles its request, or holds a connection open doing nothing, is cut off
//! without taking a slot from the others for long.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::response::Response;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

use crate::config::SharedConfig;

/// What one connection's watcher needs to know, updated by its socket and its requests.
struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last byte read or written.
    last_ms: AtomicU64,
    /// When the first byte of a request head arrived (ms since `epoch` + 1), or 0 while no
    /// head is being read.
    head_since_ms: AtomicU64,
    /// Requests whose handler or response body is still running.
    in_flight: AtomicUsize,
}

impl Activity {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// Serves `app` on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, app: Router, config: SharedConfig, mut stop: watch::Receiver<bool>) {
    let mut cap = config.get().limits.max_connections as usize;
    let slots = Arc::new(Semaphore::new(cap));
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        let limits = config.get().limits.clone();
        let wanted = limits.max_connections as usize;
        if wanted > cap {
            slots.add_permits(wanted - cap);
            cap = wanted;
        } else if wanted < cap {
            // Shrinking takes effect as connections close.
            let taken = slots.forget_permits(cap - wanted);
            cap -= taken;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, cap));
            continue;
        };
        let app = app.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            serve_connection(
                stream,
                app,
                Duration::from_millis(limits.header_read_timeout_ms),
                Duration::from_millis(limits.idle_timeout_ms),
                stop,
            )
            .await;
            drop(permit);
        });
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Over the cap: a short 503 so the client knows to come back, then close.
async fn refuse(mut stream: TcpStream, cap: usize) {
    let body = format!(
        "{{\"error\":{{\"code\":\"too_many_connections\",\"message\":\"the engine has {cap} connections open (limits.max_connections); retry shortly\"}}}}"
    );
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

async fn serve_connection(
    stream: TcpStream,
    app: Router,
    header_timeout: Duration,
    idle_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity {
        epoch: Instant::now(),
        last_ms: AtomicU64::new(0),
        head_since_ms: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
    });
    let io = TokioIo::new(Watched { inner: stream, activity: activity.clone() });
    let seen = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
        // The head is complete: the header-read clock stops, and the request is in flight
        // until its response body ends or is dropped.
        seen.head_since_ms.store(0, Ordering::Relaxed);
        seen.in_flight.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight(seen.clone());
        let app = app.clone();
        async move {
            let response = app.oneshot(request.map(Body::new)).await;
            response.map(|r: Response| r.map(|body| Body::new(Tracked { inner: body, _guard: guard })))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).keep_alive(true);
    let conn = builder.serve_connection(io, service).with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    // Checked a few times per timeout, at most once a second, so that a thousand open
    // connections cost little.
    let tick = (header_timeout.min(idle_timeout) / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tokio::time::sleep(tick) => {
                let now = activity.now_ms();
                let head = activity.head_since_ms.load(Ordering::Relaxed);
                if head != 0 && now.saturating_sub(head - 1) > header_timeout.as_millis() as u64 {
                    tracing::debug!("closing a connection that did not send its request head within {header_timeout:?}");
                    return;
                }
                let quiet = now.saturating_sub(activity.last_ms.load(Ordering::Relaxed));
                if !closing && head == 0 && activity.in_flight.load(Ordering::Relaxed) == 0
                    && quiet > idle_timeout.as_millis() as u64
                {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = stopped(&mut stop), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The socket, noting when bytes move and when a request head starts arriving.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let a = &self.activity;
            let now = a.now_ms();
            a.last_ms.store(now, Ordering::Relaxed);
            // Bytes while no request is in flight begin the next request's head.
            if a.in_flight.load(Ordering::Relaxed) == 0 && a.head_since_ms.load(Ordering::Relaxed) == 0 {
                a.head_since_ms.store(now + 1, Ordering::Relaxed);
            }
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result
            && n > 0
        {
            self.activity.last_ms.store(self.activity.now_ms(), Ordering::Relaxed);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts a request as in flight until dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.last_ms.store(self.0.now_ms(), Ordering::Relaxed);
    }
}

/// A response body that keeps its request in flight while it streams (the live feed).
struct Tracked {
    inner: Body,
    _guard: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
