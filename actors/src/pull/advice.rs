//! What to do about a registry that could not be reached or refused a pull, told from the
//! failure's real cause (its error chain), never guessed: a name that does not resolve is
//! not a registry that wants `insecure_registries`.
//!
//! The causes, from the chain `oci-client` → `reqwest` → `hyper-util` → `std::io` /
//! `rustls`:
//! - **DNS**: hyper-util's connector says `dns error` (the resolver's own words follow);
//! - **refused**: an `io::Error` of kind `ConnectionRefused`;
//! - **timeout**: reqwest's timeout, or an `io::Error` of kind `TimedOut`;
//! - **plain HTTP**: the TLS handshake got something that is not TLS (rustls'
//!   `InvalidMessage`, "received corrupt message"): the one case where listing the
//!   registry in `[images] insecure_registries` is the answer;
//! - **TLS**: any other rustls error (an untrusted or mismatched certificate);
//! - **HTTP status**: the registry answered, with 401/403 (it wants credentials; banger
//!   pulls anonymously), 404 (no such repository or tag) or another status.

use std::error::Error;

use oci_client::errors::OciDistributionError;

/// Why a registry request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    Dns,
    Refused,
    Timeout,
    PlainHttp,
    Tls,
    Status(u16),
    Other,
}

/// The cause of `e`, from its chain.
pub fn cause(e: &OciDistributionError) -> Cause {
    match e {
        OciDistributionError::ServerError { code, .. } => return Cause::Status(*code),
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => return Cause::Status(401),
        OciDistributionError::ImageManifestNotFoundError(_) => return Cause::Status(404),
        _ => {}
    }
    let mut cur: Option<&(dyn Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<reqwest::Error>() {
            if r.is_timeout() {
                return Cause::Timeout;
            }
            if let Some(s) = r.status() {
                return Cause::Status(s.as_u16());
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return Cause::Refused,
                std::io::ErrorKind::TimedOut => return Cause::Timeout,
                _ => {}
            }
            // An io::Error's source() skips the error it wraps (hyper-util wraps rustls'
            // in two): look through them here.
            let mut inner = io.get_ref();
            while let Some(i) = inner {
                if let Some(tls) = i.downcast_ref::<rustls::Error>() {
                    return tls_cause(tls);
                }
                if i.to_string().starts_with("dns error") {
                    return Cause::Dns;
                }
                inner = i.downcast_ref::<std::io::Error>().and_then(|x| x.get_ref());
            }
        }
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return tls_cause(tls);
        }
        if err.to_string().starts_with("dns error") {
            return Cause::Dns;
        }
        cur = err.source();
    }
    Cause::Other
}

fn tls_cause(e: &rustls::Error) -> Cause {
    match e {
        rustls::Error::InvalidMessage(_) => Cause::PlainHttp,
        _ => Cause::Tls,
    }
}

/// The advice for a failed request to `registry`, said after the error; None when there
/// is nothing better to say than the error itself.
pub fn advice(e: &OciDistributionError, registry: &str, insecure: &[String]) -> Option<String> {
    Some(match cause(e) {
        Cause::Dns => format!(
            "the name {} does not resolve: check the reference's registry and this host's DNS",
            host(registry)
        ),
        Cause::Refused => format!(
            "nothing accepts connections at {registry}: check the registry's address and port, and that it runs"
        ),
        Cause::Timeout => format!("{registry} did not answer in time: check the host's network"),
        Cause::PlainHttp if !insecure.iter().any(|r| r == registry) => format!(
            "{registry} answers plain HTTP, not HTTPS: if you trust it, list it in the daemon's config: [images] insecure_registries = [\"{registry}\"]"
        ),
        Cause::PlainHttp => return None,
        Cause::Tls => format!(
            "{registry}'s TLS certificate was refused: the host must trust its issuer (its CA certificates)"
        ),
        Cause::Status(401 | 403) => {
            format!("{registry} refused an anonymous pull: banger pulls public images only")
        }
        Cause::Status(404) => {
            format!("{registry} has no such repository or tag: check the reference")
        }
        Cause::Status(_) | Cause::Other => return None,
    })
}

/// `registry` (`host[:port]`) without its port.
fn host(registry: &str) -> &str {
    match registry.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    async fn pull_err(reference: &str, insecure: &[String]) -> (Cause, Option<String>) {
        let r: oci_client::Reference = reference.parse().unwrap();
        let client = super::super::oci::client(insecure);
        let e = client
            .pull_image_manifest(&r, &oci_client::secrets::RegistryAuth::Anonymous)
            .await
            .unwrap_err();
        let c = cause(&e);
        // The chain, for a failing assertion.
        let a =
            advice(&e, r.resolve_registry(), insecure).or_else(|| Some(format!("(none) {e:?}")));
        (c, a)
    }

    /// A server on 127.0.0.1 that answers every request with `status`, over plain HTTP.
    fn http_server(status: &'static str) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        addr
    }

    /// Each cause gets its own advice, and only a plain-HTTP registry is told about
    /// `insecure_registries`. (A DNS failure pulling from Docker Hub was told to list the
    /// registry there.) Real requests: an unresolvable name (`.invalid` never resolves,
    /// RFC 6761), a closed port, plain HTTP spoken to an HTTPS client, and HTTP statuses
    /// from a server on 127.0.0.1.
    #[tokio::test]
    async fn advice_follows_the_cause() {
        let (c, a) = pull_err("registry.banger.invalid/x/y:1", &[]).await;
        assert_eq!(c, Cause::Dns, "{a:?}");
        let a = a.unwrap();
        assert!(
            a.contains("registry.banger.invalid does not resolve") && !a.contains("insecure"),
            "{a}"
        );

        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let (c, a) = pull_err(&format!("{addr}/x/y:1"), &[]).await;
        assert_eq!(c, Cause::Refused, "{a:?}");
        assert!(!a.unwrap().contains("insecure"));

        let plain = http_server("404 Not Found");
        let (c, a) = pull_err(&format!("{plain}/x/y:1"), &[]).await;
        assert_eq!(c, Cause::PlainHttp, "{a:?}");
        assert!(
            a.unwrap()
                .contains(&format!("insecure_registries = [\"{plain}\"]")),
        );

        let insecure = vec![plain.clone()];
        let (c, a) = pull_err(&format!("{plain}/x/y:1"), &insecure).await;
        assert_eq!(c, Cause::Status(404), "{a:?}");
        assert!(a.unwrap().contains("no such repository or tag"));

        let locked = http_server("401 Unauthorized");
        let (c, a) = pull_err(&format!("{locked}/x/y:1"), std::slice::from_ref(&locked)).await;
        assert_eq!(c, Cause::Status(401), "{a:?}");
        assert!(a.unwrap().contains("anonymous"));
    }

    #[test]
    fn host_drops_the_port() {
        assert_eq!(host("registry.invalid:5000"), "registry.invalid");
        assert_eq!(host("docker.io"), "docker.io");
    }
}
