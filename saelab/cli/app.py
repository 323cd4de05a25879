"""`saelab app`: serve the Streamlit app."""

from __future__ import annotations

import os
import sys

from saelab.cli.common import add_command, from_args
from saelab.errors import SaelabError
from saelab.options import AppOptions


def _app_argv(sae: str, port: int, host: str) -> list[str]:
    """The `streamlit run` command line for the app (fileWatcherType none: watching the venv overflows inotify)."""
    from saelab.app import HOME

    return [sys.executable, "-m", "streamlit", "run", str(HOME), "--server.headless", "true",
            "--server.fileWatcherType", "none", "--server.address", host, "--server.port", str(port),
            "--browser.gatherUsageStats", "false", "--", "--sae", sae]


def _check_port(host: str, port: int) -> None:
    import socket

    if not host.strip():  # streamlit and bind() take "" as every interface: the app would be public, unasked
        raise SaelabError(f"--host {host!r} is empty: pass an address, e.g. 127.0.0.1 (this machine only) or "
                          "0.0.0.0 (every interface)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except socket.gaierror as e:
            raise SaelabError(f"cannot serve on {host}:{port} ({e.strerror or e}): pass a valid --host, e.g. "
                              "127.0.0.1") from None
        except OSError as e:
            raise SaelabError(f"cannot serve on {host}:{port} ({e.strerror or e}): pass a free --port") from None


def cmd_app(args) -> int:
    from saelab.targets import APP_ENV_VAR as ENV_VAR
    from saelab.targets import resolve_target

    try:
        import plotly  # noqa: F401
        import streamlit  # noqa: F401
    except ImportError:
        raise SaelabError("the app needs streamlit and plotly: pip install 'saelab[app]'") from None
    o = from_args(AppOptions, args)
    target = resolve_target(o.sae)
    _check_port(o.host, o.port)
    argv = _app_argv(str(target.path), o.port, o.host)
    print(f"saelab app: {target.path} on http://{o.host}:{o.port} (Ctrl-C stops it)", flush=True)
    os.environ[ENV_VAR] = str(target.path)
    os.execv(sys.executable, argv)  # this process becomes the server: its PID stops it


def add_parser(sub) -> None:
    add_command(sub, "app", AppOptions, cmd_app,
                help="open the feature browser / steering / circuits app (Streamlit)",
                description="Serve the Streamlit app on an SAE folder or a group folder.", run_flags=False)
