"""``appliance review``: the morning review of a dataset in a browser, served from the box.

Flask (routing, Jinja2 templates that escape every value, static files) behind waitress (a
production WSGI server in pure Python: no compiled parts to build for the box, threads for
images loading in parallel). The page and its script and style ship in this package; nothing
is fetched from anywhere else.

Security, for a server on a shop-floor network:
- it binds 127.0.0.1 unless told otherwise (``allow_remote``);
- every request needs the random token printed at start: the URL carries it once, the server
  answers with an HttpOnly, SameSite=Strict cookie and a redirect that drops it from the URL;
- a request that changes anything is a JSON POST with the page's CSRF token in a header;
- files are served by item id from the job store's rows, never by a path from the request;
- the only writes are review decisions into the store, and exports into the one folder named
  on the command line.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import re
import secrets
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from flask import Flask, abort, jsonify, make_response, redirect, render_template, request, send_file
from PIL import Image
from werkzeug.exceptions import HTTPException

from appliance.dataset.export import ExportError, export_reviewed
from appliance.imaging import WORKING_PNG_LEVEL
from appliance.review.items import NotFound, Query, detail, facets, file_of, load_items, select
from appliance.storage import JobStore
from appliance.storage.reviews import REASONS, ReviewError, ReviewLog

THUMB_SIZE = 320
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")


@dataclass
class ReviewSettings:
    dataset: Path
    token: str
    reviewer: str
    export_to: Path | None = None  # where the page's export button writes; None: no button
    allow_remote: bool = False


@lru_cache(maxsize=512)
def _thumbnail(path: str, mtime_ns: int) -> bytes:
    with Image.open(path) as image:
        image.thumbnail((THUMB_SIZE, THUMB_SIZE))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG", compress_level=WORKING_PNG_LEVEL)
    return buffer.getvalue()


def create_app(settings: ReviewSettings) -> Flask:
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=1 << 20, JSON_SORT_KEYS=False)
    store = JobStore(settings.dataset)
    lock = threading.Lock()  # one SQLite connection, used by waitress's threads in turn
    csrf = secrets.token_urlsafe(24)

    def cookie_name() -> str:
        # Cookies ignore the port: two review servers on one host must not share one.
        return f"appliance_review_{request.environ.get('SERVER_PORT', '')}"

    def authorised() -> bool:
        return _same(request.cookies.get(cookie_name(), ""), settings.token)

    @app.before_request
    def guard():
        if not settings.allow_remote and not _loopback_host(request.host):
            abort(400, "this server answers on its loopback name only")  # DNS rebinding
        given = request.args.get("token")
        if given is not None and request.method == "GET":
            if not _same(given, settings.token):
                abort(403, "wrong token: open the URL that `appliance review` printed")
            response = redirect(request.path)
            response.set_cookie(cookie_name(), settings.token, httponly=True,
                                samesite="Strict", path="/")
            return response
        if not authorised():
            abort(403, "no token: open the URL that `appliance review` printed")
        if request.method == "POST":
            if not _same(request.headers.get("X-CSRF-Token", ""), csrf):
                abort(403, "missing or wrong CSRF token: reload the page")
            if not request.is_json:
                abort(415, "send JSON")
        elif request.method not in ("GET", "HEAD"):
            abort(405)

    @app.after_request
    def headers(response):
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        if request.path.startswith("/api/"):
            return jsonify(error=error.description or error.name), error.code
        return make_response(f"{error.code} {error.name}: {error.description}\n", error.code,
                             {"Content-Type": "text/plain; charset=utf-8"})

    @app.get("/")
    def index():
        return render_template("review.html", csrf=csrf, boot={
            "reviewer": settings.reviewer, "reasons": list(REASONS),
            "dataset": str(settings.dataset), "can_export": settings.export_to is not None,
            "export_to": str(settings.export_to) if settings.export_to else None})

    @app.get("/api/items")
    def items():
        query = Query.from_args(request.args)
        with lock:
            everything = load_items(store)
            page, total = select(everything, query)
            offered = facets(everything, store)
            counts = ReviewLog(store).counts().as_dict()
        return jsonify(items=page, total=total, page=query.page, per_page=query.per_page,
                       facets=offered, counts=counts)

    @app.get("/api/items/<item_id>")
    def item(item_id: str):
        try:
            with lock:
                return jsonify(detail(store, item_id))
        except NotFound:
            abort(404, "no such item")

    @app.post("/api/reviews")
    def review():
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("ids"), list):
            abort(400, "expected {ids: [...], decision, reason, reviewer}")
        try:
            ids = [_sample_id(i) for i in body["ids"]]
            with lock:
                n = ReviewLog(store).decide(ids, str(body.get("decision", "")),
                                            str(body.get("reviewer") or settings.reviewer),
                                            body.get("reason") and str(body["reason"]))
                counts = ReviewLog(store).counts().as_dict()
        except (ReviewError, NotFound) as exc:
            abort(400, str(exc))
        return jsonify(recorded=n, counts=counts)

    @app.post("/api/export")
    def export():
        if settings.export_to is None:
            abort(404, "start `appliance review --export-to DIR` to export from the page")
        body = request.get_json(silent=True) or {}
        target = settings.export_to / time.strftime("export-%Y%m%d-%H%M%S")
        try:  # its own store connection: the page keeps answering while it copies
            report = export_reviewed(settings.dataset, target,
                                     approved_only=bool(body.get("approved_only", True)))
        except ExportError as exc:
            abort(409, str(exc))
        return jsonify(out=str(report.out), samples=report.samples, feedback=report.feedback,
                       left_out=report.left_out, lines=report.lines())

    @app.get("/file/<item_id>/<kind>")
    @app.get("/file/<item_id>/<kind>/<int:index>")
    def file(item_id: str, kind: str, index: int | None = None):
        thumb = request.args.get("thumb") == "1"
        try:
            with lock:
                path = file_of(store, item_id, kind, index)
        except NotFound:
            abort(404)
        if thumb:
            data = _thumbnail(str(path), path.stat().st_mtime_ns)
            response = send_file(io.BytesIO(data), mimetype="image/png")
        else:
            response = send_file(path, mimetype="image/png", conditional=True)
        response.headers["Cache-Control"] = "private, max-age=3600"
        return response

    app.extensions["appliance_store"] = store
    return app


def _same(given: str, secret: str) -> bool:
    """Constant-time comparison that also takes text that is not ASCII (and says no)."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), secret.encode("utf-8"))


