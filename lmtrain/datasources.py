"""The data a run names: ``--train-data`` and ``--val-data`` specs, parsed in this one place.

A spec is ``[NAME=]PATH[@WEIGHT]`` (a val set takes no weight):

* WEIGHT is what follows the *last* ``@`` when it reads as a number, so a path holding ``@`` still works:
  ``data/a@b/train`` has no weight, ``data/a@b/train@0.5`` has 0.5. A number that is not positive and finite
  (``0``, ``-1``, ``nan``, ``inf``, ``1e-400``), or not written as a plain ASCII decimal (``1_000``, other
  scripts' digits, spaces), is an error, not part of the path; so are weights below 2^-32 of the largest.
* NAME is what precedes the first ``=`` when that holds no ``/`` (a name never does), so ``data/k=v/train`` is
  a path; write ``./x=y`` for a relative path whose first part holds ``=``. Without a name, the source's
  directory (a file's or glob's: its directory) names it; ``train`` and ``val``, the directories prepare
  writes, name their parent's: ``data/web/train`` is ``web``. Names become metric keys (``val_loss/web``), so
  they must be unique, non-empty and hold no ``/`` or ``=``.

One train spec without ``@`` is one dataset, exactly as before mixtures (a plain :class:`lmdata.TokenDataset`,
so older runs and checkpoints resume); with a weight, or several specs each with one, a :class:`lmdata.Mixture`.
Several train specs without weights are refused: a mixture without stated proportions is a mistake more often
than a wish for equal ones, and ``@1`` on each says the latter in two characters.
"""

from __future__ import annotations

import glob
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lmdata import Mixture, TokenDataset
from lmdata.errors import ArgumentError
from lmdata.mixture import normalised_weights, source_name
from lmtrain.errors import ConfigError


@dataclass(frozen=True)
class DataSource:
    """One parsed spec: its name, the path TokenDataset opens, and its weight (None: none given)."""

    name: str
    path: str
    weight: float | None = None


_PLAIN_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")  # ASCII only, no _ or spaces


def _as_number(text: str) -> float | None:
    """``text`` as a number if it reads as one (Python's grammar: what a user may have meant as a weight), else
    None (then it is part of the path)."""
    try:
        return float(text)
    except ValueError:
        return None


def _weight_problem(spec: str, text: str, number: float) -> str | None:
    """Why ``text`` (reading as ``number``) is no weight: only plain decimal or scientific ASCII numbers are (not
    Python's ``1_000``, other scripts' digits or surrounding spaces), positive and representable."""
    if not _PLAIN_NUMBER.fullmatch(text):
        if math.isfinite(number) and number > 0:
            return f"{spec!r}: the weight {text!r} must be a plain decimal number such as 0.5, 3 or 1e-3"
        return f"{spec!r}: the weight {text!r} must be a positive finite number"
    if number == 0 and any(d in text.partition("e")[0].partition("E")[0] for d in "123456789"):
        return f"{spec!r}: the weight {text!r} underflows to 0 as a float; give the weights on a larger scale"
    if not (math.isfinite(number) and number > 0):
        return f"{spec!r}: the weight {text!r} must be a positive finite number"
    return None


def parse_spec(spec: str, weighted: bool) -> tuple[DataSource | None, list[str]]:
    """(the source, or None; the problems of ``spec``). ``weighted``: a train spec (a weight allowed)."""
    name, path = None, spec
    head, eq, tail = spec.partition("=")
    if eq and "/" not in head:
        name, path = head, tail
    weight = None
    before, at, after = path.rpartition("@")
    if at and (number := _as_number(after)) is not None:
        if not weighted:
            return None, [f"{spec!r}: a val set takes no @WEIGHT (val_loss is weighted by the train weights)"]
        if (problem := _weight_problem(spec, after, number)) is not None:
            return None, [problem]
        weight, path = number, before
    if path == "":
        return None, [f"{spec!r}: no path"]
    if name == "":
        return None, [f"{spec!r}: the name before '=' is empty; write NAME=PATH or just PATH"]
    # a default name that cannot be a metric key is a problem only where names are used (_name_problems)
    return DataSource(source_name(path) if name is None else name, path, weight), []


def spec_hint(spec_path: str) -> str:
    """A hint for a source path that does not exist ('' if it does, or nothing is suspect): one that reads like
    NAME=PATH with a ``/`` in NAME (``é/=data/x``, one part before the ``=`` or an existing path after it: names
    cannot contain '/', so it is all path), or like several
    specs in one string (``"a@0.5, b@0.5"``, where a TOML list was meant)."""
    if glob.glob(spec_path):
        return ""
    head, eq, tail = spec_path.partition("=")
    if eq and tail and "/" in head and ("/" not in head.rstrip("/") or glob.glob(tail)):
        return f" (if {head!r} was meant as a name: names cannot contain '/', so the whole spec was read as a path)"
    if "," in spec_path:
        return (
            " (several sources in one string? give one spec each: a TOML list such as train_data = "
            '["a@0.5", "b@0.5"], or --train-data once per source)'
        )
    return ""


