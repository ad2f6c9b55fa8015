"""The leak probe of a causal language model: does position t read the tokens after it?

For each block of ``T`` tokens and each position ``t < T - 1``, the tokens after ``t`` are shuffled
within the block and the model's log-probability of the token it predicts at ``t`` (the block's
token ``t + 1``) is taken again. A model whose attention applies its causal mask gives exactly the
same log-probability (a change of 0: the probe's test); a model that reads ahead changes it. The
Tensorized Transformer authors' multi-linear attention builds its causal mask and never applies
it (``--multilinear-unmasked`` reproduces that): the probe measures how much its predictions
depend on the tokens it predicts.

Usage::

    python -m powernorm_fairseq.analysis.leak --path CKPT --data data/ptb/data-bin --blocks 64

The model's ``forward(tokens)`` returns logits ``(B, T, V)`` (fairseq's language models);
pure torch otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from powernorm_fairseq.pipeline.common import atomic_write_json


@torch.no_grad()
def leak_probe(model: nn.Module, blocks: Tensor, seed: int = 1) -> dict:
    """The change in the log-probability of each block's next token when the tokens after it are
    shuffled, over every block and position.

    Args:
        model: a causal LM in eval mode; ``model(tokens)`` returns the logits ``(B, T, V)`` (or a
            tuple whose first item they are).
        blocks: ``(B, T)`` token ids (``T >= 3``).
        seed: of the shuffles.

    Returns:
        ``{"mean_abs": mean |delta log p|, "max_abs": max |delta log p|, "positions": count}``
        in nats; exactly 0 for a model that never reads ahead.
    """
    if blocks.dim() != 2 or blocks.size(1) < 3:
        raise ValueError(f"leak_probe needs blocks of shape (B, T >= 3), got {tuple(blocks.shape)}")
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)

    def logp(tokens: Tensor) -> Tensor:
        out = model(tokens)
        logits = out[0] if isinstance(out, tuple) else out
        return torch.log_softmax(logits.double(), dim=-1)

    base = logp(blocks)
    length = blocks.size(1)
    deltas = []
    for t in range(length - 2):  # at least two tokens after t to shuffle
        shuffled = blocks.clone()
        after = shuffled[:, t + 1:]  # the token predicted at t (position t + 1) and the rest
        order = torch.stack([torch.randperm(after.size(1), generator=g) for _ in range(after.size(0))])
        shuffled[:, t + 1:] = torch.gather(after, 1, order)
        # the log-probability of the original next token, with the inputs after t moved
        target = blocks[:, t + 1:t + 2]
        before = base[:, t].gather(1, target).squeeze(1)
        after_logp = logp(shuffled)[:, t].gather(1, target).squeeze(1)
        deltas.append((after_logp - before).abs())
    model.train(was_training)
    d = torch.cat(deltas)
    return {"mean_abs": float(d.mean()), "max_abs": float(d.max()), "positions": int(d.numel())}


def _blocks(data: Path, length: int, count: int) -> Tensor:
    """The first ``count`` blocks of ``length`` tokens of the test split of a fairseq LM data-bin."""
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(str(data / "dict.txt"))
    dataset = data_utils.load_indexed_dataset(str(data / "test"), dictionary)
    stream = torch.cat([dataset[i] for i in range(len(dataset))])
    usable = stream[: (stream.numel() // length) * length].view(-1, length)
    return usable[:count].long()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m powernorm_fairseq.analysis.leak", description=__doc__.split("\n")[0])
    p.add_argument("--path", required=True, help="a language model checkpoint")
    p.add_argument("--data", required=True, help="its data-bin (dict.txt, test.*)")
    p.add_argument("--blocks", type=int, default=64, help="test blocks probed")
    p.add_argument("--out", help="JSON record (default: <checkpoint>.leak.json)")
    args = p.parse_args(argv)
    from fairseq import checkpoint_utils

    import powernorm_fairseq.models  # noqa: F401  (the plugin's models; compat)

    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task([args.path])
    model = models[0]
    length = int(cfg.task.tokens_per_sample)
    result = leak_probe(model, _blocks(Path(args.data), length, args.blocks))
    result.update(checkpoint=str(Path(args.path).resolve()), block_length=length, blocks=args.blocks,
                  unmasked=bool(getattr(cfg.model, "multilinear_unmasked", False)),
                  self_attention=str(getattr(cfg.model, "self_attention", "standard")))
    out = Path(args.out or Path(args.path).with_suffix(".leak.json"))
    atomic_write_json(out, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
