"""Captioner decoding on a finished run: cached one-word steps against full-prefix recomputation.

    .venv/bin/python benchmarks/caption_decode.py --project PROJECT [--shards 2] [--repeats 2]

Loads PROJECT/models/captioner/captioner.pt and the first `--shards` clip shards, and captions
them twice per repeat: with `Captioner.generate` (each step runs the decoder on the newest word
against cached keys and values) and with the reference loop below (each step reruns the decoder
over the whole prefix, as `generate` did before session 14). Prints seconds, clips/s, the ratio
and how many captions agree (they must all agree: both are greedy over the same logits).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from components.captioner import BOS, EOS, Captioner, load_captioner, to_float  # noqa: E402
from components.clips import square_shard  # noqa: E402


@torch.no_grad()
def full_prefix_generate(model: Captioner, video: torch.Tensor, batch_size: int = 256) -> list[str]:
    """Greedy captions, the decoder rerun over the whole prefix at every step."""
    out: list[str] = []
    for start in range(0, len(video), batch_size):
        x = to_float(video[start : start + batch_size])
        memory, _ = model.encode(x)
        tokens = torch.full((len(x), 1), model.index[BOS], dtype=torch.long)
        causal = nn.Transformer.generate_square_subsequent_mask(model.max_len)
        for step in range(1, model.max_len):
            h = model.embed(tokens) + model.pos[:, :step]
            if model.object_slots:
                h = h + model.slots(memory, tokens)
            h = model.decoder(h, memory, tgt_mask=causal[:step, :step], tgt_is_causal=True)
            tokens = torch.cat([tokens, model.head(h[:, -1]).argmax(-1, keepdim=True)], 1)
            if (tokens == model.index[EOS]).any(1).all():
                break
        out.extend(model.detokenize(tokens[:, 1:]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model = load_captioner(args.project / "models/captioner/captioner.pt")
    shards = sorted((args.project / "data/clips").glob("shard-*.pt"))[: args.shards]
    video = torch.cat([square_shard(torch.load(s, weights_only=True)["video"], model.config["size"],
                                    model.config["frames"])
                       for s in shards])
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        cached = model.generate(video)
        t1 = time.perf_counter()
        full = full_prefix_generate(model, video)
        t2 = time.perf_counter()
        print(json.dumps({"repeat": rep, "clips": len(video), "object_tokens": model.object_tokens,
                          "cached_s": round(t1 - t0, 2), "full_prefix_s": round(t2 - t1, 2),
                          "cached_clips_per_s": round(len(video) / (t1 - t0), 1),
                          "speedup": round((t2 - t1) / (t1 - t0), 2),
                          "same_captions": sum(a == b for a, b in zip(cached, full)),
                          "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
