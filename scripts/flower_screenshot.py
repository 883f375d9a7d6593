"""Take docs/flower-tasks.png: a real deployment (SmolLM2 on the CPU behind a private Redis),
real requests, and Flower's tasks page rendered by headless Chromium.

Needs Debian's chromium (`apt-get install chromium`). Flower runs without auth here, on
loopback only, because headless Chromium cannot answer a basic-auth prompt.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import mii
from mii.launch.embedded_redis import EmbeddedRedis, free_port


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "docs/flower-tasks.png"
    redis = EmbeddedRedis().start()
    os.environ["MII_REDIS_URL"] = redis.url
    port = free_port()
    flower = subprocess.Popen([sys.executable, "-m", "mii", "flower", "--no-auth",
                               "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    client = mii.serve("smollm2", deployment_name="smollm2-demo", replica_num=2)
    try:
        time.sleep(3)  # Flower subscribes to events before the traffic
        questions = ["What is the capital of France?", "Name three primary colors.",
                     "Write a haiku about Redis streams.", "What is 12 times 12?"]  # fmt: skip
        client.generate(questions, max_new_tokens=48, do_sample=False)
        with contextlib.suppress(mii.errors.InvalidRequestError):
            client.generate("x " * 9000, max_new_tokens=8)  # refused: a failed task
        client.generate(questions[:2], max_new_tokens=24)
        time.sleep(2)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/tasks", timeout=10).read()
        _screenshot(f"http://127.0.0.1:{port}/tasks", out)
        print(f"wrote {out}")
    finally:
        client.terminate_server()
        flower.terminate()
        redis.stop()


def _screenshot(url: str, out: str) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    profile = tempfile.mkdtemp(prefix="mii-chromium-")
    subprocess.run([
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
        "--window-size=1600,900", "--virtual-time-budget=8000",
        f"--screenshot={os.path.abspath(out)}", url,
    ], check=True, capture_output=True, timeout=120)  # fmt: skip


if __name__ == "__main__":
    main()
