//! Helpers for the token and TLS tests: fly processes started with extra flags and environment
//! (a token, a CA), and certificates made at run time with rcgen, so no key ever sits in the
//! repository.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::fly::clean_env;
use crate::paths::{fly_binary, python};
use crate::process::Proc;

/// PEM files of a CA and of a server certificate it signed, valid for `localhost` and
/// `127.0.0.1`.
pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes a fresh CA named `name` and a server certificate signed by it, in `dir`.
pub fn make_certs(dir: &Path, name: &str) -> Certs {
    std::fs::create_dir_all(dir).expect("creating the certificate directory");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("fly test CA {name}"));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("self-signing the CA");

    let mut params =
        CertificateParams::new(vec!["localhost".to_string()]).expect("server parameters");
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    params
        .distinguished_name
        .push(DnType::CommonName, "fly test coordinator");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("server key");
    let cert = params
        .signed_by(&key, &*ca)
        .expect("signing the server certificate");

    let certs = Certs {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&certs.ca, ca.pem()).expect("writing ca.pem");
    std::fs::write(&certs.cert, cert.pem()).expect("writing cert.pem");
    std::fs::write(&certs.key, key.serialize_pem()).expect("writing key.pem");
    certs
}

/// Any fly command, with the tests' clean environment plus `env`.
pub fn fly(
    name: &str,
    binary: &str,
    args: &[&str],
    env: &[(&str, &str)],
    cwd: &Path,
    log_dir: Option<&Path>,
) -> Proc {
    let mut command = Command::new(fly_binary(binary));
    command.args(args).current_dir(cwd);
    clean_env(&mut command, log_dir);
    command.envs(env.iter().copied());
    Proc::spawn(name, &mut command)
}

/// `fly-agent --connect URL` with two workers in `workdir`, plus `args` (`--token`, `--ca`).
pub fn agent(
    name: &str,
    url: &str,
    workdir: &Path,
    log_dir: Option<&Path>,
    args: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let workdir_arg = workdir.to_string_lossy();
    let python = python();
    let python_arg = python.to_string_lossy();
    let mut all = vec![
        "--connect",
        url,
        "--workers",
        "2",
        "--workdir",
        &workdir_arg,
        "--python",
        &python_arg,
    ];
    all.extend_from_slice(args);
    fly(name, "fly-agent", &all, env, workdir, log_dir)
}

/// `fly-coordinator run --connect URL ARGS -- PYTEST_ARGS` in `project`.
pub fn run_connect(
    project: &Path,
    url: &str,
    args: &[&str],
    env: &[(&str, &str)],
    pytest_args: &[&str],
) -> Proc {
    let mut all = vec!["run", "--connect", url];
    all.extend_from_slice(args);
    all.push("--");
    all.extend_from_slice(pytest_args);
    fly(
        "fly-coordinator run --connect",
        "fly-coordinator",
        &all,
        env,
        project,
        None,
    )
}
