"""The README's Python example runs as written and learns what it says."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_python_api_example_runs_and_its_online_model_finds_both_clusters(tmp_path, monkeypatch):
    section = README.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # it saves model.npz
    names: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), names)
    online, X = names["online"], names["X"]
    assert sorted(np.round(online.means_[:, 0]).tolist()) == [-4.0, 4.0]
    assert online.predict(X[[0, len(X) - 1]]).tolist() in ([0, 1], [1, 0])
    assert (tmp_path / "model.npz").exists()


def test_the_readmes_config_examples_are_valid_configs():
    import yaml

    from streamgmm.service.config import config_from_dict

    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        config = config_from_dict(yaml.safe_load(block), environ={})
        assert config.input.fields is None or config.input.dimension == len(config.input.fields)
