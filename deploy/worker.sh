#!/usr/bin/env bash
# A compose worker: join the head. RAY_RESOURCES names the node's device class for CPU nodes
# ('{"cpu_class:cpu-general": 1000}'); GPU nodes get accelerator_type:<model> from Ray itself.
set -euo pipefail
exec ray start --address=ray-head:6379 --num-cpus="${RAY_CPUS:-2}" --resources="${RAY_RESOURCES:-{\}}" --disable-usage-stats --block
