//! Who may talk to this coordinator: the farm's shared token, which every agent and client must
//! present on every call (compared in constant time, never logged); the rule that keeps a
//! coordinator without a token on loopback; and the TLS identity it serves with.
//!
//! Anyone who can submit a run can run code on every agent (pytest imports the project's
//! conftest, and its arguments can load plugins), so an open port off loopback is an open
//! shell: it takes a token or an explicit `--insecure`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fly_agent::connect::{ConnectError, Token, TokenArgs, AUTHORIZATION};
use subtle::ConstantTimeEq;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};
use tracing::warn;

/// Why a coordinator cannot start listening as asked.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Token(#[from] ConnectError),
    #[error("cannot resolve the listen address {addr}: {error}")]
    Resolve { addr: String, error: std::io::Error },
    #[error(
        "refusing to listen on {addr} without a token: it is not a loopback address, and anyone \
         who can reach it could run code on the agents. Give the farm a token with --token, \
         --token-file or FLY_TOKEN, or pass --insecure to listen without one"
    )]
    NoToken { addr: String },
    #[error("cannot read the TLS {what} {}: {error}", path.display())]
    ReadTls {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the TLS {what} {} holds no PEM {what}", path.display())]
    NotPem { what: &'static str, path: PathBuf },
    #[error("cannot use the TLS certificate {} with the key {}: {detail}", cert.display(), key.display())]
    BadIdentity {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
}

/// The flags of a coordinator that listens (`serve`, `run --listen`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ListenArgs {
    #[command(flatten)]
    pub token: TokenArgs,
    /// Listen on an address other than loopback without a token. Anyone who can reach it can
    /// then submit runs, and so run code on the agents.
    #[arg(long)]
    pub insecure: bool,
    /// Serve TLS with this certificate chain (PEM); agents and clients then connect with
    /// https:// URLs.
    #[arg(long, env = "FLY_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "FLY_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ListenArgs {
    /// Everything that can refuse a listening coordinator before its port opens: the token
    /// sources, the loopback rule for `addr`, and the TLS files.
    pub async fn security(&self, addr: &str) -> Result<Security, AuthError> {
        let token = self.token.resolve()?;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(read_identity(cert, key)?),
            _ => None,
        };
        check_listen_address(addr, token.is_some(), self.insecure, tls.is_some()).await?;
        Ok(Security { token, tls })
    }
}

/// What a listening coordinator enforces. The default (no token, no TLS) is what the
/// in-memory connection of `run --local` uses: nothing but this process can reach it.
#[derive(Clone, Default)]
pub struct Security {
    pub token: Option<Token>,
    /// Certificate and key; deliberately not `Debug`, since the key is in it.
    pub tls: Option<Identity>,
}

impl Security {
    /// `https` when serving TLS, else `http`: the scheme of the announced URL.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The TLS configuration tonic's server takes, if any.
    pub fn tls_config(&self) -> Option<ServerTlsConfig> {
        self.tls
            .as_ref()
            .map(|identity| ServerTlsConfig::new().identity(identity.clone()))
    }

    /// The interceptor for one service; `who` names its callers in the log ("an agent").
    pub fn check(&self, who: &'static str) -> TokenCheck {
        TokenCheck {
            expected: self.token.clone().map(Arc::new),
            who,
        }
    }
}

/// Applies the loopback rule to `addr`: a coordinator without a token listens only on
/// loopback, unless `insecure`. Every address `addr` resolves to must be loopback, since
/// binding may pick any of them; `0.0.0.0` and `::` are not loopback.
pub async fn check_listen_address(
    addr: &str,
    has_token: bool,
    insecure: bool,
    tls: bool,
) -> Result<(), AuthError> {
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(|error| AuthError::Resolve {
            addr: addr.to_string(),
            error,
        })?
        .collect();
    if let Some(warning) = listen_rule(addr, &resolved, has_token, insecure, tls)? {
        warn!("{warning}");
    }
    Ok(())
}

