"""The README's Python quickstart must run as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README quickstart", "exec"), namespace)
    assert tuple(namespace["out"].shape) == (1024, 4, 64)
    assert tuple(namespace["y"].shape) == (2024, 256)


def test_readme_lists_every_task_and_config():
    from typing import get_args

    from diffuser_graph.tasks import TaskConfig

    text = README.read_text()
    configs = sorted(p.name for p in (README.parent / "configs").glob("*.yaml"))
    missing = [name for name in configs if name not in text]
    assert not missing, f"configs not in the README: {missing}"
    union = get_args(get_args(TaskConfig)[0])
    names = [cls.model_fields["name"].default for cls in union]
    for name in names:
        assert f"configs/{name}-small.yaml" in text or f"`{name}-small.yaml`" in text, name
