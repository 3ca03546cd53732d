"""A loopback stand-in for the Hugging Face file host: ``/{repo}/resolve/{revision}/{file}``.

Serves one local folder as a repo at one commit (sent as ``X-Repo-Commit``, like the Hub),
honours single ``Range: bytes=a-b`` requests with ``206``, and counts every body byte it
sends. ``mode`` makes it misbehave: ``"ignore-range"`` answers ranges with the whole file
(``200``), ``"416"`` answers every range with ``416``, ``"drop"`` closes the connection
after ``drop_after`` body bytes of one ranged answer.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")


@dataclass
class HubLog:
    sent: int = 0  # body bytes sent
    requests: list = field(default_factory=list)  # (file, range header or None, status)
    lock: threading.Lock = field(default_factory=threading.Lock)


class HubServer:
    """``with HubServer(folder, "org/model") as hub:`` then ``HF_ENDPOINT=hub.endpoint``."""

    def __init__(self, folder: Path, repo: str, *, mode: str = "ok", drop_after: int = 0):
        self.folder, self.repo, self.mode, self.drop_after = Path(folder), repo, mode, drop_after
        self.log = HubLog()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                limit = len(body)
                if server.mode == "drop" and status == 206 and len(body) > server.drop_after:
                    limit = server.drop_after
                self.wfile.write(body[:limit])
                with server.log.lock:
                    server.log.sent += limit
                if limit < len(body):
                    self.close_connection = True

            def do_GET(self):
                prefix = f"/{server.repo}/resolve/"
                path = unquote(self.path.split("?")[0])
                if not path.startswith(prefix):
                    return self._send(404, b"not found", {})
                revision, _, name = path[len(prefix):].partition("/")
                file = server.folder / name
                if revision not in ("main", COMMIT) or not file.is_file():
                    return self._send(404, b"not found", {})
                data = file.read_bytes()
                head = {"X-Repo-Commit": COMMIT, "Accept-Ranges": "bytes"}
                rng = self.headers.get("Range")
                status = 200
                if rng and server.mode == "416":
                    status, data = 416, b""
                elif rng and server.mode != "ignore-range":
                    m = _RANGE.match(rng)
                    a, b = int(m.group(1)), int(m.group(2))
                    if a >= len(data):
                        status, data = 416, b""
                    else:
                        b = min(b, len(data) - 1)
                        head["Content-Range"] = f"bytes {a}-{b}/{len(data)}"
                        status, data = 206, data[a: b + 1]
                with server.log.lock:
                    server.log.requests.append((name, rng, status))
                self._send(status, data, head)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client hanging up on a refused answer is fine
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
