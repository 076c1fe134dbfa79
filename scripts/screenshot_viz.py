"""Screenshot the default pipeline view of a kedro-viz build with headless Chromium.

    python scripts/screenshot_viz.py [BUILD_DIR] [PNG]      # defaults: build docs/kedro-viz-lineage.png

The build is served over HTTP on a free local port (the app fetches ``api/*``, which ``file://`` blocks);
the served ``index.html`` turns kedro-viz's feature-hint pop-ups off so they do not cover the graph.
Needs no network: the Google-fonts link in the page fails fast offline and the system font is used.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# kedro-viz keeps its user settings in localStorage["KedroViz"]; set before the app script runs.
SETTINGS = {"showFeatureHints": False}
SETTINGS_SCRIPT = f"<script>localStorage.setItem('KedroViz', {json.dumps(json.dumps(SETTINGS))});</script>"


class BuildHandler(SimpleHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the base class's name
        if self.path.split("?")[0] in ("/", "/index.html"):
            page = (Path(self.directory) / "index.html").read_text(encoding="utf-8")
            body = page.replace("<head>", "<head>" + SETTINGS_SCRIPT, 1).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


def main(build: Path = Path("build"), png: Path = Path("docs/kedro-viz-lineage.png")) -> int:
    if not (build / "api" / "main").is_file():
        print(f"{build}: not a kedro-viz build; run `make viz` first", file=sys.stderr)
        return 2
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if browser is None:
        print("headless Chromium not found (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    png.parent.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(BuildHandler, directory=str(build)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--hide-scrollbars", "--window-size=1600,1000", "--virtual-time-budget=20000",
             f"--screenshot={png.resolve()}", f"http://127.0.0.1:{server.server_address[1]}/"],
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    if result.returncode != 0 or not png.is_file():
        print(result.stderr[-3000:], file=sys.stderr)
        return result.returncode or 1
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*map(Path, sys.argv[1:3])))
