"""Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`), so
no debugging port is opened at all. Every request the page makes is recorded from the protocol's
own `Network.requestWillBeSent` events: unlike a log file or a proxy, that sees each request the
renderer starts (whatever the scheme, cached or not, before it could fail), which is what a
test of "the page loads nothing" needs."""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fixtures_processes import stop, tail

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe"]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
INSTALL = "apt-get install -y chromium"
TIMEOUT = 60.0  # seconds for any one protocol answer or page load
# execs the browser with the two pipe ends as its fds 3 and 4, where --remote-debugging-pipe wants
# them (moved above 10 first, so neither end can overwrite the other)
ONTO_FDS_3_AND_4 = """
import fcntl, os, sys
commands, events = (fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3])
os.dup2(commands, 3)
os.dup2(events, 4)
os.execv(sys.argv[3], sys.argv[3:])
"""


def find_chromium() -> str | None:
    return next(filter(None, map(shutil.which, BROWSERS)), None)


@pytest.fixture
def artifacts(request, tmp_path) -> Path:
    """Where a test keeps files worth looking at afterwards (screenshots): the folder named by
    AUTOPRUNE_TEST_ARTIFACTS, one subfolder per test, or else the test's tmp_path."""
    root = os.environ.get("AUTOPRUNE_TEST_ARTIFACTS")
    if not root:
        return tmp_path
    folder = Path(root) / request.node.name.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class PageLoad:
    url: str
    requests: list[str] = field(default_factory=list)  # every URL the page asked for, in order
    dom: dict[str, Any] = field(default_factory=dict)
    screenshot: Path | None = None


class Chromium:
    """One headless browser; `load()` renders a page and reports what it requested and holds."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.log = workdir / "chromium.log"
        to_browser, self._to_browser = os.pipe()      # the browser reads commands on its fd 3
        self._from_browser, from_browser = os.pipe()  # and writes answers and events on its fd 4
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", ONTO_FDS_3_AND_4, str(to_browser), str(from_browser),
                 binary, *FLAGS, f"--user-data-dir={workdir / 'profile'}", "about:blank"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                pass_fds=(to_browser, from_browser))
        os.close(to_browser)
        os.close(from_browser)
        self._next_id = 0
        self._answers: dict[int, queue.Queue] = {}
        self.events: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        with os.fdopen(self._from_browser, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        replies = self._answers.pop(message["id"], None)
                        if replies is not None:
                            replies.put(message)
                    else:
                        self.events.put(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, answer: bool = True) -> dict:
        """One protocol command; its result (unless `answer` is False), or an error naming the command."""
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            replies: queue.Queue = queue.Queue()
            if answer:
                self._answers[ident] = replies
            message = {"id": ident, "method": method, "params": params or {}}
            if session:
                message["sessionId"] = session
            os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        if not answer:
            return {}
        try:
            reply = replies.get(timeout=TIMEOUT)
        except queue.Empty:
            raise TimeoutError(f"chromium did not answer {method} within {TIMEOUT:.0f} s; log:\n{tail(self.log)}") from None
        if "error" in reply:
            raise RuntimeError(f"chromium: {method} failed: {reply['error']}")
        return reply["result"]

    def load(self, path: Path, screenshot: Path | None = None, width: int = 1400, settle: float = 1.0) -> PageLoad:
        """Open `path`, wait for its load event and `settle` quiet seconds, then read the DOM."""
        page = PageLoad(url=path.resolve().as_uri())
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Network.enable", session=session)
        self.send("Page.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
        self.send("Page.navigate", {"url": page.url}, session=session)
        loaded, quiet_since, deadline = False, None, time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.1)
            except queue.Empty:
                if loaded and time.monotonic() - quiet_since >= settle:
                    break
                continue
            if event.get("sessionId") != session:
                continue
            if event["method"] == "Network.requestWillBeSent":
                page.requests.append(event["params"]["request"]["url"])
                quiet_since = time.monotonic()
            elif event["method"] == "Network.webSocketCreated":
                page.requests.append(event["params"]["url"])
                quiet_since = time.monotonic()
            elif event["method"] == "Page.loadEventFired":
                loaded, quiet_since = True, time.monotonic()
        else:
            raise TimeoutError(f"chromium: {page.url} did not finish loading within {TIMEOUT:.0f} s")
        page.dom = self.evaluate(session, DOM_SUMMARY)
        if screenshot is not None:
            height = int(self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]["height"])
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
            shot = self.send("Page.captureScreenshot", {"format": "png"}, session=session)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            page.screenshot = screenshot
        self.send("Target.closeTarget", {"targetId": target})
        return page

    def evaluate(self, session: str, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"chromium: script failed: {result['exceptionDetails']}")
        return result["result"]["value"]

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                self.send("Browser.close", answer=False)  # it may exit before it answers
                self.process.wait(timeout=10)
        except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            pass
        finally:
            stop(self.process, grace=5)
            os.close(self._to_browser)


# what the page holds once rendered: its sections (and whether they take up room) and its images
# (whether each decoded and shows)
DOM_SUMMARY = """(() => ({
  title: document.title,
  sections: [...document.querySelectorAll('section[id]')].map(s => ({
      id: s.id, heading: s.querySelector('h2')?.textContent, height: s.getBoundingClientRect().height})),
  images: [...document.images].map(i => ({
      alt: i.alt, complete: i.complete, width: i.naturalWidth, shown: i.getBoundingClientRect().width})),
}))()"""


@pytest.fixture
def chromium(tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip(f"needs Chromium ({INSTALL}) to render pages headless")
    browser = Chromium(binary, tmp_path)
    try:
        yield browser
    finally:
        browser.close()
