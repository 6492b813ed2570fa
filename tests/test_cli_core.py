"""Bad input to the core commands: one line, non-zero exit, no stack trace."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tokenskip.cli import main


def run(args):
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


def assert_one_line_error(code, output, *needles):
    assert code != 0
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("Error:"), output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in lines[0], output


def test_help_lists_commands_with_examples():
    code, out = run(["--help"])
    assert code == 0 and "pipeline" in out and "eval" in out
    code, out = run(["eval", "--help"])
    assert code == 0 and "Examples:" in out and "tokenskip eval --router static --sparsity 0.3" in out


def test_missing_model_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    assert_one_line_error(*run(["eval", "--model", str(missing), "--sparsity", "0.3"]), str(missing))


def test_folder_without_config(tmp_path):
    assert_one_line_error(*run(["eval", "--model", str(tmp_path), "--sparsity", "0.3"]), "config.json")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert_one_line_error(*run(["eval", "--model", str(tmp_path), "--sparsity", "0.3"]), "gpt2", "not supported")


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5", "nan"])
def test_sparsity_out_of_range(value):
    assert_one_line_error(*run(["eval", "--sparsity", value]), "--sparsity")


@pytest.mark.parametrize("command", ["report", "pipeline"])
@pytest.mark.parametrize("args,needle", [
    (["--longctx", "needle,bogus"], "bogus: choose from needle, kv_lookup, article_qa"),
    (["--longctx", ","], "(empty): choose from"),
    (["--longctx-lengths", "512,abc"], "give comma-separated integers"),
    (["--longctx-lengths", "128"], "must be >= 256"),
    (["--longctx-examples", "0"], "0 is not in the range x>=1"),
])
def test_longctx_flags_are_range_checked_by_click(command, args, needle, tmp_path):
    """The long-prompt options are shared by `report` and `pipeline` and checked before any work."""
    paths = [str(tmp_path / "fit")] if command == "report" else ["--out", str(tmp_path / "out")]
    code, out = run([command, *paths, *args])
    assert code == 2 and f"Invalid value for '{args[0]}'" in out and needle in out, out
    assert "Traceback" not in out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["report", "pipeline"])
def test_longctx_and_no_longctx_contradict(command, tmp_path):
    paths = [str(tmp_path / "fit")] if command == "report" else ["--out", str(tmp_path / "out")]
    assert_one_line_error(*run([command, *paths, "--longctx", "needle", "--no-longctx"]), "--longctx and --no-longctx")


def test_unknown_schedule_file(tmp_path):
    assert_one_line_error(*run(["eval", "--schedule", str(tmp_path / "s.json")]), "s.json")


@pytest.mark.slow
@pytest.mark.parametrize("content,needle", [(b"", "empty"), (b"   \n\t ", "empty"), (b"\xff\xfe\xfa bad", "UTF-8")])
def test_bad_text_file(tmp_path, content, needle):
    path = tmp_path / "text.txt"
    path.write_bytes(content)
    code, out = run(["eval", "--sparsity", "0.3", "--text", str(path)])
    assert_one_line_error(code, out, str(path))
    assert needle.lower() in out.lower()


@pytest.mark.slow
def test_missing_text_file(tmp_path):
    assert_one_line_error(*run(["eval", "--sparsity", "0.3", "--text", str(tmp_path / "nope.txt")]), "nope.txt")


@pytest.mark.slow
def test_static_beats_random_at_0_3_with_flops():
    """On smollm2-135m at overall 0.3, static routing is far better than random, same FLOPs."""
    rows = {}
    for router in ("static", "random"):
        code, out = run(["eval", "--router", router, "--sparsity", "0.3", "--windows", "4", "--json"])
        assert code == 0, out
        data = json.loads(out)
        rows[router] = data["results"][1]
        assert data["results"][0]["method"] == "dense"
    static, random = rows["static"], rows["random"]
    print(f"\nstatic ppl {static['ppl']:.2f} KL {static['kl']:.4f} FLOPs {static['flops']:.3f}; "
          f"random ppl {random['ppl']:.2f} KL {random['kl']:.4f} FLOPs {random['flops']:.3f}")
    assert static["ppl"] < random["ppl"] and static["kl"] < random["kl"]
    assert static["flops"] == pytest.approx(random["flops"]) and static["flops"] < 0.8
    assert static["sparsity"] == pytest.approx(0.3, abs=0.01)
