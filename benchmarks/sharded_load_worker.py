"""Run under torchrun by benchmarks/sharded_load.py and tests/test_sharded_load.py: load a model the way the scripts
do (`load_model(..., sharded_load=...)` then `dist.wrap`), and write what each process holds and what loading cost it.

    python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/sharded_load_worker.py MODEL OUT \\
        --dtype float32 --place train|frozen-sharded|frozen-full [--whole] [--value-model] [--stats-only]

OUT/rank{r}.pt: {"params": name -> this rank's local tensor (its FSDP2 shard, or the whole tensor), "buffers",
"out": the fused head's log-probs of a fixed batch, "rss_before"/"rss_peak": bytes, the peak while loading
and placing, "seconds": load_model + wrap, "check_seconds": of which the fused-head check, "config"/"generation_config": the model's}.
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import dist
from common.model import load_model


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--place", default="train", choices=["train", "frozen-sharded", "frozen-full"])
    p.add_argument("--whole", action="store_true", help="load whole on every process (the path before sharded loading)")
    p.add_argument("--value-model", action="store_true", help="AutoModelForSequenceClassification, num_labels=1")
    p.add_argument("--stats-only", action="store_true", help="write no parameters or buffers (a large model)")
    a = p.parse_args()
    dist.init()
    kwargs = {}
    if a.value_model:
        from transformers import AutoModelForSequenceClassification

        kwargs = {"model_class": AutoModelForSequenceClassification, "num_labels": 1}
    import common.logprobs

    peaks = []  # the peak while loading: up to the fused-head check, which both paths run once the weights are in
    check = common.logprobs.check_fused_head

    check_seconds = []

    def record_then_check(*args, **kwargs):
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        begin = time.perf_counter()
        try:
            return check(*args, **kwargs)
        finally:
            check_seconds.append(time.perf_counter() - begin)

    common.logprobs.check_fused_head = record_then_check
    torch.manual_seed(0)
    rss_before = rss_bytes()
    start = time.perf_counter()
    model = load_model(a.model, dtype=a.dtype, device="cpu", sharded_load=not a.whole, **kwargs)
    if a.place != "train":
        model.eval().requires_grad_(False)
    model = dist.wrap(model, train=a.place == "train", shard=a.place == "frozen-sharded")
    seconds = time.perf_counter() - start
    # a sharded load checks the head after loading, through FSDP (a forward that gathers the root's parameters, as
    # every training forward does); a whole load checks it before sharding, on the plain model
    rss_peak = peaks[0] if peaks and not a.whole else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params, buffers = {}, {}
    if not a.stats_only:
        params = {
            n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone() for n, p in model.named_parameters()
        }
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    ids = torch.arange(24).reshape(2, 12) * 7 % 90 + 3
    mask = torch.ones_like(ids)
    with torch.no_grad():
        if a.value_model:
            from common.model import last_token_scores

            out = dist.root_forward(model, lambda m: last_token_scores(m, ids, mask))
        else:
            from common.logprobs import token_logprobs

            out = token_logprobs(model, ids, mask)
    torch.save(
        {
            "params": params,
            "buffers": buffers,
            "out": out,
            "config": model.config.to_dict(),
            "generation_config": model.generation_config.to_dict() if model.can_generate() else None,
            "rss_before": rss_before,
            "rss_peak": rss_peak,
            "seconds": seconds,
            "check_seconds": sum(check_seconds),
        },
        Path(a.out) / f"rank{dist.rank()}.pt",
    )
    dist.close()


if __name__ == "__main__":
    main()
