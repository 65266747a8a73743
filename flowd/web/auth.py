"""Who may use the console: the password, sessions, CSRF tokens, the login throttle.

Standard library only, so ``flowd run`` can read the password before it forks its
workers without importing the web libraries. The password file is read once; only a
salted PBKDF2 hash stays in memory. Sessions live in memory (a restart logs everyone
out), each with its own CSRF token that every POST must carry.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass, field

from flowd.errors import ConfigError

PBKDF2_ROUNDS = 200_000
SESSION_IDLE_S = 12 * 3600.0
SESSIONS_MAX = 200
THROTTLE_FIRST_S = 1.0
THROTTLE_MAX_S = 60.0


class PasswordHash:
    """A salted hash of the console's password; :meth:`matches` compares in constant time."""

    def __init__(self, password: str):
        self._salt = secrets.token_bytes(16)
        self._digest = self._hash(password)

    def _hash(self, password: str) -> bytes:
        return hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), self._salt, PBKDF2_ROUNDS)

    def matches(self, password: str) -> bool:
        return hmac.compare_digest(self._hash(password), self._digest)


def load_password(path: str, where: str | None = None) -> PasswordHash:
    """Read ``[web] password_file`` once. Raises ConfigError (naming the key) when it is
    missing, empty, or readable by anyone but its owner."""
    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{why}: {path}", key="web.password_file", path=where)

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise refuse("the password file does not exist") from None
    except OSError as exc:
        raise refuse(f"cannot read the password file ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise refuse("the password file is not a regular file")
        if info.st_mode & 0o077:
            raise refuse(f"the password file is open to its group or others (mode {stat.S_IMODE(info.st_mode):04o});"
                         " make it readable by flowd's user only (chmod 600)")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(4096)
    finally:
        os.close(fd)
    try:
        password = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise refuse("the password file is not UTF-8 text") from None
    if not password:
        raise refuse("the password file is empty")
    return PasswordHash(password)


@dataclass
class Session:
    """One browser's session: its CSRF token and whether it has logged in."""

    id: str
    csrf: str
    authenticated: bool
    last_seen: float = field(default_factory=time.monotonic)

    def has_token(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token), self.csrf)


class Sessions:
    """Sessions by cookie value; idle ones expire, the least recently used go past the cap."""

    def __init__(self, idle_s: float = SESSION_IDLE_S, cap: int = SESSIONS_MAX):
        self._idle_s = idle_s
        self._cap = cap
        self._by_id: dict[str, Session] = {}
        self._lock = threading.Lock()

    def new(self, authenticated: bool) -> Session:
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), authenticated)
        with self._lock:
            self._by_id[session.id] = session
            if len(self._by_id) > self._cap:
                # Anonymous sessions go first: visitors who never logged in cannot push out one who did.
                oldest = min(self._by_id.values(), key=lambda s: (s.authenticated, s.last_seen))
                del self._by_id[oldest.id]
        return session

    def get(self, session_id: str | None, now: float | None = None) -> Session | None:
        if not session_id:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            session = self._by_id.get(session_id)
            if session is None:
                return None
            if now - session.last_seen > self._idle_s:
                del self._by_id[session_id]
                return None
            session.last_seen = now
            return session

    def end(self, session_id: str) -> None:
        with self._lock:
            self._by_id.pop(session_id, None)


class LoginThrottle:
    """Each failed login doubles the wait before the next attempt is even checked
    (1 s, 2 s, 4 s, ... up to a minute); a success resets it."""

    def __init__(self, first_s: float = THROTTLE_FIRST_S, max_s: float = THROTTLE_MAX_S):
        self._first_s = first_s
        self._max_s = max_s
        self._failures = 0
        self._not_before = 0.0
        self._lock = threading.Lock()

    def wait_left(self, now: float | None = None) -> float:
        """Seconds until a login may be tried again (0: now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return max(self._not_before - now, 0.0)

    def failed(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            wait = min(self._first_s * 2.0 ** self._failures, self._max_s)
            self._failures += 1
            self._not_before = now + wait
            return wait

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0
            self._not_before = 0.0
