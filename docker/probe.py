"""HTTP probe for the containers (standard library only; the HAPI image has no curl, ours needs none).

    probe.py                              exit 0 when this container's /health answers {"status": "ok"}
    probe.py URL                          exit 0 when URL answers 2xx
    probe.py --wait SECONDS URL -- CMD…   wait until URL answers 2xx, then run CMD in this process

The first form is the image's HEALTHCHECK: the port is the service's own setting (``server.port``
from ``$CDS_CONFIG`` and ``CDS_SERVER_PORT``, default 8080). The last form starts the scenario
loader once HAPI FHIR answers ``/metadata`` (HAPI takes a while to start and its image has no shell
for a healthcheck).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request


def own_health_url() -> str:
    """``http://127.0.0.1:<server.port>/health`` for the service in this container."""
    try:
        from cds_service.base.config import load_settings

        port = int(load_settings().section("server")["port"])
    except Exception:  # a broken configuration also stops the service: report it unhealthy below
        port = int(os.environ.get("CDS_SERVER_PORT") or 8080)
    return f"http://127.0.0.1:{port}/health"


def check(url: str, timeout: float = 5.0) -> str | None:
    """None when ``url`` answers 2xx (and, for a JSON body with a ``status``, ``"ok"``); else why not."""
    request = urllib.request.Request(url, headers={"Accept": "application/json, application/fhir+json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(1 << 20)
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        return f"unreachable ({getattr(error, 'reason', error)})"
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if isinstance(document, dict) and "status" in document and document["status"] != "ok":
        return f"status {document['status']!r}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(prog="probe.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?", help="URL to probe (default: this container's /health)")
    parser.add_argument("--wait", type=float, default=0.0, help="keep trying for this many seconds")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between tries")
    args = parser.parse_args(argv)
    url = args.url or own_health_url()
    deadline = time.monotonic() + args.wait
    while True:
        problem = check(url)
        if problem is None:
            break
        if time.monotonic() >= deadline:
            print(f"probe: {url}: {problem}", file=sys.stderr)
            return 1
        print(f"probe: waiting for {url} ({problem})", file=sys.stderr, flush=True)
        time.sleep(args.interval)
    if command:
        sys.stdout.flush()
        os.execvp(command[0], command)  # replaces this process: the command's exit status is the container's
    return 0


if __name__ == "__main__":
    sys.exit(main())
