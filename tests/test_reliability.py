"""Reliability: no lost runs, no silent wrong answers, one clear line for every bad input.

The command-line cases live in one table, run in this process through ``main`` (fast) and,
marked slow, through the installed console script in subprocesses (the way users meet them).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffuser_graph import DiffuserAttention, DiffuserConfig, DiffuserForCausalLM, PatternSpec
from diffuser_graph.checkpoint import load_checkpoint
from diffuser_graph.cli import main
from diffuser_graph.config import ConfigError
from diffuser_graph.tasks import DataError, ListOpsTask, TextTask, load_task, text
from diffuser_graph.train import RunConfig, read_metrics, train
from runs import TINY
from runs import tiny_run as tiny

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "diffuser-graph"

def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files the command-line cases need: a config, a trained run (and copies), bad files."""
    root = tmp_path_factory.mktemp("world")
    write_yaml(root / "tiny.yaml", {**TINY, "out_dir": str(root / "run")})
    train(tiny(root / "run"), progress=False)
    for copy in ("run-resume", "run-nobest", "run-lr"):
        shutil.copytree(root / "run", root / copy)
    (root / "run-nobest" / "best.pt").unlink()
    (root / "duplicate.yaml").write_text("seed: 1\nmodel:\n  hops: 2\nmodel:\n  hops: 3\n")
    (root / "latin1.yaml").write_bytes(b"seed: 1\n# caf\xe9\n")
    (root / "folder.yaml").mkdir()
    lra = root / "lra"
    lra.mkdir()
    for name in ("basic_train.tsv", "basic_val.tsv", "basic_test.tsv"):
        (lra / name).write_bytes(b"Source\tTarget\n[MAX 1 2 ]\t2\n[MIN 3 \xff ]\t3\n")
    for name, train_csv in (("latin-text", b"text,label\nna\xefve,1\n"),
                            ("columns", b"text,label\nx,1,2\n")):
        (root / name).mkdir()
        (root / name / "train.csv").write_bytes(train_csv)
        for split in ("val", "test"):
            (root / name / f"{split}.csv").write_text("text,label\nfine,0\n")
    write_yaml(root / "official-8192.yaml", {"seq_lens": [8192], "variants": {
        "official": {"kind": "official"}}, "regular_like": None})
    write_yaml(root / "window0.yaml", {"seq_lens": [64], "variants": {"w": {"window": 0}},
                                       "regular_like": None, "histogram_len": 64,
                                       "diffusion": {"seq_len": 32, "head_dim": 4}})
    (root / "a-file").write_text("not a folder")
    return root


@dataclass
class Case:
    name: str
    argv: list  # "{root}" is replaced by the world folder
    message: str


