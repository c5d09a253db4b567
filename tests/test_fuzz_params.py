"""Fuzzing greta.record.params and the CLI with hypothesis.

Every override is drawn together with a label the test decides by construction: good (in a range the
loader must accept) or bad (wrong type, negative, zero, huge, NaN/inf, unknown key, missing path, ...).
  - load_params: a bad item must give a ParamError of one non-empty line that names a bad key; all-good
    items must load, with the given values, and pass the loader's own validation.
  - `python -m greta probe|audit` (main()): bad input returns 2, prints one `greta: error:` line, runs
    nothing and writes nothing under -o; good input reaches the (mocked) probe with the loader's params.
  - garbage params files (binary, non-mapping, deep nesting, duplicate keys): the same.
Derandomized and database-free, so CI sees the same examples every run.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from greta.__main__ import main
from greta.probe.preflight import preflight
from greta.record.params import DEFAULTS, FAULT_KINDS, PHASES, ParamError, Params, load_params, parse_overrides, validate

REPO_ROOT = Path(__file__).resolve().parent.parent
CPU_PARAMS = REPO_ROOT / "params" / "cpu_default.yaml"
MISSING = "/nonexistent-greta-fuzz"  # a root that never exists: any path under it is missing

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def fuzz(n: int) -> settings:
    return settings(FUZZ, max_examples=n)

SECTIONS = {k: tuple(v) for k, v in DEFAULTS.items() if isinstance(v, dict)}
KNOWN = [k for k, v in DEFAULTS.items() if not isinstance(v, dict)] + [f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks]
INT_KEYS = [k for k in KNOWN if type(DEFAULTS.get(k)) is int]
FLOAT_KEYS = [k for k in KNOWN if k not in INT_KEYS and (k.partition(".")[2] or type(DEFAULTS[k]) is float)]
STR_KEYS = [k for k in KNOWN if k not in INT_KEYS and k not in FLOAT_KEYS]
assert set(INT_KEYS) >= {"ctx", "gen", "span", "seed", "threads"} and "timeouts.decode" in FLOAT_KEYS
assert set(STR_KEYS) >= {"model", "prompt", "device", "fault"}

# A token-id file long enough for every good ctx (GOOD_INT below), and a tokenizer.json for text prompts
# (preflight checks that one exists; the tiny preset has none beside it). The strategies name their paths, so
# the paths are fixed at import; the files exist only while this module's tests run (fuzz_files), so nothing
# is left behind, also by a process that imports this module and runs none of its tests.
FUZZ_DIR = Path(tempfile.gettempdir()) / f"greta-fuzz-{os.getpid()}"
PROMPT_IDS = FUZZ_DIR / "ids.txt"
FUZZ_TOKENIZER = FUZZ_DIR / "tokenizer.json"


@pytest.fixture(scope="module", autouse=True)
def fuzz_files():
    FUZZ_DIR.mkdir(exist_ok=True)
    PROMPT_IDS.write_text(" ".join(str(i % 50) for i in range(8192)))
    FUZZ_TOKENIZER.write_text("{}")
    yield
    shutil.rmtree(FUZZ_DIR, ignore_errors=True)

# --- the spec, written out here rather than read from greta.record.params ------------------------------------
CPUS = os.cpu_count() or 1
GOOD_INT = {"ctx": (1, 8192), "gen": (16, 64), "span": (2, 16), "kv_aligned": (0, 1), "seed": (0, 2**32 - 1),
            "prefill_chunk": (1, 4096), "kv_block": (1, 4096), "threads": (0, CPUS),
            "tp": (1, 1),  # tiny has one KV head (tp > 1: tests/test_tp_probe.py, the tiny-tp preset)
            "tp_invariant": (0, 0)}  # 1 needs kv_aligned=1, drawn independently here (tests/test_tp_invariance.py)
# the largest value each int key takes; ctx and gen beyond the bound are "obviously too big"
INT_MAX = {"kv_aligned": 1, "tp_invariant": 1, "seed": 2**32 - 1, "threads": CPUS, "ctx": 2**31 - 1,
           "gen": 2**31 - 1, "span": 2**31 - 1, "prefill_chunk": 2**31 - 1, "kv_block": 2**31 - 1, "tp": 8}
# others: 1 (span 1 compares no decode step)
INT_MIN = {"kv_aligned": 0, "tp_invariant": 0, "seed": 0, "threads": 0, "span": 2}
FLOAT_RANGE = {"sampling_period_s": (1e-3, 3600.0), "thresholds.top1_agreement": (0.0, 1.0),
               "memory_fraction": (1.0, 1.0),  # a cap below 1 is a real OOM on purpose: the fuzz leaves it off
               "thresholds.max_abs_diff": (0.0, None), "thresholds.p99_abs_diff": (0.0, None),
               **{f"timeouts.{ph}": (1e-3, 7 * 86400.0) for ph in SECTIONS["timeouts"]}}
VALID_STR = {"probe": ["b3_77"], "model": ["tiny"], "device": ["cpu"], "backend": ["torch"],
             "dtype": ["bfloat16", "float16", "float32"], "perturb": ["none", "rope_offset", "kv_off_by_one"],
             "fault": ["none"] + [f"{k}:{ph}" for k in FAULT_KINDS for ph in PHASES],
             # the loader checks that a prompt file exists (its ids are read by the load phase)
             "prompt": ["synthetic", "hello", str(PROMPT_IDS)],
             # text prompts: an existing text file; a tokenizer.json file or a folder holding one ("" = beside the model)
             "prompt_file": ["", str(REPO_ROOT / "README.md")], "tokenizer": ["", str(FUZZ_TOKENIZER)],
             # a chat needs a tokenizer with a chat template, which neither the tiny preset nor FUZZ_TOKENIZER has
             "chat": [""], "engine": ["greta"]}
# strings that some machine may accept, so never labelled bad
MAYBE_VALID_STR = {"device": ["cuda"] + [f"cuda:{i}" for i in range(16)], "backend": ["triton"],
                   "model": ["llama3-8b", "llama2-7b"], "perturb": ["tp_library_reduce"]}
assert set(FLOAT_RANGE) == set(FLOAT_KEYS) and set(GOOD_INT) == set(INT_KEYS) and set(VALID_STR) == set(STR_KEYS)

NAN_INF = ["nan", "NaN", "NAN", ".nan", "inf", "-inf", "Infinity", "-Infinity", ".inf", "-.inf", "+inf"]


def _exists(s: str) -> bool:
    try:
        return Path(s).exists() or (REPO_ROOT / s).exists()
    except (OSError, ValueError):
        return False


digit_free = st.text(max_size=30).filter(lambda s: not any(c.isdigit() for c in s))
junk = st.one_of(st.none(), st.booleans(), st.lists(st.integers(-5, 5), max_size=3),
                 st.dictionaries(st.sampled_from(["a", "decode", "x"]), st.integers(0, 3), max_size=2))


def good_value(key: str) -> st.SearchStrategy:
    if key in INT_KEYS:
        lo, hi = GOOD_INT[key]
        return st.integers(lo, hi)
    if key in FLOAT_KEYS:
        lo, hi = FLOAT_RANGE[key]
        return st.floats(lo, hi if hi is not None else 1e6) | st.integers(math.ceil(lo), int(hi if hi is not None else 1e6))
    return st.sampled_from(VALID_STR[key])


def bad_value(key: str) -> st.SearchStrategy:
    """Values that are wrong for key whatever the machine (as objects; the CLI passes str() of them)."""
    # "" is a valid value of some string keys (prompt_file, tokenizer: none / beside the model), so never bad there
    valid = VALID_STR.get(key, []) + MAYBE_VALID_STR.get(key, [])
    kinds = [junk, digit_free, st.sampled_from([v for v in NAN_INF + ["", " ", "1.5e", "--1", "0x", "twelve"]
                                                if v not in valid])]
    if key in INT_KEYS:
        lo = INT_MIN.get(key, 1)
        kinds += [st.integers(max_value=lo - 1).filter(lambda v: v >= -10**30) | st.just(lo - 1),  # negative, zero
                  st.integers(INT_MAX[key] + 1, 10**40), st.sampled_from([10**400, 2**31, 10**13]),  # huge
                  st.integers(-10**6, 10**6).map(lambda i: i + 0.5) | st.floats(1e-9, 0.999),  # 1.5, 0.25
                  st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300]),
                  st.integers(4301, 5000).map(lambda n: "9" * n)]  # longer than Python's int() takes
    elif key in FLOAT_KEYS:
        lo, hi = FLOAT_RANGE[key]
        kinds += [st.floats(max_value=lo, exclude_max=True, allow_nan=False).filter(lambda v: v > -1e300 and v < lo),
                  st.sampled_from([math.nan, math.inf, -math.inf, 10**400, -10**400, "1e400"]),
                  st.sampled_from(["-1", "-0.5", "-1e-3"])]
        if lo > 0:
            kinds.append(st.sampled_from([0, 0.0, "0", "0.0", "-0"]))
        if hi is not None:
            kinds.append(st.floats(min_value=hi, exclude_min=True, allow_infinity=False) | st.just(hi * 10))
    else:
        text = st.text(max_size=40).filter(lambda s: s.strip() not in valid and s not in valid and not _exists(s))
        kinds += [text, st.integers(-3, 3), st.floats(allow_nan=True), st.sampled_from([MISSING + "/x", MISSING])]
        if key in ("model", "prompt"):
            kinds.append(st.text(max_size=30).map(lambda s: f"{MISSING}/{s}"))  # paths that don't exist
    return st.one_of(kinds).filter(lambda v: not (isinstance(v, str) and (v in valid or v.strip() in valid)))


unknown_key = st.one_of(
    st.text(max_size=30),
    st.tuples(st.sampled_from(KNOWN), st.text(min_size=1, max_size=5)).map("".join),  # ctxx, timeouts.decod...
    st.tuples(st.sampled_from(list(SECTIONS)), st.text(min_size=1, max_size=8)).map(lambda t: f"{t[0]}.{t[1]}"),
).filter(lambda k: k.strip() not in KNOWN and k.strip() not in SECTIONS and "=" not in k and not k.lstrip().startswith("-"))


@st.composite
def item(draw, good: bool | None = None):
    """(key, value, is_bad)."""
    if good is None:
        good = draw(st.booleans())
    if good:
        key = draw(st.sampled_from(KNOWN))
        return key, draw(good_value(key)), False
    which = draw(st.sampled_from(["value", "value", "value", "unknown", "section"]))
    if which == "unknown":
        return draw(unknown_key), draw(st.integers(0, 5) | st.text(max_size=5)), True
    if which == "section":  # timeouts: 5 instead of a mapping
        return draw(st.sampled_from(list(SECTIONS))), draw(st.integers(-5, 5) | st.text(max_size=5) | st.none()), True
    key = draw(st.sampled_from(KNOWN))
    return key, draw(bad_value(key)), True


@st.composite
def case(draw, need_bad: bool = False, all_good: bool = False):
    """{key: (value, is_bad)}: some good items, then (mostly) one bad one, so that a bad value the loader
    lets through isn't hidden behind another that it refuses."""
    items = {k: (v, False) for k, v, _ in draw(st.lists(item(good=True), max_size=5))}
    if all_good:
        return with_tokenizer(items, give=True)
    n_bad = draw(st.sampled_from([1, 1, 1, 1, 2, 3] if need_bad else [0, 1, 1, 1, 1, 1, 2, 3]))
    if n_bad and draw(st.integers(0, 7)) == 0:
        g = draw(st.integers(1, 1000))
        items["gen"] = (g, False)
        items["span"] = (draw(st.integers(g + 1, g + 100)), True)  # span > gen
        n_bad -= 1
    for _ in range(n_bad):
        k, v, _ = draw(item(good=False))
        items[k] = (v, True)
    return with_tokenizer(items, give=draw(st.booleans()))


