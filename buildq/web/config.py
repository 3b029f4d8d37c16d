"""``[web]``: the status page's settings, read from the daemon's own config file.

The daemon ignores this table; ``buildq web`` validates it at start-up with the same rules as
every other table (a bad key stops it with one line naming the key). The token is a secret:
``token_env`` / ``token_file`` (or an inline ``token`` in a mode-600 file), never shown.
"""

from __future__ import annotations

from dataclasses import dataclass

from buildq.config import ConfigError, Secret, Table

DEFAULT_PORT = 9465
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
#: A token shorter than this is refused: it guards cancels and dead-letter purges.
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class WebConfig:
    bind: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    #: Actions (cancel, requeue, purge) are on only when a token is configured.
    token: Secret | None = None
    #: How often the open pages refresh their live parts.
    refresh_s: float = 5.0
    #: How long a browser stays signed in after entering the token.
    session_ttl_s: float = 12 * 3600.0
    #: Host header values served (DNS-rebinding guard); the bind address is always allowed.
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    #: Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (uvicorn's
    #: forwarded_allow_ips): the client address in action logs, https for Secure cookies.
    trusted_proxies: tuple[str, ...] = ("127.0.0.1",)

    @property
    def actions_enabled(self) -> bool:
        return self.token is not None

    @classmethod
    def from_table(cls, table: Table) -> WebConfig:
        token = table.secret("token", required=False)
        if token is not None and len(token.reveal()) < MIN_TOKEN_CHARS:
            raise ConfigError(
                table.key("token"),
                token,
                f"a token of at least {MIN_TOKEN_CHARS} characters (e.g. openssl rand -hex 32)",
            )
        bind = table.str("bind", cls.bind)
        hosts = table.str_list("allowed_hosts", list(LOOPBACK_HOSTS))
        config = cls(
            bind=bind,
            port=table.int("port", DEFAULT_PORT, min=0, max=65535),
            token=token,
            refresh_s=table.float("refresh_s", cls.refresh_s, min=1.0, max=3600.0),
            session_ttl_s=table.float("session_ttl_s", cls.session_ttl_s, min=60.0),
            allowed_hosts=tuple(dict.fromkeys([*hosts, bind])),
            trusted_proxies=tuple(table.str_list("trusted_proxies", ["127.0.0.1"])),
        )
        table.reject_unknown()
        return config
