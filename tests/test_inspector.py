"""The inspector pages (``/inspect``) through the app, with FastAPI's TestClient.

Who may look (token, session cookie, signature, open app), the list's filters
and pages, one instance's page (diagram and cursors, data, awaited events,
wake-up, history), escaping of everything that comes from a store or a
request, and answers that are 4xx pages, never 500, for what a caller got
wrong. The real-browser test is ``test_inspector_browser.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pydantic
import pytest
from http_app import stored_ids, untouched
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stores.store_support import make_spec

import gorch
from gorch import DAG, For, Go, Node, On, Parallel, S, Select, Step, Timeout
from gorch.clock import use_clock
from gorch.engine import Engine
from gorch.errors import StoreUnavailable
from gorch.http import create_app, sign
from gorch.http import inspect as inspector
from gorch.http.auth import Authenticator

with warnings.catch_warnings():  # newer Starlette warns that its TestClient moves to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

TOKEN = "inspector-token"
SECRET = "inspector-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
XSS = "<script>alert('x')</script>"


# --------------------------------------------------------------------------- workflows


class Assign(pydantic.BaseModel):
    owner: str
    note: str = ""


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


class Review(gorch.Workflow):
    """Every kind of statement the diagram draws, with cursors in branches and DAG nodes."""

    def definition(self) -> gorch.Section:
        return S(
            Parallel(
                "checks", Select("legal ok", On("legal")), Select("finance ok", On("finance"))
            ),
            DAG(
                "build",
                Step("compile", self.noop),
                Node("approval", Select("qa", On("qa"))),
                Step("package", self.noop, after=["compile", "approval"]),
            ),
            For("rounds", lambda: False, Step("round", self.noop)),
            Go("audit", Select("audit log", On("audit"))),
            Select("sign off", On("sign")),
        )

    def noop(self) -> None:
        pass


WORKFLOWS: dict[str, type[gorch.Workflow]] = {"ticket": Ticket, "review": Review}


# --------------------------------------------------------------------------- reading pages


@dataclass
class El:
    tag: str
    attrs: dict[str, str]
    items: list[El | str] = field(default_factory=list)
    """Children and text, in document order."""

    @property
    def children(self) -> list[El]:
        return [i for i in self.items if isinstance(i, El)]

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    @property
    def text(self) -> str:
        return " ".join(" ".join(i if isinstance(i, str) else i.text for i in self.items).split())

    def all(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list[El]:
        """Every descendant with this tag, class and attributes (``data_name`` = data-name)."""
        found = []
        for child in self.children:
            want = {k.replace("_", "-"): v for k, v in attrs.items()}
            if (
                (tag is None or child.tag == tag)
                and (cls is None or cls in child.classes)
                and all(child.attrs.get(k) == v for k, v in want.items())
            ):
                found.append(child)
            found += child.all(tag, cls, **attrs)
        return found

    def one(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> El:
        found = self.all(tag, cls, **attrs)
        assert len(found) == 1, f"expected one {tag} .{cls} {attrs}, found {len(found)}"
        return found[0]


_VOID = {"meta", "input", "br", "link", "img", "hr"}


class _Tree(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.root = El("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        el = El(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].items.append(el)
        if tag not in _VOID:
            self.stack.append(el)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].items.append(data)


def page(r: Any, status: int = 200) -> El:
    """The response as an element tree (asserting its status and that it is well nested)."""
    assert r.status_code == status, r.text[:2000]
    assert r.headers["content-type"].startswith("text/html")
    tree = _Tree()
    tree.feed(r.text)
    tree.close()
    assert tree.stack == [tree.root], "unclosed elements"
    return tree.root


def listed(root: El) -> list[str]:
    return [a.text for a in root.all("a", "instance-link")]


def cursors(root: El) -> set[str]:
    """The names of the diagram's nodes marked as a cursor (thread titles by their thread)."""
    diagram = root.one(id="diagram")
    names = {
        n.attrs.get("data-name") or n.attrs["data-kind"]  # start and end: by their kind
        for n in diagram.all(cls="node")
        if "cursor" in n.classes
    }
    titles = {
        t.attrs.get("data-thread") or t.attrs.get("data-node", "")
        for t in diagram.all(cls="title")
        if "cursor" in t.classes
    }
    return names | titles


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = Engine(f"sqlite:///{tmp_path / 'inspect.db'}", WORKFLOWS)
    yield e
    e.store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def any_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An Engine on SQLite, or on its own table of the real PostgreSQL server."""
    with contextlib.contextmanager(make_spec)(request.param, tmp_path) as spec:
        store = spec.open()
        try:
            yield Engine(store, WORKFLOWS)
        finally:
            store.close()


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine, token=TOKEN)) as c:
        yield c


# --------------------------------------------------------------------------- who may look


@pytest.mark.parametrize(
    "path", ["/inspect", "/inspect/instances/t-1", "/inspect/instances/nope", "/inspect/other"]
)
def test_a_request_without_the_token_is_401_with_the_sign_in_form(
    client: TestClient, engine: Engine, path: str
) -> None:
    engine.start("ticket", "t-1", {"title": "secret title"})
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        r = client.get(path, headers=headers)
        root = page(r, 401)
        assert root.one("input", id="token").attrs["type"] == "password"
        assert "secret title" not in r.text and "t-1" not in r.text
        assert r.headers["www-authenticate"] == "Bearer"
    client.cookies.set(inspector.COOKIE, "v1.9999999999." + "0" * 64)
    page(client.get(path), 401)


def test_the_bearer_token_opens_the_pages(client: TestClient, engine: Engine) -> None:
    engine.start("ticket", "t-1", {"title": "a"})
    assert listed(page(client.get("/inspect", headers=AUTH))) == ["t-1"]
    root = page(client.get("/inspect/instances/t-1", headers=AUTH))
    assert root.one(id="status").text == "waiting"


def test_signing_in_sets_a_strict_httponly_session_cookie_that_is_not_the_token(
    client: TestClient, engine: Engine
) -> None:
    engine.start("ticket", "t-1", {"title": "a"})
    form = page(client.get("/inspect/login"))
    assert form.one("form").attrs["action"] == "/inspect/login"
    r = client.post("/inspect/login", data={"token": TOKEN}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/inspect"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{inspector.COOKIE}=v1.")
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/inspect", "Max-Age=43200"):
        assert attribute in cookie
    assert "Secure" not in cookie  # plain http here; over https the cookie is Secure
    assert TOKEN not in cookie
    client.cookies.set(inspector.COOKIE, r.cookies[inspector.COOKIE])
    root = page(client.get("/inspect"))  # no header: the cookie does it
    assert listed(root) == ["t-1"]
    assert root.all("form", action="/inspect/logout")
    page(client.get("/inspect/instances/t-1"))
    # The cookie opens the inspector, not the API.
    assert client.get("/workflows/t-1").status_code == 401
    r = client.post("/inspect/logout", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/inspect/login"
    assert f'{inspector.COOKIE}=""' in r.headers["set-cookie"]
    client.cookies.clear()
    page(client.get("/inspect"), 401)


def test_a_wrong_token_signs_nobody_in(client: TestClient) -> None:
    for wrong in ("wrong", "", TOKEN + "x", "é"):
        r = client.post("/inspect/login", data={"token": wrong}, follow_redirects=False)
        root = page(r, 401)
        assert root.one(id="login-error").text == "That is not the token."
        assert "set-cookie" not in r.headers
    r = client.post(
        "/inspect/login", content=b'{"token": "x"}', headers={"Content-Type": "application/json"}
    )
    page(r, 415)
    r = client.post(
        "/inspect/login", data={"token": TOKEN}, headers={"Sec-Fetch-Site": "cross-site"}
    )
    page(r, 403)
    big = client.post("/inspect/login", data={"token": "x" * 5000})
    page(big, 413)


def test_a_session_expires_and_ends_when_the_token_changes() -> None:
    auth = Authenticator(token=TOKEN, secret=None, tolerance=300)
    access = inspector._Access(auth, timedelta(hours=1))
    fresh = access.session()
    assert access.session_ok(fresh)
    two_hours_ago = datetime.now(UTC) - timedelta(hours=2)
    with use_clock(lambda: two_hours_ago):
        old = access.session()
    assert not access.session_ok(old)
    expires, mac = fresh.split(".")[1:]
    later = str(int(expires) + 3600)
    assert not access.session_ok(f"v1.{later}.{mac}")  # the expiry is signed
    assert not access.session_ok(f"v1.{expires}.{mac[:-1]}{'0' if mac[-1] != '0' else '1'}")
    other = inspector._Access(Authenticator(token="new", secret=None, tolerance=300), access.ttl)
    assert not other.session_ok(fresh)
    with pytest.raises(ValueError):
        inspector._Access(auth, timedelta(0))


def test_with_only_a_secret_reads_are_signed_and_a_browser_is_told_why(engine: Engine) -> None:
    engine.start("ticket", "t-1", {"title": "a"})
    with TestClient(create_app(engine, secret=SECRET)) as c:
        root = page(c.get("/inspect"), 401)
        assert not root.all("input", id="token")
        assert "Serve it with a token" in root.text
        assert listed(page(c.get("/inspect", headers=sign(SECRET, "GET", "/inspect")))) == ["t-1"]
        page(c.post("/inspect/login", data={"token": "anything"}), 404)


def test_an_open_app_has_an_open_inspector_and_inspector_false_has_none(engine: Engine) -> None:
    engine.start("ticket", "t-1", {"title": "a"})
    with TestClient(create_app(engine, insecure=True)) as c:
        assert listed(page(c.get("/inspect"))) == ["t-1"]
    with TestClient(create_app(engine, token=TOKEN, inspector=False)) as c:
        r = c.get("/inspect", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"] == "NotFound"


def test_pages_allow_no_script_and_are_not_cached(client: TestClient) -> None:
    r = client.get("/inspect", headers=AUTH)
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert re.search(r"style-src 'sha256-[A-Za-z0-9+/=]+'", csp)
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-store"
    assert "<script" not in r.text.lower()


# --------------------------------------------------------------------------- the list


def _fill(engine: Engine) -> dict[str, str]:
    """23 tickets and 4 reviews; some tickets assigned or closed: id -> status."""
    for i in range(23):
        engine.start("ticket", f"t-{i:02d}", {"title": f"ticket {i}"})
    for i in range(4):
        engine.start("review", f"Review-{i}")
    for i in range(0, 23, 5):
        engine.send(f"t-{i:02d}", "assign", {"owner": "ann"})
        engine.send(f"t-{i:02d}", "close")
    engine.cancel("t-01")
    return {s.id: s.status for s in engine.list(limit=1000).items}


def _follow(client: TestClient, url: str) -> tuple[list[str], int]:
    """Every id listed from ``url`` on, following "Next page"; and how many pages."""
    ids: list[str] = []
    pages = 0
    while True:
        root = page(client.get(url, headers=AUTH))
        pages += 1
        ids += listed(root)
        nxt = root.all("a", id="next-page")
        if not nxt:
            return ids, pages
        url = nxt[0].attrs["href"]
        assert pages < 50


def test_the_list_filters_and_pages_in_id_order(any_engine: Engine) -> None:
    statuses = _fill(any_engine)
    everything = sorted(statuses)
    with TestClient(create_app(any_engine, token=TOKEN)) as c:
        ids, pages = _follow(c, "/inspect?limit=5")
        assert ids == everything and pages == 6
        assert listed(page(c.get("/inspect", headers=AUTH))) == everything[:20]  # default 20
        ids, _ = _follow(c, "/inspect?workflow=review&limit=3")
        assert ids == [f"Review-{i}" for i in range(4)]
        finished = sorted(i for i, s in statuses.items() if s == "finished")
        assert _follow(c, "/inspect?status=finished")[0] == finished
        assert _follow(c, "/inspect?status=cancelled&workflow=ticket")[0] == ["t-01"]
        assert _follow(c, "/inspect?workflow=review&status=finished")[0] == []
        assert _follow(c, "/inspect?workflow=unregistered")[0] == []
        # Text search: in the id, case-insensitive, paged like the rest.
        assert _follow(c, "/inspect?q=REVIEW")[0] == [f"Review-{i}" for i in range(4)]
        ones = sorted(i for i in everything if "1" in i)
        assert _follow(c, "/inspect?q=1&limit=2")[0] == ones
        assert _follow(c, "/inspect?q=1&status=waiting")[0] == [
            i for i in ones if statuses[i] == "waiting"
        ]
        # The form shows what is filtered; the first-page link drops the cursor.
        root = page(c.get("/inspect?limit=5&after=t-04&status=waiting&q=t-", headers=AUTH))
        assert root.one("select", id="f-status").one("option", selected="").text == "waiting"
        assert root.one("input", id="f-q").attrs["value"] == "t-"
        first = parse_qs(urlsplit(root.one("a", id="first-page").attrs["href"]).query)
        assert first == {"status": ["waiting"], "q": ["t-"], "limit": ["5"]}


def test_a_search_reads_a_bounded_number_of_instances_per_page(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(30):
        engine.start("ticket", f"t-{i:02d}", {"title": "x"})
    monkeypatch.setattr(inspector, "SCAN_BATCH", 4)
    monkeypatch.setattr(inspector, "SCAN_BUDGET", 8)
    calls: list[int] = []
    real = engine.list

    def counting(**kw: Any) -> Any:
        calls.append(kw["limit"])
        return real(**kw)

    monkeypatch.setattr(engine, "list", counting)
    with TestClient(create_app(engine, token=TOKEN)) as c:
        root = page(c.get("/inspect?q=9", headers=AUTH))
        assert listed(root) == []  # t-00 .. t-07 read, none matches
        assert calls == [4, 4]  # 8 read, then the page ends with "more may match"
        assert root.one("a", id="next-page").attrs["href"] == "/inspect?q=9&after=t-07"
        assert "more may match further on" in root.one("p", "count").text
        calls.clear()
        ids, _ = _follow(c, "/inspect?q=9")
    assert ids == ["t-09", "t-19", "t-29"]


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=501",
        "limit=abc",
        "limit=-1",
        "limit=1.5",
        "status=bogus",
        "status=WAITING",
        "q=" + "x" * 201,
        "workflow=" + "w" * 201,
        "workflow=a%00b",
        "after=%0a",
        "after=" + "a" * 201,
    ],
)
def test_bad_filters_and_paging_are_422_pages(
    client: TestClient, engine: Engine, query: str
) -> None:
    engine.start("ticket", "t-1", {"title": "a"})
    with untouched(engine, "t-1"):
        root = page(client.get(f"/inspect?{query}", headers=AUTH), 422)
    assert root.one(id="error-detail").text


_QUERY_TEXT = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["", "waiting", "20", "0", "-1", "ticket", "t-1", "%00", "x" * 201]
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    params=st.dictionaries(
        st.sampled_from(["workflow", "status", "q", "after", "limit", "other"]), _QUERY_TEXT
    )
)
def test_no_query_string_makes_the_list_fail(
    client: TestClient, engine: Engine, params: dict[str, str]
) -> None:
    if not stored_ids(engine):
        engine.start("ticket", "t-1", {"title": "a"})
    with untouched(engine, "t-1"):
        r = client.get("/inspect", params=params, headers=AUTH)
    assert r.status_code in (200, 422), r.text
    page(r, r.status_code)


def test_a_store_that_is_down_is_a_503_page(
    client: TestClient, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(**_kw: Any) -> Any:
        raise StoreUnavailable("the database is restarting")

    monkeypatch.setattr(engine, "list", down)
    r = client.get("/inspect", headers=AUTH)
    assert "the database is restarting" in page(r, 503).one(id="error-detail").text
    assert r.headers["retry-after"] == "1"


# --------------------------------------------------------------------------- one instance


def test_the_instance_page_shows_cursor_data_events_wakeup_and_history(
    client: TestClient, engine: Engine
) -> None:
    r = client.put("/workflows/ticket/t-1", json={"title": "printer on fire"}, headers=AUTH)
    assert r.status_code == 201
    root = page(client.get("/inspect/instances/t-1", headers=AUTH))
    assert root.one("span", "id").text == "t-1"
    assert cursors(root) == {"triage"}
    triage = root.one(id="diagram").one(cls="node", data_name="triage")
    assert "[_main_] waiting: assign, remind" in triage.text
    assert root.one(id="diagram").one(cls="node", data_name="open").classes == {"node", "k-step"}
    # Awaited events: assign with its input's fields, remind with its due time.
    rows = {row.attrs["data-event"]: row for row in root.all("tr", "awaited")}
    assert set(rows) == {"assign", "remind"}
    fields = [li.text for li in rows["assign"].all("li")]
    assert fields == ["owner * : string", "note : string"]  # * required
    assert '"title": "Assign"' in rows["assign"].one("pre").text  # the whole JSON schema
    assert "no input" in rows["remind"].text and "in 2h" in rows["remind"].text
    due = engine.get("t-1").next_wakeup
    assert due is not None
    assert due.strftime("%Y-%m-%d %H:%M:%S UTC") in root.one(id="next-wakeup").text
    assert '"title": "printer on fire"' in root.one("pre", id="data").text
    history = root.one("table", id="history").all("tr", "entry")
    assert [e.all("td")[1].text for e in history] == ["started", "step"]
    assert history[0].all("td")[7].text == "http:token"  # who started it

    client.post("/workflows/t-1/events/assign", json={"owner": "ann"}, headers=AUTH)
    root = page(client.get("/inspect/instances/t-1", headers=AUTH))
    assert cursors(root) == {"work"}
    event = root.one("table", id="history").all("tr", "entry")[-1]
    assert event.all("td")[1].text == "event" and event.all("td")[2].text == "assign"
    assert '{"owner": "ann", "note": ""}' in event.text or '{"owner": "ann"}' in event.text

    client.post("/workflows/t-1/events/close", headers=AUTH)
    root = page(client.get("/inspect/instances/t-1", headers=AUTH))
    assert root.one(id="status").text == "finished"
    assert cursors(root) == {"end"}
    assert "none scheduled" in root.one(id="next-wakeup").text


def test_cursors_in_parallel_branches_dag_nodes_and_threads_are_highlighted(
    client: TestClient, engine: Engine
) -> None:
    engine.start("review", "r-1")

    def look() -> El:
        return page(client.get("/inspect/instances/r-1", headers=AUTH))

    root = look()
    assert cursors(root) == {"checks", "legal ok", "finance ok"}
    join = root.one(id="diagram").one(cls="node", data_name="checks")
    assert join.attrs["data-kind"] == "join" and "2 branches running" in join.text
    engine.send("r-1", "legal")
    assert cursors(look()) == {"checks", "finance ok"}
    engine.send("r-1", "finance")
    root = look()
    assert cursors(root) == {"build", "qa"}
    dag = root.one(id="diagram")
    assert "done" in dag.one(cls="title", data_node="compile").classes
    assert dag.one(cls="title", data_node="package").classes == {"title"}
    assert "after compile, approval" in dag.one(cls="title", data_node="package").text
    engine.send("r-1", "qa")
    root = look()
    assert cursors(root) == {"audit log", "sign off"}
    kinds = {n.attrs["data-kind"] for n in root.one(id="diagram").all(cls="node")}
    assert kinds >= {"start", "end", "step", "select", "fork", "join", "for", "go"}


def test_an_unknown_or_impossible_id_is_a_404_page(client: TestClient) -> None:
    root = page(client.get("/inspect/instances/nope", headers=AUTH), 404)
    assert "no workflow with id 'nope'" in root.one(id="error-detail").text
    r = client.get("/inspect/instances/%3Cscript%3Ealert(1)%3C%2Fscript%3E", headers=AUTH)
    page(r, 404)
    assert "<script" not in r.text.lower() and "&lt;script&gt;" in r.text
    page(client.get("/inspect/instances/" + "a" * 300, headers=AUTH), 404)
    page(client.get("/inspect/nothing/here", headers=AUTH), 404)


def test_every_string_from_the_store_or_the_request_is_escaped(
    client: TestClient, engine: Engine
) -> None:
    engine.start("ticket", "t-1", {"title": XSS})
    engine.send("t-1", "assign", {"owner": '"><img src=x onerror=alert(1)>', "note": XSS})
    # A record written straight to the store: its id and workflow name are HTML.
    engine.store.create("<b>x</b>", "<i>wf</i>", "waiting", b"blob", None)
    r = client.get(f"/inspect?q=%3Cb%3E&workflow={XSS}", headers=AUTH)
    root = page(r)
    assert "<script" not in r.text.lower() and "<b>" not in r.text and "<i>" not in r.text
    assert root.one("input", id="f-q").attrs["value"] == "<b>"  # shown as typed, as text
    r = client.get("/inspect?q=%3Cb%3E", headers=AUTH)
    root = page(r)
    assert listed(root) == ["<b>x</b>"]
    assert "&lt;b&gt;x&lt;/b&gt;" in r.text and "&lt;i&gt;wf&lt;/i&gt;" in r.text
    assert root.one("a", "instance-link").attrs["href"] == "/inspect/instances/%3Cb%3Ex%3C%2Fb%3E"
    r = client.get("/inspect/instances/t-1", headers=AUTH)
    root = page(r)
    assert "<script" not in r.text.lower() and "<img" not in r.text.lower()
    assert XSS in root.one("pre", id="data").text  # shown as text
    assert "onerror=alert(1)" in root.one("table", id="history").text


def test_a_record_that_does_not_load_is_shown_as_far_as_it_can_be(
    client: TestClient, engine: Engine
) -> None:
    engine.store.create("bad-1", "ticket", "waiting", b"\x00not a blob", None)
    engine.store.create("ghost-1", "ghost", "waiting", b"whatever", None)
    root = page(client.get("/inspect/instances/bad-1", headers=AUTH))
    assert "The stored state does not load" in " ".join(p.text for p in root.all("p", "problem"))
    assert "No diagram" in root.text
    root = page(client.get("/inspect/instances/ghost-1", headers=AUTH))
    assert "'ghost' is not registered" in root.text
    assert listed(page(client.get("/inspect", headers=AUTH))) == ["bad-1", "ghost-1"]


def test_a_definition_that_fails_leaves_the_rest_of_the_page(engine: Engine) -> None:
    class Broken(gorch.Workflow):
        def definition(self) -> gorch.Section:
            raise RuntimeError("definition broke")

    engine.start("ticket", "t-1", {"title": "a"})
    broken = Engine(engine.store, {"ticket": Broken})  # a deploy whose definition fails
    with TestClient(create_app(broken, token=TOKEN)) as c:
        root = page(c.get("/inspect/instances/t-1", headers=AUTH))
    assert "No diagram: DefinitionError" in root.text and "definition broke" in root.text
    history = root.one("table", id="history").all("tr", "entry")
    assert [e.all("td")[1].text for e in history] == ["started", "step"]


def test_the_inspector_serves_an_async_engine(tmp_path: Path) -> None:
    engine = gorch.AsyncEngine(f"sqlite:///{tmp_path / 'a.db'}", WORKFLOWS)

    async def fill() -> None:
        await engine.start("ticket", "t-1", {"title": "async"}, by="ann")
        await engine.start("review", "r-1")
        await engine.send("t-1", "assign", {"owner": "bob"})

    asyncio.run(fill())
    try:
        with TestClient(create_app(engine, token=TOKEN)) as c:
            assert listed(page(c.get("/inspect", headers=AUTH))) == ["r-1", "t-1"]
            assert listed(page(c.get("/inspect?status=waiting&q=T", headers=AUTH))) == ["t-1"]
            root = page(c.get("/inspect/instances/t-1", headers=AUTH))
            assert cursors(root) == {"work"}
            first = root.one("table", id="history").all("tr", "entry")[0]
            assert first.all("td")[7].text == "ann"
            assert cursors(page(c.get("/inspect/instances/r-1", headers=AUTH))) == {
                "checks",
                "legal ok",
                "finance ok",
            }
            page(c.get("/inspect/instances/nope", headers=AUTH), 404)
    finally:
        asyncio.run(engine.close())


def test_the_inspector_is_served_under_a_mount_prefix(engine: Engine) -> None:
    from fastapi import FastAPI

    engine.start("ticket", "t-1", {"title": "a"})
    parent = FastAPI()
    parent.mount("/ops", create_app(engine, token=TOKEN))
    with TestClient(parent) as c:
        root = page(c.get("/ops/inspect", headers=AUTH))
        assert root.one("a", "instance-link").attrs["href"] == "/ops/inspect/instances/t-1"
        r = c.post("/ops/inspect/login", data={"token": TOKEN}, follow_redirects=False)
        assert r.headers["location"] == "/ops/inspect"
        assert "Path=/ops/inspect" in r.headers["set-cookie"]


def test_an_application_adds_the_inspector_next_to_the_router(engine: Engine) -> None:
    from fastapi import FastAPI

    from gorch.http import create_router

    engine.start("ticket", "t-1", {"title": "a"})
    app = FastAPI()
    app.include_router(create_router(engine, token=TOKEN))
    app.include_router(inspector.create_inspector(engine, token=TOKEN, session_ttl=60))
    with TestClient(app) as c:
        page(c.get("/inspect"), 401)
        assert listed(page(c.get("/inspect", headers=AUTH))) == ["t-1"]
        r = c.post("/inspect/login", data={"token": TOKEN}, follow_redirects=False)
        assert "Max-Age=60" in r.headers["set-cookie"]
