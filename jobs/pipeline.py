"""Run the whole chain (preprocess -> sketch sets -> eval sets -> base -> train -> register -> benchmark).

    python jobs/pipeline.py --config configs/tiny.yaml
    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/cluster.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
