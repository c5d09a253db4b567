"""report.md of a reproduction record (greta reproduce), rendered from its reproduction.json alone, so that
greta verify can render it again and compare byte for byte."""
from __future__ import annotations

import re

from greta.reports import md

_SAFE_LINK = re.compile(r"[A-Za-z0-9._+=/-]+")  # what a run-id path is made of (greta.record.rundir)


def _link(label, path) -> md.Markup:
    """A Markdown link to a record by its relative path when the path is plain run-id characters; otherwise the
    label and path as escaped text (nothing from outside becomes markup); without a path (a record outside the
    reproduction's output folder) the label alone."""
    if path is None:
        return md.line(label)
    if isinstance(path, str) and _SAFE_LINK.fullmatch(path) and isinstance(label, str) and _SAFE_LINK.fullmatch(label):
        return md.Markup(f"[{md.text(label)}]({path}/report.md)")
    return md.line(label, "at", path)


def _value(v) -> md.Markup:
    return md.text("(not recorded)") if v is None else md.code(v)


def _record_lines(title: str, ref: dict | None) -> list:
    if not ref:
        return [md.Markup("- " + md.line(f"{title}:", "not run"))]
    return [md.Markup("- " + md.line(f"{title}:", _link(ref.get("run_id"), ref.get("path")), "· verdict", md.bold(ref.get("verdict"))))]


def _environment(env: dict | None) -> list:
    if not env:
        return []
    rows = [[r["field"], _value(r["original"]), _value(r["here"]),
             "yes" if r["original"] == r["here"] else (md.bold("no") if r.get("decides", True) else "no (does not decide)")]
            for r in env["fields"]]
    out = ["", md.heading(2, "Environment"), "", md.table(["field", "original", "here", "same"], rows)]
    if env.get("unrecorded"):
        out += ["", md.line("Not recorded by the original, so not compared:", ", ".join(env["unrecorded"]))]
    return out


def _comparison(cmp: dict | None) -> list:
    if not cmp:
        return []
    what = ("every array of the logits file, bit for bit" if cmp["by"] == "logits" else
            "per position and path, the sha256 of the logits' bytes and their top-k (the original has no logits file)")
    out = ["", md.heading(2, "Bits"), "", md.line("Compared:", what)]
    if cmp["equal"]:
        return out + ["", md.line("Every compared bit is equal.")]
    rows = [[path, n] for path, n in cmp["differing"].items()]
    f = cmp["first"] or {}
    where = ["request", f["request"], "·"] if f.get("request") is not None else []  # a batch record's request
    out += ["", md.line("First difference:", *where, "path", md.code(f.get("path")), "· step", f.get("step"))]
    if f.get("position") is not None:
        out[-1] = md.line(out[-1], "· position", f["position"])
    if f.get("note"):
        out += ["", md.line(f["note"])]
    if cmp["by"] == "logits" and f.get("max_abs_diff") is not None:
        out += ["", md.line("max |Δ| there:", f"{f['max_abs_diff']:.6g}", "· over every array:", f"{cmp['max_abs_diff']:.6g}")]
    if cmp["by"] == "fingerprints":
        t = f.get("top_k")
        out += ["", md.line("First differing top-k entry [id, value]: #" + str(t["rank"]), "original", md.code(t["original"]),
                            "· here", md.code(t["here"])) if t else
                md.line("The top-k ids and values agree; the sha256 differs (the difference lies outside the top-k).")]
    return out + ["", md.table(["path", "rows/positions that differ"], rows)]


def _points(points: list) -> list:
    rows = [[p["name"], md.bold(p["verdict"]), p["reason"], _link("reproduction", p.get("path"))] for p in points]
    return ["", md.heading(2, "Points"), "", md.table(["point", "verdict", "reason", "record"], rows)]


def render_reproduction(body: dict) -> str:
    """report.md from reproduction.json's dict (greta.record.reproduction): a record's, or a sweep's."""
    sweep = "points" in body
    out = [md.heading(1, "Reproduction: ", md.Markup(md.bold(body["verdict"]))), "",
           md.line("Verdict:", md.bold(body["verdict"]), "—", body["reason"]), "",
           *_record_lines("Original sweep" if sweep else "Original", body.get("original"))]
    if sweep:
        return "\n".join(out + _points(body["points"])) + "\n"
    out += _record_lines("Re-run here", body.get("rerun"))
    out += _environment(body.get("environment")) + _comparison(body.get("comparison"))
    out += ["", md.heading(2, "What this compares"), "",
            md.line("The original is re-run from its params.json on this machine (same probe kind, same matrix point, "
                    "same device kind). The bits are comparable only where the environment that defines them "
                    "(device model, driver, CUDA/ROCm, torch, triton, BLAS, CPU model on the CPU) and the "
                    "inputs (weights and prompt hashes) are the same; a field the original lacks is named above. "
                    "The links are relative to this record.")]
    return "\n".join(out) + "\n"
