"""benchmarks/_common.py's results files: every run is appended, none overwritten."""

import json

import pytest

from benchmarks import _common as C


def _env(date: str, commit: str) -> dict:
    return {"device": "test cpu", "device_type": "cpu", "torch": "t", "triton": "tr", "cuda": "none",
            "python": "3", "date": date, "command": "python -m benchmarks.x", "git_commit": commit}


def test_write_results_appends_runs_and_sections(tmp_path):
    first = [C.Row(kernel="plain", provider="a", size="s", p50_ms=1.0)]
    second = [C.Row(kernel="plain", provider="a", size="s", p50_ms=2.0)]
    C.write_results("bench", first, _env("2026-12-01T00:00:00", "aaa"), "| x |\n", tmp_path, {"run": 1})
    json_path, md_path = C.write_results("bench", second, _env("2026-12-02T00:00:00", "bbb"), "| y |\n",
                                         tmp_path, {"run": 2})
    runs = C.read_runs(json_path)
    assert [r["summary"]["run"] for r in runs] == [1, 2]
    assert [r["rows"][0]["p50_ms"] for r in runs] == [1.0, 2.0]
    assert runs[1]["rows"][0]["git_commit"] == "bbb" and runs[1]["rows"][0]["date"] == "2026-12-02T00:00:00"
    assert C.latest_run(json_path)["summary"] == {"run": 2}
    text = md_path.read_text()
    assert text.index("commit aaa") < text.index("| x |") < text.index("commit bbb") < text.index("| y |")


def test_a_single_run_file_from_before_appending_is_kept(tmp_path):
    old = {"environment": _env("2026-11-01T00:00:00", "old"), "summary": {"run": 0}, "rows": []}
    (tmp_path / "bench.json").write_text(json.dumps(old))
    (tmp_path / "bench.md").write_text("old table\n")
    json_path, md_path = C.write_results("bench", [], _env("2026-12-01T00:00:00", "new"), "new table", tmp_path)
    assert [r["environment"]["git_commit"] for r in C.read_runs(json_path)] == ["old", "new"]
    text = md_path.read_text()
    assert text.index("old table") < text.index("new table")


def test_a_table_whose_json_is_missing_is_appended_to_not_overwritten(tmp_path):
    C.write_results("bench", [], _env("2026-12-01T00:00:00", "aaa"), "first table", tmp_path)
    (tmp_path / "bench.json").unlink()
    _, md_path = C.write_results("bench", [C.Row(kernel="k", provider="p", size="s")],
                                 _env("2026-12-02T00:00:00", "bbb"), "second table", tmp_path)
    text = md_path.read_text()
    assert text.count("# bench: every run") == 1
    assert text.index("commit aaa") < text.index("first table") < text.index("commit bbb") < text.index("second table")
    assert C.read_runs(tmp_path / "bench.json")[0]["rows"][0]["python"] == "3"  # each row carries its versions


def test_latest_run_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        C.latest_run(tmp_path / "nothing.json")


def test_name_pairs_maps_each_item_and_names_the_form_on_a_malformed_one():
    from benchmarks._common import name_pairs

    assert name_pairs(["a=b", "c=d=e"]) == {"a": "b", "c": "d=e"}
    assert name_pairs([]) == {}
    for bad in ("no-equals", "=b", "a="):
        with pytest.raises(ValueError, match="expected --alias NAME=AS"):
            name_pairs([bad], "--alias NAME=AS")


