"""Studies: the grid, resuming, the aggregate, the CLI; one real study of tiny runs (slow)."""
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from diffuser_graph.cli import main
from diffuser_graph.config import ConfigError, load_config
from diffuser_graph.io import atomic_write_text
from diffuser_graph.study import StudyConfig, expand, run_study, status
from runs import TINY

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_config(tmp_path, **train) -> Path:
    """``TINY`` as a YAML file in ``tmp_path``, with ``train`` settings changed."""
    data = json.loads(json.dumps(TINY))
    data["train"].update(train)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def study(tmp_path, **fields) -> StudyConfig:
    data = {"out_dir": str(tmp_path / "study"), "configs": [str(tiny_config(tmp_path))],
            "seeds": [0, 1, 2], "grid": {"model.attention": ["diffuser", "sparse"]}, **fields}
    return StudyConfig.model_validate(data)


def fake_launcher(outcomes):
    """Writes results.json as a finished run would (atomically, as ``train`` does: another
    job's summary may read it at any moment); the value comes from ``outcomes``."""
    launched = []

    def launch(run, threads):
        launched.append((run, threads))
        value = outcomes(run)
        if value is None:
            return 1
        run.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.out_dir / "results.json", json.dumps({
            "best_step": 4, "val": {"accuracy": value}, "test": {"accuracy": value},
            "speed": {"train_steps_per_s": 10.0 + run.seed, "timed_steps": 12}}))
        return 0

    return launch, launched


def test_the_grid_is_configs_by_points_by_seeds_with_one_folder_each(tmp_path):
    s = study(tmp_path, grid={"model.attention": ["diffuser", "sparse"], "model.hops": [1, 3]},
              overrides={"train.max_steps": 6})
    runs = expand(s)
    assert len(runs) == 2 * 2 * 3 and len({run.out_dir for run in runs}) == 12
    first = runs[0]
    assert first.out_dir == tmp_path / "study" / "tiny" / "attention-diffuser__hops-1" / "seed0"
    assert first.overrides == ("train.max_steps=6", 'model.attention="diffuser"', "model.hops=1",
                               "seed=0", f"out_dir={first.out_dir}")
    assert [run.seed for run in runs[:3]] == [0, 1, 2]


