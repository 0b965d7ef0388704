"""`python -m explorer [--runs DIR] [--port N] [other streamlit flags]`: the safe way to start the app.

The server binds 127.0.0.1 only and sends no usage statistics, from whatever folder this is run;
other ``--server.*`` / ``--theme.*`` flags are passed on to ``streamlit run``. To serve on another
interface, say so explicitly: ``--server.address 0.0.0.0`` (there is no login: anyone who reaches
the port sees every run).
"""

from __future__ import annotations

import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"
SAFE_FLAGS = ("--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
              "--server.headless", "true")


def streamlit_argv(argv: list[str]) -> list[str]:
    """``streamlit run`` arguments: the safe flags first (flags given later win), app arguments after --."""
    app_args, flags = [], []
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "--runs" and args:
            app_args += [a, args.pop(0)]
        elif a.startswith("--runs="):
            app_args.append(a)
        elif a == "--port" and args:
            flags += ["--server.port", args.pop(0)]
        elif a == "--":
            app_args += args
            break
        else:
            flags.append(a)
    return ["streamlit", "run", str(APP), *SAFE_FLAGS, *flags, "--", *app_args]


def main(argv: list[str] | None = None) -> int:
    from streamlit.web import cli as stcli

    sys.argv = streamlit_argv(sys.argv[1:] if argv is None else argv)
    try:
        stcli.main()                     # click: exits with SystemExit
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
