"""API tokens: where they come from, and the checks of the routes that need one.

The admin routes (swap, approvals, optimize) and the API docs always need a token;
the pipeline routes need one when the pipeline says `auth: {pipeline_routes: token}`.

- Tokens come from HETFORGE_API_TOKEN, else from the token file (HETFORGE_API_TOKEN_FILE, default
  `$HETFORGE_HOME/api-token`): one `TOKEN` or `NAME:TOKEN` a line. When neither exists, the first
  start (`resolve_tokens`, called where the application is built) writes one new token to the file
  (mode 0600) and prints it once.
- The ingress holds only the tokens' SHA-256 digests (they travel in Ray's deployment arguments);
  the holder's name (`NAME`, else `admin`) is the identity the audit trail records, never a name
  a request body claims.
- Admin routes also refuse a cross-origin request (an Origin or Sec-Fetch-Site header naming another
  site: 403) and a body that is not JSON (415): a browser page elsewhere cannot post to them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import Request

from hetforge import config
from hetforge.serving.ingress.errors import ApiError

DEFAULT_NAME = "admin"
_NAMED = re.compile(r"^([A-Za-z0-9_.@-]{1,64}):(.+)$")
_CHALLENGE = 'Bearer realm="hetforge"'


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Tokens:
    """The tokens an ingress accepts: SHA-256 digest -> the holder's name. Empty: every guarded route is refused."""

    digests: dict[str, str] = field(default_factory=dict)

    def identify(self, token: str) -> str | None:
        """The holder of `token`, or None (compared in constant time against every digest)."""
        presented, found = digest(token), None
        for known, name in self.digests.items():
            if hmac.compare_digest(known, presented):
                found = name
        return found


def parse_tokens(text: str, source: str) -> dict[str, str]:
    """token -> holder's name, from lines `TOKEN` or `NAME:TOKEN` (blank lines and `#` comments skipped)."""
    tokens = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        named = _NAMED.match(line)
        name, token = (named.group(1), named.group(2).strip()) if named else (DEFAULT_NAME, line)
        if len(token) < 16:  # a short token can be guessed over HTTP; refuse it rather than serve with it
            raise ValueError(f"{source}:{number}: an API token of at least 16 characters (got {len(token)})")
        tokens[token] = name
    return tokens


def _generate(path: Path, announce: Callable[[str], None]) -> str:
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process wrote it first: use theirs
        return path.read_text()
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    announce(
        f"hetforge: generated an API token for the admin routes and /docs, saved in {path} (shown once):\n"
        f"  {token}\n"
        "send it as `Authorization: Bearer <token>`; set HETFORGE_API_TOKEN or HETFORGE_API_TOKEN_FILE to choose your own"
    )
    return token + "\n"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_tokens(announce: Callable[[str], None] = _stderr) -> Tokens:
    """The tokens to serve with: HETFORGE_API_TOKEN, else the token file, created with a new token when missing."""
    from_env = config.api_token()
    if from_env:
        return Tokens({digest(t): n for t, n in parse_tokens(from_env, "HETFORGE_API_TOKEN").items()})
    path = config.api_token_file()
    text = path.read_text() if path.is_file() else _generate(path, announce)
    tokens = parse_tokens(text, str(path))
    if not tokens:
        raise ValueError(f"{path}: no API token in the file; write one (16 characters or more) or delete the file")
    return Tokens({digest(t): n for t, n in tokens.items()})


def client_token() -> str | None:
    """The token a client on this machine sends (the CLI, tests): HETFORGE_API_TOKEN, else the token file's first."""
    from_env = config.api_token()
    if from_env:
        return next(iter(parse_tokens(from_env, "HETFORGE_API_TOKEN")), None)
    path = config.api_token_file()
    if not path.is_file():
        return None
    return next(iter(parse_tokens(path.read_text(), str(path))), None)


def client_headers() -> dict[str, str]:
    """`Authorization: Bearer ...` with `client_token()`, or no header when there is none."""
    token = client_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


# ---------------------------------------------------------------------------------------------- checks
def _presented(request: Request, allow_basic: bool) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if allow_basic and scheme.lower() == "basic":  # a browser's own prompt: any user name, the token as password
        try:
            return base64.b64decode(value.strip(), validate=True).decode().partition(":")[2] or None
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


def authenticate(request: Request, tokens: Tokens, allow_basic: bool = False) -> str:
    """The identity of the request's token; 401 when it has none or an unknown one."""
    challenge = _CHALLENGE + (', Basic realm="hetforge"' if allow_basic else "")
    token = _presented(request, allow_basic)
    if token is None:
        raise ApiError(
            401,
            "this route needs the API token: send `Authorization: Bearer <token>` (HETFORGE_API_TOKEN, or the file "
            "HETFORGE_API_TOKEN_FILE, default $HETFORGE_HOME/api-token, on the serving host)",
            headers={"WWW-Authenticate": challenge},
        )
    identity = tokens.identify(token)
    if identity is None:
        raise ApiError(401, "the API token is not valid", headers={"WWW-Authenticate": challenge})
    return identity


def check_same_origin(request: Request) -> None:
    """403 for a request a browser sends from another site (its Origin names another host, or Sec-Fetch-Site says so)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise ApiError(
            403, f"cross-origin request refused (Sec-Fetch-Site: {site}); admin routes take same-origin calls"
        )
    origin = request.headers.get("origin")
    if origin is None:
        return  # not sent by a browser's cross-origin machinery (curl, the CLI, a same-origin GET)
    host = request.headers.get("host", "")
    if origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
        raise ApiError(
            403, f"cross-origin request refused: Origin {origin[:200]} is not this server ({host[:200] or 'no Host'})"
        )


def check_json_body(request: Request) -> None:
    """415 for a request body that is not declared as JSON (`application/json` or `application/*+json`)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json")):
        return
    raise ApiError(415, f"this route takes a JSON body with `Content-Type: application/json` (got {kind or 'none'!r})")
