#!/usr/bin/env bash
# The compose head: start Ray's head node, wait for the workers, deploy the pipeline where the planner
# places it (hetforge serve --address), and stay up. Every container mounts one HETFORGE_HOME volume, so
# the replicas of all nodes write their metrics into one folder and the ingress's /metrics has them all.
set -euo pipefail
ray start --head --port=6379 --num-cpus="${HEAD_CPUS:-1}" --dashboard-host=0.0.0.0 --disable-usage-stats
python - <<'PY'
import os, time, ray
want = int(os.environ.get("HETFORGE_EXPECT_NODES", "2"))
ray.init(address="auto", logging_level="ERROR")
while len([n for n in ray.nodes() if n["Alive"]]) < want:
    time.sleep(2)
PY
hetforge serve "${HETFORGE_PIPELINE:-examples/page_triage.yaml}" --address 127.0.0.1:6379 --host 0.0.0.0 --port 8000
exec tail -f /dev/null
