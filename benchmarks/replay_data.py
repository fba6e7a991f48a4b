"""General-skill replay data for the tiny world, written as Parquet with the `datasets` library: the classic remedy
for SFT's forgetting is to mix such data into `--dataset` (docs/data.md, "Mixtures").

    python benchmarks/replay_data.py --out runs/replay/general.parquet
    python sft.py --dataset assets/data/sft.jsonl runs/replay/general.parquet --dataset-weights 0.8 0.2

The conversations are the general skills (reverse, larger, uppercase), none of whose prompts is in the held-out
`assets/data/eval.jsonl`.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.tinyworld import GENERAL_SKILLS, as_conversation, make_tasks


@dataclass
class Args:
    out: str = "runs/replay/general.parquet"
    """where to write the Parquet file"""
    per_skill: int = 1000
    """conversations per general skill"""
    seed: int = 11
    """seed of the generated tasks (the held-out prompts are excluded whatever it is)"""
    eval_prompts: str = "assets/data/eval.jsonl"
    """held-out prompts to keep out of the replay data"""


def main(args: Args) -> None:
    import datasets

    datasets.disable_progress_bars()

    held_out = {json.loads(line)["prompt"] for line in Path(args.eval_prompts).read_text().splitlines() if line}
    rows = [
        as_conversation(t) for skill in GENERAL_SKILLS for t in make_tasks(skill, args.per_skill, args.seed, held_out)
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(args.out)
    print(f"{args.out}: {len(rows)} general-skill conversations ({', '.join(GENERAL_SKILLS)})")


if __name__ == "__main__":
    main(tyro.cli(Args))
