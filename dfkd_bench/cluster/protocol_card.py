"""The protocol card of a method (``dfkd-bench list --card METHOD [--dataset D]``), generated from the code.

For each dataset the method's paper reports, every setting its paper protocol fixes, with

* **paper / official code**: the value of the paper or, where the paper is silent, of the authors'
  official code (``PaperProtocol.official`` where the code's value is not what this suite runs);
* **ours, paper protocol**: what ``protocol = "paper"`` resolves to (``experiment.resolve_settings``);
* **ours, common protocol**: what the same method runs under the common protocol (the preset's);

and a mark: ``CHOSEN`` where this suite keeps a deviation from the paper (with the reason), ``*``
where the common protocol differs from the paper's value (by design: one protocol for every method).
"""

from __future__ import annotations

from typing import Any

from dfkd_bench.errors import ConfigError
from dfkd_bench.method_api import get_method


def setting_text(value: Any) -> str:
    """A setting's value as the card writes it (also what the report compares with a run's config.json)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]" if value else "[]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def card_rows(method: str, dataset: str) -> list[dict[str, str]]:
    """One row per setting: ``setting``, ``paper``, ``ours_paper``, ``ours_common``, ``mark``."""
    from dfkd_bench.cluster.experiment import paper_protocol, resolve_settings

    protocol = paper_protocol(method, dataset)
    teacher, student, size, train, params = resolve_settings(method, dataset, "paper")
    c_teacher, c_student, c_size, c_train, c_params = resolve_settings(method, dataset, "common")
    ours = {"teacher_arch": teacher, "student_arch": student, "image_size": size,
            **{k: getattr(train, k) for k in protocol.train}, **{k: params[k] for k in protocol.params}}
    common = {"teacher_arch": c_teacher, "student_arch": c_student, "image_size": c_size,
              **{k: getattr(c_train, k) for k in protocol.train}, **{k: c_params.get(k, "-") for k in protocol.params}}
    declared = {"teacher_arch": protocol.teacher_arch, "student_arch": protocol.student_arch,
                "image_size": protocol.image_size, **protocol.train, **protocol.params}
    rows = []
    for name, value in declared.items():
        paper = protocol.official.get(name, value)
        mark = f"CHOSEN: {protocol.deviations[name]}" if name in protocol.deviations else (
            "differs" if setting_text(ours[name]) != setting_text(paper) else "")
        if setting_text(common[name]) != setting_text(paper) and not mark:
            mark = "* common differs"
        elif setting_text(common[name]) != setting_text(paper):
            mark += "; * common differs"
        rows.append({"setting": name, "paper": setting_text(paper), "ours_paper": setting_text(ours[name]),
                     "ours_common": setting_text(common[name]), "mark": mark})
    for name, value in protocol.official.items():  # official-code facts that are not settings here
        if name not in declared:
            rows.append({"setting": name, "paper": setting_text(value), "ours_paper": "-", "ours_common": "-",
                         "mark": f"CHOSEN: {protocol.deviations[name]}" if name in protocol.deviations else ""})
    return rows


def render_card(method: str, dataset: str | None = None) -> str:
    cls = get_method(method)
    datasets = [dataset] if dataset else sorted(cls.paper_protocols)
    if not datasets:
        raise ConfigError(f"{method} has no paper protocol yet; `dfkd-bench list --settings` shows its settings")
    lines = [f"protocol card: {cls.label or cls.name} ({cls.summary})"]
    for name in datasets:
        if name not in cls.paper_protocols:
            have = ", ".join(sorted(cls.paper_protocols)) or "none"
            raise ConfigError(f"{method} has no paper protocol for {name} (it has: {have}); "
                              f"pass --dataset with one of them")
        protocol = cls.paper_protocols[name]
        std = f" +- {protocol.std:g}" if protocol.std is not None else ""
        teacher = f", teacher {protocol.teacher_accuracy:g} %" if protocol.teacher_accuracy is not None else ""
        published = f"{protocol.accuracy:g}{std} %" if protocol.accuracy is not None else "(not read here)"
        lines += ["", f"{name}: published {published}{teacher}, selection {protocol.selection} "
                      f"-- {protocol.source}", f"official code: {protocol.code}"]
        rows = card_rows(method, name)
        header = {"setting": "setting", "paper": "paper / official code", "ours_paper": "ours (paper)",
                  "ours_common": "ours (common)", "mark": ""}
        widths = {k: max(len(r[k]) for r in [header, *rows]) for k in ("setting", "paper", "ours_paper", "ours_common")}
        for row in [header, *rows]:
            lines.append(("  " + "  ".join(row[k].ljust(widths[k]) for k in widths) + "  " + row["mark"]).rstrip())
    return "\n".join(lines)


# ------------------------------------------------- the values a method actually receives ---

def resolved_rows(method: str, dataset: str, protocol: str = "common", budget: str = "default",
                  overrides: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """Every engine setting and every setting of ``method`` as a run of it on ``dataset`` receives it,
    with the layer that set it last: ``default`` (engine / paper default), ``preset D`` (the
    dataset's preset, shared by every method that declares a setting of that name), ``D preset value
    of M`` (``Method.preset_params``), ``paper protocol``, ``budget B``, ``--set``."""
    import dataclasses

    from dfkd_bench.config import TrainConfig, resolve_method_params
    from dfkd_bench.cluster.experiment import resolve_pair_and_train, resolve_params
    from dfkd_bench.presets import get_preset

    overrides = dict(overrides or {})
    preset = get_preset(dataset)
    first = "paper protocol" if protocol == "paper" else f"preset {dataset}"
    train_layers = [("default", TrainConfig()),
                    (first, resolve_pair_and_train(method, dataset, protocol)[3]),
                    (f"budget {budget}", resolve_pair_and_train(method, dataset, protocol, budget)[3]),
                    ("--set", resolve_pair_and_train(method, dataset, protocol, budget, overrides)[3])]
    defaults = dataclasses.asdict(get_method(method).Params())
    param_layers = [("default", defaults)]
    if protocol == "common":
        param_layers += [(f"preset {dataset}", resolve_method_params(method, preset.params, {})),
                         (f"{dataset} preset value of {method}", resolve_params(method, dataset, protocol))]
    else:
        param_layers.append(("paper protocol", resolve_params(method, dataset, protocol)))
    param_layers += [(f"budget {budget}", resolve_params(method, dataset, protocol, budget)),
                     ("--set", resolve_params(method, dataset, protocol, budget, overrides))]

    def rows(kind: str, names: list[str], layers: list[tuple[str, Any]], value_of) -> list[dict[str, str]]:
        out = []
        for name in names:
            origin, value = layers[0][0], value_of(layers[0][1], name)
            for layer, values in layers[1:]:
                if value_of(values, name) != value:
                    origin, value = layer, value_of(values, name)
            out.append({"kind": kind, "setting": name, "value": setting_text(value), "from": origin})
        return out

    return (rows("engine", [f.name for f in dataclasses.fields(TrainConfig)], train_layers, getattr)
            + rows(method, list(defaults), param_layers, lambda values, name: values[name]))


def render_resolved(methods: list[str], dataset: str, protocol: str = "common", budget: str = "default",
                    overrides: dict[str, Any] | None = None) -> str:
    """``dfkd-bench list --settings --methods M --dataset D``: :func:`resolved_rows` as text."""
    from dfkd_bench.config import check_override_keys

    check_override_keys(methods, dict(overrides or {}))
    lines = []
    for method in methods:
        rows = resolved_rows(method, dataset, protocol, budget, overrides)
        lines.append(f"{method} on {dataset} ({protocol} protocol, budget {budget}): the values a run receives, "
                     f"and the layer that set each last")
        width = max(len(row["setting"]) for row in rows)
        for kind in ("engine", method):
            lines.append(f"  {kind} settings:")
            lines += [f"    {row['setting']:{width}s} = {row['value']:12s} ({row['from']})"
                      for row in rows if row["kind"] == kind]
        lines.append("")
    return "\n".join(lines).rstrip()
