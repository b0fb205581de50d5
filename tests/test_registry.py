"""Method registration: a broken method file costs only itself, and Params fields are real settings."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dfkd_bench.method_api import Method, _check_params_are_dataclass_fields, get_method, hparam


def _cli_with_methods_in(folder, *args):
    """The CLI in a fresh process that also imports the method files of ``folder``, as if they had
    been dropped into methods/ (the repository is not written to)."""
    env = {**os.environ, "DFKD_BENCH_METHOD_PATH": str(folder)}
    return subprocess.run([sys.executable, "-m", "dfkd_bench.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_a_method_file_that_fails_to_import_costs_only_itself(tmp_path):
    (tmp_path / "broken_probe.py").write_text("import torch\n\nx = 1\nraise RuntimeError('no GPU driver found')\n")
    (tmp_path / "typo_probe.py").write_text("def f(:\n    pass\n")

    listing = _cli_with_methods_in(tmp_path, "list")
    assert listing.returncode == 0, listing.stderr
    assert "abm " in listing.stdout and "mad " in listing.stdout  # the other methods still work
    warnings = [line for line in listing.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, listing.stderr
    assert any(f"{tmp_path}/broken_probe.py failed to import: line 4: no GPU driver found" in w for w in warnings)
    assert any(f"{tmp_path}/typo_probe.py failed to import: line 1" in w for w in warnings)
    assert "Traceback" not in listing.stderr

    asked = _cli_with_methods_in(tmp_path, "run", "--methods", "broken_probe", "--dataset", "digits",
                                 "--results-dir", str(tmp_path / "runs"))
    assert asked.returncode == 2
    error = [line for line in asked.stderr.splitlines() if line.startswith("error:")]
    assert error == [f"error: method 'broken_probe' is unavailable: {tmp_path}/broken_probe.py failed to import: "
                     "line 4: no GPU driver found"], asked.stderr
    assert "Traceback" not in asked.stderr
    assert not (tmp_path / "runs").exists()


def test_a_params_subclass_without_dataclass_is_refused_at_registration():
    base = get_method("abm")

    class Undecorated(base.Params):  # forgot @dataclass: `extra` would silently not be a setting
        extra: int = 2

    class Probe(base):
        name = "probe_undecorated"
        Params = Undecorated

    with pytest.raises(TypeError, match=r"Undecorated declares extra but is not decorated with @dataclass"):
        _check_params_are_dataclass_fields(Probe)

    @dataclasses.dataclass
    class Decorated(base.Params):
        extra: int = hparam(2, "a new setting")

    class Fine(base):
        name = "probe_decorated"
        Params = Decorated

    _check_params_are_dataclass_fields(Fine)  # a decorated subclass is fine
    assert issubclass(Fine, Method)


def test_an_undecorated_params_in_a_dropped_file_is_one_warning_line(tmp_path):
    (tmp_path / "undecorated_probe.py").write_text(textwrap.dedent("""
        from dfkd_bench.method_api import register_method
        from dfkd_bench.methods.abm import ABM

        class Params(ABM.Params):
            extra: int = 2

        @register_method
        class Undecorated(ABM):
            name = "undecorated_probe"
            Params = Params
    """))
    listing = _cli_with_methods_in(tmp_path, "list")
    assert listing.returncode == 0, listing.stderr
    assert (f"warning: {tmp_path}/undecorated_probe.py failed to import: line 8: Undecorated.Params: Params declares "
            "extra but is not decorated with @dataclass") in listing.stderr


@pytest.mark.parametrize("name", ["abm_noise", "pixel_ce"])
def test_a_method_dropped_in_as_a_file_gets_the_whole_contract(tmp_path, name):
    """The documentation's example methods (a generator method and a pool method), each as a file in a folder
    of $DFKD_BENCH_METHOD_PATH, run every test of tests/test_contract.py (listing, state round trip,
    SIGKILL + exact resume, a stop mid-stage + exact resume, no host sync; for the pool method, measurements
    that leave it alone)."""
    from test_readme import method_examples

    (tmp_path / f"{name}.py").write_text(method_examples()[name])
    tests = Path(__file__).parent
    env = {**os.environ, "DFKD_BENCH_METHOD_PATH": str(tmp_path), "DFKD_BENCH_CONTRACT_ONLY": name}
    result = subprocess.run([sys.executable, "-m", "pytest", str(tests / "test_contract.py"), "-q", "-p",
                             "no:cacheprovider", "--rootdir", str(tests.parent)],
                            capture_output=True, text=True, timeout=600, env=env, cwd=tests.parent)
    assert result.returncode == 0, result.stdout[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    expected = 6 if name == "pixel_ce" else 5  # listing + 4 per-method tests (+ pool measurements)
    assert f"{expected} passed" in summary and "failed" not in summary, summary


def test_list_settings_shows_the_values_a_method_receives_and_where_each_comes_from(capsys):
    from dfkd_bench.cli import main

    assert main(["list", "--settings", "--methods", "dafl,deepinv", "--dataset", "digits", "--budget", "smoke",
                 "--set", "lr_S=0.1", "--set", "generator_lr=0.01"]) == 0
    out = capsys.readouterr().out
    lines = {" ".join(line.split()[:3]): line for line in out.splitlines() if " = " in line}

    def origin(setting, value):
        matches = [line for key, line in lines.items() if key == f"{setting} = {value}"]
        assert matches, (setting, value, out)
        return matches[0].rsplit("(", 1)[1].rstrip(")")

    assert origin("student_lr", "0.1") == "--set"  # a paper symbol, resolved
    assert origin("student_steps", "2") == "budget smoke"
    assert origin("channels_last", "True") == "preset digits"
    assert origin("generator", "gen_tiny") == "preset digits"  # the preset's shared generator, by name
    assert origin("generator_lr", "0.01") == "--set"
    assert origin("entropy_log_base", "10") == "default"
    assert origin("synthesis_steps", "2") == "budget smoke"  # capped by the smoke budget ...
    assert main(["list", "--settings", "--methods", "deepinv", "--dataset", "digits"]) == 0
    own = [line.split() for line in capsys.readouterr().out.splitlines() if "synthesis_steps" in line]
    assert own == [["synthesis_steps", "=", "20", "(digits", "preset", "value", "of", "deepinv)"]]  # its own value
    assert main(["list", "--settings", "--methods", "dafl", "--dataset", "mnist", "--protocol", "paper"]) == 0
    paper = capsys.readouterr().out
    assert "generator_lr" in paper and "0.2" in paper and "(paper protocol)" in paper


def test_list_settings_for_methods_needs_a_dataset_and_known_names(capsys):
    from dfkd_bench.cli import main

    assert main(["list", "--methods", "mad"]) == 2
    assert main(["list", "--settings", "--methods", "nosuch", "--dataset", "digits"]) == 2
    assert main(["list", "--settings", "--methods", "mad", "--dataset", "digits", "--set", "zeta9=1"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors), errors