@pytest.mark.parametrize("fields,message", [
    ({"seeds": [0, 0]}, "seeds must be distinct"),
    ({"grid": {"model.hops": []}}, "needs at least one value"),
    ({"grid": {"seed": [1, 2]}}, "set by the study"),
    ({"grid": {"model hops": [1]}}, "dotted key"),
    ({"configs": []}, "at least 1 item"),
    ({"jobs": 2}, "Extra inputs are not permitted"),
])
def test_bad_study_files_are_refused(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        study(tmp_path, **fields)


def test_a_bad_grid_value_is_refused_before_any_run_naming_the_run(tmp_path):
    s = study(tmp_path, grid={"model.hops": [2, 0]})
    launch, launched = fake_launcher(lambda run: 0.5)
    with pytest.raises(ConfigError, match=r"study run .*tiny.yaml \[model.hops=0\] seed 0: .*hops"):
        run_study(s, launcher=launch, progress=False)
    assert launched == []


def test_finished_runs_are_skipped_and_the_rest_resume(tmp_path):
    s = study(tmp_path)
    runs = expand(s)
    launch, launched = fake_launcher(lambda run: None if run.seed == 2 else 0.5)
    with pytest.raises(RuntimeError, match="2 of 6 study runs did not finish: .*exit 1"):
        run_study(s, jobs=2, launcher=launch, progress=False)
    assert [status(run) for run in runs] == ["done", "done", "new"] * 2
    (runs[2].out_dir).mkdir(parents=True)
    (runs[2].out_dir / "last.pt").write_bytes(b"")
    assert status(runs[2]) == "resume"
    launch, launched = fake_launcher(lambda run: 0.5)
    run_study(s, jobs=1, threads=3, launcher=launch, progress=False)
    assert [run for run, _ in launched] == [runs[2], runs[5]] and launched[0][1] == 3
    assert all(status(run) == "done" for run in runs)


def test_the_summary_holds_mean_and_sample_std_over_seeds(tmp_path):
    s = study(tmp_path)
    values = {("diffuser", 0): 0.5, ("diffuser", 1): 0.7, ("diffuser", 2): 0.9,
              ("sparse", 0): 0.25, ("sparse", 1): 0.25, ("sparse", 2): 0.4}
    launch, _ = fake_launcher(lambda run: values[(run.point[0][1], run.seed)])
    table = run_study(s, launcher=launch, progress=False)
    row = table[table["model.attention"] == "diffuser"].iloc[0]
    assert row["mean"] == pytest.approx(0.7)
    assert row["std"] == pytest.approx(math.sqrt(((0.2**2) * 2) / 2))  # sample std: n - 1
    assert row["values"] == [0.5, 0.7, 0.9] and row["steps_per_s"] == pytest.approx(11.0)
    out = tmp_path / "study"
    csv = (out / "summary.csv").read_text().splitlines()
    assert csv[0] == ("config,model.attention,seed,metric,value,val_value,steps_per_s,"
                      "best_step") and len(csv) == 7
    markdown = (out / "summary.md").read_text()
    assert "| attention=diffuser | 0.7000 ± 0.2000 | 3 | 0.5000, 0.7000, 0.9000 | 11.00 |" in (
        markdown)
    assert (out / "tiny-bars.png").read_bytes()[:4] == b"\x89PNG"


def test_numeric_grid_keys_get_a_curve_with_error_bars(tmp_path):
    s = study(tmp_path, grid={"model.hops": [1, 2, 4]}, seeds=[0, 1])
    launch, _ = fake_launcher(lambda run: 0.1 * run.point[0][1] + 0.01 * run.seed)
    run_study(s, launcher=launch, progress=False)
    assert (tmp_path / "study" / "tiny-hops.png").read_bytes()[:4] == b"\x89PNG"


def test_mapping_grid_values_are_summarised_by_their_json_text(tmp_path):
    patterns = [{"window": 2}, {"window": 2, "num_global": 1}]
    s = study(tmp_path, grid={"model.pattern": patterns}, seeds=[0, 1])
    launch, _ = fake_launcher(lambda run: 0.5 + 0.1 * len(run.point[0][1]) + 0.01 * run.seed)
    table = run_study(s, launcher=launch, progress=False)
    assert list(table["model.pattern"]) == ['{"window": 2}', '{"window": 2, "num_global": 1}']
    assert list(table["mean"]) == pytest.approx([0.605, 0.705])
    markdown = (tmp_path / "study" / "summary.md").read_text()
    assert '| pattern={"window": 2, "num_global": 1} | 0.7050 ± 0.0071 | 2 |' in markdown
    assert not (tmp_path / "study" / "tiny-pattern.png").exists()  # no curve for mappings


def test_the_shipped_studies_expand_and_validate():
    from diffuser_graph.study import check_runs

    for path in sorted((CONFIGS / "studies").glob("*.yaml")):
        s = load_config(path, StudyConfig)
        runs = expand(s)
        assert len(runs) >= 9, path
        check_runs(runs)


def test_cli_dry_run_lists_every_run(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "s"),
                                    "configs": [str(tiny_config(tmp_path))],
                                    "grid": {"model.hops": [1, 2]}}))
    assert main(["study", str(path), "--dry-run", "seeds=[4]"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("new ") for line in lines)
    assert lines[0].endswith("(%s model.hops=1, seed 4)" % (tmp_path / "tiny.yaml"))
    assert main(["study", str(path), "--jobs", "0"]) == 2
    assert main(["study", str(path), "--threads", "0"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_a_real_study_trains_resumes_and_summarises(tmp_path):
    config = tiny_config(tmp_path, max_steps=4, eval_every=2, log_every=2)
    s = StudyConfig.model_validate({"out_dir": str(tmp_path / "study"), "configs": [str(config)],
                                    "seeds": [0, 1], "grid": {"model.attention":
                                                              ["diffuser", "sparse"]}})
    table = run_study(s, jobs=2, threads=1, progress=False)
    assert len(table) == 2 and list(table["seeds"]) == [2, 2]
    runs = expand(s)
    assert all((run.out_dir / "train.log").exists() for run in runs)
    before = {run.out_dir: (run.out_dir / "results.json").stat().st_mtime_ns for run in runs}
    run_study(s, jobs=2, threads=1, progress=False)  # nothing left: nothing retrained
    assert {run.out_dir: (run.out_dir / "results.json").stat().st_mtime_ns
            for run in runs} == before


@pytest.mark.slow
def test_a_stopped_study_keeps_its_runs_and_finishes_them_next_time(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    config = tiny_config(tmp_path, max_steps=400, eval_every=100, log_every=50)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "s"), "configs": [str(config)],
                                    "seeds": [0, 1], "grid": {"model.hops": [1, 2]}}))
    command = [sys.executable, "-m", "diffuser_graph.cli", "study", str(path), "--quiet",
               "--threads", "1"]
    s = load_config(path, StudyConfig)
    first = expand(s)[0]
    study = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (first.out_dir / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.2)  # the first run has trained and checkpointed
    study.send_signal(signal.SIGTERM)
    out, err = study.communicate(timeout=120)
    assert study.returncode == 0, err
    assert re.search(r"study stopped on SIGTERM with [34] of 4 runs left", out), out
    assert [status(run) for run in expand(s)][1:] == ["new"] * 3
    assert status(first) in ("resume", "done")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert all(status(run) == "done" for run in expand(s))
    steps = [json.loads(line)["step"] for line in (first.out_dir / "metrics.jsonl").open()
             if json.loads(line)["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # resumed, every step logged once
