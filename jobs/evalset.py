"""`ray job submit ... -- python jobs/evalset.py --sketchset S ...`: the `sketchgan evalset create` command."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline.cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(pipeline.cli.main(["evalset", "create", *sys.argv[1:]]))
