import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import torch
import yaml

from diffuser_graph.checkpoint import CheckpointError, load_checkpoint
from diffuser_graph.cli import main
from diffuser_graph.config import ConfigError, load_config
from diffuser_graph.tasks import collate, load_task
from diffuser_graph.train import RunConfig, model_for_task, read_metrics, train
from runs import TINY, tiny_run

REPO = Path(__file__).resolve().parents[1]

def tiny(tmp_path, name="run", **train_overrides):
    return tiny_run(tmp_path / name, **train_overrides)


def test_training_writes_the_run_folder(tmp_path):
    config = tiny(tmp_path)
    results = train(config, progress=False)
    out = Path(config.out_dir)
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "best.pt", "last.pt",
                 "results.json"):
        assert (out / name).stat().st_size > 0, name
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"]["vocab_size"] == 17 and resolved["model"]["num_labels"] == 10
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "val"] == [4, 8, 12]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6, 8, 10, 12]
    assert 0 <= results["test"]["accuracy"] <= 1 and 0 < results["test"]["majority_rate"] < 1
    assert json.loads((out / "results.json").read_text()) == results
    assert results["speed"]["timed_steps"] == 12 and results["speed"]["train_steps_per_s"] > 0
    best = load_checkpoint(out / "best.pt")
    assert best["step"] == results["best_step"]


def test_resume_is_bit_exact(tmp_path):
    straight = tiny(tmp_path, "straight")
    train(straight, progress=False)
    interrupted = tiny(tmp_path, "interrupted")
    assert train(interrupted, stop_after=8, progress=False) == {"stopped_at": 8}
    assert load_checkpoint(Path(interrupted.out_dir) / "last.pt")["step"] == 8
    train(interrupted, resume=True, progress=False)
    a = load_checkpoint(Path(straight.out_dir) / "last.pt")
    b = load_checkpoint(Path(interrupted.out_dir) / "last.pt")
    assert a["step"] == b["step"] == 12
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    records_a = read_metrics(Path(straight.out_dir) / "metrics.jsonl")
    records_b = read_metrics(Path(interrupted.out_dir) / "metrics.jsonl")
    assert records_a == records_b


def test_resume_drops_metrics_written_after_the_checkpoint(tmp_path):
    config = tiny(tmp_path)
    train(config, stop_after=8, progress=False)
    metrics = Path(config.out_dir) / "metrics.jsonl"
    with metrics.open("a") as handle:  # a crash after step 8's checkpoint, before the next one
        handle.write(json.dumps({"step": 9, "split": "train", "loss": 9.9, "accuracy": 0.0}) + "\n")
    train(config, resume=True, progress=False)
    assert all(r["loss"] != 9.9 for r in read_metrics(metrics))


def test_existing_run_is_never_overwritten(tmp_path):
    config = tiny(tmp_path)
    train(config, stop_after=4, progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config, progress=False)
    changed = config.model_copy(update={"seed": 99})
    with pytest.raises(ConfigError, match="differs from the one"):
        train(changed, resume=True, progress=False)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(corrupt)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="lacks model weights"):
        load_checkpoint(tmp_path / "other.pt")
    config = tiny(tmp_path, "resume-nothing")
    with pytest.raises(CheckpointError, match="does not exist"):
        train(config, resume=True, progress=False)


def test_train_and_eval_commands(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "out_dir": str(tmp_path / "cli")}))
    assert main(["train", str(path), "train.max_steps=4", "--quiet"]) == 0
    assert "| test |" in capsys.readouterr().out
    checkpoint = tmp_path / "cli" / "best.pt"
    assert main(["eval", str(path), "--checkpoint", str(checkpoint)]) == 0
    evaluation = json.loads((tmp_path / "cli" / "eval.json").read_text())
    assert evaluation["test"]["n"] == 16
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 10)
    assert main(["eval", str(path), "--checkpoint", str(tmp_path / "bad.pt")]) == 2
    assert "corrupt" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,message", [
    (["train.lr=-1"], "train.lr: Input should be greater than 0"),
    (["model.hops=0"], "model.hops"),
    (["task.name=imagenet"], "task"),
    (["train.bacth_size=4"], "train.bacth_size: Extra inputs are not permitted"),
])
def test_config_errors_name_the_key(tmp_path, overrides, message):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    with pytest.raises(ConfigError, match=message):
        load_config(path, RunConfig, overrides)


def test_sequences_longer_than_max_positions_are_rejected(tmp_path):
    config = tiny(tmp_path)
    config = config.model_copy(update={"model": config.model.model_copy(
        update={"max_positions": 20})})
    with pytest.raises(ConfigError, match=r"sequences of \d+ tokens but model.max_positions is 20"):
        train(config, progress=False)


SHIPPED = [name + size for name in ("listops", "text", "image", "pathfinder", "retrieval",
                                      "lm", "multihop")
           for size in ("", "-small")] + ["mlm-small", "mlm-roberta", "text-roberta", "text-1k"] + [
    f"{name}-official" for name in ("listops", "text", "image", "pathfinder", "retrieval")]
