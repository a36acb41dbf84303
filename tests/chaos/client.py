#!/usr/bin/env python3
"""The chaos run's clients: well-behaved callers of the consume endpoint.

Each of THREADS threads sends consumes for random customers until STOP_FILE
exists; each consume has its own Idempotency-Key and is sent again, same key
and body, on a refused or broken connection or a 503, until it gets another
answer (at most RETRY_FOR seconds). Writes one line per consume to OUT:
`<customer> <key> <status> <event id or ->`, and one line per attempt's
second to OUT.attempts: `<unix second> <answered> <failed>`, for the
availability during each fault.

Usage: client.py BASE_URL TOKENS_FILE OUT STOP_FILE THREADS
(TOKENS_FILE: one `<customer id> <jwt>` a line.)
"""
import collections
import http.client
import json
import os
import random
import sys
import threading
import time
import urllib.parse
import uuid

RETRY_FOR = 120.0


def main():
    base, tokens_file, out, stop_file, threads = sys.argv[1:6]
    url = urllib.parse.urlsplit(base)
    customers = [line.split() for line in open(tokens_file) if line.strip()]
    lock = threading.Lock()
    results = []
    seconds = collections.defaultdict(lambda: [0, 0])

    def attempt_seen(ok):
        with lock:
            seconds[int(time.time())][0 if ok else 1] += 1

    def worker():
        conn = None
        while not os.path.exists(stop_file):
            customer, token = random.choice(customers)
            key = str(uuid.uuid4())
            body = json.dumps({"app_id": "vto-001", "session_id": key[:8]})
            headers = {
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json",
                "Idempotency-Key": key,
            }
            deadline = time.time() + RETRY_FOR
            answer = None
            while answer is None and time.time() < deadline:
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
                    conn.request("POST", "/api/v1/customer/tokens/consume", body, headers)
                    response = conn.getresponse()
                    payload = response.read()
                    if response.status == 503:
                        attempt_seen(False)
                        time.sleep(0.05)
                        continue
                    attempt_seen(True)
                    event = "-"
                    if response.status == 200:
                        event = json.loads(payload)["event_id"]
                    answer = (response.status, event)
                except (OSError, http.client.HTTPException):
                    attempt_seen(False)
                    if conn is not None:
                        conn.close()
                    conn = None
                    time.sleep(0.05)
            status, event = answer if answer else (0, "-")
            with lock:
                results.append(f"{customer} {key} {status} {event}")

    workers = [threading.Thread(target=worker) for _ in range(int(threads))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    with open(out, "w") as f:
        f.write("\n".join(results) + "\n")
    with open(out + ".attempts", "w") as f:
        for second in sorted(seconds):
            answered, failed = seconds[second]
            f.write(f"{second} {answered} {failed}\n")


if __name__ == "__main__":
    main()