CASES = [
    Case("eval output would overwrite the checkpoint",
         ["eval", "{root}/tiny.yaml", "--checkpoint", "{root}/run/best.pt", "--out",
          "{root}/run/best.pt"], "is an input of this command"),
    Case("eval output in a file, not a folder",
         ["eval", "{root}/tiny.yaml", "--checkpoint", "{root}/run/best.pt", "--out",
          "{root}/a-file/eval.json"], "is not a writable folder"),
    Case("eval of a checkpoint that is not there",
         ["eval", "{root}/tiny.yaml", "--checkpoint", "{root}/none.pt"], "none.pt does not exist"),
    Case("eval with another model section",
         ["eval", "{root}/tiny.yaml", "model.attention=full", "--checkpoint",
          "{root}/run/best.pt"],
         "differs from the checkpoint's in attention (config 'full', checkpoint 'diffuser')"),
    Case("--stop-after 0", ["train", "{root}/tiny.yaml", "out_dir={root}/x", "--stop-after", "0"],
         "--stop-after must be a step >= 1, got 0"),
    Case("--stop-after -5", ["train", "{root}/tiny.yaml", "out_dir={root}/x", "--stop-after",
                             "-5"], "--stop-after must be a step >= 1, got -5"),
    Case("--resume --stop-after before the checkpoint",
         ["train", "{root}/tiny.yaml", "out_dir={root}/run-resume", "--resume", "--stop-after",
          "1"], "is already at step 12; --stop-after 1 would train nothing"),
    Case("resume with a changed setting",
         ["train", "{root}/tiny.yaml", "out_dir={root}/run-lr", "train.lr=0.5", "--resume"],
         "differs from the one {root}/run-lr was started with in train.lr"),
    Case("resume without best.pt",
         ["train", "{root}/tiny.yaml", "out_dir={root}/run-nobest", "--resume"],
         "best.pt is missing"),
    Case("a key twice in a YAML file", ["train", "{root}/duplicate.yaml"],
         "duplicate.yaml:4: not valid YAML: key 'model' appears twice (first on line 2)"),
    Case("a config that is not UTF-8", ["train", "{root}/latin1.yaml"],
         "latin1.yaml:2: not UTF-8 text (byte 0xe9"),
    Case("a config that is a folder", ["train", "{root}/folder.yaml"], "is a folder, not a file"),
    Case("a pattern config that is not UTF-8",
         ["pattern", "--length", "64", "--config", "{root}/latin1.yaml"],
         "latin1.yaml:2: not UTF-8 text"),
    Case("a ListOps TSV that is not UTF-8",
         ["train", "{root}/tiny.yaml", "task.path={root}/lra", "out_dir={root}/x"],
         "basic_train.tsv:3: not UTF-8 text (byte 0xff"),
    Case("a text CSV that is not UTF-8",
         ["train", str(REPO / "configs/text-small.yaml"), "task.path={root}/latin-text",
          "out_dir={root}/x"], "train.csv:2: not UTF-8 text"),
    Case("a text CSV row with a column too many",
         ["train", str(REPO / "configs/text-small.yaml"), "task.path={root}/columns",
          "out_dir={root}/x"], "train.csv:2: expected 2 columns, got 3"),
    Case("a data folder that does not exist",
         ["train", "{root}/tiny.yaml", "task.path={root}/no/such", "out_dir={root}/x"],
         "no/such: folder does not exist"),
    Case("a path the image task would ignore",
         ["train", str(REPO / "configs/image-small.yaml"), "task.path=no/such/folder",
          "out_dir={root}/x"], "task.image: Value error, path (no/such/folder) is only read "
                               "with source: cifar10"),
    Case("hops: true", ["train", "{root}/tiny.yaml", "model.hops=true"],
         "model.hops: Value error, must be an integer, not a boolean"),
    Case("window: true", ["pattern", "--length", "64", "window=true"],
         "window: Value error, must be an integer, not a boolean"),
    Case("an empty out_dir", ["train", "{root}/tiny.yaml", "out_dir="],
         "out_dir: String should have at least 1 character"),
    Case("sample at temperature nan",
         ["sample", "--checkpoint", "{root}/run/best.pt", "--prompt", "x", "--temperature",
          "nan"], "--temperature a number >= 0"),
    Case("spectral: a variant that fits no length",
         ["spectral", "{root}/official-8192.yaml", "--out", "{root}/spectral-none"],
         "variant 'official' (kind official, max_len 4096) fits none of seq_lens [8192]"),
    Case("spectral: a window-0 variant",
         ["spectral", "{root}/window0.yaml", "--out", "{root}/spectral-w0", "--quiet"],
         "isolated node"),
    Case("pattern --hops -1", ["pattern", "--length", "64", "--hops", "-1"],
         "--hops at least 1"),
    Case("pattern --length 1", ["pattern", "--length", "1"], "--length must be at least 2"),
    Case("pattern window=0", ["pattern", "--length", "64", "window=0"], "isolated node"),
    Case("pattern --out a folder", ["pattern", "--length", "64", "--out", "{root}/pictures/"],
         "pictures is a folder; give a file name"),
    Case("examples --out a folder",
         ["examples", str(REPO / "configs/image-small.yaml"), "--out", "{root}/"],
         "is a folder; give a file name"),
    Case("export of a checkpoint that is not there",
         ["export", "{root}/none.pt", "{root}/exported"], "none.pt does not exist"),
    Case("export into a folder that holds files",
         ["export", "{root}/run/best.pt", "{root}/run"],
         "already exists and is not an empty folder"),
    Case("train without a config", ["train"],
         "diffuser-graph train: the following arguments are required: config"),
    Case("an unknown flag", ["train", "{root}/tiny.yaml", "--bogus"],
         "unrecognized arguments: --bogus"),
]