/// The loopback rule on resolved addresses: `Err` refuses, `Ok(Some(..))` allows with a
/// warning for the log.
pub fn listen_rule(
    addr: &str,
    resolved: &[SocketAddr],
    has_token: bool,
    insecure: bool,
    tls: bool,
) -> Result<Option<String>, AuthError> {
    // `::ffff:127.0.0.1` is loopback too.
    let loopback_only =
        !resolved.is_empty() && resolved.iter().all(|a| a.ip().to_canonical().is_loopback());
    if loopback_only {
        return Ok(None);
    }
    match (has_token, insecure) {
        (false, false) => Err(AuthError::NoToken {
            addr: addr.to_string(),
        }),
        (false, true) => Ok(Some(format!(
            "listening on {addr} without a token (--insecure): anyone who can reach it can \
             submit runs and so run code on the agents"
        ))),
        (true, _) if !tls => Ok(Some(format!(
            "listening on {addr} without TLS: the token crosses the network unencrypted; serve \
             with --tls-cert and --tls-key"
        ))),
        (true, _) => Ok(None),
    }
}

/// Reads the server's certificate and key and checks that tonic can serve with them, so a bad
/// file stops the coordinator at start with both names, not at the first connection.
pub fn read_identity(cert: &Path, key: &Path) -> Result<Identity, AuthError> {
    let cert_pem = read_pem(cert, "certificate", "-----BEGIN CERTIFICATE-----")?;
    // PKCS#8, PKCS#1 (RSA) and SEC1 (EC) keys all end their armour line this way.
    let key_pem = read_pem(key, "key", "PRIVATE KEY-----")?;
    let identity = Identity::from_pem(cert_pem, key_pem);
    Server::builder()
        .tls_config(ServerTlsConfig::new().identity(identity.clone()))
        .map_err(|err| AuthError::BadIdentity {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            detail: fly_agent::connect::error_chain(&err),
        })?;
    Ok(identity)
}

fn read_pem(path: &Path, what: &'static str, marker: &str) -> Result<Vec<u8>, AuthError> {
    let pem = std::fs::read(path).map_err(|error| AuthError::ReadTls {
        what,
        path: path.to_path_buf(),
        error,
    })?;
    let marker = marker.as_bytes();
    if !pem.windows(marker.len()).any(|w| w == marker) {
        return Err(AuthError::NotPem {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(pem)
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `authorization` metadata.
    Missing,
    /// A token that is not the farm's (or not a `Bearer` one).
    Wrong,
}

impl Refusal {
    /// What the caller is told: enough to fix it, nothing about the expected token.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Missing => {
                "no token: this coordinator requires the farm's token (give it with --token, \
                 --token-file or FLY_TOKEN)"
            }
            Refusal::Wrong => {
                "wrong token: the token sent is not this coordinator's (check --token, \
                 --token-file or FLY_TOKEN)"
            }
        }
    }

    /// What the coordinator's log says.
    fn reason(self) -> &'static str {
        match self {
            Refusal::Missing => "no token",
            Refusal::Wrong => "wrong token",
        }
    }
}

/// Checks a call's `authorization` metadata against the farm's token. The comparison takes the
/// same time wherever the first differing byte is (`subtle`); only the length may show.
pub fn verify(expected: &Token, presented: Option<&AsciiMetadataValue>) -> Result<(), Refusal> {
    let value = presented.ok_or(Refusal::Missing)?.as_bytes();
    let token = match value.iter().position(|&b| b == b' ') {
        Some(space) if value[..space].eq_ignore_ascii_case(b"bearer") => &value[space + 1..],
        _ => return Err(Refusal::Wrong),
    };
    if bool::from(token.ct_eq(expected.secret_bytes())) {
        Ok(())
    } else {
        Err(Refusal::Wrong)
    }
}

/// The server-side interceptor: refuses every call without the farm's token, before the
/// service sees it, and logs the refusal with the peer's address (never a token).
#[derive(Clone)]
pub struct TokenCheck {
    expected: Option<Arc<Token>>,
    who: &'static str,
}

