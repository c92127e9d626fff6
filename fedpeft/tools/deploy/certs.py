"""Certificates and SuperNode keys, in the formats Flower 1.42 reads.

The SuperLink serves its Fleet, Control and Runtime APIs over HTTPS on one port; its
internal SuperExec connects to 127.0.0.1, so the server certificate always names 127.0.0.1
too. SuperNode keys are EC keys on a NIST curve, the private key in OpenSSH format, the
public key an OpenSSH line (``flwr supernode register KEY.pub CONNECTION``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING

from fedpeft.tools.deploy.errors import DeployError

if TYPE_CHECKING:  # cryptography loads on first use: `fedpeft --help` stays quick
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
ALWAYS_NAMED = ("localhost", "127.0.0.1")  # the SuperLink's own SuperExec connects here


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certs(out: Path | str, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """Write a CA and a SuperLink server certificate naming ``hosts`` (and 127.0.0.1).

    Returns the paths of ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key``. Keys
    are unencrypted PEM with mode 0600: keep ``ca.key`` off the SuperLink machine.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    out = Path(out)
    names = _host_names(hosts)
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_cert = _ca_certificate(ca_key, valid)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = _server_certificate(key, names, ca_key, ca_cert, valid)
    paths = {name: out / name for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)}
    _write(paths[CA_KEY], _pem(ca_key), 0o600)
    _write(paths[CA_CERT], ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths[SERVER_KEY], _pem(key), 0o600)
    _write(paths[SERVER_CERT], cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


def _host_names(hosts: list[str]) -> list[str]:
    """``hosts`` and :data:`ALWAYS_NAMED`, once each, in order; a malformed one raises."""
    names = list(dict.fromkeys([*hosts, *ALWAYS_NAMED]))
    for host in names:
        if not host or any(c.isspace() for c in host) or "/" in host:
            raise DeployError(f"--host {host!r} is not a host name or IP address")
    return names


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    """An RSA private key as unencrypted PEM (TraditionalOpenSSL)."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _ca_certificate(
    ca_key: rsa.RSAPrivateKey, valid: tuple[datetime.datetime, datetime.datetime]
) -> x509.Certificate:
    """The federation's self-signed CA: it signs certificates, nothing else, no sub-CAs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpeft federation CA")])
    usage = x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=True,
        crl_sign=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _server_certificate(
    key: rsa.RSAPrivateKey,
    names: list[str],
    ca_key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    valid: tuple[datetime.datetime, datetime.datetime],
) -> x509.Certificate:
    """The SuperLink's certificate, signed by the CA: a TLS server for every one of ``names``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def make_node_key(prefix: Path | str) -> tuple[Path, Path]:
    """Write a SuperNode key pair: ``PREFIX`` (OpenSSH EC P-384 private key), ``PREFIX.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = Path(prefix)
    public = private.with_name(private.name + ".pub")
    if private.exists():
        raise DeployError(f"{private} exists; a node key is never overwritten (delete it first)")
    key = ec.generate_private_key(ec.SECP384R1())
    _write(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(public, line + b"\n", 0o644)
    return private, public
