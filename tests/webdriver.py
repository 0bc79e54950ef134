"""Just enough of the W3C WebDriver protocol (plain HTTP + JSON) to drive Debian's headless
chromium through its chromedriver, with no client library: the listening page's browser test and
``scripts/page_screenshot.py`` use it."""
from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator


class WebDriver:
    """Just enough of the W3C WebDriver protocol (plain HTTP + JSON) to drive Debian's chromium
    through its chromedriver: no client library needed."""

    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

    def __init__(self, url: str):
        self.url = url
        caps = {"browserName": "chrome", "goog:chromeOptions": {
            "binary": shutil.which("chromium"),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1100,900"]}}
        self.session = self.call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]
        self.call("POST", f"/session/{self.session}/timeouts", {"implicit": 30000, "script": 30000})

    def call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else (b"{}" if method == "POST" else None)
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=90) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"webdriver {method} {path}: {exc.read()[:500]!r}") from None

    def s(self, path: str) -> str:
        return f"/session/{self.session}{path}"

    def get(self, url: str) -> None:
        self.call("POST", self.s("/url"), {"url": url})

    def find(self, css: str) -> str:  # waits up to the implicit timeout
        found = self.call("POST", self.s("/element"), {"using": "css selector", "value": css})
        assert isinstance(found, dict) and self.ELEMENT in found, f"{css}: {found!r}"[:500]
        return found[self.ELEMENT]

    def script(self, js: str, *args):
        return self.call("POST", self.s("/execute/sync"), {"script": js, "args": list(args)})

    def screenshot(self, path) -> None:
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.call("GET", self.s("/screenshot"))))

    def quit(self) -> None:
        self.call("DELETE", self.s(""))



@contextlib.contextmanager
def start_chromedriver(log: Path) -> Iterator[WebDriver]:
    """chromedriver on a free port and a headless chromium session; both ended on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([shutil.which("chromedriver"), f"--port={port}", f"--log-path={log}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        # chromedriver answers /status once it listens: wait for that (at most 30 s), not a fixed time.
        for _ in range(300):
            try:
                with urllib.request.urlopen(url + "/status", timeout=5) as r:
                    if json.loads(r.read())["value"]["ready"]:
                        break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(f"chromedriver exited with {process.returncode}; see {log}") from None
                threading.Event().wait(0.1)
        web = WebDriver(url)
        try:
            yield web
        finally:
            web.quit()
    finally:
        process.terminate()
        process.wait(timeout=30)
