"""A web-scraper-style I/O job: fetch pages concurrently, collect their titles.

To stay self-contained (and off the internet) it serves its own pages on
loopback; point ``fetch`` at real URLs to scrape for real. I/O-bound work wants
more workers than cores: each task mostly waits.

Run: python examples/scraper.py [pages]
"""

import re
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fabric.local import Executor


class Pages(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"<html><title>page {self.path.strip('/')}</title></html>".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        match = re.search(rb"<title>(.*?)</title>", response.read())
    return match.group(1).decode() if match else ""


def main(pages: int) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with Executor(max_workers=8) as ex:
            titles = list(ex.map(fetch, [f"{base}/{i}" for i in range(pages)], timeout=60))
    finally:
        server.shutdown()
        server.server_close()
    assert titles == [f"page {i}" for i in range(pages)], titles[:3]
    print(f"fetched {len(titles)} pages; last title: {titles[-1]!r}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
