"""The tiny training run the training and reliability tests share (seconds on a CPU)."""
import json

from diffuser_graph.train import RunConfig

TINY = {
    "seed": 3,
    "task": {"name": "listops", "max_depth": 3, "max_args": 4, "min_length": 6,
             "max_length": 40, "train_size": 64, "val_size": 16, "test_size": 16},
    "model": {"hidden_size": 16, "num_heads": 2, "num_layers": 1, "ffn_size": 32,
              "max_positions": 48, "dropout": 0.1, "attn_dropout": 0.1, "hop_dropout": 0.1,
              "pattern": {"window": 1, "num_global": 1, "num_random": 1}, "hops": 2},
    "train": {"batch_size": 8, "lr": 0.003, "warmup_steps": 2, "max_steps": 12,
              "eval_every": 4, "log_every": 2, "eval_batch_size": 16, "threads": 1},
}


def tiny_run(out_dir, **train_settings) -> RunConfig:
    """``TINY`` writing into ``out_dir``, with ``train`` settings changed."""
    data = json.loads(json.dumps(TINY))
    data["out_dir"] = str(out_dir)
    data["train"].update(train_settings)
    return RunConfig.model_validate(data)
