#!/usr/bin/env python3
"""Archive each hour's traffic counts as an object in the city's object store.

A process service of the traffic app. Maru delivers every loop-detector reading of topic
`city.traffic` to it (a trigger, CloudEvents batches); it sums vehicles per intersection
and UTC hour, and keeps each hour as one JSON object, `traffic/YYYY-MM-DD/HH.json`, in the
bucket its manifest names (`store_bucket`). Maru passes the S3 endpoint, the bucket and an
access key limited to it in the environment. Requests are signed with AWS Signature
Version 4, written out with the standard library only (no boto3 needed on the node).

Readings are delivered at least once: each hour's object records the last topic offset it
counted, and a reading at or below it is not counted twice.
"""

import datetime
import hashlib
import hmac
import http.server
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request

ENDPOINT = os.environ["AWS_ENDPOINT_URL"].rstrip("/")
# Over TLS, Maru names the CA that signed its endpoint's certificate (as the AWS SDKs expect).
TLS = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or None)
BUCKET = os.environ["MARU_BUCKET"]
ACCESS_KEY = os.environ["AWS_ACCESS_KEY_ID"]
SECRET_KEY = os.environ["AWS_SECRET_ACCESS_KEY"]
REGION = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")

# Hours being counted: "YYYY-MM-DD/HH" -> the object's content.
HOURS = {}


def _hmac(key, text):
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def request(method, key, body=b""):
    """A signed request for `key` in the bucket; returns (status, body)."""
    url = urllib.parse.urlsplit(ENDPOINT)
    path = "/" + BUCKET + "/" + urllib.parse.quote(key, safe="/-_.~")
    now = datetime.datetime.now(datetime.timezone.utc)
    stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(body).hexdigest()
    headers = {"host": url.netloc, "x-amz-content-sha256": payload, "x-amz-date": stamp}
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        [method, path, ""]
        + [f"{name}:{headers[name]}" for name in sorted(headers)]
        + ["", signed, payload]
    )
    scope = f"{day}/{REGION}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key_bytes = _hmac(_hmac(_hmac(_hmac(("AWS4" + SECRET_KEY).encode(), day), REGION), "s3"), "aws4_request")
    signature = hmac.new(key_bytes, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/{scope}, SignedHeaders={signed}, Signature={signature}"
    )
    sent = urllib.request.Request(ENDPOINT + path, data=body if method == "PUT" else None, method=method, headers=headers)
    try:
        with urllib.request.urlopen(sent, timeout=10, context=TLS) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def hour_object(hour):
    """The hour's counts: from memory, else from the store (after a restart), else new."""
    if hour not in HOURS:
        status, body = request("GET", f"traffic/{hour}.json")
        if status == 200:
            HOURS[hour] = json.loads(body)
        elif status == 404:
            HOURS[hour] = {"hour": hour, "intersections": {}, "readings": 0, "through_offset": -1}
        else:
            raise RuntimeError(f"read traffic/{hour}.json: {status} {body[:200]!r}")
    return HOURS[hour]


def archive(events):
    touched = set()
    for event in events:
        reading = event.get("data") or {}
        at_ms = int(reading.get("at_ms", 0))
        hour = datetime.datetime.fromtimestamp(at_ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d/%H")
        offset = int(str(event.get("id", ":-1")).rsplit(":", 1)[-1])
        counts = hour_object(hour)
        if offset <= counts["through_offset"]:
            continue
        place = event.get("partitionkey") or event.get("subject") or "unknown"
        counts["intersections"][place] = counts["intersections"].get(place, 0) + int(reading.get("vehicles", 0))
        counts["readings"] += 1
        counts["through_offset"] = offset
        touched.add(hour)
    for hour in sorted(touched):
        body = json.dumps(HOURS[hour], sort_keys=True).encode()
        status, answer = request("PUT", f"traffic/{hour}.json", body)
        if status != 200:
            raise RuntimeError(f"write traffic/{hour}.json: {status} {answer[:200]!r}")
    # Keep the last few hours in memory.
    for old in sorted(HOURS)[:-3]:
        del HOURS[old]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path.endswith("/healthz") else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        try:
            if self.headers.get("Content-Type", "").startswith("application/cloudevents-batch+json"):
                events = json.loads(body)
            else:
                events = [{
                    "id": self.headers.get("ce-id", ":-1"),
                    "partitionkey": self.headers.get("ce-partitionkey"),
                    "data": json.loads(body or b"{}"),
                }]
            archive(events)
            self.send_response(204)
        except Exception as error:  # the trigger retries, then dead-letters
            print(f"archive failed: {error}", flush=True)
            self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(os.environ["PORT"])
    print(f"traffic archive on port {port}, bucket {BUCKET}", flush=True)
    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