def with_tokenizer(items: dict, give: bool) -> dict:
    """A text prompt (prompt=hello, a prompt_file) needs a tokenizer.json: give it one, or else label the
    text prompt bad (the tiny preset has none), unless the tokenizer is itself the bad item under test."""
    text = [k for k, (v, bad) in items.items() if not bad and ((k == "prompt" and v == "hello") or (k == "prompt_file" and v))]
    if text and not items.get("tokenizer", ("", False))[1] and not items.get("tokenizer", ("", False))[0]:
        if give:
            items["tokenizer"] = (str(FUZZ_TOKENIZER), False)
        else:
            items.update({k: (items[k][0], True) for k in text})
    return items


def as_dict(items: dict, nest: bool) -> dict:
    """Overrides as papermill passes them: dotted keys, or sections nested ({'timeouts': {'decode': 5}})."""
    out: dict = {}
    for k, (v, _) in items.items():
        sec, _, sub = k.partition(".")
        if nest and sec in SECTIONS and sub and sec not in items:
            out.setdefault(sec, {})[sub] = v
        else:
            out[k] = v
    return out


def as_cli(items: dict) -> list[str]:
    """-p key=value strings, as typed on a command line."""
    return [f"{k}={v if isinstance(v, str) else repr(v) if isinstance(v, float) else v}" for k, (v, _) in items.items()]