def test_the_commit_is_marked_dirty_by_code_edits_not_by_appended_results(tmp_path):
    """Benchmark rows name the commit they measured; an uncommitted edit of code, or a new file not yet
    committed, marks it ``+dirty``; rows appended or new under a result directory and ignored build
    outputs do not (the GPU suite's rows once named a stale commit; three benchmarks' first rows named
    the commit before their own script)."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    rows = tmp_path / "benchmarks" / "results" / "rows.jsonl"
    rows.parent.mkdir(parents=True)
    rows.write_text("{}\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "init")
    clean = C.git_commit(str(tmp_path))
    assert len(clean) == 12 and not clean.endswith("+dirty")
    rows.write_text("{}\n{}\n")
    assert C.git_commit(str(tmp_path)) == clean
    (tmp_path / "benchmarks" / "results" / "new_rows.jsonl").write_text("{}\n")
    (tmp_path / ".gitignore").write_text("built/\n")
    git("add", ".gitignore")
    git("commit", "-qm", "ignore")
    clean = C.git_commit(str(tmp_path))
    (tmp_path / "built").mkdir()
    (tmp_path / "built" / "ext.so").write_text("")
    assert C.git_commit(str(tmp_path)) == clean
    (tmp_path / "new_bench.py").write_text("x = 1\n")
    assert C.git_commit(str(tmp_path)) == clean + "+dirty"
    (tmp_path / "new_bench.py").unlink()
    (tmp_path / "code.py").write_text("x = 2\n")
    assert C.git_commit(str(tmp_path)) == clean + "+dirty"
    assert C.git_commit(str(tmp_path / "missing")) == "unknown"


CPUINFO = """processor\t: 0
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
microcode\t: 0x1000065
flags\t\t: fpu sse2 avx512f
processor\t: 1
cpu family\t: 25
model\t\t: 17
flags\t\t: fpu sse2 avx512f
"""


def test_the_cpu_fingerprint_tells_machines_the_model_name_does_not():
    """Quality NOTES section 74: two machines named "AMD EPYC" gave different bits; the fingerprint reads what
    differs (family/model/stepping, microcode, flags), from the first processor, flags in any order."""
    base = C.cpu_fingerprint(CPUINFO)
    assert base.startswith("family/model/stepping 25/17/1, microcode 0x1000065, torch dispatch ")
    assert C.cpu_fingerprint(CPUINFO.replace("fpu sse2 avx512f", "avx512f fpu sse2", 1)) == base
    for other in (CPUINFO.replace("model\t\t: 17", "model\t\t: 1", 1), CPUINFO.replace("0x1000065", "0x1000066"),
                  CPUINFO.replace("fpu sse2 avx512f", "fpu sse2", 1)):
        assert C.cpu_fingerprint(other) != base
    assert C.cpu_fingerprint("").startswith("processor ") and "(no /proc/cpuinfo)" in C.cpu_fingerprint("")
    arm = "CPU implementer\t: 0x41\nCPU part\t: 0xd0c\nCPU variant\t: 0x3\nCPU revision\t: 1\nFeatures\t: fp asimd\n"
    assert C.cpu_fingerprint(arm).startswith("implementer/part/variant/revision 0x41/0xd0c/0x3/1, microcode ?")
    assert C.cpu_fingerprint(arm.replace("0xd0c", "0xd40")) != C.cpu_fingerprint(arm)
    assert C.cpu_fingerprint(arm.replace("fp asimd", "fp asimd sve")) != C.cpu_fingerprint(arm)
    assert C.environment("cpu")["cpu"] == C.cpu_fingerprint()


def test_the_argparse_types_refuse_bad_values_by_name(tmp_path):
    """The benchmarks' shared flag types: each refusal says what was wrong with the value."""
    import argparse

    assert C.positive_int("3") == 3 and C.int_at_least(0)("0") == 0 and C.positive_float("0.5") == 0.5
    assert C.comma_list(" a, b,,") == ["a", "b"]
    refused = [(C.positive_int, "0", "at least 1, got 0"), (C.positive_int, "-5", "at least 1, got -5"),
               (C.positive_int, "x", "expected an integer, got 'x'"), (C.int_at_least(2), "1", "at least 2, got 1"),
               (C.positive_float, "0", "> 0"), (C.positive_float, "nan", "> 0"), (C.positive_float, "inf", "> 0"),
               (C.comma_list, "", "names none"), (C.comma_list, ",", "names none"),
               (C.output_dir, "", "$OUT"), (C.output_dir, "  ", "$OUT"), (C.output_file, "", "$OUT")]
    for parse, text, message in refused:
        with pytest.raises(argparse.ArgumentTypeError, match=__import__("re").escape(message)):
            parse(text)
    a_file = tmp_path / "results.txt"
    a_file.write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="is a file, not a directory"):
        C.output_dir(str(a_file))
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory, not a file"):
        C.output_file(str(tmp_path))
    assert C.output_dir(str(tmp_path / "new")) == tmp_path / "new" and C.output_file(str(a_file)) == a_file


@pytest.mark.parametrize("text", ['{"runs": [', "[1, 2]", "\xff"])
def test_a_damaged_results_file_is_named(tmp_path, text):
    path = tmp_path / "bench.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=f"{path} is not a results file"):
        C.read_runs(path)
    with pytest.raises(ValueError, match="bench.json is not a results file"):
        C.write_results("bench", [], _env("2026-12-01T00:00:00", "aaa"), "table", tmp_path)
    assert path.read_bytes() == text.encode("latin-1")  # left as it was


def test_without_git_the_commit_is_the_one_the_caller_gave(tmp_path, monkeypatch):
    """A borrowed GPU machine gets the checkout's files, not .git: its rows said "unknown" with no way to
    name the commit measured. SALSA_FUSED_COMMIT names it there; git, where there is one, comes first."""
    (tmp_path / "code.py").write_text("x = 1\n")
    monkeypatch.delenv("SALSA_FUSED_COMMIT", raising=False)
    assert C.git_commit(str(tmp_path)) == "unknown"
    monkeypatch.setenv("SALSA_FUSED_COMMIT", "1789ac0abc12")
    assert C.git_commit(str(tmp_path)) == "1789ac0abc12"
    assert C.git_commit() != "1789ac0abc12"  # this checkout has git
