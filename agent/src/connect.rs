//! How a client reaches a coordinator: the URL, the TLS trust (`--ca`) and the shared token
//! (`--token`, `--token-file`, `FLY_TOKEN`) it presents on every call.
//!
//! Both kinds of client use it: `fly-agent` and `fly-coordinator run --connect`. The
//! coordinator's side of the token (the check) lives in the coordinator's `auth` module; the
//! [`Token`] type is shared so both sides read and validate a token the same way.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

/// The environment variable a token is read from when neither `--token` nor `--token-file` is
/// given.
pub const TOKEN_ENV: &str = "FLY_TOKEN";

/// The gRPC metadata key that carries the token, as `Bearer TOKEN`.
pub const AUTHORIZATION: &str = "authorization";

/// Why a string cannot be a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is empty")]
    Empty,
    /// The token travels in an HTTP/2 header: only visible ASCII survives that unchanged.
    #[error("the token must be printable ASCII without spaces")]
    Characters,
}

/// What went wrong while reading a token, a CA certificate, or a coordinator URL.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read the token file {}: {error}", path.display())]
    ReadTokenFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the token file {}: {error}", path.display())]
    TokenFile { path: PathBuf, error: TokenError },
    #[error("{TOKEN_ENV}: {0}")]
    TokenEnv(TokenError),
    #[error("cannot read the CA certificate {}: {error}", path.display())]
    ReadCa {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display())]
    NotACertificate { path: PathBuf },
    #[error(
        "{url:?} is not a valid coordinator URL (expected http://HOST:PORT or https://HOST:PORT)"
    )]
    BadUrl {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("--ca is for https:// coordinator URLs, and {url} is not one")]
    CaWithoutTls { url: String },
    #[error("cannot set up TLS for {url}: {detail}")]
    Tls { url: String, detail: String },
}

/// The shared secret of a farm. Its `Debug` never shows it, and comparing two tokens is left
/// to the coordinator, which does it in constant time.
#[derive(Clone)]
pub struct Token {
    secret: String,
    /// `Bearer SECRET`, marked sensitive so HTTP/2 never puts it in its header tables.
    header: AsciiMetadataValue,
}

impl Token {
    /// The secret's bytes, for the coordinator's constant-time comparison.
    pub fn secret_bytes(&self) -> &[u8] {
        self.secret.as_bytes()
    }

    /// The `authorization` metadata value a client sends.
    pub fn header(&self) -> &AsciiMetadataValue {
        &self.header
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl FromStr for Token {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Token, TokenError> {
        if s.is_empty() {
            return Err(TokenError::Empty);
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Characters);
        }
        let mut header = AsciiMetadataValue::try_from(format!("Bearer {s}"))
            .map_err(|_| TokenError::Characters)?;
        header.set_sensitive(true);
        Ok(Token {
            secret: s.to_string(),
            header,
        })
    }
}

/// `--token` and `--token-file`, shared by every fly command that talks to or serves a farm.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TokenArgs {
    /// The farm's shared token, required from agents and clients when the coordinator has one.
    /// Prefer --token-file or FLY_TOKEN: a command line is visible to other users of the machine.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<Token>,
    /// Read the token from this file (a trailing newline is ignored), e.g. a mounted secret.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

impl TokenArgs {
    /// The token to use: `--token`, else `--token-file`, else `FLY_TOKEN`, else none.
    pub fn resolve(&self) -> Result<Option<Token>, ConnectError> {
        resolve_token(
            self.token.as_ref(),
            self.token_file.as_deref(),
            std::env::var(TOKEN_ENV).ok().as_deref(),
        )
    }
}

/// [`TokenArgs::resolve`] with the environment passed in. An empty `FLY_TOKEN` counts as
/// unset, as clap treats empty environment variables.
pub fn resolve_token(
    flag: Option<&Token>,
    file: Option<&Path>,
    env: Option<&str>,
) -> Result<Option<Token>, ConnectError> {
    if let Some(token) = flag {
        return Ok(Some(token.clone()));
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|error| ConnectError::ReadTokenFile {
            path: path.to_path_buf(),
            error,
        })?;
        // Files written by `echo` or an editor end with a newline; secrets mounted by
        // Kubernetes usually do not. Either way the newline is not part of the token.
        let token = text
            .trim_end_matches(['\n', '\r'])
            .parse()
            .map_err(|error| ConnectError::TokenFile {
                path: path.to_path_buf(),
                error,
            })?;
        return Ok(Some(token));
    }
    match env {
        Some(value) if !value.is_empty() => value.parse().map(Some).map_err(ConnectError::TokenEnv),
        _ => Ok(None),
    }
}

