"""The explorer's web layer: a small FastAPI app serving one static page (no outside fonts, scripts or styles)
and JSON routes that call :class:`densevit.apps.explore.Explorer`. It only routes clicks and encodes results;
the page draws them. Needs the ``explore`` extra (``pip install "densevit[explore]"``).

Routes (settings = ``{layer, facet, bin, stride, load_size}``; coordinates in original-image pixels):
    GET  /                 the page          GET /api/state     model facts, defaults, images
    GET  /api/image/{i}    image i (JPEG)    GET /api/progress  what a running extraction is doing
    POST /api/prepare      extract for settings             POST /api/similarity  {settings, image, x, y, k}
    POST /api/attention    {settings, image, x, y, head, k} POST /api/saliency    {settings}
    POST /api/pca          {settings}                       POST /api/upload      multipart ``files``
    POST /api/save         {png (data URL), mode, settings, image, x, y, k, head}: PNG + JSON in the out folder
A user error answers 400 ``{"error": one line}``; the page shows it.

It answers only its own page: a request whose ``Host`` is not one the server is bound to (:func:`allowed_hosts`)
gets 400 (Starlette's TrustedHostMiddleware: no DNS rebinding), and a POST whose ``Origin`` (or, without one,
``Sec-Fetch-Site``) is not the server's own origin gets 403 (:class:`OriginCheck`: no other page can drive it).
The model work runs in one worker thread, queued (:class:`Worker`), so the event loop stays free.
"""
import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import errno
import io
import json
import math
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from densevit.errors import DensevitError
from densevit.upsample import UPSAMPLERS
from densevit.io.files import OutputWriteError, atomic_write_bytes, check_outputs

from .session import (
    DESCRIPTOR_FACETS,
    MAX_LOAD_SIZE,
    Explorer,
    ImageMap,
    Settings,
    encode_png,
)

STATIC = Path(__file__).resolve().parent / "static"
DISPLAY_SIDE = 1024  # images are sent to the page at most this large (the page scales them)
MAX_K = 100  # top-k matches per image
MAX_SAVE_BYTES = 64 << 20  # the largest view PNG Save writes
MAX_SAVE_PIXELS = 32_000_000  # the largest view PNG Save decodes (checked from its header first)
MAX_UPLOAD_MIB = 64  # bytes of one upload request, counted while it streams (densevit-explore --max-upload-mib)


def _b64_f32(values) -> str:
    return base64.b64encode(np.ascontiguousarray(values.detach().cpu().numpy(), dtype="<f4").tobytes()).decode()


def _match(m) -> Optional[Dict[str, Any]]:
    return None if m is None else {"token": m.token, "x": m.x, "y": m.y, "score": m.score}


def _map(m: ImageMap) -> Dict[str, Any]:
    v = m.values
    return {"image": m.image, "shape": list(m.grid.shape), "values": _b64_f32(v), "extent": list(m.extent),
            "min": float(v.min()), "max": float(v.max()), "topk": [_match(t) for t in m.topk],
            "best_buddy": _match(m.best_buddy)}


def _show(value: Any) -> str:
    """A value for a one-line message (repr, cut short)."""
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."


