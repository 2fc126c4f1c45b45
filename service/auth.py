"""Bearer API keys.

Keys are kept as SHA-256 digests and a presented key is compared with every configured digest
with `hmac.compare_digest` (constant time, no early exit), so neither the comparison time nor the
logs reveal a key. Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from jrs.service.errors import Unauthorized

logger = logging.getLogger("jrs.service.auth")

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="`Authorization: Bearer <key>` with a key of JRS_API_KEYS / JRS_API_KEYS_FILE.",
)


def digest(key: str) -> bytes:
    """SHA-256 digest of a key."""
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyChecker:
    """Checks presented keys against the configured ones.

    Args:
        keys: the accepted keys (empty: every request is accepted, insecure development mode).
    """

    def __init__(self, keys: list[str]) -> None:
        self._digests = [digest(k) for k in keys]

    @property
    def enabled(self) -> bool:
        """Whether keys are required."""
        return bool(self._digests)

    def check(self, presented: str | None) -> bool:
        """Whether `presented` is one of the keys (constant-time over all keys).

        Args:
            presented: the key from the request, or None.

        Returns:
            True when accepted.
        """
        if not self._digests:
            return True
        if not presented:
            return False
        candidate = digest(presented)
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(candidate, d)
        return ok


def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """FastAPI dependency: refuse the request without a valid Bearer key.

    Args:
        request: the request.
        credentials: the parsed ``Authorization`` header (None when absent or not Bearer).

    Raises:
        Unauthorized: missing, malformed or unknown key (answered 401 with
            ``WWW-Authenticate: Bearer``).
    """
    checker: KeyChecker = request.app.state.key_checker
    if not checker.enabled:
        return
    if credentials is None:
        raise Unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
    if not checker.check(credentials.credentials):
        logger.info("rejected an unknown API key")
        raise Unauthorized("invalid API key")
