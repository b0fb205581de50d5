"""The README's example of a fourth method really is one file that works."""

from __future__ import annotations

import re
import sys
import types

from dfkd_bench.train.engine import train_run
from dfkd_bench.cluster.experiment import build_run_configs
from dfkd_bench.method_api import get_method
from conftest import REPO_ROOT


def readme_method_examples() -> dict[str, str]:
    """The Python examples of the README's "Adding a method" section, by the method name they register."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("### Adding a method"):]
    section = section[:section.index("\n## ")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return {re.search(r'^    name = "(\w+)"', code, re.M).group(1): code for code in blocks}


def test_the_readme_shows_a_generator_method_and_a_pool_method():
    assert set(readme_method_examples()) == {"abm_noise", "pixel_ce"}


def test_readme_method_example_registers_and_runs(digits_request, tmp_path):
    module = types.ModuleType("dfkd_bench.methods.abm_noise")
    sys.modules[module.__name__] = module
    try:
        exec(compile(readme_method_examples()["abm_noise"], "README.md", "exec"), module.__dict__)
        method = get_method("abm_noise")
        assert method.Params().noise_kd_weight == 0.5
        config = build_run_configs(digits_request(["abm_noise"]))[0]
        summary = train_run(config, tmp_path, device="cpu", progress=False)
        assert summary["iterations"] == config.train.total_iterations
        from dfkd_bench.store import RunStore

        evals = [r for r in RunStore(tmp_path, config.run_name).read_records() if r["kind"] == "eval"]
        assert "loss/kd_noise" in evals[-1]  # the new source is trained on and recorded
    finally:
        sys.modules.pop(module.__name__, None)
        from dfkd_bench import method_api

        method_api._METHODS.pop("abm_noise", None)


def test_readme_pool_method_example_fills_its_pool_and_trains_on_it(digits_request, tmp_path):
    module = types.ModuleType("dfkd_bench.methods.pixel_ce")
    sys.modules[module.__name__] = module
    try:
        exec(compile(readme_method_examples()["pixel_ce"], "README.md", "exec"), module.__dict__)
        assert get_method("pixel_ce").pool_based
        config = build_run_configs(digits_request(["pixel_ce"], overrides={"synthesis_steps": 2}))[0]
        summary = train_run(config, tmp_path, device="cpu", progress=False)
        assert summary["iterations"] == config.train.total_iterations
        from dfkd_bench.store import RunStore

        evals = [r for r in RunStore(tmp_path, config.run_name).read_records() if r["kind"] == "eval"]
        assert evals[-1]["pool_images"] > 0 and "loss/kd_pool" in evals[-1]  # batches joined the pool
    finally:
        sys.modules.pop(module.__name__, None)
        from dfkd_bench import method_api

        method_api._METHODS.pop("pixel_ce", None)

