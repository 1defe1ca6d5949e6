//! A small HTTP/1.1 GET client for release files: hyper's client connection over a TCP
//! stream, redirects followed (at most [`MAX_REDIRECTS`]), bodies capped, and downloads
//! streamed to disk through SHA-256 in one pass.
//!
//! `http://` is served over plain TCP (the tests' server on 127.0.0.1); `https://` needs
//! TLS, see [`super::tls`].

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Redirects followed before giving up.
pub const MAX_REDIRECTS: usize = 5;
/// Connecting and each read may take this long.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors fetching a URL.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{url}: unsupported URL scheme (http and https only)")]
    Scheme { url: String },
    #[error("cannot connect to {url}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: TLS failed")]
    Tls {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: HTTP request failed")]
    Request {
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{url}: the server answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: more than {MAX_REDIRECTS} redirects")]
    Redirects { url: String },
    #[error("{url}: bad redirect location")]
    BadRedirect { url: String },
    #[error("{url}: larger than the {limit}-byte limit")]
    TooLarge { url: String, limit: u64 },
    #[error("{url}: timed out")]
    Timeout { url: String },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A byte stream hyper can speak HTTP on (plain TCP or TLS).
pub(super) trait IoStream:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send
{
}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> IoStream for T {}

async fn timed<T>(
    url: &url::Url,
    f: impl Future<Output = Result<T, HttpError>>,
) -> Result<T, HttpError> {
    tokio::time::timeout(IO_TIMEOUT, f)
        .await
        .map_err(|_| HttpError::Timeout {
            url: url.to_string(),
        })?
}

/// Send one GET and return the response (status not checked); no redirect handling.
async fn get_once(url: &url::Url) -> Result<hyper::Response<hyper::body::Incoming>, HttpError> {
    let https = match url.scheme() {
        "http" => false,
        "https" => true,
        _ => {
            return Err(HttpError::Scheme {
                url: url.to_string(),
            });
        }
    };
    let host = url.host_str().unwrap_or_default().to_owned();
    let port = url.port_or_known_default().unwrap_or(80);
    let tcp = timed(url, async {
        tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|source| HttpError::Connect {
                url: url.to_string(),
                source,
            })
    })
    .await?;
    let stream: Box<dyn IoStream> = if https {
        timed(url, super::tls::connect(url, &host, tcp)).await?
    } else {
        Box::new(tcp)
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| HttpError::Request {
            url: url.to_string(),
            source,
        })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let host_header = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    let req = hyper::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", host_header)
        .header("user-agent", concat!("banger/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .expect("a valid request");
    timed(url, async {
        sender
            .send_request(req)
            .await
            .map_err(|source| HttpError::Request {
                url: url.to_string(),
                source,
            })
    })
    .await
}

/// GET with redirects; a non-2xx final status is an error.
async fn get(
    url: &url::Url,
) -> Result<(url::Url, hyper::Response<hyper::body::Incoming>), HttpError> {
    let mut url = url.clone();
    for _ in 0..=MAX_REDIRECTS {
        let resp = get_once(&url).await?;
        let status = resp.status();
        if status.is_redirection() {
            let next = resp
                .headers()
                .get("location")
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok())
                .ok_or_else(|| HttpError::BadRedirect {
                    url: url.to_string(),
                })?;
            // Never downgrade from https to http.
            if url.scheme() == "https" && next.scheme() != "https" {
                return Err(HttpError::BadRedirect {
                    url: url.to_string(),
                });
            }
            url = next;
            continue;
        }
        if !status.is_success() {
            return Err(HttpError::Status {
                url: url.to_string(),
                status: status.as_u16(),
            });
        }
        return Ok((url, resp));
    }
    Err(HttpError::Redirects {
        url: url.to_string(),
    })
}

/// GET a small document into memory (at most `limit` bytes).
pub async fn get_bytes(url: &url::Url, limit: u64) -> Result<Vec<u8>, HttpError> {
    let (url, resp) = get(url).await?;
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(frame) = timed(&url, async {
        body.frame()
            .await
            .transpose()
            .map_err(|source| HttpError::Request {
                url: url.to_string(),
                source,
            })
    })
    .await?
    {
        if let Ok(data) = frame.into_data() {
            out.extend_from_slice(&data);
            if out.len() as u64 > limit {
                return Err(HttpError::TooLarge {
                    url: url.to_string(),
                    limit,
                });
            }
        }
    }
    Ok(out)
}

/// GET into a new file at `dest`, hashing as it streams; returns (bytes, sha256 hex).
/// A failed download removes what it wrote.
pub async fn download(url: &url::Url, dest: &Path, limit: u64) -> Result<(u64, String), HttpError> {
    let result = download_inner(url, dest, limit).await;
    if result.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    result
}

async fn download_inner(
    url: &url::Url,
    dest: &Path,
    limit: u64,
) -> Result<(u64, String), HttpError> {
    let write_err = |source| HttpError::Write {
        path: dest.display().to_string(),
        source,
    };
    let (url, resp) = get(url).await?;
    let mut file = tokio::fs::File::create(dest).await.map_err(write_err)?;
    let mut body = resp.into_body();
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = timed(&url, async {
        body.frame()
            .await
            .transpose()
            .map_err(|source| HttpError::Request {
                url: url.to_string(),
                source,
            })
    })
    .await?
    {
        if let Ok(data) = frame.into_data() {
            len += data.len() as u64;
            if len > limit {
                return Err(HttpError::TooLarge {
                    url: url.to_string(),
                    limit,
                });
            }
            hasher.update(&data);
            file.write_all(&data).await.map_err(write_err)?;
        }
    }
    file.sync_all().await.map_err(write_err)?;
    Ok((len, hex(&hasher.finalize())))
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
