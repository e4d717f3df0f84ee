"""Drive the MLflow UI in headless Chromium over the DevTools protocol (no Selenium/Playwright):
start `mlflow server` on a store, open pages, read what a person sees, click, take screenshots.

Used by tests/test_tracking.py (the UI test) and, as a script, to take the screenshots in
docs/img/:  python tests/mlflow_ui.py STORE.db OUT_PREFIX
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(db: str | Path):
    """`mlflow server` on a SQLite store, on a free local port; yields its base URL."""
    import requests

    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{Path(db).resolve()}",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if requests.get(f"{base}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(1)
        else:
            raise RuntimeError("mlflow server did not start")
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


class Browser:
    """One headless Chromium page, driven synchronously (each call runs the event loop)."""

    def __init__(self, width: int = 1400, height: int = 800):
        self.width, self.height = width, height
        self.loop = asyncio.new_event_loop()
        self.profile = tempfile.mkdtemp(prefix="histoflow-chrome-")
        self.proc = subprocess.Popen(
            [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--window-size={width},{height}", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ws = None
        for line in self.proc.stderr:   # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                ws = m.group(1)
                break
        if ws is None:
            raise RuntimeError("chromium did not start its DevTools endpoint")
        port = re.search(r":(\d+)/", ws).group(1)
        import requests

        page = next(t for t in requests.get(f"http://127.0.0.1:{port}/json", timeout=10).json() if t["type"] == "page")
        self.loop.run_until_complete(self._connect(page["webSocketDebuggerUrl"]))
        self._id = 0
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    async def _connect(self, url: str) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(url, max_msg_size=0)

    async def _call(self, method: str, params: dict) -> dict:
        self._id += 1
        await self.ws.send_str(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def call(self, method: str, **params) -> dict:
        return self.loop.run_until_complete(asyncio.wait_for(self._call(method, params), 60))

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return res.get("result", {}).get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, pattern: str, timeout: float = 60) -> str:
        """The page's visible text once ``pattern`` (a regex) appears in it."""
        end = time.time() + timeout
        text = ""
        while time.time() < end:
            text = self.text()
            if re.search(pattern, text):
                return text
            time.sleep(0.5)
        raise AssertionError(f"{pattern!r} not on the page after {timeout}s; it shows: {text[:1500]!r}")

    def click_text(self, text: str, selector: str = "button, a, [role=button], [role=tab], span") -> bool:
        """Click the first element matching ``selector`` whose own text is ``text``."""
        return bool(self.js(f"""(() => {{
            const want = {json.dumps(text)};
            for (const el of document.querySelectorAll({json.dumps(selector)})) {{
                if ((el.innerText || '').trim() === want) {{ el.click(); return true; }}
            }}
            return false; }})()"""))

    def expand_rows(self) -> bool:
        """Expand every run with nested runs (its +/- button in the Run Name cell), once."""
        return bool(self.js("""(() => {
            // the run-name cell's +/- button (present on runs that have child runs)
            const rows = [...document.querySelectorAll('button[data-component-id*="runnamecellrenderer"]')];
            rows.forEach(b => b.click());
            return rows.length > 0; })()"""))

    def close_assistant(self) -> None:
        """Close the MLflow Assistant side panel (it opens itself on first load, hiding columns)."""
        self.js("""(() => { for (const b of document.querySelectorAll('button[aria-label="Close"]')) b.click(); })()""")

    def screenshot(self, path: str | Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.session.close())
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.loop.close()
            shutil.rmtree(self.profile, ignore_errors=True)


if __name__ == "__main__":
    db, prefix = sys.argv[1], sys.argv[2]
    with mlflow_server(db) as base:
        browser = Browser()
        try:
            browser.open(f"{base}/{sys.argv[4] if len(sys.argv) > 4 else '#/experiments/1?workflowType=machine_learning'}")
            browser.wait_for(sys.argv[3] if len(sys.argv) > 3 else r"histoflow \d{4}-")
            time.sleep(3)
            browser.close_assistant()
            time.sleep(1)
            browser.screenshot(f"{prefix}.png")
            if browser.expand_rows():
                browser.wait_for(r"mil/")
                time.sleep(3)
                browser.screenshot(f"{prefix}-expanded.png")
            print(browser.text()[:3000])
        finally:
            browser.close()
