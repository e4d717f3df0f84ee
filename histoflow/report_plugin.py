"""The Snakemake report as it may leave the site (config ``privacy.export``).

Snakemake's html report embeds, beside the captioned results, each reported file's absolute path,
the params of the job that made it, and every rule's input and output paths: the output folder,
the samples sheet's path (``make_splits`` reads it) and anything else a path or URL in the config
points to. None of that is a supported option to switch off, so histoflow ships a report plugin
(Snakemake's reporter plugin interface): Snakemake's own html reporter, whose rendered page then
has each such path or URL replaced by a placeholder (``{outdir}/qc/slides.tsv``, ``{samples}`` (braces, not angle brackets: the page shows some strings as HTML)).
The embedded files themselves are histoflow's de-identified outputs (checklist, QC table).

``histoflow report {outdir}/report.html [snakemake options]`` runs it; with ``privacy.export: full``
the page is left as Snakemake renders it.
"""

from __future__ import annotations

import html
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from snakemake.report.html_reporter import Reporter as _HtmlReporter
from snakemake.report.html_reporter import ReportSettings as _HtmlReportSettings

from .privacy import PATH_COLUMNS, export_mode, file_name_of

NAME = "histoflow"
MODULE = f"snakemake_report_plugin_{NAME}"     # the name Snakemake's plugin registry expects
# config keys whose value is a sheet: its path columns are redacted too
SHEET_KEYS = ("samples",)
# config keys that hold a path even when it does not look like one ("samples.tsv")
PATH_KEYS = ("samples", "weights_dir", "artifact_location", "reference")


@dataclass
class ReportSettings(_HtmlReportSettings):
    """The html reporter's options, as ``--report-histoflow-path`` and ``--report-histoflow-stylesheet-path``."""


class Reporter(_HtmlReporter):
    def render(self) -> None:
        super().render()
        config = self.dag.workflow.config
        if export_mode(config) != "full":
            redact_report(Path(self.settings.path), redactions(config))


def _variants(value: str, base: Path) -> set[str]:
    """The spellings a path may have in the page: absolute, resolved, and as given where that
    cannot be mistaken for a word of the page's code ("results" is also a JavaScript variable:
    only "results/" is a path)."""
    if "://" in value:
        return {value}
    path = Path(os.path.expanduser(value))
    path = path if path.is_absolute() else base / path
    out = {os.path.abspath(path), str(path.resolve())}
    out.add(value if "/" in value.rstrip("/") or value.startswith("~") else value.rstrip("/") + "/")
    return out


def _is_path_or_url(value: str) -> bool:
    return "://" in value or value.startswith(("/", "~")) or (os.sep in value and os.path.exists(value))


def _strings(value: Any, key: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, str(k))
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v, key)
    elif isinstance(value, str) and value:
        yield key, value


def redactions(config: dict, base: Path | None = None) -> list[tuple[str, str]]:
    """(text, placeholder) pairs, longest text first (the output folder before a file in it):
    every path or URL in the config, under its key; the output folder as ``{outdir}``; the path
    columns of the samples sheet(s) (slide sources, annotations)."""
    base = base or Path.cwd()
    pairs: dict[str, str] = {}
    names: dict[str, str] = {}    # a source's file name alone ("x.svs" of "slides/x.svs")
    for key, value in _strings(config):
        if key == "outdir":
            continue
        value = value.removeprefix("local:")          # a local TorchScript encoder's path
        if _is_path_or_url(value) or (key in PATH_KEYS and ("/" in value or "." in value)):
            for v in _variants(value, base):
                pairs.setdefault(v, "{" + key + "}/" if v.endswith("/") and not value.endswith("/") else "{" + key + "}")
        if key in SHEET_KEYS and os.path.isfile(value):
            sheet = pd.read_csv(value, sep=None, engine="python", dtype=str, keep_default_na=False)
            ids = sheet["slide_id"] if "slide_id" in sheet else pd.Series([None] * len(sheet), index=sheet.index)
            for column in sheet.columns.intersection(PATH_COLUMNS):
                for cell, slide_id in zip(sheet[column], ids):
                    if not cell:
                        continue
                    for v in _variants(cell, Path(value).resolve().parent):
                        if v.endswith("/") and not cell.endswith("/"):
                            continue      # a bare file name: as a whole token (below)
                        pairs.setdefault(v, "{" + column + "}")
                    name = file_name_of(cell, slide_id)
                    if name:
                        names.setdefault(name, "{" + column + "}")
    outdir = str(config.get("outdir") or "")
    if outdir:
        for v in _variants(outdir, base):
            pairs[v] = "{outdir}/" if v.endswith("/") else "{outdir}"
    # as the page may spell them: raw, JSON-escaped, HTML-escaped
    spelled: dict[str, str] = {}
    for text, token in pairs.items():
        if len(text) < 4 or text in ("/", "."):
            continue
        for form in (text, json.dumps(text)[1:-1], html.escape(text)):
            spelled.setdefault(form, token)
    # file names last (a full path that holds one goes first) and as whole tokens only: "x.svs"
    # must not rewrite "index.svs" (the page's own words and code)
    bare = [(re.compile(rf"(?<![A-Za-z0-9_.-]){re.escape(form)}(?![A-Za-z0-9_-])"), token)
            for name, token in sorted(names.items(), key=lambda kv: -len(kv[0]))
            for form in dict.fromkeys((name, json.dumps(name)[1:-1], html.escape(name)))]
    return sorted(spelled.items(), key=lambda kv: -len(kv[0])) + bare


def redact_text(text: str, pairs: list[tuple[str | re.Pattern, str]]) -> str:
    for needle, token in pairs:
        text = needle.sub(token, text) if isinstance(needle, re.Pattern) else text.replace(needle, token)
    return text


def redact_report(path: Path, pairs: list[tuple[str, str]]) -> None:
    """Rewrite the report (an .html, or the report.html inside a .zip) with ``pairs`` replaced,
    atomically (a half-redacted report never sits at the final name)."""
    tmp = path.with_name(f".{path.name}.redacting")
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                data = src.read(info)
                if info.filename.endswith(".html") and info.filename.count("/") <= 1:
                    data = redact_text(data.decode("utf-8"), pairs).encode("utf-8")
                dst.writestr(info, data)
    else:
        tmp.write_text(redact_text(path.read_text(encoding="utf-8"), pairs), encoding="utf-8")
    os.replace(tmp, path)


def register() -> None:
    """Make ``--reporter histoflow`` known to Snakemake in this process (its registry only finds
    plugins installed as separate, non-editable packages)."""
    import sys

    from snakemake_interface_report_plugins.registry import ReportPluginRegistry

    sys.modules.setdefault(MODULE, sys.modules[__name__])
    ReportPluginRegistry().register_plugin(MODULE, sys.modules[__name__])


def run_report(path: str | os.PathLike, snakemake_args: list[str]) -> int:
    """``snakemake --reporter histoflow --report-histoflow-path PATH ...`` in this process."""
    register()
    from snakemake.cli import main as snakemake_main

    try:
        snakemake_main(["--reporter", NAME, "--report-histoflow-path", str(path), *snakemake_args])
    except SystemExit as done:
        return int(done.code or 0)
    return 0