def _whole(value: Any, what: str, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """A whole number from JSON (an int, an integral finite float or a digit string) within ``lo..hi``."""
    n: Optional[int] = None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        n = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit() and len(value) < 20:
        n = int(value)
    if n is None:
        raise DensevitError(f"{what} must be a whole number, got {_show(value)}")
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        raise DensevitError(f"{what} must be from {lo} to {hi}, got {n}")
    return n


def _finite(value: Any, what: str) -> float:
    """A finite number from JSON (a number or a numeric string)."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        v = float(value)
    except (ValueError, OverflowError):
        v = math.nan
    if not math.isfinite(v):
        raise DensevitError(f"{what} must be a finite number, got {_show(value)}")
    return v


def _settings(ex: Explorer, d: Any) -> Settings:
    """Settings from the page (missing: the defaults; load size null or "original": the original size), checked
    by the explorer (facet, stride, layer and load size bounds)."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise DensevitError(f"settings must be an object, got {_show(d)}")
    given = lambda k: k in d and d[k] not in (None, "")  # noqa: E731
    kw: Dict[str, Any] = {}
    if given("layer"):
        kw["layer"] = _whole(d["layer"], "layer")
    if given("facet"):
        if not isinstance(d["facet"], str):
            raise DensevitError(f"facet must be a name, got {_show(d['facet'])}")
        kw["facet"] = d["facet"]
    if "bin" in d and d["bin"] is not None:
        if d["bin"] not in (True, False, 0, 1):
            raise DensevitError(f"bin must be true or false, got {_show(d['bin'])}")
        kw["bin"] = bool(d["bin"])
    if given("stride"):
        kw["stride"] = _whole(d["stride"], "stride")
    if "load_size" in d:
        v = d["load_size"]
        kw["load_size"] = None if v in (None, "", "original") else _whole(v, "load size")
    if "upsample" in d:
        v = d["upsample"]
        if v not in (None, "", "none") and not isinstance(v, str):
            raise DensevitError(f"upsample must be a method name, got {_show(v)}")
        kw["upsample"] = None if v in (None, "", "none") else v
    return ex.settings(**kw)


def _k(body: Dict[str, Any]) -> int:
    return _whole(body.get("k", 5), "top-k", 1, MAX_K)


def _point(ex: Explorer, body: Dict[str, Any]):
    """``(image, x, y)`` of a click: an image index and finite pixel coordinates."""
    if "image" not in body or "x" not in body or "y" not in body:
        raise DensevitError("a click needs an image index and x, y in pixels")
    return (_whole(body["image"], "image index", 0, max(0, len(ex.images) - 1)), _finite(body["x"], "x"),
            _finite(body["y"], "y"))


def _head(ex: Explorer, body: Dict[str, Any]) -> Optional[int]:
    """The attention head: None for the mean of heads (missing, empty or "mean"), else ``0..heads-1``."""
    head = body.get("head")
    if head in (None, "", "mean"):
        return None
    try:
        return _whole(head, "head", 0, ex.num_heads - 1)
    except DensevitError:
        raise DensevitError(f"head must be \"mean\" or a whole number from 0 to {ex.num_heads - 1}, "
                            f"got {_show(head)}") from None


def _png(data_url: Any) -> bytes:
    """The bytes of a ``data:image/png;base64,`` URL, checked to be a PNG that PIL decodes."""
    prefix = "data:image/png;base64,"
    if not isinstance(data_url, str) or not data_url.startswith(prefix):
        raise DensevitError("nothing to save: the view has no picture yet")
    if len(data_url) > 4 * MAX_SAVE_BYTES // 3 + len(prefix) + 4:
        raise DensevitError(f"the picture is too large to save (at most {MAX_SAVE_BYTES >> 20} MB)")
    try:
        data = base64.b64decode(data_url[len(prefix):], validate=True)
    except (binascii.Error, ValueError):
        raise DensevitError("the picture to save is not valid base64") from None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise DensevitError("the picture to save is not a PNG")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_SAVE_PIXELS:
                raise DensevitError(f"the picture to save is {im.width}x{im.height} pixels, more than the "
                                    f"{MAX_SAVE_PIXELS:,} a view has")
            im.load()
    except DensevitError:
        raise
    except Exception as exc:  # noqa: BLE001 (any decoding failure, decompression bombs included)
        raise DensevitError(f"the picture to save is not a readable PNG ({str(exc).splitlines()[0][:80]})") from None
    return data


async def read_uploads(request: Any, max_bytes: int) -> List[Any]:
    """``[(file name, bytes)]`` of a multipart upload (field ``files``), its size bounded WHILE it streams: a
    declared ``Content-Length`` past ``max_bytes`` is refused before reading, and the body stops being read (and
    the request is refused) as soon as ``max_bytes`` have arrived."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    too_large = DensevitError(f"the upload is more than {max_bytes >> 20} MiB (densevit-explore --max-upload-mib N "
                              f"raises the bound)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise DensevitError("an upload is a multipart/form-data request with one or more 'files'")

    async def limited():
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > max_bytes:
                raise too_large
            yield chunk

    try:
        form = await MultiPartParser(request.headers, limited(), max_files=1000, max_fields=100).parse()
    except MultiPartException as exc:
        raise DensevitError(f"bad upload: {exc.message}") from None
    try:
        files = [v for k, v in form.multi_items() if k == "files" and not isinstance(v, str)]
        if not files:
            raise DensevitError("bad request: files: Field required")
        return [(f.filename or "upload", await f.read()) for f in files]
    finally:
        await form.close()


def allowed_hosts(host: str, extra: Sequence[str] = ()) -> List[str]:
    """The ``Host`` names the server answers to when bound to ``host``: this machine's loopback names, the bound
    address, ``extra`` names, and for a wildcard bind (0.0.0.0, ::) this machine's name and addresses. Ports are
    not part of them (any port form of these names is accepted)."""
    def norm(h: str) -> str:
        h = h.strip().lower()
        return f"[{h}]" if ":" in h and not h.startswith("[") else h

    names = ["127.0.0.1", "localhost", "[::1]", norm(host)] + [norm(h) for h in extra]
    if host in ("", "0.0.0.0", "::"):
        import socket

        me = socket.gethostname()
        names += [norm(me), norm(socket.getfqdn())]
        try:
            names += [norm(str(a[4][0])) for a in socket.getaddrinfo(me, None)]
        except OSError:
            pass
    return list(dict.fromkeys(n for n in names if n and n not in ("0.0.0.0", "[::]")))


class OriginCheck:
    """ASGI middleware: a state-changing request (any method but GET, HEAD, OPTIONS) must come from the server's
    own page: its ``Origin`` is this server's origin (``http://`` + the ``Host`` it was sent to, which
    TrustedHostMiddleware has checked), or, without ``Origin``, ``Sec-Fetch-Site`` is ``same-origin``. The rest
    (other sites' pages, no-cors form posts, requests that show neither header) is refused with 403."""

    SAFE = frozenset({"GET", "HEAD", "OPTIONS"})

    def __init__(self, app) -> None:
        self.app = app

    @staticmethod
    def refusal(headers) -> Optional[str]:
        """Why a state-changing request with ``headers`` is refused, or None when it comes from the page."""
        host = (headers.get("host") or "").lower()
        origin = headers.get("origin")
        site = headers.get("sec-fetch-site")
        own = "only the explorer's own page may change it"
        if origin is not None and origin.lower() not in (f"http://{host}", f"https://{host}"):
            return f"a request from {origin[:80]!r} is refused: {own}"
        if site not in (None, "same-origin"):
            return f"a {site[:20]!r} request is refused: {own}"
        if origin is None and site is None:
            return f"refused: a request that changes the explorer needs the Origin of its page (http://{host})"
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] not in self.SAFE:
            from starlette.datastructures import Headers
            from starlette.responses import JSONResponse

            why = self.refusal(Headers(scope=scope))
            if why is not None:
                await JSONResponse({"error": why}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Stopping(Exception):
    """A request cancelled because the server is stopping (answered 503, never a traceback)."""


class Worker:
    """The explorer's one worker: a daemon thread that runs the model work (extraction, clicks, uploads, saves)
    one job at a time in arrival order. The event loop never waits for the model (``/api/progress`` and
    ``/api/state`` answer while work runs), and a stopping server never waits for it (daemon thread)."""

    def __init__(self) -> None:
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self.busy = False
        self._thread = threading.Thread(target=self._loop, name="densevit-explore worker", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Jobs waiting for the one running now."""
        return self._jobs.qsize()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():   # its request went away while it waited
                continue
            self.busy = True
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 (handed to the request)
                fut.set_exception(exc)
            finally:
                self.busy = False

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Queue ``fn(*args)`` and wait for its result without blocking the event loop; raises :class:`Stopping`
        when the server cancels the wait (it is stopping; a job not yet started is dropped)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fut, fn, args))
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            raise Stopping() from None

    def stop(self) -> None:
        """Let the thread end after the running job (never waited for)."""
        self._jobs.put(None)


def create_app(explorer: Explorer, out_dir: Path = Path("explore_out"), hosts: Optional[Sequence[str]] = None,
               inputs: Sequence[Union[str, Path]] = (), max_upload_bytes: int = MAX_UPLOAD_MIB << 20):
    """The FastAPI application serving ``explorer``; Save writes into ``out_dir``, never into ``inputs`` (the
    files and folders the explorer was started on) nor an image's file (:func:`densevit.io.files.check_outputs`,
    checked again at each Save; a failed write answers one line, and leaves no partial file). It answers only requests sent
    to one of ``hosts`` (default: ``allowed_hosts("127.0.0.1")``; any other ``Host`` gets 400, which stops DNS
    rebinding) and changes state only for requests from its own page (:class:`OriginCheck`, else 403). The model
    work runs in one :class:`Worker`, queued."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    ex = explorer
    worker = Worker()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()

    app = FastAPI(title="densevit explorer", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(OriginCheck)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(hosts or allowed_hosts("127.0.0.1")),
                       www_redirect=False)
    app.state.worker = worker

    @app.exception_handler(DensevitError)
    async def _user_error(request: Request, exc: DensevitError):
        return JSONResponse({"error": str(getattr(exc, "cli_message", exc))}, status_code=400)

    @app.exception_handler(OutputWriteError)
    async def _write_error(request: Request, exc: OutputWriteError):    # the server's disk, not the request
        return JSONResponse({"error": str(exc)}, status_code=507 if exc.errno == errno.ENOSPC else 500)

    @app.exception_handler(Stopping)
    async def _stopping(request: Request, exc: Stopping):
        return JSONResponse({"error": "the explorer is stopping"}, status_code=503)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        err = (exc.errors() or [{}])[0]
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        return JSONResponse({"error": f"bad request: {where + ': ' if where else ''}{err.get('msg', 'invalid')}"},
                            status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):  # never a dead page: the page shows it
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    def static(name: str):
        path = STATIC / name
        if name not in {p.name for p in STATIC.iterdir()}:
            return JSONResponse({"error": "not found"}, status_code=404)
        kind = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}.get(path.suffix, "text/plain")
        return FileResponse(path, media_type=kind)

    def images() -> List[Dict[str, Any]]:
        return [{"index": i, "name": im.name, "width": im.original_hw[1], "height": im.original_hw[0],
                 "note": im.note, "version": id(im)} for i, im in enumerate(list(ex.images))]

    @app.get("/api/state")
    async def state():
        return {"backbone": ex.backbone, "weights": None if ex.weights is None else Path(str(ex.weights)).name,
                "patch_size": ex.patch_size, "depth": ex.depth, "heads": ex.num_heads, "strides": ex.strides,
                "facets": list(DESCRIPTOR_FACETS), "upsamplers": list(UPSAMPLERS), "defaults": ex.defaults.as_dict(),
                "images": images(),
                "limits": {"load_size": [ex.patch_size, MAX_LOAD_SIZE], "tokens": ex.max_tokens, "k": [1, MAX_K]}}

    @app.get("/api/image/{index}")
    def image(index: int):
        items = list(ex.images)
        if not 0 <= index < len(items):
            raise DensevitError(f"no image {index}")
        img = items[index].image
        if max(img.size) > DISPLAY_SIDE:
            s = DISPLAY_SIDE / max(img.size)
            img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=92)
        return Response(buf.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.get("/api/progress")
    async def progress():
        return {**ex.progress, "queued": worker.queued}

    @app.post("/api/prepare")
    async def prepare(body: Dict[str, Any]):
        def job():
            s = _settings(ex, body.get("settings"))
            return {"seconds": ex.prepare(s, attention=bool(body.get("attention")))}
        return await worker.run(job)

    @app.post("/api/similarity")
    async def similarity(body: Dict[str, Any]):
        def job():
            s = _settings(ex, body.get("settings"))
            i, x, y = _point(ex, body)
            t0 = time.perf_counter()
            r = ex.similarity(i, x, y, s, k=_k(body))
            return {"mode": "similarity", "source": r.source, "clicked": _match(r.clicked),
                    "settings": r.settings.as_dict(), "maps": [_map(m) for m in r.maps],
                    "compute_ms": 1000 * r.seconds, "server_ms": 1000 * (time.perf_counter() - t0)}
        return await worker.run(job)

    @app.post("/api/attention")
    async def attention(body: Dict[str, Any]):
        def job():
            s = _settings(ex, body.get("settings"))
            i, x, y = _point(ex, body)
            r = ex.attention(i, x, y, s, head=_head(ex, body), k=_k(body))
            return {"mode": "attention", "source": r.source, "clicked": _match(r.clicked), "head": r.head,
                    "settings": r.settings.as_dict(), "cls_share": r.cls_share, "maps": [_map(r.map)],
                    "compute_ms": 1000 * r.seconds}
        return await worker.run(job)

    @app.post("/api/saliency")
    async def saliency(body: Dict[str, Any]):
        def job():
            s = _settings(ex, body.get("settings"))
            ex.prepare(s)
            return {"mode": "saliency", "maps": [_map(ex.saliency(i, s)) for i in range(len(ex.images))]}
        return await worker.run(job)

    @app.post("/api/pca")
    async def pca(body: Dict[str, Any]):
        def job():
            s = _settings(ex, body.get("settings"))
            pics = ex.pca(s, max_side=DISPLAY_SIDE)
            return {"mode": "pca", "images": [{"image": i, "png": base64.b64encode(encode_png(p)).decode()}
                                              for i, p in enumerate(pics)]}
        return await worker.run(job)

    @app.post("/api/upload")
    async def upload(request: Request):
        """Each file is added or reported on its own (a bad one never drops the others); 400 when none was added.
        The request's bytes are bounded while it streams (:func:`read_uploads`), each image's pixels from its
        header before decoding, and the images kept by the explorer's ``max_images``."""
        batch = await read_uploads(request, max_upload_bytes)

        def job():
            added, errors, notes = [], [], []
            for filename, data in batch:
                name = filename.replace("\\", "/").rsplit("/", 1)[-1] or "upload"
                try:
                    item = ex.add_image(data, name=name)
                    added.append(name)
                    if item.note:
                        notes.append(item.note)
                except DensevitError as exc:
                    errors.append(str(exc) if name in str(exc) or "file name" in str(exc) else f"{name}: {exc}")
            return {"added": added, "errors": errors, "notes": notes, "images": images()}

        res = await worker.run(job)
        if res["errors"] and not res["added"]:
            return JSONResponse({"error": " — ".join(res["errors"]), **res}, status_code=400)
        return res

    @app.post("/api/save")
    async def save(body: Dict[str, Any]):
        def job():
            s = _settings(ex, body.get("settings"))
            mode = body.get("mode", "similarity")
            if mode not in ("similarity", "attention", "saliency", "pca"):
                raise DensevitError(f"unknown view {_show(mode)}; one of similarity, attention, saliency, pca")
            png = _png(body.get("png"))
            record: Dict[str, Any]
            if mode in ("similarity", "attention") and body.get("image") is not None:
                i, x, y = _point(ex, body)
                k = _k(body)
                if mode == "similarity":
                    record = ex.finding(ex.similarity(i, x, y, s, k=k))
                else:
                    record = ex.finding(ex.attention(i, x, y, s, head=_head(ex, body), k=k))
            else:
                record = {"backbone": ex.backbone, "mode": mode, "settings": s.as_dict(),
                          "images": [{"index": i, "name": im.name, "path": im.source}
                                     for i, im in enumerate(ex.images)]}
            out = Path(out_dir)
            read = [*inputs, *(im.source for im in ex.images if im.source)]
            check_outputs(read, folders=[out])
            stem = time.strftime("explore_%Y%m%d-%H%M%S")
            n = 0
            while (out / f"{stem}{'' if n == 0 else f'_{n}'}.png").exists() or \
                    (out / f"{stem}{'' if n == 0 else f'_{n}'}.json").exists():
                n += 1
            stem = f"{stem}{'' if n == 0 else f'_{n}'}"
            check_outputs(read, files=[out / f"{stem}.png", out / f"{stem}.json"])
            if "clicked" in record:                 # only a clicked finding can be recomputed
                record["replay"] = f"densevit-explore --replay {out / (stem + '.json')}"
            text = (json.dumps(record, indent=2) + "\n").encode()
            atomic_write_bytes(out / f"{stem}.png", png)
            try:
                atomic_write_bytes(out / f"{stem}.json", text)
            except OSError:
                (out / f"{stem}.png").unlink(missing_ok=True)       # a finding is its picture and its record
                raise
            return {"png": str(out / f"{stem}.png"), "json": str(out / f"{stem}.json")}
        return await worker.run(job)

    return app
