"""The CUDA paths: pure-torch engines on the GPU, training there, checkpoints back on the CPU.

DGL's PyPI wheel has no CUDA kernels, so on a GPU every pattern must run on the block or gather
engine. These tests run only where torch sees a CUDA device (they are skipped elsewhere); the
same functions are held to the dense reference on the CPU by test_engines.py.
"""
import json

import pytest
import torch

from diffuser_graph import (
    PackedBatch,
    PatternSpec,
    build_graph,
    dense_diffusion_attention,
    dense_mask,
    diffusion_attention,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda", 0)
PATTERNS = [PatternSpec(window=4, num_global=2, num_random=3),
            PatternSpec(window=3, num_random=2, causal=True),
            PatternSpec(kind="grid", image_size=(6, 7), window=1, num_global=1, num_random=2),
            PatternSpec(kind="official", window=16, num_random=2, num_global=3, max_len=256)]


@pytest.mark.parametrize("spec", PATTERNS, ids=lambda s: s.kind + ("-causal" if s.causal else ""))
def test_auto_runs_every_pattern_on_the_gpu_and_matches_the_reference(spec):
    n = 42
    batch = PackedBatch.from_lengths([n], spec, device=CUDA)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    out = diffusion_attention(batch, q.to(CUDA), k.to(CUDA), v.to(CUDA), hops=4)
    assert batch.engine_name in ("block", "gather") and out.device.type == "cuda"
    expected = dense_diffusion_attention(dense_mask(build_graph(n, spec)), q, k, v, hops=4)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-10)


def test_training_on_the_gpu_in_bf16_and_loading_on_the_cpu(tmp_path):
    from diffuser_graph.checkpoint import load_checkpoint, model_from_checkpoint
    from diffuser_graph.tasks import collate, load_task
    from diffuser_graph.train import RunConfig, train

    config = RunConfig.model_validate({
        "seed": 0, "out_dir": str(tmp_path / "run"),
        "task": {"name": "listops", "max_depth": 3, "max_args": 4, "min_length": 6,
                 "max_length": 40, "train_size": 64, "val_size": 16, "test_size": 16},
        "model": {"hidden_size": 32, "num_heads": 2, "num_layers": 2, "ffn_size": 64,
                  "max_positions": 48, "pattern": {"window": 2, "num_global": 1,
                                                   "num_random": 1}},
        "train": {"batch_size": 8, "max_steps": 6, "eval_every": 3, "log_every": 1,
                  "device": "cuda", "precision": "bf16"}})
    results = train(config, progress=False)
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results
    state = load_checkpoint(tmp_path / "run" / "best.pt")
    on_cpu = model_from_checkpoint(state, device="cpu").eval()
    on_gpu = model_from_checkpoint(state, device=CUDA).eval()
    data = load_task(config.task, config.seed)
    batch = collate(data.val, range(len(data.val)))
    with torch.no_grad():
        cpu_logits = on_cpu(batch["input_ids"], batch["attention_mask"])
        gpu_logits = on_gpu(batch["input_ids"].to(CUDA), batch["attention_mask"].to(CUDA))
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, rtol=1e-4, atol=1e-4)
