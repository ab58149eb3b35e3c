"""Bearer tokens: a tokens file holds SHA-256 hashes only — one admin token and one per client.

    {"admin": "<sha256 hex>", "clients": {"3": "<sha256 hex>", ...}}

A client token opens that client's model and nothing else; the admin token opens every client.
`feddpa tokens RUN_DIR --out FILE` creates one per client and prints the plaintext once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenStore:
    admin: str | None
    clients: dict[int, str]

    @classmethod
    def load(cls, path: str | Path) -> TokenStore:
        try:
            data = json.loads(Path(path).read_text())
            clients = {int(k): str(v) for k, v in data.get("clients", {}).items()}
            return cls(data.get("admin"), clients)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"tokens file {path} not found (create it with feddpa tokens)"
            ) from None
        except (ValueError, AttributeError) as err:
            raise ValueError(
                f"tokens file {path}: expected {{'admin': hash, 'clients': {{id: hash}}}} ({err})"
            ) from None

    def is_admin(self, token: str) -> bool:
        return self.admin is not None and hmac.compare_digest(digest(token), self.admin)

    def client_of(self, token: str) -> int | None:
        h = digest(token)
        for cid, expected in self.clients.items():
            if hmac.compare_digest(h, expected):
                return cid
        return None


def create_tokens(client_ids: list[int], out: Path) -> dict:
    """Write hashes to `out` (refusing to overwrite) and return the plaintext tokens."""
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new file (existing tokens stay valid)")
    admin = f"fdpa-admin-{secrets.token_urlsafe(24)}"
    per_client = {str(c): f"fdpa-c{c}-{secrets.token_urlsafe(24)}" for c in client_ids}
    plain = {"admin": admin, "clients": per_client}
    hashed = {"admin": digest(admin), "clients": {k: digest(v) for k, v in per_client.items()}}
    out.write_text(json.dumps(hashed, indent=2))
    out.chmod(0o600)
    return plain