SMALL_DATA = {"listops": ["task.train_size=64", "task.val_size=16", "task.test_size=16"],
              "text": ["task.train_size=64", "task.val_size=16", "task.test_size=16"],
              "image": [],
              "pathfinder": ["task.train_size=64", "task.val_size=16", "task.test_size=16"],
              "retrieval": ["task.train_size=64", "task.val_size=16", "task.test_size=16"],
              "lm": ["task.max_bytes=20000"],
              "mlm": ["task.max_bytes=20000"],
              "multihop": ["task.train_size=64", "task.val_size=16", "task.test_size=16"]}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_are_valid(name):
    config = load_config(REPO / "configs" / f"{name}.yaml", RunConfig)
    assert config.task.name in name
    assert sorted(p.stem for p in (REPO / "configs").glob("*.yaml")) == sorted(
        [*SHIPPED, "spectral"])  # a new config is added to this list, and so tested
    if name.endswith("-official"):  # the authors' architecture, the rest as the full config
        model = config.model
        assert (model.pattern.kind, model.layer_norm, model.alpha, model.hops, model.kernel,
                model.hop_dropout_at) == ("official", "post", 0.1, 5, "ppr", "after_mix")
        assert model.dropout == model.attn_dropout == model.hop_dropout == 0.1
        full = load_config(REPO / "configs" / f"{name.removesuffix('-official')}.yaml",
                           RunConfig)
        assert config.task == full.task and config.train == full.train


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SHIPPED if n.endswith("-small")])
def test_every_small_config_trains_end_to_end(name, tmp_path):
    task = name.removesuffix("-small")
    config = load_config(REPO / "configs" / f"{name}.yaml", RunConfig, [
        *SMALL_DATA[task], "train.max_steps=3", "train.eval_every=3", "train.log_every=1",
        f"out_dir={tmp_path / name}"])
    results = train(config, progress=False)
    assert results["best_step"] == 3 and 0 <= results["test"]["accuracy"] <= 1


def test_grid_pattern_must_match_the_images(tmp_path):
    config = load_config(REPO / "configs" / "image-small.yaml", RunConfig, [
        "model.pattern.image_size=[4,16]", f"out_dir={tmp_path / 'x'}"])
    with pytest.raises(ConfigError, match=r"image_size is \(4, 16\) but the task's sequences "
                                          r"are \(8, 8\)"):
        train(config, progress=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    data = json.loads(json.dumps(TINY))
    for key in ("dropout", "attn_dropout", "hop_dropout"):
        data["model"][key] = 0.0  # processes draw different dropout masks
    data["train"]["max_steps"] = 6
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    train(RunConfig.model_validate({**data, "out_dir": str(single_dir)}), progress=False)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump({**data, "out_dir": str(ddp_dir)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    f"--master_port={free_port()}", "-m", "diffuser_graph.cli", "train",
                    str(path), "--quiet"], check=True, env=env, timeout=300,
                   capture_output=True)
    single = load_checkpoint(single_dir / "last.pt")
    ddp = load_checkpoint(ddp_dir / "last.pt")
    for name, tensor in single["model"].items():
        # The key bias adds q.b to every score of a query alike, which softmax ignores: its
        # gradient is rounding noise that Adam normalises into arbitrary steps. It never
        # changes an output (checked on the logits below), so it is not compared.
        if not name.endswith("attention.key.bias"):
            torch.testing.assert_close(ddp["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    config = RunConfig.model_validate({**data, "out_dir": str(single_dir)})
    task = load_task(config.task, config.seed)
    batch = collate(task.val, range(len(task.val)))
    logits = [model_for_task(state, task).eval()(batch["input_ids"],
                                                           batch["attention_mask"])
              for state in (single, ddp)]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)


def test_device_setting_is_checked_and_resolved(tmp_path, monkeypatch):
    from diffuser_graph.train import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="train.device is 'cuda' but torch finds no CUDA"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="only 2 CUDA devices"):
        resolve_device("cuda:5")
    for bad in ("gpu", "cuda:x", "tpu:0"):
        with pytest.raises(pydantic.ValidationError, match="must be auto, cpu, cuda or cuda:N"):
            RunConfig.model_validate({**TINY, "train": {**TINY["train"], "device": bad}})


@pytest.mark.slow
def test_bf16_trains_listops_small_like_fp32(tmp_path):
    """bfloat16 autocast on the CPU: 200 steps of listops-small end within 0.02 nats of fp32's
    validation loss (bf16 keeps 8 bits of mantissa in the matmuls; attention runs in fp32)."""
    losses = {}
    for precision in ("fp32", "bf16"):
        config = load_config(REPO / "configs" / "listops-small.yaml", RunConfig, [
            "train.max_steps=200", "train.eval_every=100", f"train.precision={precision}",
            f"out_dir={tmp_path / precision}"])
        train(config, progress=False)
        records = read_metrics(tmp_path / precision / "metrics.jsonl")
        losses[precision] = [r["loss"] for r in records if r["split"] == "val"]
    assert all(math.isfinite(x) for x in losses["bf16"])
    assert losses["bf16"][-1] < losses["bf16"][0] < math.log(10)  # it learns
    assert abs(losses["bf16"][-1] - losses["fp32"][-1]) < 0.02


def test_checkpoints_record_the_model_class_and_load_on_a_given_device(tmp_path):
    from diffuser_graph.checkpoint import model_from_checkpoint

    config = tiny(tmp_path)
    train(config, stop_after=4, progress=False)
    state = load_checkpoint(Path(config.out_dir) / "last.pt")
    assert state["model_class"] == "DiffuserForSequenceClassification"
    model = model_from_checkpoint(state, device="cpu")
    assert next(model.parameters()).device == torch.device("cpu")
    from diffuser_graph import DiffuserForCausalLM
    with pytest.raises(CheckpointError, match="holds a DiffuserForSequenceClassification, not a "
                                              "DiffuserForCausalLM"):
        model_from_checkpoint(state, DiffuserForCausalLM)
