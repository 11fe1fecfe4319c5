"""Credentials for a Flower deployment of fl-sd: a TLS certificate authority and server certificate for the
SuperLink, and one authentication key pair per SuperNode. For local tests and trials; for a real federation use
certificates from your organisation's CA (docs/flower.md says which file goes where).

    python deploy/make_credentials.py --out creds --hosts 127.0.0.1 localhost superlink.example.org --supernodes 3

writes into ``--out``:

* ``ca.crt`` (give it to every SuperNode and to ``flwr``: ``--root-certificates``, ``root-certificates``), ``ca.key``;
* ``server.pem`` + ``server.key``: the SuperLink's certificate (``--ssl-certfile`` / ``--ssl-keyfile``, with
  ``--ssl-ca-certfile ca.crt``), valid for every ``--hosts`` name or IP address;
* ``supernode_<i>`` / ``supernode_<i>.pub``: SuperNode i's private key (``flower-supernode
  --auth-supernode-private-key``) and public key (``flwr supernode register supernode_<i>.pub``), ECDSA P-384 in
  OpenSSH format, as Flower's node authentication expects.

Needs only ``cryptography`` (installed with Flower).
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DAYS = 365


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_tls(out: Path, hosts: list[str], days: int = DAYS) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl-sd test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", _key_pem(ca_key), private=True)
    _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.key", _key_pem(key), private=True)


def make_supernode_key(out: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = out / name, out / f"{name}.pub"
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write into")
    parser.add_argument("--hosts", nargs="+", default=["127.0.0.1", "localhost"],
                        help="names / IP addresses the SuperLink is reached at (the certificate's SANs)")
    parser.add_argument("--supernodes", type=int, default=0, help="how many SuperNode key pairs")
    parser.add_argument("--days", type=int, default=DAYS, help="certificate validity")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    make_tls(out, args.hosts, args.days)
    for i in range(args.supernodes):
        make_supernode_key(out, f"supernode_{i}")
    print(f"wrote ca.crt, server.pem, server.key and {args.supernodes} SuperNode key pair(s) to {out}")


if __name__ == "__main__":
    main()
