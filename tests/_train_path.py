"""Make `python/` importable for the aios_train tests without installing the wheel."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "python") not in sys.path:
    sys.path.insert(0, str(ROOT / "python"))

import torch  # noqa: E402

torch.set_num_threads(1)  # tests share 2 cores with builds; keep them deterministic and light