/// Adds the token (if any) to every request a gRPC client makes.
#[derive(Clone, Debug, Default)]
pub struct AttachToken(Option<Token>);

impl AttachToken {
    pub fn new(token: Option<Token>) -> AttachToken {
        AttachToken(token)
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert(AUTHORIZATION, token.header().clone());
        }
        Ok(request)
    }
}

/// What a client needs besides the URL: its token and the CA it trusts for `https://`.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    pub token: Option<Token>,
    /// PEM file of the CA that signed the coordinator's certificate; `None` trusts the
    /// system's roots.
    pub ca: Option<PathBuf>,
}

impl ConnectOptions {
    /// The interceptor that puts this client's token on every request.
    pub fn attach_token(&self) -> AttachToken {
        AttachToken::new(self.token.clone())
    }

    /// An endpoint for `url`, with TLS set up for `https://` URLs (connection timeouts and the
    /// like are the caller's).
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, ConnectError> {
        let endpoint =
            Endpoint::from_shared(url.to_string()).map_err(|source| ConnectError::BadUrl {
                url: url.to_string(),
                source,
            })?;
        let https = endpoint.uri().scheme_str() == Some("https");
        if !https {
            return match &self.ca {
                Some(_) => Err(ConnectError::CaWithoutTls {
                    url: url.to_string(),
                }),
                None => Ok(endpoint),
            };
        }
        let tls = match &self.ca {
            Some(path) => ClientTlsConfig::new().ca_certificate(read_certificate(path)?),
            None => ClientTlsConfig::new().with_enabled_roots(),
        };
        endpoint.tls_config(tls).map_err(|err| ConnectError::Tls {
            url: url.to_string(),
            detail: error_chain(&err),
        })
    }
}

