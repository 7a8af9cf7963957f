"""Bringing a model back when its worker process dies.

Triton's Python backend runs each model instance in its own process (the backend stub). When that process
dies (killed for memory, a crash in native code), the bundled Triton 2.51 answers every later request with
"stub process is not healthy" while it still calls the model ready, and never starts a new one: a load
balancer would keep sending traffic to a model that cannot answer.

So the server runs with explicit model control and a watchdog thread looks at the stubs twice a second
(the server's child processes, read from /proc). When a model has lost one, the watchdog unloads it through
the repository API, so that readiness says not ready at once, and loads it again, which starts fresh stubs.
A model an operator unloaded on purpose is left alone.
"""
from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

STUB = b"triton_python_backend_stub"
CHECK_EVERY = 0.5           # seconds between looks at the stubs
RETRY_AFTER = (5, 60)       # a failed reload is tried again after 5 s, doubling up to 60 s


def workers(server_pid: int) -> dict[str, list[int]]:
    """The live stubs of a tritonserver by model, one per model instance: its child processes running the
    backend stub, whose first argument is REPO/<model>/<version>/model.py. A zombie counts as dead."""
    found: dict[str, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            if int(ppid) != server_pid or state == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError):          # gone meanwhile
            continue
        if argv[0].endswith(STUB) and len(argv) > 1:
            found.setdefault(Path(os.fsdecode(argv[1])).parent.parent.name, []).append(int(entry))
    return found


def repository_headers(server_args) -> dict:
    """The header the watchdog must send when tritonserver's arguments restrict the repository API
    (--http-restricted-api=model-repository[,...]:KEY=VALUE)."""
    for arg in server_args:
        if arg.startswith("--http-restricted-api="):
            apis, _, key = arg.split("=", 1)[1].partition(":")
            name, _, value = key.partition("=")
            if "model-repository" in apis.split(",") and name:
                return {name: value}
    return {}


class Watchdog:
    """Watches the stubs of one running tritonserver and reloads a model that lost one. `recoveries` lists
    each reload: the model, the lost process ids, and the seconds from noticing to serving again."""

    def __init__(self, pid: int, http_url: str, headers: dict | None = None, progress=print):
        self.pid = pid
        self.url = f"http://{http_url}/v2/repository"
        self.headers = dict(headers or {})
        self.progress = progress
        self.recoveries: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Watchdog":
        expected = workers(self.pid)            # taken now: a stub may die before the thread first looks
        self._thread = threading.Thread(target=self._watch, args=(expected,), daemon=True, name="triton-watchdog")
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None

    def _post(self, path: str, timeout: float = 600.0):
        request = urllib.request.Request(f"{self.url}/{path}", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json", **self.headers})
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            body = reply.read()
        return json.loads(body) if body else None

    def _loaded(self, model: str) -> bool:
        """Whether Triton holds `model` loaded (an operator's unload turns this false before the stubs go)."""
        return any(m.get("name") == model and m.get("state") == "READY" for m in self._post("index", 30))

    def _watch(self, expected: dict) -> None:
        pending: dict[str, list] = {}   # model -> [lost pids, noticed at, tries, next try at, backoff] until it is back
        while not self._stop.wait(CHECK_EVERY):
            now = workers(self.pid)
            for model in set(expected) | set(now) | set(pending):
                alive = now.get(model, [])
                if model not in pending:
                    lost = sorted(set(expected.get(model, ())) - set(alive))
                    if not lost or len(alive) >= len(expected[model]):
                        expected[model] = alive       # unchanged, newly loaded, or reloaded by an operator
                        continue
                    try:
                        if not self._loaded(model):   # unloaded on purpose, or being unloaded
                            expected[model] = alive
                            continue
                    except (urllib.error.URLError, OSError, ValueError):
                        continue                      # the server is busy or going: look again
                    pending[model] = [lost, time.monotonic(), 0, 0.0, RETRY_AFTER[0] / 2]
                lost, noticed, tries, when, backoff = pending[model]
                if time.monotonic() < when or self._stop.is_set():
                    continue
                if self._reload(model, lost, noticed, tries):
                    del pending[model]
                    expected[model] = workers(self.pid).get(model, [])
                else:
                    backoff = min(backoff * 2, RETRY_AFTER[1])
                    pending[model][2:] = [tries + 1, time.monotonic() + backoff, backoff]

    def _reload(self, model: str, lost: list[int], noticed: float, tries: int) -> bool:
        """Unload `model` (readiness: not ready) and load it again (fresh stubs); False when Triton refused."""
        if tries:
            self.progress(f"[serve] {model}: reloading again (try {tries + 1})")
        else:
            self.progress(f"[serve] {model}: worker process {', '.join(map(str, lost))} died; reloading the model "
                          "(not ready until it is back)")
        try:
            self._post(f"models/{model}/unload")
            self._post(f"models/{model}/load")
        except urllib.error.HTTPError as err:
            said = err.read()[:300].decode(errors="replace")
            self.progress(f"[serve] {model}: reloading failed (HTTP {err.code}: {said}); trying again")
            return False
        except (urllib.error.URLError, OSError) as err:
            if not self._stop.is_set():
                self.progress(f"[serve] {model}: reloading failed ({err}); trying again")
            return False
        seconds = time.monotonic() - noticed
        self.recoveries.append(dict(model=model, lost=lost, seconds=round(seconds, 2), tries=tries + 1))
        self.progress(f"[serve] {model}: serving again {seconds:.1f} s after its worker died")
        return True
