"""A small local web page for trying a trained model: type a caption, see the reranked grid.

    python -m dalle_ds.serve --bundle runs/demo/bundle [--clip runs/demo/clip] --port 8000
    python -m dalle_ds.serve --checkpoint runs/tiny/export --dvae runs/demo/dvae/export \\
        --tokenizer runs/demo/tokenizer.json ...              # the parts of a bundle, one by one
    # then open http://127.0.0.1:8000/

Standard library ``http.server`` (one request samples at a time; a lock serialises the model).
Routes: ``GET /`` the form (``?caption=...&n=..&keep=..`` also shows the result: the form submits
with GET), ``GET /api/sample?caption=...`` JSON (seeds, scores, the grid as base64 PNG),
``GET /healthz``. ``n`` is capped by ``--max-n``. Binds 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import base64
import html
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from dalle_ds import cli_args
from dalle_ds.parallel.dist import default_device
from dalle_ds.sampling.grids import grid_image
from dalle_ds.sampling.pipeline import Pipeline
from dalle_ds.sampling.generate import SamplingSettings

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dalle-ds</title>
<style>
 body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; }}
 input[type=text] {{ width: 30em; }} input[type=number] {{ width: 4em; }}
 #grid {{ image-rendering: pixelated; width: {width}px; margin-top: 1em; }}
 .err {{ color: #b00; }} td {{ padding: 0 .6em; }}
</style></head>
<body>
<h1>dalle-ds</h1>
<form id="form" method="get" action="/">
 <label>Caption <input id="caption" name="caption" type="text" value="{caption}" required></label>
 <label>candidates <input id="n" name="n" type="number" min="1" max="{max_n}" value="{n}"></label>
 <label>keep <input id="keep" name="keep" type="number" min="1" max="{max_n}" value="{keep}"></label>
 <button id="go" type="submit">Generate</button>
</form>
<p>{about}</p>
{result}
</body></html>
"""


class App:
    """The model behind the page: one lock, so concurrent requests take turns."""

    def __init__(self, pipe: Pipeline, n: int = 16, keep: int = 4, max_n: int = 64, seed: int = 0,
                 settings: SamplingSettings | None = None):
        self.pipe, self.n, self.keep, self.max_n, self.seed = pipe, n, keep, max_n, seed
        self.settings = settings or SamplingSettings()
        self.lock = threading.Lock()

    def about(self) -> str:
        c = self.pipe.prior.cfg
        rr = "CLIP reranking on" if self.pipe.scorer is not None else "no CLIP: the first samples are shown"
        return (f"prior: {c.n_layers} layers, d_model {c.d_model}, {c.image_grid}x{c.image_grid} codes; "
                f"{self.pipe.image_size}px images; {rr}")

    def params(self, query: dict[str, list[str]]) -> tuple[str, int, int, int]:
        caption = (query.get("caption") or [""])[0].strip()
        try:
            n = int((query.get("n") or [self.n])[0])
            keep = int((query.get("keep") or [self.keep])[0])
            seed = int((query.get("seed") or [self.seed])[0])
        except ValueError as e:
            raise ValueError(f"n, keep and seed must be integers ({e})") from None
        if not 1 <= n <= self.max_n:
            raise ValueError(f"n={n}: must be in [1, {self.max_n}]")
        if not 1 <= keep <= n:
            raise ValueError(f"keep={keep}: must be in [1, n={n}]")
        if len(caption) > 500:
            raise ValueError("caption: at most 500 characters")
        return caption, n, keep, seed

    def sample(self, caption: str, n: int, keep: int, seed: int) -> dict:
        with self.lock:
            r = self.pipe.sample(caption, n, keep, seed, self.settings)
        buf = io.BytesIO()
        grid_image(r["images"]).save(buf, format="PNG")
        return {"caption": caption, "n": n, "keep": keep, "seeds": r["seeds"], "scores": r["scores"],
                "grid_png": base64.b64encode(buf.getvalue()).decode("ascii")}

    def page(self, query: dict[str, list[str]]) -> str:
        caption, result = "", ""
        n, keep = self.n, self.keep
        try:
            caption, n, keep, seed = self.params(query)
            if caption:
                r = self.sample(caption, n, keep, seed)
                rows = "".join(f"<tr><td>{i + 1}</td><td>{s}</td><td>{'' if sc is None else f'{sc:.4f}'}</td></tr>"
                               for i, (s, sc) in enumerate(zip(r["seeds"], r["scores"] or [None] * keep)))
                result = (f'<h2 id="result-caption">{html.escape(caption)}</h2>'
                          f'<img id="grid" alt="samples for {html.escape(caption, quote=True)}" '
                          f'src="data:image/png;base64,{r["grid_png"]}">'
                          f'<table id="scores"><tr><th>rank</th><th>seed</th><th>CLIP cosine</th></tr>{rows}</table>')
        except ValueError as e:
            result = f'<p class="err" id="error">{html.escape(str(e))}</p>'
        side = self.pipe.image_size
        return PAGE.format(caption=html.escape(caption, quote=True), n=n, keep=keep, max_n=self.max_n,
                           about=html.escape(self.about()), result=result, width=max(256, 2 * side * 3))


def make_handler(app: App):
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urlparse(self.path)
            query = parse_qs(url.query)
            if url.path == "/":
                self._send(200, app.page(query).encode("utf-8"), "text/html; charset=utf-8")
            elif url.path == "/api/sample":
                try:
                    caption, n, keep, seed = app.params(query)
                    if not caption:
                        raise ValueError("caption: required")
                    body, code = app.sample(caption, n, keep, seed), 200
                except ValueError as e:
                    body, code = {"error": str(e)}, 400
                self._send(code, json.dumps(body).encode(), "application/json")
            elif url.path == "/healthz":
                self._send(200, b"ok\n", "text/plain")
            else:
                self._send(404, b"not found\n", "text/plain")

        def log_message(self, fmt: str, *args) -> None:
            print(f"serve: {self.address_string()} {fmt % args}")

    return Handler


def make_server(app: App, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), make_handler(app))


def main(argv: list[str] | None = None) -> None:
    ap = cli_args.Parser(description=__doc__.split("\n\n")[0])
    Pipeline.add_args(ap)
    ap.add_argument("--clip", default=None, help="CLIP for reranking: a folder or a Hugging Face id in the local cache")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("-n", type=int, default=16, help="default candidates per request")
    ap.add_argument("--keep", type=int, default=4)
    ap.add_argument("--max-n", type=int, default=64)
    SamplingSettings.add_args(ap)
    ap.add_argument("--device", default=str(default_device()), help="default: cuda:LOCAL_RANK%%count, else cpu")
    args = ap.parse_args(argv)
    pipe = Pipeline.from_args(args)
    app = App(pipe, args.n, args.keep, args.max_n,
              settings=SamplingSettings.from_args(args))
    server = make_server(app, args.host, args.port)
    print(f"serve: http://{args.host}:{server.server_address[1]}/  ({app.about()})")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    raise SystemExit(cli_args.run(main))
