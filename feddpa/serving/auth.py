"""Bearer tokens: a tokens file holds SHA-256 hashes only — one admin token and one per client.

    {"admin": "<sha256 hex>", "clients": {"3": "<sha256 hex>", ...}}

A client token opens that client's model and nothing else; the admin token opens every client.
`feddpa tokens RUN_DIR --out FILE` creates one per client and prints the plaintext once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from feddpa.core.atomic import atomic_write_bytes

SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenStore:
    admin: str | None
    clients: dict[int, str]

    @classmethod
    def load(cls, path: str | Path) -> TokenStore:
        """Read and check a tokens file: every problem is an error naming the file, at start-up,
        never a failure per request."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"tokens file {path} not found (create it with feddpa tokens RUN_DIR --out FILE)"
            ) from None
        except (ValueError, OSError) as err:
            raise ValueError(f"tokens file {path}: not readable JSON ({err}); {REDO}") from None
        if not isinstance(data, dict) or set(data) - {"admin", "clients"}:
            raise ValueError(f"tokens file {path}: expected {SHAPE}; {REDO}")
        admin = data.get("admin")
        if admin is not None:
            _check_hash(path, "admin", admin)
        clients = data.get("clients", {})
        if not isinstance(clients, dict):
            raise ValueError(
                f"tokens file {path}: 'clients' must be an object {{id: hash}}; {REDO}"
            )
        checked: dict[int, str] = {}
        for key, value in clients.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit()):
                raise ValueError(f"tokens file {path}: client id {key!r} is not a number; {REDO}")
            checked[int(key)] = _check_hash(path, f"clients.{key}", value)
        if admin is None and not checked:
            raise ValueError(f"tokens file {path} holds no token at all; {REDO}")
        return cls(admin, checked)

    def is_admin(self, token: str) -> bool:
        return self.admin is not None and hmac.compare_digest(digest(token), self.admin)

    def client_of(self, token: str) -> int | None:
        h = digest(token)
        for cid, expected in self.clients.items():
            if hmac.compare_digest(h, expected):
                return cid
        return None


SHAPE = "{'admin': sha256 hex, 'clients': {'<id>': sha256 hex}}"
REDO = "create a new file with feddpa tokens RUN_DIR --out FILE"


def _check_hash(path: str | Path, key: str, value: object) -> str:
    if not (isinstance(value, str) and SHA256_HEX.fullmatch(value)):
        raise ValueError(
            f"tokens file {path}: {key} is not a SHA-256 hash (64 lowercase hex digits); the "
            f"file holds hashes, never the tokens themselves; {REDO}"
        )
    return value


def create_tokens(client_ids: list[int], out: Path) -> dict:
    """Write hashes to `out` and return the plaintext tokens. The file is created with mode 0600
    (never readable by others, whatever the umask) under a temporary name, then linked into
    place: it appears complete or not at all, and an existing file is never overwritten."""
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new file (existing tokens stay valid)")
    admin = f"fdpa-admin-{secrets.token_urlsafe(24)}"
    per_client = {str(c): f"fdpa-c{c}-{secrets.token_urlsafe(24)}" for c in client_ids}
    plain = {"admin": admin, "clients": per_client}
    hashed = {"admin": digest(admin), "clients": {k: digest(v) for k, v in per_client.items()}}
    try:
        atomic_write_bytes(out, json.dumps(hashed, indent=2).encode(), exclusive=True, mode=0o600)
    except FileExistsError:
        raise FileExistsError(
            f"{out} exists; choose a new file (existing tokens stay valid)"
        ) from None
    return plain