def bad_keys(items: dict) -> list[str]:
    return [k for k, (_, bad) in items.items() if bad]


def names(msg: str, keys: list[str]) -> bool:
    """msg names one of keys: as is (a known key) or as the start of its repr (an unknown one; the CLI strips
    keys). The list of known keys that follows an unknown one doesn't count."""
    msg = msg.split("; known:")[0]
    return any(k in msg or repr(k)[:40] in msg or repr(k.strip())[:40] in msg for k in keys)


def one_line(msg: str) -> bool:
    return bool(msg.strip()) and len(msg.splitlines()) == 1 and "\n" not in msg and "\r" not in msg


def check_loaded(p: Params, items: dict) -> None:
    """The loader's own invariants, and the given values (coerced to the defaults' types) kept."""
    validate(p)
    assert set(p.to_dict()) == set(DEFAULTS)
    for s, ks in SECTIONS.items():
        assert set(p.to_dict()[s]) == set(ks)
    for k, (v, _) in items.items():
        sec, _, sub = k.partition(".")
        got, default = (getattr(getattr(p, sec), sub), DEFAULTS[sec][sub]) if sub else (getattr(p, k), DEFAULTS[k])
        assert type(got) is type(default), (k, got)
        assert got == (float(v) if isinstance(default, float) else v), (k, v, got)


