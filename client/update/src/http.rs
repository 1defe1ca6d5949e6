//! GET of release files over `reqwest`, the HTTP client the daemon's image pulls use:
//! rustls on the `ring` provider (no aws-lc, no OpenSSL), the host's CA store through
//! `rustls-platform-verifier` (on Linux the store `rustls-native-certs` reads:
//! `/etc/ssl/certs`, `SSL_CERT_FILE`/`SSL_CERT_DIR` honoured). Redirects are followed (at
//! most [`MAX_REDIRECTS`], never from https to http), bodies capped, and downloads streamed
//! to disk through SHA-256 in one pass.
//!
//! Trust in a release does not rest on TLS — the signature on `SHA256SUMS` does — so TLS
//! only keeps the transfer private and the manifest fresh.

use std::path::Path;
use std::time::Duration;

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
    #[error("cannot set up the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("cannot connect to {url}")]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: TLS failed")]
    Tls {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: HTTP request failed")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: the server answered {status}")]
    Status { url: String, status: u16 },
    /// More than [`MAX_REDIRECTS`], a bad `Location`, or a redirect from https to http.
    #[error("{url}: redirect not followed")]
    Redirect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
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

/// Why a redirect was refused (the source of [`HttpError::Redirect`]).
#[derive(Debug, thiserror::Error)]
enum RedirectRefused {
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooMany,
    #[error("a redirect from https to {0} (never downgraded to http)")]
    Downgrade(String),
}

fn client() -> Result<reqwest::Client, HttpError> {
    // The process default provider: reqwest is built without one (`rustls-no-provider`).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let policy = reqwest::redirect::Policy::custom(|attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(RedirectRefused::TooMany);
        }
        let from_https = attempt.previous().iter().any(|u| u.scheme() == "https");
        if from_https && attempt.url().scheme() != "https" {
            let to = attempt.url().to_string();
            return attempt.error(RedirectRefused::Downgrade(to));
        }
        attempt.follow()
    });
    reqwest::Client::builder()
        .connect_timeout(IO_TIMEOUT)
        .read_timeout(IO_TIMEOUT)
        .redirect(policy)
        .user_agent(concat!("banger/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(HttpError::Client)
}

/// Whether a TLS (rustls) error is among `e`'s causes. An `io::Error` wrapping one (the
/// connector nests two) shows it only through `get_ref`: its `source` skips to the inner
/// error's own source.
fn is_tls(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<rustls::Error>() {
            return true;
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && is_tls(inner)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

fn classify(url: &str, source: reqwest::Error) -> HttpError {
    let url = url.to_owned();
    if source.is_timeout() {
        HttpError::Timeout { url }
    } else if source.is_redirect() {
        HttpError::Redirect { url, source }
    } else if is_tls(&source) {
        HttpError::Tls { url, source }
    } else if source.is_connect() {
        HttpError::Connect { url, source }
    } else {
        HttpError::Request { url, source }
    }
}

/// GET with redirects; a non-2xx final status is an error.
async fn get(url: &url::Url) -> Result<reqwest::Response, HttpError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(HttpError::Scheme {
            url: url.to_string(),
        });
    }
    let resp = client()?
        .get(url.clone())
        .send()
        .await
        .map_err(|e| classify(url.as_str(), e))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(HttpError::Status {
            url: resp.url().to_string(),
            status: status.as_u16(),
        });
    }
    Ok(resp)
}

/// GET a small document into memory (at most `limit` bytes).
pub async fn get_bytes(url: &url::Url, limit: u64) -> Result<Vec<u8>, HttpError> {
    let mut resp = get(url).await?;
    let url = resp.url().to_string();
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| classify(&url, e))? {
        out.extend_from_slice(&chunk);
        if out.len() as u64 > limit {
            return Err(HttpError::TooLarge { url, limit });
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
    let mut resp = get(url).await?;
    let url = resp.url().to_string();
    let mut file = tokio::fs::File::create(dest).await.map_err(write_err)?;
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(chunk) = resp.chunk().await.map_err(|e| classify(&url, e))? {
        len += chunk.len() as u64;
        if len > limit {
            return Err(HttpError::TooLarge { url, limit });
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(write_err)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};

    /// A plain HTTP/1.1 server on 127.0.0.1: `/r/N` redirects to `/r/N-1`, `/r/0` and
    /// `/small` answer 2 bytes, `/big` 4096, anything else 404.
    fn serve() -> std::net::SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut line = String::new();
                    let _ = reader.read_line(&mut line);
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
                    let (status, extra, body) = match path.strip_prefix("/r/") {
                        Some("0") => ("200 OK", String::new(), vec![b'o'; 2]),
                        Some(n) => {
                            let n: u32 = n.parse().unwrap();
                            ("302 Found", format!("location: /r/{}\r\n", n - 1), vec![])
                        }
                        None if path == "/small" => ("200 OK", String::new(), vec![b's'; 2]),
                        None if path == "/big" => ("200 OK", String::new(), vec![b'b'; 4096]),
                        None => ("404 Not Found", String::new(), vec![]),
                    };
                    let mut conn = conn;
                    let _ = write!(
                        conn,
                        "HTTP/1.1 {status}\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(&body);
                });
            }
        });
        addr
    }

    fn url(addr: std::net::SocketAddr, path: &str) -> url::Url {
        url::Url::parse(&format!("http://{addr}{path}")).unwrap()
    }

    #[tokio::test]
    async fn redirects_are_followed_up_to_the_limit() {
        let addr = serve();
        let five = url(addr, &format!("/r/{MAX_REDIRECTS}"));
        assert_eq!(get_bytes(&five, 16).await.unwrap(), b"oo");
        let six = url(addr, &format!("/r/{}", MAX_REDIRECTS + 1));
        let err = get_bytes(&six, 16).await.unwrap_err();
        assert!(matches!(err, HttpError::Redirect { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn bodies_are_capped_statuses_checked_and_failed_downloads_removed() {
        let addr = serve();
        let err = get_bytes(&url(addr, "/big"), 1024).await.unwrap_err();
        assert!(
            matches!(err, HttpError::TooLarge { limit: 1024, .. }),
            "{err:?}"
        );
        let err = get_bytes(&url(addr, "/nothing"), 1024).await.unwrap_err();
        assert!(
            matches!(err, HttpError::Status { status: 404, .. }),
            "{err:?}"
        );
        let err = get_bytes(&url::Url::parse("ftp://x/y").unwrap(), 1).await;
        assert!(matches!(err, Err(HttpError::Scheme { .. })));

        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f");
        let err = download(&url(addr, "/big"), &dest, 1024).await.unwrap_err();
        assert!(matches!(err, HttpError::TooLarge { .. }), "{err:?}");
        assert!(!dest.exists(), "a failed download leaves nothing");
        let (len, sha) = download(&url(addr, "/small"), &dest, 1024).await.unwrap();
        assert_eq!(len, 2);
        assert_eq!(sha, hex(&Sha256::digest(b"ss")));
        assert_eq!(std::fs::read(&dest).unwrap(), b"ss");
    }
}