impl Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        match verify(expected, request.metadata().get(AUTHORIZATION)) {
            Ok(()) => Ok(request),
            Err(refusal) => {
                let peer = request
                    .remote_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "an unknown address".into());
                warn!("refused {} from {peer}: {}", self.who, refusal.reason());
                Err(Status::unauthenticated(refusal.message()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(s: &str) -> Token {
        s.parse().unwrap()
    }

    fn header(s: &str) -> AsciiMetadataValue {
        AsciiMetadataValue::try_from(s).unwrap()
    }

    #[test]
    fn only_the_farms_bearer_token_passes() {
        let expected = token("s3cret");
        assert_eq!(verify(&expected, Some(&header("Bearer s3cret"))), Ok(()));
        assert_eq!(verify(&expected, Some(&header("bearer s3cret"))), Ok(()));
        assert_eq!(verify(&expected, None), Err(Refusal::Missing));
        for wrong in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Bearer S3CRET",
            "Bearer ",
            "Basic s3cret",
            "s3cret",
        ] {
            assert_eq!(
                verify(&expected, Some(&header(wrong))),
                Err(Refusal::Wrong),
                "{wrong:?}"
            );
        }
    }

    #[test]
    fn the_interceptor_refuses_as_unauthenticated_and_passes_the_right_token() {
        let security = Security {
            token: Some(token("s3cret")),
            tls: None,
        };
        let mut check = security.check("an agent");
        let status = check.call(Request::new(())).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(status.message().contains("no token"), "{status:?}");

        let mut wrong = Request::new(());
        wrong
            .metadata_mut()
            .insert(AUTHORIZATION, header("Bearer nope"));
        let status = check.call(wrong).unwrap_err();
        assert!(status.message().contains("wrong token"), "{status:?}");
        assert!(!status.message().contains("s3cret"));

        let mut right = Request::new(());
        right
            .metadata_mut()
            .insert(AUTHORIZATION, header("Bearer s3cret"));
        assert!(check.call(right).is_ok());

        // Without a token every call passes: loopback, `--insecure`, or in-process.
        let mut open = Security::default().check("a client");
        assert!(open.call(Request::new(())).is_ok());
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn without_a_token_only_loopback_is_allowed() {
        let loopback = addrs(&["127.0.0.1:7171", "[::1]:7171", "[::ffff:127.0.0.1]:7171"]);
        assert!(matches!(
            listen_rule("localhost:7171", &loopback, false, false, false),
            Ok(None)
        ));
        for open in [
            addrs(&["0.0.0.0:7171"]),
            addrs(&["[::]:7171"]),
            addrs(&["192.0.2.7:7171"]),
            addrs(&["127.0.0.1:7171", "192.0.2.7:7171"]),
        ] {
            let err = listen_rule("host:7171", &open, false, false, false).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("--token") && text.contains("--insecure"),
                "{text}"
            );
            assert!(matches!(
                listen_rule("host:7171", &open, false, true, false),
                Ok(Some(_))
            ));
            assert!(matches!(
                listen_rule("host:7171", &open, true, false, true),
                Ok(None)
            ));
            let warning = listen_rule("host:7171", &open, true, false, false).unwrap();
            assert!(warning.unwrap().contains("--tls-cert"));
        }
    }

    #[tokio::test]
    async fn the_rule_resolves_host_names() {
        assert!(check_listen_address("localhost:0", false, false, false)
            .await
            .is_ok());
        assert!(check_listen_address("127.0.0.1:0", false, false, false)
            .await
            .is_ok());
        assert!(matches!(
            check_listen_address("0.0.0.0:0", false, false, false).await,
            Err(AuthError::NoToken { .. })
        ));
        assert!(check_listen_address("0.0.0.0:0", true, false, false)
            .await
            .is_ok());
    }

    #[test]
    fn unusable_tls_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let err = read_identity(&cert, &key).err().unwrap();
        assert!(err.to_string().contains("cert.pem"), "{err}");
        std::fs::write(&cert, "not a certificate").unwrap();
        let err = read_identity(&cert, &key).err().unwrap();
        assert!(matches!(err, AuthError::NotPem { .. }), "{err}");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = read_identity(&cert, &key).err().unwrap();
        let text = err.to_string();
        assert!(
            text.contains("cert.pem") && text.contains("key.pem"),
            "{text}"
        );
    }
}