# --- load_params ---------------------------------------------------------------------------------------
@fuzz(400)
@given(items=case(), form=st.sampled_from(["dict", "nested", "cli", "file"]))
def test_load_params_refuses_bad_in_one_line_and_accepts_good(items, form):
    with tempfile.TemporaryDirectory() as tmp:
        path = None
        if form == "cli":
            overrides = parse_overrides(as_cli(items))
        elif form == "file":
            data = as_dict(items, nest=True)
            text = yaml.safe_dump(data)  # ASCII: non-ASCII escaped, so e.g. NEL stays inside its key
            assume(set(yaml.safe_load(text)) == set(data))
            path = Path(tmp) / "p.yaml"
            path.write_text(text, encoding="utf-8")
            overrides = None
        else:
            overrides = as_dict(items, nest=form == "nested")
        bad = bad_keys(items)
        try:
            p = preflight(load_params(path, overrides))
        except ParamError as e:
            msg = str(e)
            assert one_line(msg), repr(msg)
            assert bad, f"refused good overrides {items!r}: {msg}"
            assert names(msg, bad), f"{msg!r} names none of {bad}"
            return
        assert not bad, f"accepted bad {bad} in {items!r}"
        check_loaded(p, items)


@fuzz(60)
@given(name=st.text(max_size=60), sub=st.sampled_from(["", "/params.yaml", "/x/y.yml"]))
def test_missing_params_file_is_one_line_naming_it(name, sub):
    path = f"{MISSING}/{name}{sub}"
    try:
        load_params(path)
    except ParamError as e:
        assert one_line(str(e)) and repr(path)[:40] in str(e), str(e)
    else:
        raise AssertionError(f"loaded a missing params file {path!r}")


