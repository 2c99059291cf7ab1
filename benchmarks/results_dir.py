"""Prints where a benchmark run's files go: benchmarks/results/<UTC date>-<device>, the device being the GPU's name
(``cuda-h200``) or, without one, the CPU's model (``cpu-amd-epyc-7b13``). Used by bench.sh and run_on_gpu.sh."""
import datetime
import re
from pathlib import Path

import torch

from mixres.apps.timing import device_name

if torch.cuda.is_available():
    slug = "cuda-" + torch.cuda.get_device_name().lower().replace("nvidia", "")
else:
    slug = "cpu-" + device_name(torch.device("cpu")).split(",")[0].lower()
slug = re.sub("[^a-z0-9]+", "-", slug).strip("-")
date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
print(Path("benchmarks", "results", f"{date}-{slug}"))  # relative to the repository root, where the scripts run
