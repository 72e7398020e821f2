//! Size-capped stage logs: when a log reaches its cap it is rotated to `NAME.1`, so at most
//! twice the cap is kept and the newest output is never lost.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Copies a child's output into `path`. The file is created on the first byte, so a quiet
/// stage costs no file creation.
pub async fn copy_capped(mut from: impl AsyncRead + Unpin, path: PathBuf, cap: u64) {
    let open = |p: &Path| {
        let p = p.to_path_buf();
        async move { tokio::fs::OpenOptions::new().create(true).append(true).open(p).await }
    };
    let mut file = None;
    let mut written = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if file.is_none() {
            match open(&path).await {
                Ok(f) => {
                    written = f.metadata().await.map(|m| m.len()).unwrap_or(0);
                    file = Some(f);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "cannot open log file ({e}); output is discarded");
                    break;
                }
            }
        }
        let f = file.as_mut().expect("opened above");
        if written + n as u64 > cap && written > 0 {
            let _ = f.flush().await;
            let rotated =
                path.with_extension(format!("{}.1", path.extension().and_then(|e| e.to_str()).unwrap_or("log")));
            let _ = tokio::fs::rename(&path, &rotated).await;
            match open(&path).await {
                Ok(new) => *f = new,
                Err(_) => break,
            }
            written = 0;
        }
        if f.write_all(&buf[..n]).await.is_err() {
            break;
        }
        written += n as u64;
    }
    if let Some(f) = file.as_mut() {
        let _ = f.flush().await;
    }
    // Drain the rest (if writing failed) so the child is never blocked on a full pipe.
    let _ = tokio::io::copy(&mut from, &mut tokio::io::sink()).await;
}

/// The last `max` bytes of a file, as text.
pub fn tail(path: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else { return String::new() };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).trim().to_string()
}