/// Reads a PEM certificate file. rustls silently skips what it cannot parse, so a file with no
/// certificate at all would otherwise surface later as an unknown-issuer handshake failure.
fn read_certificate(path: &Path) -> Result<Certificate, ConnectError> {
    let pem = std::fs::read(path).map_err(|error| ConnectError::ReadCa {
        path: path.to_path_buf(),
        error,
    })?;
    let marker = b"-----BEGIN CERTIFICATE-----";
    if !pem.windows(marker.len()).any(|w| w == marker) {
        return Err(ConnectError::NotACertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(Certificate::from_pem(pem))
}

/// An error and all its causes, `: `-separated.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Transport errors often repeat their cause in their own message.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Explains why connecting failed. A TLS failure is named as one, with what to check, instead
/// of the generic "transport error" it arrives as.
pub fn describe_connect_error(err: &(dyn std::error::Error + 'static)) -> String {
    match find_tls_error(err) {
        Some(tls) => describe_tls_error(tls),
        None => error_chain(err),
    }
}

fn describe_tls_error(err: &rustls::Error) -> String {
    match err {
        rustls::Error::InvalidCertificate(reason) => format!(
            "TLS handshake failed: the coordinator's certificate was refused ({reason}); check \
             that --ca (FLY_CA) is the CA that signed it and that the certificate names the \
             host in the URL"
        ),
        rustls::Error::InvalidMessage(_) => format!(
            "TLS handshake failed: {err}; is the coordinator serving TLS (--tls-cert)? Use \
             http:// for a coordinator without TLS"
        ),
        _ => format!("TLS handshake failed: {err}"),
    }
}

/// The rustls error somewhere in `err`'s causes. rustls errors travel inside `io::Error`s,
/// whose `source()` skips the wrapped error itself, so each `io::Error` is opened by hand.
fn find_tls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(err);
    while let Some(cause) = current {
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(inner) = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(tls) = find_tls_error(inner) {
                return Some(tls);
            }
        }
        current = cause.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(s: &str) -> Token {
        s.parse().expect("a valid token")
    }

    #[test]
    fn a_token_is_printable_ascii_without_spaces() {
        assert_eq!("".parse::<Token>().unwrap_err(), TokenError::Empty);
        assert_eq!("a b".parse::<Token>().unwrap_err(), TokenError::Characters);
        assert_eq!("tök".parse::<Token>().unwrap_err(), TokenError::Characters);
        assert_eq!("a\n".parse::<Token>().unwrap_err(), TokenError::Characters);
        let t = token("s3cr3t-_.~+/=");
        assert_eq!(t.secret_bytes(), b"s3cr3t-_.~+/=");
        assert_eq!(t.header().to_str().unwrap(), "Bearer s3cr3t-_.~+/=");
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let t = token("do-not-print-me");
        let args = TokenArgs {
            token: Some(t.clone()),
            token_file: None,
        };
        assert!(!format!("{t:?} {args:?}").contains("do-not-print-me"));
        let options = ConnectOptions {
            token: Some(t),
            ca: None,
        };
        assert!(!format!("{options:?}").contains("do-not-print-me"));
    }

    #[test]
    fn the_flag_wins_over_the_file_which_wins_over_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let flag = token("from-flag");

        let got = resolve_token(Some(&flag), Some(&file), Some("from-env")).unwrap();
        assert_eq!(got.unwrap().secret_bytes(), b"from-flag");
        let got = resolve_token(None, Some(&file), Some("from-env")).unwrap();
        assert_eq!(got.unwrap().secret_bytes(), b"from-file");
        let got = resolve_token(None, None, Some("from-env")).unwrap();
        assert_eq!(got.unwrap().secret_bytes(), b"from-env");
        assert!(resolve_token(None, None, None).unwrap().is_none());
        assert!(resolve_token(None, None, Some("")).unwrap().is_none());
    }

    #[test]
    fn a_token_file_loses_its_trailing_newline_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "abc\r\n").unwrap();
        let got = resolve_token(None, Some(&file), None).unwrap().unwrap();
        assert_eq!(got.secret_bytes(), b"abc");

        std::fs::write(&file, "a b\n").unwrap();
        let err = resolve_token(None, Some(&file), None).unwrap_err();
        assert!(
            err.to_string().contains("printable ASCII"),
            "{err}: should say what is wrong"
        );
        std::fs::write(&file, "\n").unwrap();
        let err = resolve_token(None, Some(&file), None).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }

    #[test]
    fn an_unreadable_token_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-token");
        let err = resolve_token(None, Some(&missing), Some("from-env")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("cannot read the token file"), "{text}");
        assert!(text.contains("no-such-token"), "{text}");
    }

    #[test]
    fn a_bad_token_in_the_environment_is_an_error() {
        let err = resolve_token(None, None, Some("two words")).unwrap_err();
        assert!(err.to_string().starts_with("FLY_TOKEN:"), "{err}");
    }

    #[test]
    fn the_token_is_attached_to_every_request() {
        let mut attach = AttachToken::new(Some(token("abc")));
        let request = attach.call(Request::new(())).unwrap();
        assert_eq!(request.metadata().get(AUTHORIZATION).unwrap(), "Bearer abc");
        let mut none = AttachToken::default();
        let request = none.call(Request::new(())).unwrap();
        assert!(request.metadata().get(AUTHORIZATION).is_none());
    }

    #[test]
    fn a_ca_needs_an_https_url_and_a_pem_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let options = ConnectOptions {
            token: None,
            ca: Some(not_pem.clone()),
        };
        let err = options.endpoint("http://127.0.0.1:7171").unwrap_err();
        assert!(matches!(err, ConnectError::CaWithoutTls { .. }), "{err}");
        let err = options.endpoint("https://127.0.0.1:7171").unwrap_err();
        assert!(matches!(err, ConnectError::NotACertificate { .. }), "{err}");

        let missing = ConnectOptions {
            token: None,
            ca: Some(dir.path().join("missing.pem")),
        };
        let err = missing.endpoint("https://127.0.0.1:7171").unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");

        let err = ConnectOptions::default().endpoint("not a url").unwrap_err();
        assert!(
            err.to_string().contains("not a valid coordinator URL"),
            "{err}"
        );
    }

    #[test]
    fn a_certificate_refusal_inside_io_errors_is_named_as_a_tls_failure() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("transport error")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let text = describe_connect_error(&Outer(io));
        assert!(text.starts_with("TLS handshake failed:"), "{text}");
        assert!(text.contains("certificate"), "{text}");

        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(
            describe_connect_error(&Outer(plain)),
            "transport error: refused"
        );
    }
}
