"""The ``hidden-align`` command: help of every subcommand, ``doctor`` and ``bench --quick``, run
as a user runs them (``python -m hidden_align`` in a fresh process), and the doctor's exit status
when a check fails (in-process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hidden_align
from hidden_align import cli, doctor

# The subprocess imports the same hidden_align as this test process, wherever it comes from
# (the source tree with its built extension, or an installed copy).
PACKAGE_ROOT = str(Path(hidden_align.__file__).resolve().parents[1])


def run_cli(*args, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    env.pop("HIDDEN_ALIGN_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-m", "hidden_align", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_help():
    done = run_cli("--help")
    assert done.returncode == 0, done.stderr
    for word in ("demo", "bench", "doctor"):
        assert word in done.stdout


@pytest.mark.parametrize("command", ["demo", "bench", "doctor"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: hidden-align {command}")


def test_doctor():
    done = run_cli("doctor")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for section in ("versions", "backends", "CUDA", "kernels", "self-check"):
        assert f"\n{section}\n" in f"\n{out}", out
    assert f"ok    hidden_align: {hidden_align.__version__}" in out
    assert "ok    cpu: loss, policy_loss" in out  # the CPU self-check ran and passed
    assert "FAIL" not in out
    assert out.rstrip().endswith("0 failed")


def test_bench_quick_table(capsys):
    assert cli.main(["bench", "--quick", "--ops", "loss", "find_anchors", "overlong"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = "| op | shape | provider | provider ms | hidden_align ms | ratio | floor MB | "
    assert lines[3] == header + "of read bandwidth | note |"
    # The header names the SIMD level in use and the measured read bandwidth.
    level = hidden_align.simd_levels()["level"]
    assert f"hidden_align SIMD {level}), read bandwidth " in lines[1]
    body = "\n".join(lines[5:])
    fractions = [float(row.split(" | ")[-2].rstrip("%")) for row in lines[5:] if row]
    assert fractions and all(f >= 0 for f in fractions)
    for op in ("loss fwd+bwd", "find_anchors", "overlong_penalty"):
        assert f"| {op} |" in body
    assert "group_advantages" not in body


def test_bench_quick_json():
    done = run_cli("bench", "--quick", "--json", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["device"] == "cpu" and result["quick"] and result["compile"].startswith("off")
    assert result["versions"]["hidden_align"] == hidden_align.__version__
    ops = {row["op"] for row in result["rows"]}
    assert ops == {
        "loss fwd+bwd",
        "find_anchors",
        "group_advantages",
        "policy_loss fwd+bwd",
        "dynamic_sampling_mask",
        "overlong_penalty",
    }
    for row in result["rows"]:
        assert set(row) >= {"op", "shape", "provider", "provider_ms", "hidden_align_ms", "ratio"}
        assert row["provider_ms"] > 0 and row["hidden_align_ms"] > 0 and row["ratio"] > 0
        assert row["note"] == "", row  # every reference agreed with hidden_align's values
    providers = {(row["op"], row["provider"]) for row in result["rows"]}
    assert ("loss fwd+bwd", "eager float64") in providers
    if result["versions"]["verl"]:
        assert ("group_advantages", "verl grpo") in providers
        assert ("policy_loss fwd+bwd", "verl vanilla") in providers


def test_bench_rejects_unusable_device(capsys):
    assert cli.main(["bench", "--quick", "--device", "tpu"]) == 2
    assert "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err


def test_doctor_fails_when_a_check_fails(monkeypatch, capsys):
    def broken():
        return [doctor.Check("self-check", "cpu", doctor.FAIL, "loss value: max abs error 1")]

    monkeypatch.setattr(doctor, "check_self", broken)
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  cpu: loss value" in out and "1 failed" in out


def test_doctor_reports_a_check_that_raises(monkeypatch, capsys):
    def raises():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(doctor, "check_cuda_libraries", raises)
    assert cli.main(["doctor", "--json"]) == 1
    checks = json.loads(capsys.readouterr().out)
    failed = [c for c in checks if c["status"] == "FAIL"]
    assert failed == [
        {
            "section": "cuda libraries",
            "name": "check",
            "status": "FAIL",
            "detail": "RuntimeError: driver exploded",
        }
    ]


def test_demo_missing_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_demo_module", lambda: (None, "no demo here"))
    assert cli.main(["demo"]) == 2
    assert "hidden-align demo: no demo here" in capsys.readouterr().err
