"""What the patches share: fairseq's originals they replaced, and the flags of a running load."""

from __future__ import annotations

#: fairseq's functions and classes as they were before :func:`~powernorm_fairseq.compat.install`
ORIGINAL: dict = {}
#: set while Trainer.load_checkpoint runs: the checkpoint being read is for training, not decoding
TRAINING_LOAD: dict = {}
#: set while an eval-lm dataloader is built: its size filter must not drop anything
EVAL_LM: dict = {}
#: set once one of the plugin's models is built in this process (its changes of fairseq's data
#: behaviour apply to the plugin's models only; fairseq's own architectures train as stock)
PLUGIN_MODEL: dict = {}