# --- the CLI -------------------------------------------------------------------------------------------
def run_cli(args: list[str], out_root: str | None = None):
    """main(args) with run_probe/run_audit mocked; -o is a fresh, not yet existing folder unless out_root.
    Returns (rc, stdout, stderr, whether a fresh -o folder was created, calls of the mocks)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        run_dir = Path(tmp) / "elsewhere"
        run_dir.mkdir()
        (run_dir / "verdict.json").write_text(json.dumps({"verdict": "PASS_EQUIV", "reason": "mocked"}))
        probe = mock.Mock(return_value=run_dir)
        audit = mock.Mock(return_value=run_dir)
        so, se = io.StringIO(), io.StringIO()
        with mock.patch("greta.probe.runner.run_probe", probe), mock.patch("greta.audit.run_audit", audit), \
                contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
            rc = main([*args, "-o", str(out) if out_root is None else out_root])
        return rc, so.getvalue(), se.getvalue(), out.exists(), probe.call_args_list + audit.call_args_list


def assert_refused(rc, stdout, stderr, wrote, calls, what):
    assert rc == 2, (what, rc, stderr)
    assert stderr.endswith("\n") and one_line(stderr[:-1]) and stderr.startswith("greta: error:"), (what, stderr)
    assert stdout == "", (what, stdout)
    assert not wrote, f"{what}: something was written under -o"
    assert not calls, f"{what}: the probe was started"


def cli_args(items: dict) -> list[str]:
    out = []
    for p in as_cli(items):
        out += ["-p", p]
    return out


@fuzz(200)
@given(items=case(need_bad=True), cmd=st.sampled_from(["probe", "audit"]))
def test_cli_refuses_bad_params(items, cmd):
    rc, so, se, wrote, calls = run_cli([cmd, "-f", str(CPU_PARAMS), *cli_args(items)])
    assert_refused(rc, so, se, wrote, calls, items)
    assert names(se, bad_keys(items)), se


@fuzz(40)
@given(items=case(all_good=True), cmd=st.sampled_from(["probe", "audit"]))
def test_cli_runs_good_params_once(items, cmd):
    """The other half: good params reach the (mocked) run, with exactly what load_params makes of them."""
    args = cli_args(items)
    rc, so, se, wrote, calls = run_cli([cmd, "-f", str(CPU_PARAMS), *args])
    assert (rc, se) == (0, ""), se
    assert so.startswith("PASS_EQUIV: mocked")
    (call,) = calls
    want = load_params(CPU_PARAMS, parse_overrides([a for a in args if a != "-p"]))
    assert call.args[0] == want  # probe and audit alike take the params validated once (greta.audit.run_audit)


@fuzz(60)
@given(cmd=st.sampled_from(["probe", "audit"]), which=st.sampled_from(["params", "model", "prompt", "out"]),
       name=st.text(max_size=30))
def test_cli_paths_that_do_not_exist(cmd, which, name):
    missing = f"{MISSING}/{name}"
    out_root = None
    if which == "params":
        args = [cmd, "-f", missing]
    elif which == "out":  # -o naming an existing file, or nothing
        args, out_root = [cmd, "-f", str(CPU_PARAMS)], (str(CPU_PARAMS) if name else "")
    else:
        args = [cmd, "-f", str(CPU_PARAMS), "-p", f"{which}={missing}"]
    before = CPU_PARAMS.read_bytes()
    rc, so, se, wrote, calls = run_cli(args, out_root)
    assert_refused(rc, so, se, wrote, calls, args)
    assert CPU_PARAMS.read_bytes() == before
    if which in ("model", "prompt", "params"):
        assert which in se, se
    if which == "params":
        assert repr(missing)[:40] in se, se


@fuzz(60)
@given(argv=st.lists(st.sampled_from(["probe", "audit", "-p", "-f", "-o", "--bogus", "-x", "ctx=0", "x"]), max_size=5))
def test_cli_usage_errors_are_one_line(argv):
    """argparse's own refusals (no command, a flag without its value, unknown flags) are one line too."""
    rc, so, se, wrote, calls = run_cli(argv)
    if rc == 2:
        assert_refused(rc, so, se, wrote, calls, argv)
    else:  # e.g. a bare `probe`: valid, and the (mocked) probe ran once
        assert rc == 0 and len(calls) == 1 and se == "", (argv, rc, se)


