"""Ray job entrypoint: `python jobs/tune.py --config FILE [--resume]` runs `sketchgan tune`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline.cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(pipeline.cli.main(["tune", *sys.argv[1:]]))
