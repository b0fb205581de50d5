"""Method registration: a broken method file costs only itself, and Params fields are real settings."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest

from dfkd_bench.method_api import Method, _check_params_are_dataclass_fields, get_method, hparam

# Runs the CLI in a fresh process whose `dfkd_bench.methods` package also sees the files of an
# extra folder, as if they had been dropped into methods/ (the repository is not written to).
_CLI_WITH_EXTRA_METHODS = textwrap.dedent("""
    import sys
    import dfkd_bench.methods as package
    package.__path__.append(sys.argv[1])
    from dfkd_bench.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _cli_with_methods_in(folder, *args):
    return subprocess.run([sys.executable, "-c", _CLI_WITH_EXTRA_METHODS, str(folder), *args],
                          capture_output=True, text=True, timeout=120)


def test_a_method_file_that_fails_to_import_costs_only_itself(tmp_path):
    (tmp_path / "broken_probe.py").write_text("import torch\n\nx = 1\nraise RuntimeError('no GPU driver found')\n")
    (tmp_path / "typo_probe.py").write_text("def f(:\n    pass\n")

    listing = _cli_with_methods_in(tmp_path, "list")
    assert listing.returncode == 0, listing.stderr
    assert "abm " in listing.stdout and "mad " in listing.stdout  # the other methods still work
    warnings = [line for line in listing.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, listing.stderr
    assert any("methods/broken_probe.py failed to import: line 4: no GPU driver found" in w for w in warnings)
    assert any("methods/typo_probe.py failed to import: line 1" in w for w in warnings)
    assert "Traceback" not in listing.stderr

    asked = _cli_with_methods_in(tmp_path, "run", "--methods", "broken_probe", "--dataset", "digits",
                                 "--results-dir", str(tmp_path / "runs"))
    assert asked.returncode == 2
    error = [line for line in asked.stderr.splitlines() if line.startswith("error:")]
    assert error == ["error: method 'broken_probe' is unavailable: methods/broken_probe.py failed to import: "
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
    assert ("warning: methods/undecorated_probe.py failed to import: line 8: Undecorated.Params: Params declares "
            "extra but is not decorated with @dataclass") in listing.stderr