def _loopback_host(host: str) -> bool:
    """Whether a Host header names this machine's loopback ("localhost", "127.0.0.1:8765",
    "[::1]:8765"): a page from another name reaching us is DNS rebinding."""
    name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    return is_loopback_name(name)


def is_loopback_name(name: str) -> bool:
    """"localhost" or a loopback address (127.0.0.0/8, ::1)."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _sample_id(value) -> int:
    """A sample's store id from an item id ("s12") or a bare number."""
    text = str(value)
    if text.startswith("s"):
        text = text[1:]
    if not re.fullmatch(r"[0-9]{1,18}", text):
        raise NotFound(f"{value!r} is not a sample")
    return int(text)


def new_token() -> str:
    return secrets.token_urlsafe(24)


def serve(settings: ReviewSettings, host: str, port: int, announce) -> None:
    """Serve until interrupted; ``announce(url)`` is called once the port is bound."""
    from waitress import create_server

    app = create_app(settings)
    # "localhost" may resolve to both ::1 and 127.0.0.1, and waitress then serves two sockets.
    host = "127.0.0.1" if host == "localhost" else host
    server = create_server(app, host=host, port=port, threads=4, ident="appliance-review")
    bound = server.effective_port
    shown = host if ":" not in host else f"[{host}]"
    if host in ("0.0.0.0", "::"):
        shown = "127.0.0.1"
    announce(f"http://{shown}:{bound}/?token={settings.token}")
    try:
        server.run()
    finally:
        server.close()
        app.extensions["appliance_store"].close()
