"""The search service and its listening page: ``audiohash.search`` over HTTP, in one process.

    python -m audiohash.serve [--conf-file F] [serve.port=8765] [model.version=production] [KEY=VALUE ...]

then open http://127.0.0.1:8765/ (pick or drop a clip, listen to it and its nearest clips). JSON API:

- ``POST /api/search[?top=10&label=X&source=Y]`` with an audio file as the body (any content type but
  JSON; ``curl --data-binary @clip.wav``), or with ``Content-Type: application/json`` and
  ``{"clip_id": ...}`` or ``{"embedding": [...]}``, optionally ``"top"`` and ``"where": {"label": [...]}``.
  Answer: ``{"codes_version", "scanned", "timing_ms", "results": [{"rank", "clip_id", "distance",
  "label", "source", "path", "audio"}]}``; a bad request gets 400 and ``{"error": "..."}``.
- ``GET /api/info``: model, code table version, number of codes, filter values.
- ``GET /api/clips[?label=X&limit=50]``: indexed clips to pick a query from.
- ``GET /audio/<clip_id>``: the clip's file (only files of indexed clips are served).
- ``POST /api/refresh``: load a newer code table version now (it is also checked every
  ``serve.refresh_s`` seconds); requests in flight finish on the version they started with.
"""
from __future__ import annotations

import json
import logging
import mimetypes
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from audiohash.errors import AudiohashError
from audiohash.search import SearchEngine

log = logging.getLogger("audiohash.serve")
PAGE = Path(__file__).with_name("web") / "index.html"
MAX_UPLOAD_BYTES = 64 << 20  # the extract job's default size limit is larger; one query clip is small
FILTER_PARAMS = ("label", "source", "split")


def local_file(path: str | None) -> Path | None:
    """A clip's path as the embeddings table holds it (``file:/abs`` or a plain path) -> a local file."""
    if not path:
        return None
    if path.startswith("file:"):
        path = urllib.parse.unquote(path[len("file:"):])
        if path.startswith("//"):
            path = path[2:]
    elif "://" in path:
        return None  # object stores: not served by this process
    return Path(path)


class Handler(BaseHTTPRequestHandler):
    engine: SearchEngine  # set on the subclass made by make_server
    server_version = "audiohash"
    protocol_version = "HTTP/1.1"  # keep-alive: a page or client reuses its connection (every answer has a length)
    disable_nagle_algorithm = True  # small answers leave at once instead of waiting for the client's ACK

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    # ---- plumbing -------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def _query(self) -> tuple[str, dict[str, list[str]]]:
        parsed = urllib.parse.urlsplit(self.path)
        return parsed.path, urllib.parse.parse_qs(parsed.query)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_UPLOAD_BYTES:
            raise AudiohashError(f"the request body has {length} bytes; at most {MAX_UPLOAD_BYTES} are taken")
        return self.rfile.read(length) if length else b""

    # ---- routes ---------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path, params = self._query()
        try:
            if path in ("/", "/index.html"):
                self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif path == "/api/info":
                self._json(self.engine.info())
            elif path == "/api/clips":
                where = {k: v for k, v in params.items() if k in FILTER_PARAMS and v != [""]}
                limit = int(params.get("limit", ["50"])[0])
                self._json({"clips": [self._with_audio(c) for c in self.engine.clips(where, limit)]})
            elif path.startswith("/audio/"):
                self._audio(urllib.parse.unquote(path[len("/audio/"):]))
            else:
                self._error(404, f"no such page: {path}")
        except (AudiohashError, ValueError) as exc:
            self._error(400, str(exc))

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        path, params = self._query()
        try:
            body = self._body()  # read whole first: on a kept-alive connection the next request follows it
        except AudiohashError as exc:
            self.close_connection = True
            self._error(413, str(exc))
            return
        try:
            if path == "/api/search":
                self._json(self._search(params, body))
            elif path == "/api/refresh":
                swapped = self.engine.refresh()
                self._json({"refreshed": swapped, "codes_version": self.engine.snapshot.version})
            else:
                self._error(404, f"no such endpoint: {path}")
        except AudiohashError as exc:
            self._error(400, str(exc))
        except (ValueError, TypeError) as exc:
            self._error(400, f"bad request: {exc}")

    def _search(self, params: dict[str, list[str]], body: bytes) -> dict:
        started = time.perf_counter()
        top = int(params.get("top", [self.engine.cfg.serve.top])[0])
        where = {k: v for k, v in params.items() if k in FILTER_PARAMS and v != [""]}
        if (self.headers.get("Content-Type") or "").startswith("application/json"):
            request = json.loads(body or b"{}")
            top = int(request.get("top", top))
            where.update({k: v if isinstance(v, list) else [v] for k, v in (request.get("where") or {}).items()})
            result = self.engine.search(clip_id=request.get("clip_id"), embedding=request.get("embedding"),
                                        top=top, where=where)
        else:
            if not body:
                raise AudiohashError("POST an audio file as the body, or JSON with clip_id or embedding")
            name = urllib.parse.unquote(self.headers.get("X-Filename") or "uploaded clip")
            result = self.engine.search(audio=body, name=name, top=top, where=where)
        answer = result.to_dict()
        for hit in answer["results"]:
            self._with_audio(hit)
        answer["timing_ms"]["total"] = (time.perf_counter() - started) * 1e3
        return answer

    @staticmethod
    def _with_audio(hit: dict) -> dict:
        hit["audio"] = "/audio/" + urllib.parse.quote(hit["clip_id"], safe="") if local_file(hit.get("path")) else None
        return hit

    def _audio(self, clip_id: str) -> None:
        snapshot = self.engine.snapshot
        at = snapshot.clip_ids.index(clip_id).as_py()
        path = local_file(snapshot.metadata["path"][at].as_py()) if at >= 0 and "path" in snapshot.metadata else None
        if path is None or not path.is_file():
            self._error(404, f"no audio file for clip {clip_id!r}")
            return
        self._send(200, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream")


def make_server(engine: SearchEngine, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server (one thread per request) answering with ``engine``; port 0 picks a free one."""
    handler = type("BoundHandler", (Handler,), {"engine": engine})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def refresh_every(engine: SearchEngine, seconds: float, stop: threading.Event) -> threading.Thread:
    """A daemon thread that calls ``engine.refresh()`` every ``seconds`` until ``stop`` is set."""
    def loop():
        while not stop.wait(seconds):
            try:
                engine.refresh()
            except Exception as exc:  # noqa: BLE001 - a failed check must not stop the service
                log.warning("code table refresh failed: %s", exc)
    thread = threading.Thread(target=loop, name="audiohash-refresh", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> None:
    from audiohash.cli import job_parser, run_job

    parser = job_parser(__doc__)

    def run(cfg, args) -> None:
        started = time.time()
        engine = SearchEngine.open(cfg)
        if engine.info()["accepts_audio"]:
            engine.warm_up()  # the extractor builds while the service already answers
        server = make_server(engine, cfg.serve.host, cfg.serve.port)
        stop = threading.Event()
        if cfg.serve.refresh_s > 0:
            refresh_every(engine, cfg.serve.refresh_s, stop)
        info = engine.info()
        host, port = server.server_address[:2]
        print(f"serve: {info['model_name']} v{info['model_version']} ({info['method']} {info['bits']} bits), "
              f"{info['n_codes']} codes of code table version {info['codes_version']}, "
              f"ready in {time.time() - started:.1f} s", flush=True)
        print(f"serve: open http://{host}:{port}/ (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            stop.set()
            server.server_close()

    run_job(run, parser, argv)


if __name__ == "__main__":
    main()