def fill(argv, root):
    return [part.replace("{root}", str(root)) for part in argv]


def check_failure(code, err, case, root):
    assert code == 2, (case.name, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (case.name, err)
    assert case.message.replace("{root}", str(root)) in lines[0], (case.name, lines[0])
    assert "Traceback" not in err


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_failure_is_one_clear_line(case, world, capsys):
    code = main(fill(case.argv, world))
    check_failure(code, capsys.readouterr().err, case, world)


@pytest.mark.slow
def test_every_failure_is_one_clear_line_from_the_console_script(world):
    def run(case):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([str(SCRIPT), *fill(case.argv, world)], capture_output=True,
                              text=True, env=env, timeout=300)
        return case, done

    with ThreadPoolExecutor(max_workers=2) as pool:
        for case, done in pool.map(run, CASES):
            check_failure(done.returncode, done.stderr, case, world)


def test_failed_commands_leave_inputs_and_no_partial_output(world, capsys):
    checkpoint = world / "run" / "best.pt"
    before = checkpoint.read_bytes()
    main(fill(CASES[0].argv, world))
    assert checkpoint.read_bytes() == before
    main(fill(CASES[1].argv, world))
    assert sorted(os.listdir(world / "run")) == sorted(os.listdir(world / "run-resume"))
    for case in CASES:
        if case.argv[0] == "spectral":
            main(fill(case.argv, world))
            assert not Path(fill(case.argv, world)[3]).exists(), case.name


def test_debug_shows_the_traceback(world):
    with pytest.raises(ConfigError, match="does not exist"):
        main(["train", str(world / "missing.yaml"), "--debug"])


def test_overrides_may_follow_the_flags(tmp_path):
    config = write_yaml(tmp_path / "tiny.yaml", {**TINY, "out_dir": str(tmp_path / "a")})
    assert main(["train", str(config), "--quiet", "--stop-after", "2",
                 f"out_dir={tmp_path / 'b'}", "train.max_steps=4"]) == 0
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 2
    assert not (tmp_path / "a").exists()


# --- run folders: locks, metrics, resume -----------------------------------------------------

def test_a_run_folder_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (out / ".lock").write_text(f"{sleeper.pid}\n")
        with pytest.raises(ConfigError, match=f"in use by another run \\(process {sleeper.pid}"):
            train(tiny(out), progress=False)
        assert not (out / "metrics.jsonl").exists()  # nothing written
    finally:
        sleeper.kill()
        sleeper.wait()
    train(tiny(out, max_steps=4), progress=False)
    assert f"taking over {out / '.lock'} from process {sleeper.pid}" in capsys.readouterr().err
    assert not (out / ".lock").exists()  # released at the end


def test_a_fresh_run_starts_a_fresh_metrics_file(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 2, "split": "train"}) + "\n")
    train(tiny(out, max_steps=4), progress=False)
    steps = [(r["step"], r["split"]) for r in read_metrics(out / "metrics.jsonl")]
    assert steps == [(2, "train"), (4, "train"), (4, "val")]
    assert read_metrics(out / "metrics.jsonl")[0]["loss"] > 0  # the new record, not the old


