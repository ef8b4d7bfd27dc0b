"""The inspector in a real headless Chromium, against a real uvicorn server.

Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``,
``/usr/bin/chromedriver``; ``.ci/run`` installs them) driven by Selenium,
which is told where the driver is (no download). Without them the tests
skip, except in CI (``CI=true``) or with ``GORCH_REQUIRE_SERVICES=1``, where
they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydantic
import pytest
import uvicorn
from stores.store_support import services_required

import gorch
from gorch import On, S, Select, Step, Timeout
from gorch.engine import Engine
from gorch.http import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TOKEN = "browser-token"
CURSOR_FILL = (255, 213, 79)
"""``--cursor`` in the inspector's stylesheet: the highlight is drawn, not only named."""


class Assign(pydantic.BaseModel):
    owner: str


class Ticket(gorch.Workflow):
    start_input = ("title",)

    title: str
    owner: str = ""

    def definition(self) -> gorch.Section:
        return S(
            Step("open", self.noop),
            Select(
                "triage",
                On("assign", self.assign),
                Timeout("remind", timedelta(hours=2), Step("nudge", self.noop)),
            ),
            Select("work", On("close")),
        )

    def noop(self) -> None:
        pass

    def assign(self, a: Assign) -> str:
        self.owner = a.owner
        return a.owner


def _browser_problem() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError as e:
        return f"selenium is not installed ({e}): pip install -e '.[dev]'"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    problem = _browser_problem()
    if problem is not None:
        if services_required():
            pytest.fail(f"{problem} (CI or GORCH_REQUIRE_SERVICES is set)", pytrace=False)
        pytest.skip(problem)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_window_size(1280, 1000)
    driver.implicitly_wait(5)
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """``app`` on a real uvicorn server, on a free port of 127.0.0.1, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = Engine(f"sqlite:///{tmp_path / 'browser.db'}", {"ticket": Ticket})
    yield e
    e.store.close()


def _rgb(css: str) -> tuple[int, ...]:
    """``rgb(1, 2, 3)`` or ``rgba(1, 2, 3, 1)`` as ``(1, 2, 3)``."""
    inside = css[css.index("(") + 1 : css.index(")")]
    return tuple(int(float(v)) for v in inside.split(",")[:3])


def _follow(driver: Any, element: Any) -> None:
    """Click what loads a new page, and wait until that page has loaded.

    Without the wait, the next lookup may find the old page's elements, which
    go stale under it as the new page replaces them. The old document is
    marked (an expando property, not a DOM change) and the wait is for a
    document without the mark that has finished loading. Polling the old
    element for staleness is not enough: while the document is swapped,
    chromedriver may answer with an "unknown error" ("Node with given id does
    not belong to the document") rather than a stale-element one, so any
    driver error during the swap means "not yet".
    """
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("document.gorchOldPage = true")
    element.click()
    WebDriverWait(driver, 10, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script(
            "return document.gorchOldPage !== true && document.readyState === 'complete'"
        )
    )


def _absent(driver: Any, css: str) -> bool:
    """No element matches ``css`` now (without the implicit wait for one to appear)."""
    driver.implicitly_wait(0)
    try:
        return not driver.find_elements("css selector", css)
    finally:
        driver.implicitly_wait(5)


def _problems(driver: Any) -> list[str]:
    """What the page's console reported: CSP violations, failed loads (none expected)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def test_sign_in_open_the_list_click_an_instance_and_see_its_cursor(
    browser: Any, engine: Engine
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select as Choice

    engine.start("ticket", "t-1", {"title": "printer on fire"})
    engine.start("ticket", "t-2", {"title": "no coffee"})
    engine.send("t-2", "assign", {"owner": "ann"})
    with serving(create_app(engine, token=TOKEN)) as url:
        browser.get(f"{url}/inspect")  # no cookie yet: the sign-in form (401)
        assert [p.split(" - ", 1)[1] for p in _problems(browser)] == [
            "Failed to load resource: the server responded with a status of 401 (Unauthorized)"
        ]
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        _follow(browser, browser.find_element(By.CSS_SELECTOR, "form button[type=submit]"))
        links = browser.find_elements(By.CSS_SELECTOR, "a.instance-link")
        assert [a.text for a in links] == ["t-1", "t-2"]
        cookie = browser.get_cookie("gorch_inspect")
        assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert TOKEN not in cookie["value"]

        # Filter on the status: the form's own GET.
        Choice(browser.find_element(By.ID, "f-status")).select_by_visible_text("waiting")
        browser.find_element(By.ID, "f-q").send_keys("T-2")
        _follow(browser, browser.find_element(By.CSS_SELECTOR, "form.filters button"))
        assert [a.text for a in browser.find_elements(By.CSS_SELECTOR, "a.instance-link")] == [
            "t-2"
        ]

        _follow(browser, browser.find_element(By.LINK_TEXT, "t-2"))
        assert browser.current_url == f"{url}/inspect/instances/t-2"
        marked = browser.find_elements(By.CSS_SELECTOR, "#diagram .node.cursor")
        assert [n.get_attribute("data-name") for n in marked] == ["work"]
        assert _rgb(marked[0].value_of_css_property("background-color")) == CURSOR_FILL
        assert "[_main_] waiting: close" in marked[0].text
        plain = browser.find_element(By.CSS_SELECTOR, "#diagram .node[data-name='triage']")
        assert "cursor" not in (plain.get_attribute("class") or "").split()
        assert _rgb(plain.value_of_css_property("background-color")) != CURSOR_FILL
        assert browser.find_element(By.ID, "status").text == "waiting"
        history = browser.find_elements(By.CSS_SELECTOR, "#history tr.entry")
        assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in history] == [
            "started",
            "step",
            "event",
        ]

        # Back to the list, the other instance: its own cursor.
        _follow(browser, browser.find_element(By.LINK_TEXT, "← Instances"))
        _follow(browser, browser.find_element(By.LINK_TEXT, "t-1"))
        marked = browser.find_elements(By.CSS_SELECTOR, "#diagram .node.cursor")
        assert [n.get_attribute("data-name") for n in marked] == ["triage"]
        problems = _problems(browser)
        assert problems == [], problems

        # Signing out ends the session.
        _follow(browser, browser.find_element(By.CSS_SELECTOR, "header form button"))
        assert browser.get_cookie("gorch_inspect") is None
        browser.get(f"{url}/inspect")
        assert browser.find_elements(By.ID, "token")
        assert _absent(browser, "a.instance-link")


def test_html_in_the_data_never_runs_in_the_browser(browser: Any, engine: Engine) -> None:
    from selenium.webdriver.common.by import By

    title = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>"
    engine.start("ticket", "t-1", {"title": title})
    with serving(create_app(engine, insecure=True)) as url:
        browser.get(f"{url}/inspect/instances/t-1")
        shown = browser.find_element(By.ID, "data").text
        assert json.dumps(title) in shown  # as text, in the JSON of the data
        assert _absent(browser, "#data img, #data script")
        time.sleep(0.2)
        assert browser.title == "t-1 · gorch inspector"
