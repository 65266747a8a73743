"""Fetch a URL and digest it: the typical first step of a scrape-and-aggregate flow."""

import hashlib
import json
import urllib.error
import urllib.request

from flowd.task import Task


class FetchDigest(Task):
    """GET `url` (stdlib urllib); passes on status, a SHA-256 of the body, and the body
    parsed as JSON when it is JSON (else as text, cut at `max_text` characters).

    `fields` (a list) keeps only those keys of a JSON object. HTTP errors raise, so the
    task's `retries` apply.
    """

    def perform(self, *args, url, timeout=10, fields=None, max_text=2000, headers=None, **kwargs):
        request = urllib.request.Request(url, headers=dict(headers or {}))
        with urllib.request.urlopen(request, timeout=float(timeout)) as response:
            body = response.read()
            status = response.status
            content_type = response.headers.get("Content-Type", "")
        data = None
        if "json" in content_type or body[:1] in (b"{", b"["):
            try:
                data = json.loads(body)
            except ValueError:
                data = None
        if isinstance(data, dict) and fields:
            data = {key: data.get(key) for key in fields}
        if data is None:
            data = body.decode("utf-8", "replace")[: int(max_text)]
        self.log.info("fetched %s: %d, %d bytes", url, status, len(body))
        return args, {**kwargs, "status": status, "sha256": hashlib.sha256(body).hexdigest(),
                      "bytes": len(body), "data": data}