def test_resume_survives_a_torn_last_metrics_line(tmp_path):
    straight, torn = tmp_path / "straight", tmp_path / "torn"
    train(tiny(straight), progress=False)
    train(tiny(torn), stop_after=8, progress=False)
    with (torn / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 9, "split": "tra')  # the process died mid-write
    train(tiny(torn), resume=True, progress=False)
    assert read_metrics(torn / "metrics.jsonl") == read_metrics(straight / "metrics.jsonl")
    (torn / "metrics.jsonl").write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not a JSON record"):
        read_metrics(torn / "metrics.jsonl")


def test_resume_allows_threads_device_and_a_moved_folder(tmp_path):
    first = tmp_path / "first"
    train(tiny(first), stop_after=4, progress=False)
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    resumed = tiny(moved, threads=2, device="cpu", eval_batch_size=4)
    assert train(resumed, resume=True, progress=False)["best_step"] > 0


def test_stop_after_between_evaluations_resumes_exactly(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(tiny(straight), progress=False)
    assert train(tiny(stopped), stop_after=5, progress=False) == {"stopped_at": 5}
    assert load_checkpoint(stopped / "last.pt")["step"] == 5
    assert load_checkpoint(stopped / "best.pt")["step"] == 4
    train(tiny(stopped), resume=True, progress=False)
    assert read_metrics(stopped / "metrics.jsonl") == read_metrics(straight / "metrics.jsonl")
    a, b = (load_checkpoint(p / "last.pt")["model"] for p in (straight, stopped))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_written_files_are_readable_like_any_other(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, max_steps=4), progress=False)
    plain = tmp_path / "plain"
    plain.write_text("x")
    mode = plain.stat().st_mode & 0o777
    for name in ("config.yaml", "metrics.jsonl", "results.json", "curves.png", "last.pt"):
        assert (out / name).stat().st_mode & 0o777 == mode, name


# --- readers --------------------------------------------------------------------------------

def test_readers_take_long_fields_a_bom_and_trailing_blank_lines(tmp_path):
    long_review = "word " * 60_000  # 300 KB in one CSV field
    (tmp_path / "train.csv").write_text(f'\ufefftext,label\n"{long_review}",1\nshort,0\n\n\n',
                                        encoding="utf-8")
    (tmp_path / "val.tsv").write_text("text\tlabel\nok\t1\n\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "fine", "label": 0}) + "\n\n")
    data = load_task(TextTask(path=str(tmp_path), max_length=400_000), seed=0)
    assert len(data.train) == 2 and len(data.train.sequences[0]) == len(long_review) + 1
    assert len(data.val) == 1 and len(data.test) == 1
    assert text.read_file(tmp_path / "train.csv", 16).labels.tolist() == [1, 0]


def test_paths_expand_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / "lra"
    folder.mkdir()
    for name in ("basic_train.tsv", "basic_val.tsv", "basic_test.tsv"):
        (folder / name).write_text("Source\tTarget\n[MAX 1 2 ]\t2\n\n")
    task = ListOpsTask(path="~/lra")
    assert task.path == str(folder)
    assert load_task(task, seed=0).train.labels.tolist() == [2]
    assert tiny("~/runs/x").out_dir == str(tmp_path / "runs" / "x")


def test_a_file_given_as_a_data_folder(world):
    with pytest.raises(DataError, match="a-file: is a file, not a folder"):
        load_task(ListOpsTask(path=str(world / "a-file")), seed=0)


# --- the library boundary ------------------------------------------------------------------------

def test_numpy_scalars_are_numbers_and_wrong_types_are_named():
    layer = DiffuserAttention(8, np.int64(2), alpha=np.float32(0.25), hops=np.int64(3))
    assert (layer.num_heads, layer.diffusion.hops, layer.diffusion.alpha) == (2, 3, 0.25)
    with pytest.raises(ValueError, match="expected a PackedBatch or a DGL graph, got int"):
        layer(5, torch.randn(4, 8))
    with pytest.raises(ValueError, match="window"):
        PatternSpec(window=True)
    with pytest.raises(ValueError, match="causal"):
        PatternSpec(causal=2)


def test_an_untrained_language_model_starts_near_the_uniform_loss():
    torch.manual_seed(0)
    config = DiffuserConfig(vocab_size=258, num_labels=258, hidden_size=64, num_heads=4,
                            pattern=PatternSpec(window=4, causal=True), pad_token_id=0)
    model = DiffuserForCausalLM(config).eval()
    ids, targets = torch.randint(2, 258, (2, 4, 64))
    loss, _ = model(ids, labels=targets)
    assert abs(float(loss) - np.log(258)) < 0.1  # nats; was ~40 with N(0, 1) embeddings
    assert torch.all(model.encoder.tokens.weight[config.pad_token_id] == 0)


# --- interruptions ------------------------------------------------------------------------------

def start_training(config_path, *flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([str(SCRIPT), "train", str(config_path), "--quiet", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(condition, process, timeout=240.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def steps_logged(out):
    try:
        return [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    except (ValueError, OSError):
        return []


SLOWER = {"task": {**TINY["task"], "train_size": 256}, "model": {**TINY["model"],
                                                                 "hidden_size": 64},
          "train": {**TINY["train"], "batch_size": 32, "max_steps": 40, "eval_every": 20,
                    "log_every": 1}}  # ~10 steps a second: room to act between checkpoints


def uninterrupted_and_interrupted(tmp_path):
    """The reference run trained straight through, and the run folder and config to interrupt."""
    straight, out = tmp_path / "straight", tmp_path / "run"
    train(RunConfig.model_validate({**TINY, **SLOWER, "out_dir": str(straight)}), progress=False)
    return straight, out, write_yaml(tmp_path / "run.yaml", {**TINY, **SLOWER, "out_dir": str(out)})


def assert_same_run(straight, out):
    a, b = (load_checkpoint(p / "last.pt")["model"] for p in (straight, out))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert read_metrics(out / "metrics.jsonl") == read_metrics(straight / "metrics.jsonl")


@pytest.mark.slow
def test_sigint_and_sigterm_save_last_pt_and_exit_cleanly(tmp_path):
    straight, out, config = uninterrupted_and_interrupted(tmp_path)
    for number, flags in ((signal.SIGINT, ()), (signal.SIGTERM, ("--resume",))):
        process = start_training(config, *flags)
        target = len(steps_logged(out)) + 3
        wait_for(lambda target=target: len(steps_logged(out)) >= target, process)
        process.send_signal(number)
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        name = signal.Signals(number).name
        assert f"stopped on {name} at step" in stdout and "--resume" in stdout
        step = load_checkpoint(out / "last.pt")["step"]
        assert f"at step {step} " in stdout and not (out / ".lock").exists()
    train(RunConfig.model_validate({**TINY, **SLOWER, "out_dir": str(out)}), resume=True,
          progress=False)
    assert_same_run(straight, out)


@pytest.mark.slow
def test_sigkill_at_three_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight, out, config = uninterrupted_and_interrupted(tmp_path)

    def kill_when(condition, *flags):
        process = start_training(config, *flags)
        wait_for(condition, process)
        process.kill()
        process.wait()

    # 1. Before the first checkpoint: the restart is a fresh run (it takes over the dead lock).
    kill_when(lambda: len(steps_logged(out)) >= 3)
    assert not (out / "last.pt").exists() and (out / ".lock").exists()
    # 2. After a checkpoint, a few steps past it.
    kill_when(lambda: (out / "last.pt").exists() and max(steps_logged(out), default=0) >= 24)
    assert load_checkpoint(out / "last.pt")["step"] == 20
    # 3. Mid-write of metrics: a kill while a record is half written leaves a torn last line.
    kill_when(lambda: max(steps_logged(out), default=0) >= 28, "--resume")
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 29, "split": "train", "lo')
    done = start_training(config, "--resume")
    stdout, stderr = done.communicate(timeout=240)
    assert done.returncode == 0, stderr
    assert_same_run(straight, out)
    steps = [(r["step"], r["split"]) for r in read_metrics(out / "metrics.jsonl")]
    assert len(steps) == len(set(steps))  # each step once
