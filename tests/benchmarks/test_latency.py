"""Latency-vs-context benchmark: argument checks, summaries, the eviction guard and one tiny
end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import latency as lat
from benchmarks.common import engine_runs as er
from benchmarks.common.engine_runs import KVGeometry

TINY = KVGeometry(num_layers=4, num_kv_heads=2, head_dim=64, max_context=4096)


def test_check_lengths() -> None:
    assert lat.check_lengths([512, 8128], 64, 8192) is None
    problem = lat.check_lengths([512, 8192], 64, 8192)
    assert "8192 + output 64 = 8256 tokens exceeds the model's 8192-token context" in problem
    assert "largest context allowed is 8128" in problem
    assert "decode needs >= 2 tokens" in lat.check_lengths([512], 1, 8192)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--contexts", "512", "0"], "--contexts: 0 is invalid: it must be an integer >= 1"),
        (["--contexts", "1k"], "'1k' is not an integer"),
        (["--repeats", "0"], "--repeats: 0 is invalid"),
        (["--cases", "crystal:-1"], "POLICY:BUDGET with BUDGET >= 1"),
        (["--block-size", "20"], "block size 20 is invalid"),
    ],
)
def test_parser_rejects_bad_values(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exc:
        lat.build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_parser_defaults_and_help() -> None:
    parser = lat.build_parser()
    args = parser.parse_args([])
    assert args.cases == [("none", None), ("crystal", 256), ("crystal", 1024)]
    assert args.contexts == [512, 1024, 2048, 4096, 8128] and args.output_len == 64
    assert all(action.help for action in parser._actions)


def test_context_too_long_for_the_model(capsys: pytest.CaptureFixture, tiny_model) -> None:
    with pytest.raises(SystemExit):
        lat.main(["--model", str(tiny_model), "--contexts", "4096", "--output-len", "8"])
    assert "largest context allowed is 4088" in capsys.readouterr().err


def _run(ttft: float, tpot: float, blocks: int, head_blocks: int | None) -> dict:
    return {
        "ttft_s": ttft,
        "tpot_s": tpot,
        "cpu_ttft_s": ttft / 2,
        "cpu_tpot_s": tpot / 2,
        "peak_blocks": blocks,
        "peak_head_blocks": head_blocks,
    }


def test_summarize_takes_medians_and_counts_bytes() -> None:
    runs = [_run(1.0, 0.02, 5, 12), _run(3.0, 0.05, 5, 14), _run(2.0, 0.04, 5, 13)]
    m = lat.summarize("crystal", {"context": 128, "runs": runs, "evictions": 9}, TINY, 32)
    assert m["ttft_median_s"] == 2.0 and m["tpot_median_s"] == 0.04
    assert m["decode_tok_s"] == pytest.approx(25.0)
    assert m["cpu_tpot_median_s"] == 0.02 and m["cpu_decode_tok_s"] == pytest.approx(50.0)
    assert m["peak_kv_bytes"] == 14 * TINY.head_block_bytes(32)
    assert m["evictions"] == 9
    none = [_run(1.0, 0.05, 5, None)]
    m = lat.summarize("none", {"context": 128, "runs": none, "evictions": None}, TINY, 32)
    assert m["peak_kv_bytes"] == 5 * TINY.block_bytes(32)


def _measured(evictions: list[int | None]) -> dict:
    runs = [_run(0.1, 0.01, 3, 8)]
    return {
        "ops": None,
        "torch_threads": 1,
        "measurements": [
            {"context": c, "runs": runs, "evictions": e}
            for c, e in zip([64, 128], evictions, strict=True)
        ],
    }


def test_driver_fails_when_a_long_context_evicted_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model
) -> None:
    # Context 64 fits a budget of 100, so evicting nothing there is fine; 128 does not.
    monkeypatch.setattr(er, "run_worker", lambda *a: _measured([0, 0]))
    argv = ["--model", str(tiny_model), "--cases", "crystal:100", "--contexts", "64", "128"]
    with pytest.raises(SystemExit, match="context 128 > budget 100 but it evicted nothing"):
        lat.main([*argv, "--output-len", "8", "--results-dir", str(tmp_path)])
    monkeypatch.setattr(er, "run_worker", lambda *a: _measured([0, 5]))
    lat.main([*argv, "--output-len", "8", "--results-dir", str(tmp_path), "--name", "unit"])
    (path,) = tmp_path.glob("*_unit.json")
    (case,) = json.loads(path.read_text())["cases"]
    assert [m["evictions"] for m in case["contexts"]] == [0, 5]
    assert "| crystal:100 | 128 | 100.00 | n/a | 10.00 | 200.00 | n/a |" in (
        path.with_suffix(".md").read_text()
    )


@pytest.mark.slow
def test_latency_smoke(tmp_path: Path) -> None:
    lat.main(
        [
            "--model",
            "tiny",
            "--cases",
            "none",
            "crystal:32",
            "--contexts",
            "48",
            "160",
            "--output-len",
            "6",
            "--repeats",
            "2",
            "--results-dir",
            str(tmp_path),
            "--name",
            "smoke",
        ]
    )
    (path,) = tmp_path.glob("*_smoke.json")
    record = json.loads(path.read_text())
    none, crystal = record["cases"]
    assert record["machine"]["cores_usable"] >= 1
    assert [m["context"] for m in none["contexts"]] == [48, 160]
    for case in (none, crystal):
        for m in case["contexts"]:
            assert len(m["runs"]) == 2
            assert m["decode_tok_s"] > 0 and m["ttft_median_s"] > 0
            assert not math.isnan(m["tpot_median_s"])
            # One thread in the engine process: CPU time cannot exceed wall time by much.
            assert 0 < m["cpu_tpot_median_s"] <= 1.5 * m["tpot_median_s"]
    assert crystal["contexts"][1]["evictions"] > 0
    # At 160 tokens vanilla holds 6 blocks; crystal:32 at most ~2 head-blocks per head.
    assert none["contexts"][1]["peak_kv_bytes"] == 6 * TINY.block_bytes(32)
    assert crystal["contexts"][1]["peak_kv_bytes"] < none["contexts"][1]["peak_kv_bytes"]
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
