"""Make the README's screenshots of the inspector: ``docs/inspector-list.png`` and
``docs/inspector-instance.png``.

Runs ``examples/approval_webhook.py``'s workflow on a throw-away SQLite file
behind a real uvicorn server, fills it with a few expenses (started and
decided through signed HTTP requests, one escalated by its three-day timer),
then signs in with headless Chromium (Debian's ``chromium`` and
``chromium-driver``) and photographs the list and one instance.

    .venv/bin/python docs/make_screenshots.py
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

import gorch
from gorch.clock import use_clock
from gorch.http import create_app, sign

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
os.environ.setdefault("GORCH_STORE", "memory://")  # the example's module-level engine: unused

from approval_webhook import WORKFLOWS  # noqa: E402

SECRET = "screenshot-secret"
TOKEN = "screenshot-token"


@contextlib.contextmanager
def serving(app: object) -> Iterator[str]:
    """``app`` on a real uvicorn server on a free port of 127.0.0.1; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def fill(engine: gorch.Engine, url: str) -> None:
    """A few expenses in every state the example has."""
    with httpx.Client(base_url=url) as client:

        def call(method: str, path: str, data: object) -> None:
            body = json.dumps(data).encode()
            headers = {**sign(SECRET, method, path, body), "Content-Type": "application/json"}
            client.request(method, path, content=body, headers=headers).raise_for_status()

        # Carol's expense was filed three days ago (by the CLI); nobody answered.
        past = datetime.now(UTC) - timedelta(days=3, minutes=5)
        with use_clock(lambda: past):
            engine.start(
                "expense",
                "exp-2025-0042",
                {
                    "requester": "carol",
                    "amount": 990,
                    "manager": "ann",
                    "director": "diana",
                    "description": "conference trip, Lisbon",
                },
                by="cli:carol",
            )
        engine.run_due()  # what the worker does: the escalation fires
        expenses = [
            ("exp-2025-0040", "bob", 120.0, True, "ann"),
            ("exp-2025-0041", "erin", 300.0, False, "ann"),
            ("exp-2025-0043", "dave", 45.5, None, ""),
            ("exp-2025-0044", "frank", 75.0, None, ""),
            ("exp-2025-0045", "grace", 1200.0, None, ""),
            ("exp-2025-0046", "heidi", 18.9, True, "ann"),
        ]
        for id, who, amount, approved, by in expenses:
            call(
                "PUT",
                f"/workflows/expense/{id}",
                {"requester": who, "amount": amount, "manager": "ann", "director": "diana"},
            )
            if approved is not None:
                decision = {"approved": approved, "by": by}
                if not approved:
                    decision["comment"] = "duplicate of exp-2025-0039"
                call("POST", f"/workflows/expense/{id}/events/decide", decision)
        call("POST", "/workflows/exp-2025-0044/cancel", {})


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def shoot(driver: webdriver.Chrome, path: Path, width: int = 1280) -> None:
    """The whole page, as tall as its content (at most 3000 pixels)."""
    metrics = {"width": width, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": 800})
    height = driver.find_element(By.TAG_NAME, "html").size["height"]
    size = {**metrics, "height": min(max(height, 400), 3000)}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", size)
    driver.save_screenshot(str(path))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    print(f"wrote {path.relative_to(ROOT)}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        engine = gorch.Engine(f"sqlite:///{tmp}/inspector.db", WORKFLOWS)
        try:
            app = create_app(engine, secret=SECRET, token=TOKEN)
            with serving(app) as url:
                fill(engine, url)
                driver = browser()
                try:
                    driver.set_window_size(1280, 900)
                    driver.get(f"{url}/inspect/login")
                    driver.find_element(By.ID, "token").send_keys(TOKEN)
                    driver.find_element(By.CSS_SELECTOR, "form button").click()
                    driver.find_element(By.CSS_SELECTOR, "table.instances")
                    shoot(driver, ROOT / "docs" / "inspector-list.png")
                    driver.find_element(By.LINK_TEXT, "exp-2025-0042").click()
                    driver.find_element(By.CSS_SELECTOR, "#diagram .node.cursor")
                    shoot(driver, ROOT / "docs" / "inspector-instance.png")
                finally:
                    driver.quit()
        finally:
            engine.store.close()


if __name__ == "__main__":
    main()
