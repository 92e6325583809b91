"""The console web app (aiohttp): pages, a JSON read API, server-sent events and the feedback action.

One app on one port. ``GET /`` serves the single page (plain HTML/CSS/JS from ``static/``, no build step);
it reads ``/api/*`` and listens on ``/events`` (text/event-stream: one event per record the console
applied, plus a ``stats`` event every 2 s), so every page updates live. Each SSE client has a bounded queue;
a client that falls behind loses its oldest events (counted) and is told to reload the views. Live clients
are capped, anonymous ones separately, so clients without the token cannot take every slot.

Reads need no token, except frame images, heat maps (``?token=`` accepted) and the onboarding runner's output
(left out of ``/api/onboarding`` without it; issue #26 item 7). Every action needs ``Authorization: Bearer <console_token>`` (stream/console/auth.py;
without a configured token it answers 403): ``POST /api/defects/{frame_id}/feedback`` (operator verdict),
``POST /api/onboarding/{product}/select`` (capture these candidate frames) and
``POST /api/onboarding/{product}/onboard`` (run ``linewatch onboard``: stream/console/onboarding.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from importlib.resources import files
from typing import Any

import orjson
from aiohttp import web

from contracts.config import Settings
from contracts.detectors import detector_info, detector_names
from contracts.logs import get_logger
from stream.console.auth import check_bearer
from stream.console.feedback import Feedback, FeedbackError, parse_request
from stream.console.hub import Hub
from stream.console.images import heatmap_overlay
from stream.console.metrics import ConsoleMetrics
from stream.console.onboarding import OnboardRunner, RunnerRefused
from stream.console.sources import ConsoleSources
from stream.console.state import ConsoleState, Filters

log = get_logger("stream.console")

STATIC = {"console.css": "text/css", "console.js": "text/javascript", "pages.js": "text/javascript",
          "onboarding.js": "text/javascript"}
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
STATE_KEY = web.AppKey("state", ConsoleState)
SOURCES_KEY = web.AppKey("sources", ConsoleSources)
HUB_KEY = web.AppKey("hub", Hub)
SETTINGS_KEY = web.AppKey("settings", Settings)
STATS_KEY = web.AppKey("stats_task", asyncio.Task)
METRICS_KEY = web.AppKey("metrics", ConsoleMetrics)
RUNNER_KEY = web.AppKey("onboard_runner", OnboardRunner)
MAX_SELECT = 200  # frame ids one capture selection carries at most


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    resp = _json({"error": message}, status)
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="linewatch-console"'
    return resp


@web.middleware
async def _headers(request: web.Request, handler):
    try:
        resp = await handler(request)
    except web.HTTPException as e:
        resp = e
    resp.headers.setdefault("Content-Security-Policy", CSP)
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Referrer-Policy", "no-referrer")
    resp.headers.setdefault("X-Frame-Options", "DENY")
    if request.path.startswith("/api/"):
        resp.headers.setdefault("Cache-Control", "no-store")
    if isinstance(resp, web.HTTPException):
        raise resp
    return resp


def _asset(name: str) -> bytes:
    return files("stream.console").joinpath("static", name).read_bytes()


async def index(request: web.Request) -> web.Response:
    return web.Response(body=_asset("index.html"), content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    return web.Response(body=_asset(name), content_type=STATIC[name], charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


async def api_config(request: web.Request) -> web.Response:
    s = request.app[SETTINGS_KEY]
    src = request.app[SOURCES_KEY]
    return _json({"actions_enabled": s.console_token is not None,
                  "actions_note": None if s.console_token is not None else
                  "read-only: no console token configured (LINEWATCH_CONSOLE_TOKEN), actions are disabled",
                  "topics": src.topics.__dict__, "replay": s.console_replay, "max_defects": s.console_max_defects,
                  "onboard_runner": s.console_onboard_runner, "detectors": detector_names(),
                  "max_cameras": request.app[STATE_KEY].max_cameras,
                  "multi_task_detectors": [d for d in detector_names() if detector_info(d).multi_task]})


async def api_cameras(request: web.Request) -> web.Response:
    st, src = request.app[STATE_KEY], request.app[SOURCES_KEY]
    tiles = st.camera_tiles()
    for t in tiles:
        t["has_frame"] = t.get("frame_id") in src.frames or t.get("frame_id") in st.defects
    return _json({"cameras": tiles})


async def api_defects(request: web.Request) -> web.Response:
    try:
        f = Filters.from_query(dict(request.query))
    except ValueError as e:
        return _error(400, str(e))
    return _json(request.app[STATE_KEY].defect_list(f))


async def api_defect(request: web.Request) -> web.Response:
    d = request.app[STATE_KEY].defect_detail(request.match_info["frame_id"])
    return _json(d) if d is not None else _error(404, "no such defect event in this console's buffer")


async def api_drift(request: web.Request) -> web.Response:
    return _json({"alerts": request.app[STATE_KEY].drift_list()})


async def api_models(request: web.Request) -> web.Response:
    return _json(request.app[STATE_KEY].models_view())


async def api_throughput(request: web.Request) -> web.Response:
    return _json(request.app[STATE_KEY].throughput())


async def healthz(request: web.Request) -> web.Response:
    h = request.app[SOURCES_KEY].health()
    return _json({"ok": not h["failed"], **h}, 200 if not h["failed"] else 503)


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS_KEY]
    m.sse_clients.set(len(request.app[HUB_KEY].clients))
    body, ctype = m.render()
    return web.Response(body=body, headers={"Content-Type": ctype})


async def img_frame(request: web.Request) -> web.Response:
    if (refused := _refused(request, query=True)) is not None:  # a frame is the plant's image: token holders only
        return refused
    jpg = await request.app[SOURCES_KEY].frame_thumbnail(request.match_info["frame_id"])
    if jpg is None:
        raise web.HTTPNotFound(text="frame not in this console's buffer")
    return web.Response(body=jpg, content_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


async def img_heatmap(request: web.Request) -> web.Response:
    if (refused := _refused(request, query=True)) is not None:
        return refused
    rec = request.app[STATE_KEY].defects.get(request.match_info["frame_id"])
    png = None if rec is None else heatmap_overlay(rec.heatmap_b64, map_threshold=rec.summary["map_threshold"],
                                                   heatmap_scale=rec.summary["heatmap_scale"])
    if png is None:
        raise web.HTTPNotFound(text="no heat map for this frame")
    return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def _decision(request: web.Request, query: bool = False):
    """The request's console token checked (``query``: it may come as ``?token=`` too: an ``<img>`` cannot set
    headers; the console keeps no access log)."""
    s = request.app[SETTINGS_KEY]
    token = s.console_token.get_secret_value() if s.console_token is not None else None
    header = request.headers.get("Authorization")
    if header is None and query and request.query.get("token"):
        header = "Bearer " + request.query["token"]
    return check_bearer(header, token)


def _refused(request: web.Request, query: bool = False) -> web.Response | None:
    """None when the request carries the console token; else the 401/403 to answer (logged)."""
    decision = _decision(request, query)
    if decision.allowed:
        return None
    log.warning("console_action_refused", status=decision.status, path=request.path, peer=request.remote)
    return _error(decision.status, decision.message)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        d = await request.json(loads=orjson.loads)
    except ValueError:
        raise ValueError("the request body must be a JSON object") from None
    if not isinstance(d, dict):
        raise ValueError("the request body must be a JSON object")
    return d


async def api_onboarding(request: web.Request) -> web.Response:
    st = request.app[STATE_KEY]
    products = [{**p, "serving": st.serving.get(p["product"])} for p in st.onboarding.view(request.app[RUNNER_KEY])]
    if not _decision(request).allowed:  # the runner's output (paths, errors, the plant's data) is for token holders
        products = [{**p, "runner": {k: v for k, v in p["runner"].items() if k not in ("output", "progress")}}
                    if p.get("runner") else p for p in products]
    return _json({"products": products,
                  "runner": request.app[SETTINGS_KEY].console_onboard_runner,
                  "running": request.app[RUNNER_KEY].running()})


async def post_capture_select(request: web.Request) -> web.Response:
    if (refused := _refused(request)) is not None:
        return refused
    product = request.match_info["product"]
    try:
        ids = (await _body(request)).get("frame_ids")
        if (not isinstance(ids, list) or not ids or len(ids) > MAX_SELECT
                or not all(isinstance(i, str) and 0 < len(i) <= 256 for i in ids)):
            raise ValueError(f"frame_ids must be a list of 1..{MAX_SELECT} frame ids")
        ev = await request.app[SOURCES_KEY].send_capture_select(product, list(dict.fromkeys(ids)))
    except ValueError as e:  # includes a product that is no safe name (OnboardEventError)
        return _error(400, str(e))
    except Exception as e:  # the broker refused or is away: nothing was selected
        log.error("console_capture_select_failed", error=f"{type(e).__name__}: {e}"[:300])
        return _error(503, f"selection not recorded: {type(e).__name__}")
    request.app[STATE_KEY].apply_onboard_event(ev)
    return _json({"product": product, "selected": ev.detail["frame_ids"], "event_id": ev.event_id}, 201)


async def post_onboard(request: web.Request) -> web.Response:
    if (refused := _refused(request)) is not None:
        return refused
    multi = [d for d in detector_names() if detector_info(d).multi_task]
    try:
        detector = (await _body(request)).get("detector") or (multi[0] if multi else detector_names()[0])
        status = await request.app[RUNNER_KEY].start(request.match_info["product"], str(detector))
    except ValueError as e:
        return _error(400, str(e))
    except RunnerRefused as e:
        return _error(e.status, str(e))
    return _json(status, 202)


async def post_feedback(request: web.Request) -> web.Response:
    if (refused := _refused(request)) is not None:
        return refused
    st = request.app[STATE_KEY]
    rec = st.defects.get(request.match_info["frame_id"])
    if rec is None:
        return _error(404, "no such defect event in this console's buffer")
    try:
        verdict, note = parse_request(await request.json(loads=orjson.loads))
    except (ValueError, FeedbackError) as e:
        return _error(400, str(e))
    d = rec.summary
    try:
        fb = Feedback(frame_id=d["frame_id"], verdict=verdict, product=d.get("product") or "unknown",
                      camera=d["camera"], model=d["model"], model_version=str(d["version"]), score=d["score"],
                      threshold=d["threshold"], line=d.get("line"), ts_ms=d.get("ts_ms") or 0, note=note)
        await request.app[SOURCES_KEY].send_feedback(fb)
    except FeedbackError as e:
        return _error(400, str(e))
    except Exception as e:  # the broker refused or is away: nothing was recorded
        log.error("console_feedback_failed", error=f"{type(e).__name__}: {e}"[:300])
        return _error(503, f"feedback not recorded: {type(e).__name__}")
    return _json(fb.to_dict(), 201)


async def events(request: web.Request) -> web.StreamResponse:
    """Live updates. The console token (``Authorization: Bearer`` or ``?token=``: a browser's EventSource
    cannot set headers; the console keeps no access log) reaches the slots kept for token holders."""
    hub, token = request.app[HUB_KEY], request.app[SETTINGS_KEY].console_token
    given = request.query.get("token")
    header = f"Bearer {given}" if given is not None else request.headers.get("Authorization")
    holder = False
    if header is not None and token is not None:
        d = check_bearer(header, token.get_secret_value())
        if not d.allowed:
            return _error(d.status, d.message)
        holder = True
    why = hub.refusal(holder)
    if why is not None:
        return _error(503, why)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    client = hub.connect(holder)
    try:
        await resp.write(b"retry: 2000\nevent: hello\ndata: {}\n\n")
        while True:
            try:
                msg = await asyncio.wait_for(client.queue.get(), timeout=15.0)
            except TimeoutError:
                msg = b": ping\n\n"
            if msg is None:  # closed by the app
                break
            if client.dropped > client.reported:  # it fell behind: its page reloads the views
                msg = b"event: hello\ndata: " + orjson.dumps({"dropped": client.dropped}) + b"\n\n" + msg
                client.reported = client.dropped
            await resp.write(msg)
    except ConnectionResetError:  # the browser went away
        pass
    finally:
        hub.clients.discard(client)
    return resp


async def _stats_loop(app: web.Application) -> None:
    while True:
        await asyncio.sleep(2.0)
        app[HUB_KEY].publish("stats", app[STATE_KEY].throughput())


def build_app(settings: Settings, bootstrap: str, *, state: ConsoleState | None = None,
              connect: bool = True) -> web.Application:
    """The console app; its Kafka tails start with the app (``on_startup``) and stop with it (``connect=False``:
    no Kafka at all, the views serve ``state`` as it is)."""
    app = web.Application(middlewares=[_headers], client_max_size=16 * 1024)
    m = ConsoleMetrics()
    hub = Hub(m)
    st = state or ConsoleState(max_defects=settings.console_max_defects)

    def changed(kind: str, payload: dict[str, Any]) -> None:
        m.observe(kind, payload)
        hub.publish(kind, payload)

    st.on_change = changed
    app[SETTINGS_KEY], app[STATE_KEY], app[HUB_KEY], app[METRICS_KEY] = settings, st, hub, m
    app[SOURCES_KEY] = ConsoleSources(settings, bootstrap, st)
    app[RUNNER_KEY] = OnboardRunner(settings, bootstrap, changed)

    async def startup(app: web.Application) -> None:
        if connect:
            await app[SOURCES_KEY].start()
        app[STATS_KEY] = asyncio.ensure_future(_stats_loop(app))

    async def shutdown(app: web.Application) -> None:  # end the event streams, or the server waits for them
        for c in list(hub.clients):
            hub.close(c)

    async def cleanup(app: web.Application) -> None:
        await app[RUNNER_KEY].stop()
        app[STATS_KEY].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await app[STATS_KEY]
        if connect:
            await app[SOURCES_KEY].stop()

    app.on_startup.append(startup)
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)
    r = app.router
    r.add_get("/", index)
    r.add_get("/static/{name}", static)
    r.add_get("/api/config", api_config)
    r.add_get("/api/cameras", api_cameras)
    r.add_get("/api/defects", api_defects)
    r.add_get("/api/defects/{frame_id}", api_defect)
    r.add_post("/api/defects/{frame_id}/feedback", post_feedback)
    r.add_get("/api/onboarding", api_onboarding)
    r.add_post("/api/onboarding/{product}/select", post_capture_select)
    r.add_post("/api/onboarding/{product}/onboard", post_onboard)
    r.add_get("/api/drift", api_drift)
    r.add_get("/api/models", api_models)
    r.add_get("/api/throughput", api_throughput)
    r.add_get("/events", events)
    r.add_get("/healthz", healthz)
    r.add_get("/metrics", metrics)
    r.add_get("/img/frame/{frame_id}.jpg", img_frame)
    r.add_get("/img/heatmap/{frame_id}.png", img_heatmap)
    return app