# --- garbage params files ------------------------------------------------------------------------------
def nested(depth: int, key: str) -> str:
    return "".join(f"{'  ' * i}{key if i == 0 else 'a'}:\n" for i in range(depth)) + f"{'  ' * depth}1\n"


# keys for which 1..16 is good: a duplicate is then refused for being one, not for its value
DUP_KEYS = ["ctx", "seed", "prefill_chunk", "kv_block", "sampling_period_s", "timeouts.decode", "thresholds.max_abs_diff"]
garbage_yaml = st.one_of(
    st.binary(max_size=200).map(lambda b: b"\xff" + b),                              # not UTF-8
    st.binary(max_size=100).map(lambda b: b"ctx: 512\n\xc3(" + b),                   # junk after a good line
    st.one_of(st.lists(st.integers(), max_size=4), st.integers(), st.floats(allow_nan=False), st.booleans(),
              st.text(max_size=20)).map(lambda v: yaml.safe_dump(v).encode()),    # top level not a mapping
    st.integers(200, 1200).map(lambda n: ("[" * n + "]" * n).encode()),             # deep nesting
    st.integers(200, 3000).map(lambda n: ("{a: " * n + "1" + "}" * n).encode()),
    st.tuples(st.integers(60, 400), st.sampled_from(["ctx", "timeouts", "bogus"])).map(lambda t: nested(*t).encode()),
    st.tuples(st.sampled_from(DUP_KEYS), st.integers(1, 16), st.integers(1, 16)).map(   # duplicate keys
        lambda t: (f"{t[0]}: {t[1]}\nseed: 0\n{t[0]}: {t[2]}\n" if "." not in t[0] else
                   f"{t[0].split('.')[0]}: {{{t[0].split('.')[1]}: {t[1]}, {t[0].split('.')[1]}: {t[2]}}}\n").encode()),
    st.sampled_from(list(SECTIONS)).map(lambda s: f"{s}.{SECTIONS[s][0]}: 1\n{s}: {{{SECTIONS[s][0]}: 2}}\n".encode()),
    st.sampled_from([b"ctx: [1, 2\n", b"ctx: 1\n  gen: 2\n", b"\tctx: 1\n", b"ctx: !!python/object:os.system x\n",
                     b"ctx: 1" + b"0" * 5000 + b"\n", b"? [a, b]\n: 1\n", b"- a\n- b\n", b"ctx: 1\n---\ngen: 2\n",
                     b"\x00", b"ctx: \x07\n", b"ctx: &a [*a]\n", b"'\n"]),
)


@fuzz(150)
@given(content=garbage_yaml, cmd=st.sampled_from(["probe", "audit"]))
def test_garbage_params_file(content, cmd):
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "p.yaml"
        f.write_bytes(content)
        try:
            load_params(f)
        except ParamError as e:
            assert one_line(str(e)) and ("p.yaml" in str(e) or "ctx" in str(e)), str(e)
        else:
            raise AssertionError(f"loaded garbage {content[:80]!r}")
        assert_refused(*run_cli([cmd, "-f", str(f)]), content[:80])


@fuzz(100)
@given(content=st.text(max_size=200) | st.binary(max_size=200))
def test_random_params_file_loads_or_refuses_in_one_line(content):
    """Random text: usually refused, at times (empty, comments) valid; never a traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "p.yaml"
        f.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        try:
            p = load_params(f)
        except ParamError as e:
            assert one_line(str(e)), str(e)
        else:
            validate(p)
