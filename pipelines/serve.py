"""``medseg serve``: settings (file + ``MEDSEG_`` environment + options) → :func:`server.app.create_app` → uvicorn.

Also runnable as ``python -m pipelines.serve --models DIR [--host H] [--port P] [--settings FILE] [--no-auth]``.
Turning auth off is allowed only on a loopback address: an open server on a network interface must be explicit in
the settings file (``auth_enabled: false``), never a command-line accident.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path

from medseg.core.errors import ConfigError, MedsegError

logger = logging.getLogger(__name__)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    models_dir: Path | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings_file: Path | None = None,
    no_auth: bool = False,
    log_level: str = "info",
) -> None:
    """Run the server until interrupted (SIGINT/SIGTERM stop it gracefully; running jobs go back to the queue).

    Args:
        models_dir: folder of run directories / nnU-Net results folders (None: the settings' ``models_dir``).
        host: interface to bind; ``127.0.0.1`` by default.
        port: TCP port.
        settings_file: YAML settings (see :mod:`server.settings`); the ``MEDSEG_`` environment also applies.
        no_auth: turn authentication off (loopback hosts only).
        log_level: uvicorn/server log level.

    Raises:
        ConfigError: invalid settings, a missing models folder, or ``no_auth`` on a non-loopback host.
    """
    import uvicorn

    from server.app import create_app
    from server.settings import load_settings

    if no_auth and not _loopback(host):
        raise ConfigError(
            f"--no-auth on host {host}",
            expected="--no-auth only with a loopback host (127.0.0.1, ::1, localhost)",
            hint="keep auth on and set api_keys, or bind 127.0.0.1",
        )
    overrides: dict[str, object] = {"models_dir": models_dir}
    if no_auth:
        overrides["auth_enabled"] = False
    settings = load_settings(settings_file, **overrides)
    if not settings.models_dir.is_dir():
        raise ConfigError(
            f"models folder {settings.models_dir} does not exist",
            expected="a folder of run directories (medseg train) or nnU-Net results folders",
            hint="pass --models DIR",
        )
    if settings.auth_enabled and not settings.api_keys and not settings.users:
        logger.warning("auth is on but no api_keys or users are configured: protected routes will answer 401")
    if not settings.auth_enabled:
        logger.warning("authentication is OFF (local use only)")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("server").setLevel(log_level.upper())
    logger.info("serving %s on http://%s:%d (data in %s)", settings.models_dir, host, port, settings.data_dir)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.serve``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=None, help="folder of run directories")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--settings", type=Path, default=None, help="YAML settings file")
    parser.add_argument("--no-auth", action="store_true", help="turn auth off (loopback hosts only)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    try:
        serve(args.models, args.host, args.port, args.settings, args.no_auth, args.log_level)
    except MedsegError as err:
        logging.getLogger(__name__).error("%s", err.message)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
