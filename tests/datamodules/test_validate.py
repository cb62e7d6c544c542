import json
import subprocess
import sys

import pytest

from datamodules.validate import main
from tests.conftest import REPO_ROOT
from tests.datamodules.synth import FAULTS, corrupt_shard, make_source


def test_clean_source_passes_from_the_command_line(tmp_path):
    make_source(tmp_path / "good", "good", 3)
    out = subprocess.run([sys.executable, "-m", "datamodules.validate", str(tmp_path / "good")], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
    total = sum(s["samples"] for s in json.loads((tmp_path / "good" / "index.json").read_text())["shards"])
    assert f"{total}/{total}" in out.stderr, out.stderr  # the progress bar, on stderr


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_is_reported_with_file_and_key(tmp_path, capsys, fault):
    src = make_source(tmp_path / "bad", "bad", 4, samples_per_shard=100)
    shard = src / "shard-000000.tar"
    key = corrupt_shard(shard, fault)
    assert main(["--no-checksums", str(src)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if fault in line]
    assert lines and all(str(shard) in line for line in lines), err
    if key is not None:
        assert any(key in line for line in lines), err


def test_checksum_and_missing_sidecar_are_reported(tmp_path, capsys):
    src = make_source(tmp_path / "s", "s", 2, samples_per_shard=100)
    corrupt_shard(src / "shard-000000.tar", "non_finite")
    (tmp_path / "empty").mkdir()
    assert main([str(src), str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "checksum" in err and "index.json is missing" in err


def test_non_finite_statistics_are_reported_with_file_and_key(tmp_path, capsys):
    import json

    src = make_source(tmp_path / "s", "s", 2, samples_per_shard=100)
    stats = json.loads((src / "stats.json").read_text())
    stats["actions"]["std"][0] = float("inf")
    stats["state"]["quantiles"][3] = [float("nan")] * len(stats["state"]["quantiles"][3])
    (src / "stats.json").write_text(json.dumps(stats))
    assert main([str(src)]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "non_finite_stats" in line]
    assert len(lines) == 2 and all(line.startswith(f"{src / 'stats.json'}: ") for line in lines), lines
    assert any("actions.std: non_finite_stats: [0]=inf" in line for line in lines), lines
    assert any("state.quantiles: non_finite_stats: [3][0]=nan" in line for line in lines), lines


def test_decode_every_decodes_a_stride_but_still_counts_and_checksums_every_sample(tmp_path, monkeypatch):
    import datamodules.validate as validate

    src = make_source(tmp_path / "s", "s", 3, samples_per_shard=100)
    decoded = []
    real = validate.decode_sample
    monkeypatch.setattr(validate, "decode_sample", lambda raw, meta: decoded.append(raw["__key__"]) or real(raw, meta))
    problems, total = validate.validate_source(src, decode_every=4)
    assert problems == [] and total > 4 and len(decoded) == -(-total // 4)
    corrupt_shard(src / "shard-000000.tar", "non_finite")
    assert any("checksum" in p for p in validate.validate_source(src, decode_every=10_000)[0])
    with pytest.raises(ValueError, match=r"decode_every=...\) must be >= 1, got 0"):
        validate.validate_source(src, decode_every=0)
