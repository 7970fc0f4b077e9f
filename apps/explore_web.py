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
"""
import base64
import io
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from PIL import Image

from densevit.errors import DensevitError

from .explore import DESCRIPTOR_FACETS, Explorer, ImageMap, Settings, encode_png

STATIC = Path(__file__).resolve().parent / "explore_static"
DISPLAY_SIDE = 1024  # images are sent to the page at most this large (the page scales them)


def _b64_f32(values) -> str:
    return base64.b64encode(np.ascontiguousarray(values.detach().cpu().numpy(), dtype="<f4").tobytes()).decode()


def _match(m) -> Optional[Dict[str, Any]]:
    return None if m is None else {"token": m.token, "x": m.x, "y": m.y, "score": m.score}


def _map(m: ImageMap) -> Dict[str, Any]:
    v = m.values
    return {"image": m.image, "shape": list(m.grid.shape), "values": _b64_f32(v), "extent": list(m.extent),
            "min": float(v.min()), "max": float(v.max()), "topk": [_match(t) for t in m.topk],
            "best_buddy": _match(m.best_buddy)}


def _settings(ex: Explorer, d: Optional[Dict[str, Any]]) -> Settings:
    """Settings from the page (load size 0 or empty: the original size), checked by the explorer."""
    d = dict(d or {})
    casts = {"layer": int, "facet": str, "bin": bool, "stride": int, "load_size": int}
    try:
        kw = {k: casts[k](d[k]) for k in casts if k in d and d[k] not in (None, "")}
    except (TypeError, ValueError) as exc:
        raise DensevitError(f"bad settings: {exc}") from None
    if "load_size" in d and (d["load_size"] in (None, "") or kw.get("load_size", 0) <= 0):
        kw["load_size"] = None
    return ex.settings(**kw)


def _k(body: Dict[str, Any]) -> int:
    try:
        return max(1, min(int(body.get("k", 5)), 100))
    except (TypeError, ValueError):
        raise DensevitError("top-k must be a whole number") from None


def _point(body: Dict[str, Any]):
    try:
        return int(body["image"]), float(body["x"]), float(body["y"])
    except (KeyError, TypeError, ValueError):
        raise DensevitError("a click needs an image index and x, y in pixels") from None


def create_app(explorer: Explorer, out_dir: Path = Path("explore_out")):
    """The FastAPI application serving ``explorer``; Save writes into ``out_dir``."""
    from fastapi import FastAPI, File, Request, UploadFile
    from fastapi.responses import FileResponse, JSONResponse, Response

    app = FastAPI(title="densevit explorer", docs_url=None, redoc_url=None, openapi_url=None)
    ex = explorer

    @app.exception_handler(DensevitError)
    async def _user_error(request: Request, exc: DensevitError):
        return JSONResponse({"error": str(exc)}, status_code=400)

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
                 "note": im.note, "version": id(im)} for i, im in enumerate(ex.images)]

    @app.get("/api/state")
    def state():
        return {"backbone": ex.backbone, "weights": None if ex.weights is None else Path(str(ex.weights)).name,
                "patch_size": ex.patch_size, "depth": ex.depth, "heads": ex.num_heads, "strides": ex.strides,
                "facets": list(DESCRIPTOR_FACETS), "defaults": ex.defaults.as_dict(), "images": images()}

    @app.get("/api/image/{index}")
    def image(index: int):
        if not 0 <= index < len(ex.images):
            raise DensevitError(f"no image {index}")
        img = ex.images[index].image
        if max(img.size) > DISPLAY_SIDE:
            s = DISPLAY_SIDE / max(img.size)
            img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=92)
        return Response(buf.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.get("/api/progress")
    def progress():
        return ex.progress

    @app.post("/api/prepare")
    def prepare(body: Dict[str, Any]):
        s = _settings(ex, body.get("settings"))
        return {"seconds": ex.prepare(s, attention=bool(body.get("attention")))}

    @app.post("/api/similarity")
    def similarity(body: Dict[str, Any]):
        s = _settings(ex, body.get("settings"))
        i, x, y = _point(body)
        t0 = time.perf_counter()
        r = ex.similarity(i, x, y, s, k=_k(body))
        return {"mode": "similarity", "source": r.source, "clicked": _match(r.clicked),
                "settings": r.settings.as_dict(), "maps": [_map(m) for m in r.maps],
                "compute_ms": 1000 * r.seconds, "server_ms": 1000 * (time.perf_counter() - t0)}

    @app.post("/api/attention")
    def attention(body: Dict[str, Any]):
        s = _settings(ex, body.get("settings"))
        i, x, y = _point(body)
        head = body.get("head")
        head = None if head in (None, "", "mean") else int(head)
        r = ex.attention(i, x, y, s, head=head, k=_k(body))
        return {"mode": "attention", "source": r.source, "clicked": _match(r.clicked), "head": r.head,
                "settings": r.settings.as_dict(), "cls_share": r.cls_share, "maps": [_map(r.map)],
                "compute_ms": 1000 * r.seconds}

    @app.post("/api/saliency")
    def saliency(body: Dict[str, Any]):
        s = _settings(ex, body.get("settings"))
        ex.prepare(s)
        return {"mode": "saliency", "maps": [_map(ex.saliency(i, s)) for i in range(len(ex.images))]}

    @app.post("/api/pca")
    def pca(body: Dict[str, Any]):
        s = _settings(ex, body.get("settings"))
        pics = ex.pca(s, max_side=DISPLAY_SIDE)
        return {"mode": "pca", "images": [{"image": i, "png": base64.b64encode(encode_png(p)).decode()}
                                          for i, p in enumerate(pics)]}

    @app.post("/api/upload")
    async def upload(files: List[UploadFile] = File(...)):
        added, errors, notes = [], [], []
        for f in files:
            data = await f.read()
            name = Path(f.filename or "upload").name
            try:
                item = ex.add_image(data, name=name)
                added.append(name)
                if item.note:
                    notes.append(item.note)
            except DensevitError as exc:
                errors.append(f"{name}: {exc}" if name not in str(exc) else str(exc))
        return {"added": added, "errors": errors, "notes": notes, "images": images()}

    @app.post("/api/save")
    def save(body: Dict[str, Any]):
        s = _settings(ex, body.get("settings"))
        mode = body.get("mode", "similarity")
        png = str(body.get("png", ""))
        if not png.startswith("data:image/png;base64,"):
            raise DensevitError("nothing to save: the view has no picture yet")
        record: Dict[str, Any]
        if mode in ("similarity", "attention") and body.get("image") is not None:
            i, x, y = _point(body)
            k = _k(body)
            if mode == "similarity":
                record = ex.finding(ex.similarity(i, x, y, s, k=k))
            else:
                head = body.get("head")
                head = None if head in (None, "", "mean") else int(head)
                record = ex.finding(ex.attention(i, x, y, s, head=head, k=k))
        else:
            record = {"backbone": ex.backbone, "mode": mode, "settings": s.as_dict(),
                      "images": [{"index": i, "name": im.name, "path": im.source} for i, im in enumerate(ex.images)]}
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = time.strftime("explore_%Y%m%d-%H%M%S")
        n = 0
        while (out / f"{stem}{'' if n == 0 else f'_{n}'}.png").exists() or \
                (out / f"{stem}{'' if n == 0 else f'_{n}'}.json").exists():
            n += 1
        stem = f"{stem}{'' if n == 0 else f'_{n}'}"
        (out / f"{stem}.png").write_bytes(base64.b64decode(png.split(",", 1)[1]))
        record["replay"] = f"densevit-explore --replay {out / (stem + '.json')}"
        (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
        return {"png": str(out / f"{stem}.png"), "json": str(out / f"{stem}.json")}

    return app
