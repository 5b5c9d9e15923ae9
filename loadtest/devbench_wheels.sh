#!/usr/bin/env bash
# Adds to a copy of the offline benchmark bundle (../shared/devbench, read-only) the wheels of
# the runtime dependencies it predates: cryptography and pyOpenSSL (issue 14's TLS and its
# front), OpenTelemetry (issue 16's tracing). Without them the service fails at import on the
# offline machine. Also py-spy, for profiles per worker count (MEDWALLET_BENCH_PROFILE=1). Run here, where the package registry is reachable:
#
#   cp -a ../shared/devbench .devbench && echo '/.devbench/' >> .git/info/exclude
#   bash loadtest/devbench_wheels.sh .devbench      # then: OUT=... bash .devbench/run.sh
#
# Versions as this project's .venv resolves them (2026-12-04); cp312 manylinux, as the bundle.
set -euo pipefail
bundle="${1:?the bundle folder, e.g. .devbench}"
python="${PYTHON:-python3}"
wheels=(
  cryptography==46.0.7 cffi==2.1.1 pycparser==3.12 pyopenssl==25.3.0
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2
  opentelemetry-exporter-otlp-proto-grpc==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2
  py-spy==0.4.3
)
echo "adding ${#wheels[@]} wheels to $bundle/whl"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$bundle/whl" "${wheels[@]}"
echo "done: $(ls "$bundle"/whl/*.whl | wc -l) wheels in $bundle/whl"
