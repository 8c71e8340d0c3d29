"""API keys: read from a file at start-up, checked in constant time, known to the audit log only by id.

File format (UTF-8 text, with or without a byte order mark), one key per line::

    # comments and blank lines are ignored
    pacs-router  9f2c0e8d4b7a41d6a3f0c5e2b8d7a6c1
    viewer-ward3 0b6e2f5a9c8d7e1f3a4b5c6d7e8f9a0b

A line is ``<key id> <key>`` (whitespace between). A line holding only a key gets the id
``key-<first 8 hex digits of its SHA-256>``. Keys must be at least 16 characters of printable
ASCII without whitespace (``python -c "import secrets; print(secrets.token_hex(16))"`` makes one):
a client cannot send anything else in an HTTP header, so such a key could never match. The id is
what the audit log records; the key itself is never stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

MIN_KEY_LENGTH = 16
MAKE_ONE = "make one with: python -c \"import secrets; print(secrets.token_hex(16))\""


class ApiKeys:
    """The accepted keys, each with its id."""

    def __init__(self, keys: dict[str, str]) -> None:
        if not keys:
            raise ValueError("no API keys given")
        self._digests = [(hashlib.sha256(key.encode()).digest(), key_id) for key_id, key in keys.items()]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ApiKeys:
        """Read an API key file (format in the module docstring).

        Raises:
            ValueError: the file is unreadable, holds no key, a short key, a key that is not printable
                ASCII, a repeated key or a repeated id; the message names the line, never the key.
        """
        path = Path(path)
        try:
            # utf-8-sig: a BOM (Windows editors write one) would otherwise become part of the first key or id
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"api_key_file {str(path)!r} cannot be read ({exc})") from exc
        keys: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            if len(words) > 2:
                raise ValueError(f"{path}:{number}: expected '<key id> <key>' or '<key>', got {len(words)} words")
            key = words[-1]
            key_id = words[0] if len(words) == 2 else "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]
            if len(key) < MIN_KEY_LENGTH:
                raise ValueError(f"{path}:{number}: key is shorter than {MIN_KEY_LENGTH} characters; {MAKE_ONE}")
            if not (key.isascii() and key.isprintable()):
                raise ValueError(f"{path}:{number}: key holds a character that is not printable ASCII, which an "
                                 f"HTTP header cannot carry, so it could never match; {MAKE_ONE}")
            if key_id in keys:
                raise ValueError(f"{path}:{number}: key id {key_id!r} is used twice")
            if key in keys.values():
                raise ValueError(f"{path}:{number}: this key is already listed under another id")
            keys[key_id] = key
        if not keys:
            raise ValueError(f"api_key_file {str(path)!r} holds no key")
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s can be read by other users of this machine; chmod 600 it", path)
        return cls(keys)

    def key_id(self, authorization: str | None) -> str | None:
        """The id of the key in an ``Authorization: Bearer <key>`` header value, or None if it matches none."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for known, key_id in self._digests:  # every key is compared, so timing says nothing about which matched
            if hmac.compare_digest(digest, known):
                found = key_id
        return found