def as_specs(value: str | Sequence[str] | None) -> list[str]:
    """A config value (one spec or a list of them) as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def source_problems(value: str | Sequence[str], weighted: bool) -> list[str]:
    """Everything wrong with a ``train_data`` (``weighted``) or ``val_data`` value; [] if it parses."""
    return _parse(value, weighted)[1]


def parse_sources(value: str | Sequence[str], weighted: bool) -> list[DataSource]:
    """The sources of a ``train_data`` (``weighted``) or ``val_data`` value; ConfigError listing its problems."""
    sources, problems = _parse(value, weighted)
    if problems:
        what = "--train-data" if weighted else "--val-data"
        raise ConfigError(f"{what}: " + "; ".join(problems))
    return sources


def _parse(value: str | Sequence[str], weighted: bool) -> tuple[list[DataSource], list[str]]:
    specs = as_specs(value)
    sources, problems = [], []
    for spec in specs:
        source, found = parse_spec(spec, weighted)
        problems += found
        if source is not None:
            sources.append(source)
    if problems:
        return [], problems
    if len(sources) > 1 or is_mixture(sources):  # one plain source needs no name, as before mixtures
        problems += _name_problems(specs, sources)
    weights = [s.weight is not None for s in sources]
    if any(weights) and not all(weights):
        unweighted = [spec for spec, w in zip(specs, weights, strict=True) if not w]
        problems.append(f"a weight on some sources but not all (none on {unweighted}): give @WEIGHT to each")
    elif all(weights) and sources:
        try:
            normalised_weights([s.weight for s in sources])
        except ArgumentError as e:
            problems.append(str(e))
    elif weighted and len(sources) > 1 and not any(weights):
        problems.append(
            f"{len(sources)} training sources without weights: give @WEIGHT to each (such as "
            f"{sources[0].path}@0.5), @1 on each for equal shares"
        )
    return ([] if problems else sources), problems


def _name_problems(specs: list[str], sources: list[DataSource]) -> list[str]:
    problems, seen = [], {}
    for spec, source in zip(specs, sources, strict=True):
        if source.name == "" or "=" in source.name:  # only a default name can be so ("/" never is)
            problems.append(
                f"{spec!r}: its directory gives no usable name ({source.name!r}); write NAME=PATH"
                + spec_hint(source.path)
            )
        if source.name in seen:
            problems.append(
                f"{seen[source.name]!r} and {spec!r} are both named {source.name!r}: names must be unique "
                "(they become metric keys); write NAME=PATH for each"
            )
        seen.setdefault(source.name, spec)
    return problems


def is_mixture(sources: Sequence[DataSource]) -> bool:
    """Train sources that make a :class:`Mixture`: any weight given (one spec without one is a plain dataset)."""
    return any(s.weight is not None for s in sources)


def combine(sources: Sequence[DataSource], datasets: Sequence[TokenDataset]) -> TokenDataset | Mixture:
    """The training data of ``sources``, each already opened (``datasets``, in order): one dataset, or their
    Mixture (which raises ManifestError for sources of different tokenizers, naming both)."""
    if not is_mixture(sources):
        return datasets[0]
    return Mixture([(ds, s.weight) for ds, s in zip(datasets, sources, strict=True)], [s.name for s in sources])


def open_train(value: str | Sequence[str]) -> TokenDataset | Mixture:
    """The training data a ``train_data`` value names, opened."""
    sources = parse_sources(value, weighted=True)
    return combine(sources, [TokenDataset(s.path) for s in sources])


def open_val(value: str | Sequence[str]) -> dict[str, TokenDataset]:
    """The validation sets a ``val_data`` value names, opened, by name."""
    return {s.name: TokenDataset(s.path) for s in parse_sources(value, weighted=False)}


def made_by(data: TokenDataset | Mixture) -> tuple[str, int] | None:
    """(tokenizer, vocab) the data's manifests record (a mixture's first source that records one), or None."""
    datasets = data.datasets if isinstance(data, Mixture) else [data]
    return next((ds.made_by for ds in datasets if ds.made_by is not None), None)


def val_weights(train: TokenDataset | Mixture, val_names: Sequence[str]) -> dict[str, float]:
    """How each val set counts in the overall ``val_loss``: by the training weight of the source of the same
    name when every val set names a training source; else equally."""
    if isinstance(train, Mixture) and set(val_names) <= set(train.names):
        by_name = dict(zip(train.names, train.weights, strict=True))
        total = math.fsum(by_name[n] for n in val_names)
        return {n: by_name[n] / total for n in val_names}
    return {n: 1 / len(val_names) for n in val_names}


def as_val_sets(val: TokenDataset | Mapping[str, TokenDataset]) -> dict[str, TokenDataset]:
    """A trainer's ``val`` argument (one dataset, or datasets by name) as datasets by name."""
    return dict(val) if isinstance(val, Mapping) else {"val": val}
