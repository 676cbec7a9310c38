"""
Development tools: C{python -m chatd token|devcert|devsecret}.

Not part of the daemon: they mint what a developer needs to try chatd
(a JWT signed with the configured secret, a self-signed localhost
certificate, a JWT secret) without an identity provider or a CA.
"""

import argparse
import datetime
import ipaddress
import os
import secrets
import sys
import time

from chatd import config


def _write_private(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def token(args):
    import jwt

    try:
        settings = config.load(args.config)
    except config.ConfigError as e:
        sys.exit(f"chatd: {e}")
    algorithm = settings.auth.algorithms[0]
    if algorithm not in config.HS_ALGORITHMS:
        sys.exit(f"chatd: token needs an HS* secret; {args.config} uses {algorithm}")
    now = int(time.time())
    claims = {"sub": args.sub, "iat": now, "exp": now + args.ttl}
    if args.name:
        claims["name"] = args.name
    if args.rooms is not None:
        claims["rooms"] = [r for r in args.rooms.split(",") if r]
    if settings.auth.issuer:
        claims["iss"] = settings.auth.issuer
    if settings.auth.audience:
        claims["aud"] = settings.auth.audience
    print(jwt.encode(claims, settings.jwt_key, algorithm=algorithm))


def devcert(args):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    os.makedirs(args.dir, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=args.days))
        .add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_private(
        os.path.join(args.dir, "privkey.pem"),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    with open(os.path.join(args.dir, "fullchain.pem"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    print(f"wrote {args.dir}/fullchain.pem and {args.dir}/privkey.pem (self-signed, localhost)")


def devsecret(args):
    if os.path.exists(args.path) and not args.force:
        print(f"{args.path} exists; kept")
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.path)), exist_ok=True)
    _write_private(args.path, secrets.token_urlsafe(48).encode() + b"\n")
    print(f"wrote {args.path}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m chatd", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("token", help="print a development JWT")
    p.add_argument("sub")
    p.add_argument("--name", help="display name (default: sub)")
    p.add_argument("--rooms", help="comma-separated rooms the user may enter (default: any)")
    p.add_argument("--ttl", type=int, default=3600, help="seconds the token lives (default 3600)")
    p.add_argument("--config", default="etc/chatd.ini")
    p.set_defaults(run=token)

    p = commands.add_parser("devcert", help="write a self-signed localhost certificate")
    p.add_argument("dir")
    p.add_argument("--days", type=int, default=365)
    p.set_defaults(run=devcert)

    p = commands.add_parser("devsecret", help="write a random JWT secret")
    p.add_argument("path")
    p.add_argument("--force", action="store_true")
    p.set_defaults(run=devsecret)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
